"""The README's Walkthrough, run as written on what ``make demo`` leaves behind.

The demo is run as the Makefile's ``demo`` target runs it (``--workdir demo --keep``) but on
a small model; then every command of the Walkthrough's shell block runs, from the
directory holding ``demo/``, with the venv's ``bin`` on PATH (what ``make shell`` or
``. .venv/bin/activate`` gives). A README edit that breaks a command fails here.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import clean_env

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def walkthrough_commands() -> list[list[str]]:
    """The commands of the first ``sh`` block in the README's Walkthrough section."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Walkthrough"):]
    section = section[:section.index("\n## ", 1)]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [words for line in block.splitlines() if (words := shlex.split(line, comments=True))]


def make_demo_recipe() -> list[str]:
    """The Makefile's ``demo`` recipe with its variables filled in."""
    make = (REPO / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n\t(.+)$", make, re.M).group(1)
    demo_dir = re.search(r"^DEMO_DIR \?= (.+)$", make, re.M).group(1)
    words = shlex.split(recipe.replace("$(DEMO_DIR)", demo_dir))
    assert words[0] == "$(PY)", recipe
    return [sys.executable] + words[1:]


@pytest.mark.timeout(600)
def test_readme_walkthrough_runs_on_demo_output(tmp_path):
    env = clean_env({"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    demo = make_demo_recipe() + ["--size-mb", "2", "--shard-mb", "1"]
    assert demo[demo.index("--workdir") + 1] == "demo" and "--keep" in demo
    p = subprocess.run(demo, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "round trip bit-exact: yes" in p.stdout
    kept = sorted(os.listdir(tmp_path / "demo"))
    assert kept == sorted([".hpcckpt-demo", "dist", "hf_model", "merged", "strategy.yaml",
                           "tp4.yaml"]), kept
    # what the demo says next is what works next
    assert "hpcckpt strategy show demo/strategy.yaml --tensor " \
           "model.layers.0.mlp.down_proj.weight" in p.stdout

    commands = walkthrough_commands()
    assert [c[0] for c in commands] == ["hpcckpt"] + ["mpiexec"] * 4 + ["hpcckpt"]
    out = []
    for words in commands:
        assert shutil.which(words[0], path=env["PATH"]), words[0]
        p = subprocess.run(words, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, f"{shlex.join(words)}: exit {p.returncode}\n{p.stdout}{p.stderr}"
        out.append(p.stdout)
    from hpcckpt.demo import compare_checkpoints, tensor_locations
    model = tmp_path / "demo" / "hf_model"
    count, _, problems = compare_checkpoints(model, tmp_path / "demo" / "my_merged")
    assert problems == [] and count == len(tensor_locations(model)) > 0
    assert out[0].splitlines()[1].startswith("  rank    0 (pp=0 dp=0 tp=0): "), out[0]
    assert "identical to demo/hf_model/: " in out[4], out[4]
    assert f"{'complete':>18}: True" in out[5].splitlines(), out[5]

    # the next demo run starts by emptying its own directory, walkthrough outputs included
    from hpcckpt.demo import prepare_workdir
    prepare_workdir(tmp_path / "demo")
    assert os.listdir(tmp_path / "demo") == [".hpcckpt-demo"]


def test_demo_refuses_a_directory_it_did_not_make(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "thesis.tex").write_text("precious")
    p = subprocess.run(make_demo_recipe(), cwd=tmp_path, env=clean_env(), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1
    assert p.stderr.splitlines() == [f"demo: {tmp_path / 'demo'} is not empty and was not made "
                                     "by the demo; choose another --workdir"]
    assert os.listdir(tmp_path / "demo") == ["thesis.tex"]


def test_make_shell_puts_hpcckpt_and_mpiexec_on_path():
    venv = Path(sys.prefix)
    make = shutil.which("make")
    if make is None or not (venv / ".installed").exists():
        pytest.skip("needs make and a venv made by `make venv`")
    if subprocess.run([make, "-q", f"VENV={venv}", f"{venv}/.installed"], cwd=REPO,
                      capture_output=True).returncode != 0:
        pytest.skip("the venv is older than pyproject.toml: `make venv` would reinstall it")
    env = clean_env({"SHELL": "/bin/sh", "PATH": "/usr/bin:/bin"})
    p = subprocess.run([make, "-s", f"VENV={venv}", "shell"], cwd=REPO, env=env, text=True,
                       input="command -v hpcckpt; command -v mpiexec\n", capture_output=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [str(venv / "bin" / "hpcckpt"), str(venv / "bin" / "mpiexec")]
