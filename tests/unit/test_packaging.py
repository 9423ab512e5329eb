"""Packaging for clusters (issue 9 item 6): no MPI among the hard dependencies.

``pip install hpcckpt`` must not bring an MPI that shadows a cluster's own; the embedded
MPICH is the ``mpich`` extra, which ``make`` installs for the README's two commands.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_mpich_is_an_extra_and_h5py_not_a_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    hard = _names(project["dependencies"])
    assert "mpich" not in hard and "h5py" not in hard, sorted(hard)
    assert "mpi4py" in hard
    assert _names(project["optional-dependencies"]["mpich"]) == {"mpich"}


def test_make_installs_the_mpich_extra():
    make = (REPO / "Makefile").read_text()
    extras = re.search(r"^EXTRAS \?= (.+)$", make, re.M).group(1).split(",")
    assert "mpich" in extras, extras
    assert "pip install -e '.[$(EXTRAS)]'" in make


def test_no_loadable_mpi_is_one_clear_line(tmp_path):
    """mpi4py without any libmpi (the cluster path gone wrong): what to install or load."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "HYDRA_"))}
    env["MPI4PY_LIBMPI"] = str(tmp_path / "libmpi.so")
    p = subprocess.run([sys.executable, "-m", "hpcckpt", "inspect", str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.splitlines() == [
        f"hpcckpt inspect: error: mpi4py cannot load an MPI library ({tmp_path}/libmpi.so: "
        "cannot open shared object file: No such file or directory): install the embedded "
        "MPICH with pip install 'hpcckpt[mpich]', or make the site's MPI loadable (module "
        "load, or MPI4PY_LIBMPI=/path/to/libmpi.so); see the README's Dependencies"]
