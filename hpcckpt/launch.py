"""The launch check (SPEC 3): refuse to run when the launcher and the MPI world disagree."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from .errors import LaunchError

_SIZE_VARS = ("SLURM_NTASKS", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
#: variables an MPI launcher sets for its processes: a job started from inside one (the
#: demo, the benchmarks) would otherwise join the outer job instead of starting its own
_JOB_VAR_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "OMPI_")


def check_launch(world_size: int, environ=os.environ) -> None:
    """E.g. ``SLURM_NTASKS=8`` with a world of 1 means the command was not started by srun
    (or mpi4py is linked to another MPI than the launcher's): every process would do the
    whole job alone. ``HPCCKPT_SKIP_LAUNCH_CHECK=1`` turns the check off."""
    if environ.get("HPCCKPT_SKIP_LAUNCH_CHECK") == "1":
        return
    for var in _SIZE_VARS:
        value = environ.get(var)
        if value and value.isdigit() and int(value) != world_size:
            raise LaunchError(
                f"{var}={value} but the MPI world has {world_size} rank(s): launch with "
                f"`srun` or `mpiexec -n {value}` using the MPI that mpi4py was built against "
                "(or set HPCCKPT_SKIP_LAUNCH_CHECK=1)")


def nested_launch_env() -> dict[str, str]:
    """``os.environ`` for an ``mpiexec`` started by this process: without the variables
    of the MPI job this process may itself be part of."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_JOB_VAR_PREFIXES)}


def find_mpiexec() -> str:
    """mpiexec next to the running interpreter (the mpich wheel's), else the one on PATH."""
    cand = Path(sys.executable).parent / "mpiexec"
    if cand.exists() and os.access(cand, os.X_OK):
        return str(cand)
    found = shutil.which("mpiexec")
    if found is None:
        raise LaunchError("no mpiexec next to the Python interpreter nor on PATH "
                          "(install the `mpich` wheel or load your MPI module)")
    return found
