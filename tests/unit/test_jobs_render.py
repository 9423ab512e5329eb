"""SLURM job templates: rendering against committed golden scripts, and its refusals.

Refresh the golden files after changing a template or the renderer on purpose:
    HPCCKPT_REFRESH_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_jobs_render.py
then review `git diff tests/golden/jobs` before committing.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcckpt.errors import UsageError
from hpcckpt.jobs import JobOptions, render, template_dir, templates
from hpcckpt.jobs.render import render_text

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden" / "jobs"
REFRESH = "HPCCKPT_REFRESH_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_jobs_render.py"
VERBS = ("convert", "load", "merge", "reshard", "save", "split", "verify")

BASE = dict(nodes=2, tasks_per_node=4, time="00:30:00", partition="debug", account="proj42",
            mpi="pmi2", env="/opt/hpcckpt-venv", log_dir="/scratch/logs")
ARGS = {
    "split": ["/data/hf_model", "/scratch/dist", "--strategy", "/data/s.yaml", "--dedup"],
    "merge": ["/scratch/dist", "/scratch/merged", "--max-shard-size", "2GB"],
    "reshard": ["/scratch/dist", "/scratch/dist_tp4", "--strategy", "/data/tp4.yaml"],
    "load": ["/scratch/dist", "--strategy", "/data/s.yaml", "--against", "/data/hf_model"],
    "verify": ["/scratch/dist", "--deep"],
    "convert": ["/data/legacy.ckpt", "/scratch/converted"],
    "save": ["python", "train.py", "--config", "/data/run 1.yaml"],
}
#: golden file name -> (verb, args, JobOptions)
CASES = {
    **{v: (v, ARGS[v], JobOptions(**BASE, command=f"hpcckpt jobs render {v} ...")) for v in VERBS},
    "reshard-node-local": ("reshard", ["/local/{rank}/ckpt", "/local/{rank}/ckpt_tp4", "--strategy",
                                       "/shared/tp4.yaml", "--node-local"],
                           JobOptions(nodes=4, tasks_per_node=1, mpi="pmix", env="/opt/v")),
    "merge-mpiexec": ("merge", ["d", "m"], JobOptions(mpi="mpiexec", time="2-00:00:00")),
    "verify-array": ("verify", ["/scratch/dist"], JobOptions(array="0-15%4", log_dir="logs",
                                                             sbatch=(("exclusive", ""),
                                                                     ("mem", "0")))),
    "save-settings": ("save", ["python", "train.py"],
                      JobOptions(settings=(("CHECKPOINT_DIR", "/scratch/run1/checkpoint"),
                                           ("LAST_STEP", "5000")),
                                 sbatch=(("signal", "B:USR1@600"),))),
    "template-defaults": ("split", None, JobOptions()),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_matches_golden(case):
    verb, args, opts = CASES[case]
    got = render(verb, args, opts)
    path = GOLDEN / f"{case}.sbatch"
    if os.environ.get("HPCCKPT_REFRESH_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(got)
    assert path.exists(), f"no golden file {path}; create it with: {REFRESH}"
    assert got == path.read_text(), (
        f"rendered {case} differs from {path.relative_to(REPO)}; if the change is intended, "
        f"refresh with: {REFRESH} and review the diff")


def test_every_template_has_a_golden_and_the_golden_is_valid_bash():
    assert tuple(templates()) == VERBS
    for case in CASES:
        r = subprocess.run(["bash", "-n", str(GOLDEN / f"{case}.sbatch")], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, f"{case}: {r.stderr}"


def test_templates_are_the_repository_jobs_directory():
    assert template_dir().resolve() == (REPO / "jobs").resolve()
    for verb in VERBS:  # every template is itself a script a user can edit and submit
        text = (REPO / "jobs" / f"{verb}.sbatch").read_text()
        assert text.startswith("#!/bin/bash\n")
        assert f"#SBATCH --job-name=hpcckpt-{verb}\n" in text
        assert '. "${HPCCKPT_JOBS:-$SLURM_SUBMIT_DIR/jobs}/common.sh"' in text
        r = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"{verb}: {r.stderr}"


@pytest.mark.parametrize("args", [
    ["/a b/c", "it's", '"q"', "$HOME", "`x`", "{rank}", "--x=1 2", "", "new\nline", "*"],
])
def test_args_survive_bash_exactly(args):
    script = render("merge", args, JobOptions())
    settings = script.split("# ---- settings ----\n", 1)[1].split("# ---- end of settings", 1)[0]
    r = subprocess.run(["bash", "-c", settings + 'printf "%s\\0" "${ARGS[@]}"'],
                       capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split("\0")[:-1] == args


def test_settings_survive_bash_exactly():
    value = "/scratch/my run/$USER's `ckpt`"
    script = render("save", ["python"], JobOptions(env=value, settings=(("LAST_STEP", "7"),)))
    settings = script.split("# ---- settings ----\n", 1)[1].split("# ---- end of settings", 1)[0]
    r = subprocess.run(["bash", "-c", settings + 'printf "%s|%s" "$HPCCKPT_ENV" "$LAST_STEP"'],
                       capture_output=True, text=True, timeout=30)
    assert r.stdout == f"{value}|7"


@pytest.mark.parametrize("verb,args,opts,message", [
    ("nope", None, JobOptions(),
     "no job template 'nope'; templates: convert, load, merge, reshard, save, split, verify"),
    ("merge", None, JobOptions(settings=(("LAST_STEP", "3"),)),
     "merge.sbatch has no setting LAST_STEP; its settings: ARGS, HPCCKPT_ENV, HPCCKPT_LAUNCHER, "
     "HPCCKPT_LOG_DIR, HPCCKPT_SRUN_MPI"),
    ("merge", None, JobOptions(settings=(("ARGS", "x"),)),
     "ARGS is the command's own arguments: give them after `--`"),
    ("merge", None, JobOptions(time="1h"),
     "time '1h' is not a SLURM time (minutes, HH:MM:SS, D-HH:MM:SS, ...)"),
    ("merge", None, JobOptions(array="0..3"),
     "array '0..3' is not a SLURM array range (e.g. 0-7, 0-15%4)"),
    ("merge", None, JobOptions(nodes=0), "nodes must be at least 1, got 0"),
    ("merge", None, JobOptions(tasks_per_node=-2), "tasks per node must be at least 1, got -2"),
    ("merge", None, JobOptions(mpi="openmpi"), "mpi 'openmpi': expected one of pmix, pmi2, mpiexec"),
    ("merge", None, JobOptions(job_name="my job"),
     "#SBATCH --job-name='my job': sbatch reads no spaces or '#' in an option value"),
    ("merge", None, JobOptions(sbatch=(("--mem", "1G"),)),
     "#SBATCH option '--mem': expected a long option name without dashes, e.g. mem=16G or "
     "exclusive="),
    ("merge", None, JobOptions(env="/a\nb"), "setting HPCCKPT_ENV: a value cannot hold a newline "
     "or NUL"),
])
def test_render_refuses(verb, args, opts, message):
    with pytest.raises(UsageError) as e:
        render(verb, args, opts)
    assert str(e.value) == message


def test_render_text_is_pure_and_needs_a_shebang():
    tpl = "#!/bin/sh\n#SBATCH --nodes=1\n# ---- settings ----\nX=1  # x\n# ---- end of settings ----\n"
    opts = JobOptions(nodes=3, settings=(("X", "2"),))
    assert render_text(tpl, {}, None, opts) == render_text(tpl, {}, None, opts) == (
        "#!/bin/sh\n#SBATCH --nodes=3\n# ---- settings ----\nX=2  # x\n"
        "# ---- end of settings ----\n")
    with pytest.raises(UsageError, match="^t: a job template starts with a #! line$"):
        render_text("echo\n", {}, None, opts, name="t")


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "hpcckpt", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_cli_render_and_list_without_mpi_inside_an_allocation():
    # a login node or an salloc shell: SLURM_NTASKS set, no MPI started, no launch check
    code = ("import sys; from hpcckpt.cli.main import main; "
            "rc = main(['jobs', 'render', 'merge', '--nodes', '2', '--', 'd', 'o']); "
            "assert 'mpi4py' not in sys.modules, 'imported mpi4py'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "SLURM_NTASKS": "8"})
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --nodes=2\n" in r.stdout and "ARGS=(d o)" in r.stdout
    assert f"HPCCKPT_ENV={sys.prefix}" in r.stdout
    r = _cli("jobs", "list")
    assert r.returncode == 0
    assert [line.split()[0] for line in r.stdout.splitlines()[1:]] == list(VERBS)


def test_cli_render_checks_the_commands_arguments():
    r = _cli("jobs", "render", "merge", "--", "only_one")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "hpcckpt jobs: error: arguments for `hpcckpt merge`: hpcckpt merge: error: the "
        "following arguments are required: out")
    r = _cli("jobs", "render", "merge", "--set", "NOEQUALS")
    assert r.stderr.strip().splitlines()[-1] == (
        "hpcckpt jobs: error: --set 'NOEQUALS': expected KEY=VALUE")
    r = _cli("jobs", "render", "split")
    assert r.returncode == 0 and "ARGS=(/path/to/hf_model" in r.stdout
    assert r.stderr.strip() == ("hpcckpt jobs render: note: no arguments after `--`: ARGS keeps "
                                "the template's example paths; edit them before submitting")
