#!/usr/bin/env python3
"""Run the whole hpcckpt test suite in stages, one summary line per stage.

Stages (groups, run in this order; ``--only GROUP`` picks one):
  serial     python -m pytest tests -m "not mpi"
  mpi        mpiexec -n N python -m pytest tests -m mpi --with-mpi -x   (N in 1 2 3 4 8)
  slurm      python -m pytest tests/slurm  (HPCCKPT_SLURM_TESTS=1): starts its own SLURM
             (installing the Debian packages when missing, as root); skipped, with the
             reason, only where that is impossible

Each stage prints one line: ``mpi-n=3     ok      58 passed   0 failed   2 skipped   21.4 s``.
Its full output goes to a log file; when a stage fails, its failure report (pytest's
FAILURES/ERRORS sections, or the last lines) is printed under its line, with the log's
path. ``-v`` streams every stage's output as it runs instead.

Every stage runs with a hard wall-clock timeout; on timeout the whole process group
(mpiexec, its proxies and every rank) is killed and the stage counts as failed.
pytest's exit code 5 ("no tests collected") counts as success with 0 passed.
Under mpiexec every rank prints its own pytest summary: a stage counts the largest.

The last line printed is always ``N passed, N failed, N skipped`` (summed over stages;
CI reads the leading ``N passed, N failed``); the exit status is non-zero if any stage
failed.

Adding a stage group: write ``def my_stages(args, env) -> list[Stage]`` and add it to
``GROUPS`` (see ``slurm_stages``); a ``Stage`` with ``skip="reason"`` is reported as
skipped instead of run.

Options:
  --only GROUP         run only that group of stages (serial, mpi, slurm)
  --sizes 1,2,3        MPI world sizes to run (default 1,2,3,4,8)
  -k EXPR              passed through to pytest
  -v, --verbose        stream each stage's output
  -- ARGS...           any further arguments are passed through to pytest

Environment:
  HPCCKPT_TEST_STAGE_TIMEOUT    seconds per MPI stage (default 600)
  HPCCKPT_TEST_SERIAL_TIMEOUT   seconds for the serial stage (default 1800)
  HPCCKPT_TEST_SLURM_TIMEOUT    seconds for the SLURM stage (default 900)
  HPCCKPT_TEST_LOG_DIR          where stage logs go (default: a new directory under /tmp)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SIZES = (1, 2, 3, 4, 8)

# pytest's closing line, with -q ("3 passed, 1 skipped in 0.12s") or without
# ("===== 3 passed, 1 skipped in 0.12s =====").  Also "no tests ran in 0.01s".
# Searched anywhere in a line: under mpiexec the ranks' lines can run together.
_COUNT = r"\d+ (?:passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?|rerun)"
_SUMMARY_RE = re.compile(
    r"(?P<body>(?:" + _COUNT + r")(?:, " + _COUNT + r")*|no tests ran) in \d+(?:\.\d+)?s"
)
_ITEM_RE = re.compile(r"(\d+) (passed|failed|errors?|skipped)\b")
#: where pytest's report of what went wrong starts
_REPORT_RE = re.compile(r"^=+ (FAILURES|ERRORS|short test summary info) =+$", re.M)
FAILURE_LINES = 300   # at most this much of a failed stage's report is printed
TAIL_LINES = 60       # without a pytest report (crash, timeout): the output's last lines


def find_mpiexec() -> str | None:
    cand = Path(sys.executable).parent / "mpiexec"
    if cand.exists() and os.access(cand, os.X_OK):
        return str(cand)
    return shutil.which("mpiexec")


def parse_summaries(output: str) -> list[tuple[int, int, int]]:
    """(passed, failed+errors, skipped) for every pytest summary line in ``output``."""
    found = []
    for m in _SUMMARY_RE.finditer(output):
        counts = {"passed": 0, "failed": 0, "skipped": 0}
        for num, kind in _ITEM_RE.findall(m.group("body")):
            counts["failed" if kind.startswith("error") else kind] += int(num)
        found.append((counts["passed"], counts["failed"], counts["skipped"]))
    return found


@dataclass(frozen=True)
class Stage:
    """One pytest run: a command, its environment and its hard timeout.

    ``skip``: a reason not to run it here (reported as a skipped stage, not a failure)."""
    name: str
    cmd: list[str]
    env: dict[str, str]
    timeout: float
    skip: str | None = None
    #: removed after the stage ran (e.g. its own pytest --basetemp)
    scratch: Path | None = None


@dataclass
class StageResult:
    name: str
    ok: bool
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    log: Path | None = None
    report: str = ""          #: what went wrong, printed under the stage's line

    def line(self) -> str:
        status = "skipped" if self.notes and self.notes[0].startswith("skipped") else (
            "ok" if self.ok else "FAILED")
        extra = f"  ({'; '.join(self.notes)})" if self.notes else ""
        return (f"{self.name:<10} {status:<7} {self.passed:5d} passed {self.failed:4d} failed "
                f"{self.skipped:4d} skipped {self.seconds:7.1f} s{extra}")


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is left."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                # the leader is gone; give the rest of the group a moment, then move on
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    return
            time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_stage(stage: Stage, log_dir: Path, verbose: bool = False) -> StageResult:
    """Run one stage to completion (or its timeout); its output goes to a log file."""
    log = log_dir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', stage.name)}.log"
    if stage.skip:
        return StageResult(stage.name, ok=True, notes=[f"skipped: {stage.skip}"])
    if verbose:
        print(f"\n===== stage {stage.name}: {' '.join(stage.cmd)}  "
              f"(timeout {stage.timeout:g} s)", flush=True)
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(
            stage.cmd,
            cwd=REPO,
            env=stage.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group, so a timeout kills every rank
        )
    except OSError as e:  # e.g. no mpiexec: the MPI stages fail, they are not skipped
        return StageResult(stage.name, ok=False, failed=1, notes=[f"cannot start: {e}"],
                           report=f"{stage.cmd[0]}: {e.strerror}; the `mpich` extra provides "
                                  "mpiexec (pip install -e '.[mpich]')")
    chunks: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        with open(log, "w") as f:
            f.write(f"$ {' '.join(stage.cmd)}\n")
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                chunks.append(line)
                f.write(line)
                if verbose:
                    sys.stdout.write(line)
                    sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=stage.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        rc = proc.wait()
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        # processes that escaped the group could keep the pipe open: don't wait forever
        reader.join(timeout=10)
    output = "".join(chunks)
    summaries = parse_summaries(output)
    # Every rank prints its own summary: count the stage once (max over ranks).
    res = StageResult(stage.name, ok=False,
                      passed=max((c[0] for c in summaries), default=0),
                      failed=max((c[1] for c in summaries), default=0),
                      skipped=max((c[2] for c in summaries), default=0),
                      seconds=time.monotonic() - t0, log=log)
    if timed_out:
        res.notes.append(f"timed out after {stage.timeout:g} s; process group killed")
        res.failed = max(res.failed, 1)
    elif rc == 0:
        res.ok = True
    elif rc == 5 or (summaries and res.passed == 0 and res.failed == 0
                     and _all_no_tests(output, rc)):
        # pytest: no tests collected (under mpiexec the code may come back remapped)
        res.ok = True
        res.notes.append("no tests collected")
    else:
        if res.failed == 0:
            res.failed = 1  # crashed / aborted / collection error without a summary line
        res.notes.append(f"exit code {rc}")
    if not res.ok and not verbose:
        res.report = failure_report(output)
    return res


def failure_report(output: str) -> str:
    """pytest's FAILURES/ERRORS sections and short summary (the first rank's, under
    mpiexec), else the output's last lines (a crash or a hang shows there)."""
    m = _REPORT_RE.search(output)
    lines = output[m.start():].splitlines() if m else output.splitlines()[-TAIL_LINES:]
    if len(lines) > FAILURE_LINES:
        more = len(lines) - FAILURE_LINES
        lines = lines[:FAILURE_LINES] + [f"... ({more} more lines in the log)"]
    return "\n".join(lines)


def _all_no_tests(output: str, rc: int) -> bool:
    """True when every rank ended with pytest's exit code 5 (mpiexec may report it
    as e.g. 5 or 5<<8); we only accept it when no rank reported a failure."""
    if rc in (5, 5 << 8):
        return True
    # Hydra prints "EXIT CODE: 5" for bad terminations; accept only if all are 5.
    codes = re.findall(r"EXIT CODE:\s*(\d+)", output)
    return bool(codes) and all(c == "5" for c in codes)


def serial_stages(args, env: dict[str, str]) -> list[Stage]:
    timeout = float(os.environ.get("HPCCKPT_TEST_SERIAL_TIMEOUT", "1800"))
    return [Stage("serial", [sys.executable, "-m", "pytest", "tests", "-m", "not mpi", "-q",
                             "-p", "no:cacheprovider", *args.extra], env, timeout)]


def mpi_stages(args, env: dict[str, str]) -> list[Stage]:
    timeout = float(os.environ.get("HPCCKPT_TEST_STAGE_TIMEOUT", "600"))
    mpiexec = find_mpiexec() or "mpiexec"  # missing: each MPI stage fails to start
    stages = []
    for n in args.sizes:
        cmd = [mpiexec, "-n", str(n), sys.executable, "-m", "pytest", "tests",
               "-m", "mpi", "--with-mpi", "-q", "-x", "-p", "no:cacheprovider", *args.extra]
        stage = Stage(f"mpi-n={n}", cmd, {**env, "HPCCKPT_TEST_MPI_SIZE": str(n)}, timeout)
        stages.append(stage)
    return stages


def slurm_stages(args, env: dict[str, str]) -> list[Stage]:
    """tests/slurm on a real slurmctld + slurmd, in its own pytest temporary directory
    (pytest's shared one is pruned by other sessions)."""
    base = Path(tempfile.mkdtemp(prefix="hpcckpt-slurm-stage-"))
    cmd = [sys.executable, "-m", "pytest", "tests/slurm", "-q", "-ra", "-p", "no:cacheprovider",
           f"--basetemp={base}", *args.extra]
    timeout = float(os.environ.get("HPCCKPT_TEST_SLURM_TIMEOUT", "900"))
    return [Stage("slurm", cmd, {**env, "HPCCKPT_SLURM_TESTS": "1"}, timeout, scratch=base)]


#: stage groups in the order they run; a new group is one function and one entry
GROUPS: dict[str, Callable[..., list[Stage]]] = {
    "serial": serial_stages,
    "mpi": mpi_stages,
    "slurm": slurm_stages,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=tuple(GROUPS))
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                    help="comma-separated MPI world sizes (default %(default)s)")
    ap.add_argument("-k", dest="kexpr", default=None, help="pytest -k expression")
    ap.add_argument("-v", "--verbose", action="store_true", help="stream each stage's output")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)

    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--sizes: expected comma-separated integers, got {args.sizes!r}")
    if any(n < 1 for n in args.sizes):
        ap.error("--sizes: world sizes must be >= 1")
    args.extra = list(args.pytest_args) + (["-k", args.kexpr] if args.kexpr is not None else [])

    # Not PYTHONUNBUFFERED: it would leak into the CLI subprocesses the tests start,
    # where unbuffered writes let the ranks' lines interleave mid-line under mpiexec.
    # pytest flushes its own progress output, so a killed stage still shows how far it got.
    base_env = dict(os.environ)
    base_env.pop("HPCCKPT_TEST_MPI_SIZE", None)
    log_dir = Path(os.environ.get("HPCCKPT_TEST_LOG_DIR") or
                   tempfile.mkdtemp(prefix="hpcckpt-tests-"))
    log_dir.mkdir(parents=True, exist_ok=True)

    stages = [st for group, make in GROUPS.items() if args.only in (None, group)
              for st in make(args, base_env)]
    print(f"stage logs: {log_dir}", flush=True)
    results: list[StageResult] = []
    for stage in stages:
        if not args.verbose and sys.stdout.isatty():  # shows what runs; the result overwrites it
            print(f"{stage.name:<10} running", end="\r", flush=True)
        res = run_stage(stage, log_dir, args.verbose)
        if stage.scratch is not None:
            shutil.rmtree(stage.scratch, ignore_errors=True)
        results.append(res)
        print(res.line(), flush=True)
        if res.report:
            print("\n".join("    " + ln for ln in res.report.splitlines()))
            print(f"    (full output: {res.log})", flush=True)

    total = StageResult("total", ok=all(r.ok for r in results),
                        passed=sum(r.passed for r in results),
                        failed=sum(r.failed for r in results),
                        skipped=sum(r.skipped for r in results),
                        seconds=sum(r.seconds for r in results))
    print(total.line(), flush=True)
    print(f"{total.passed} passed, {total.failed} failed, {total.skipped} skipped", flush=True)
    return 0 if total.ok else 1


if __name__ == "__main__":
    sys.exit(main())
