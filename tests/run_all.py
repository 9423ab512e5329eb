#!/usr/bin/env python3
"""Run the whole hpcckpt test suite in stages.

Stages:
  serial     python -m pytest tests -m "not mpi"
  mpi-n=N    mpiexec -n N python -m pytest tests -m mpi --with-mpi -x   (N in 1 2 3 4 8)
  slurm      python -m pytest tests/slurm  (HPCCKPT_SLURM_TESTS=1): starts its own SLURM
             (installing the Debian packages when missing, as root); skipped, with the
             reason, only where that is impossible

Every stage runs with a hard wall-clock timeout; on timeout the whole process group
(mpiexec, its proxies and every rank) is killed and the stage counts as failed.
pytest's exit code 5 ("no tests collected") counts as success with 0 passed.

The last line printed is always ``N passed, N failed`` (summed over stages), followed by
``, N skipped`` when tests were skipped (their reasons are in pytest's summary above); the
exit status is non-zero if any stage failed.

Options:
  --only serial|mpi|slurm   run only that stage (or the MPI stages)
  --sizes 1,2,3        MPI world sizes to run (default 1,2,3,4,8)
  -k EXPR              passed through to pytest
  -- ARGS...           any further arguments are passed through to pytest

Environment:
  HPCCKPT_TEST_STAGE_TIMEOUT    seconds per MPI stage (default 600)
  HPCCKPT_TEST_SERIAL_TIMEOUT   seconds for the serial stage (default 1800)
  HPCCKPT_TEST_SLURM_TIMEOUT    seconds for the SLURM stage (default 900)
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

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SIZES = (1, 2, 3, 4, 8)

# pytest's closing line, with -q ("3 passed, 1 skipped in 0.12s") or without
# ("===== 3 passed, 1 skipped in 0.12s =====").  Also "no tests ran in 0.01s".
# Searched anywhere in a line: under mpiexec the ranks' lines can run together.
_COUNT = r"\d+ (?:passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?|rerun)"
_SUMMARY_RE = re.compile(
    r"(?P<body>(?:" + _COUNT + r")(?:, " + _COUNT + r")*|no tests ran) in \d+(?:\.\d+)?s"
)
_ITEM_RE = re.compile(r"(\d+) (passed|failed|errors?)\b")
_SKIPPED_RE = re.compile(r"(\d+) skipped\b")


def find_mpiexec() -> str | None:
    cand = Path(sys.executable).parent / "mpiexec"
    if cand.exists() and os.access(cand, os.X_OK):
        return str(cand)
    return shutil.which("mpiexec")


def parse_summaries(output: str) -> list[tuple[int, int]]:
    """(passed, failed+errors) for every pytest summary line in ``output``."""
    found = []
    for m in _SUMMARY_RE.finditer(output):
        passed = failed = 0
        for num, kind in _ITEM_RE.findall(m.group("body")):
            if kind == "passed":
                passed += int(num)
            else:
                failed += int(num)
        found.append((passed, failed))
    return found


@dataclass
class StageResult:
    name: str
    ok: bool
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


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


def run_stage(name: str, cmd: list[str], env: dict[str, str], timeout: float) -> StageResult:
    print(f"\n===== stage {name}: {' '.join(cmd)}  (timeout {timeout:g} s)", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # own process group, so a timeout kills every rank
    )
    chunks: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            chunks.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=timeout)
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
    seconds = time.monotonic() - t0
    output = "".join(chunks)
    summaries = parse_summaries(output)
    # Every rank prints its own summary: count the stage once (max over ranks).
    passed = max((p for p, _ in summaries), default=0)
    failed = max((f for _, f in summaries), default=0)

    skipped = max((int(n) for m in _SUMMARY_RE.finditer(output)
                   for n in _SKIPPED_RE.findall(m.group("body"))), default=0)
    res = StageResult(name, ok=False, passed=passed, failed=failed, skipped=skipped,
                      seconds=seconds)
    if timed_out:
        msg = f"stage {name} timed out after {timeout:g} s"
        res.notes.append(msg)
        res.failed = max(res.failed, 1)
        print(f"\n!!!!! {msg}; killed its process group", flush=True)
    elif rc == 0:
        res.ok = True
    elif rc == 5 or (summaries and passed == 0 and failed == 0 and _all_no_tests(output, rc)):
        # pytest: no tests collected (under mpiexec the code may come back remapped)
        res.ok = True
        res.notes.append("no tests collected")
    else:
        if res.failed == 0:
            res.failed = 1  # crashed / aborted / collection error without a summary line
        res.notes.append(f"exit code {rc}")
    status = "ok" if res.ok else "FAILED"
    extra = f" ({'; '.join(res.notes)})" if res.notes else ""
    print(
        f"===== stage {name}: {status}: {res.passed} passed, {res.failed} failed, "
        f"{res.skipped} skipped in {seconds:.1f} s{extra}",
        flush=True,
    )
    return res


def _all_no_tests(output: str, rc: int) -> bool:
    """True when every rank ended with pytest's exit code 5 (mpiexec may report it
    as e.g. 5 or 5<<8); we only accept it when no rank reported a failure."""
    if rc in (5, 5 << 8):
        return True
    # Hydra prints "EXIT CODE: 5" for bad terminations; accept only if all are 5.
    codes = re.findall(r"EXIT CODE:\s*(\d+)", output)
    return bool(codes) and all(c == "5" for c in codes)


def slurm_stage(extra: list[str], base: Path) -> tuple[str, list[str], dict[str, str], float]:
    """(name, command, environment additions, timeout) of the SLURM stage, whose pytest
    temporary directory is ``base`` (pytest's shared one is pruned by other sessions)."""
    cmd = [sys.executable, "-m", "pytest", "tests/slurm", "-q", "-ra", "-p", "no:cacheprovider",
           f"--basetemp={base}", *extra]
    timeout = float(os.environ.get("HPCCKPT_TEST_SLURM_TIMEOUT", "900"))
    return "slurm", cmd, {"HPCCKPT_SLURM_TESTS": "1"}, timeout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("serial", "mpi", "slurm"))
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                    help="comma-separated MPI world sizes (default %(default)s)")
    ap.add_argument("-k", dest="kexpr", default=None, help="pytest -k expression")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)

    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--sizes: expected comma-separated integers, got {args.sizes!r}")
    if any(n < 1 for n in sizes):
        ap.error("--sizes: world sizes must be >= 1")

    mpi_timeout = float(os.environ.get("HPCCKPT_TEST_STAGE_TIMEOUT", "600"))
    serial_timeout = float(os.environ.get("HPCCKPT_TEST_SERIAL_TIMEOUT", "1800"))

    extra = list(args.pytest_args)
    if args.kexpr is not None:
        extra += ["-k", args.kexpr]

    # Not PYTHONUNBUFFERED: it would leak into the CLI subprocesses the tests start,
    # where unbuffered writes let the ranks' lines interleave mid-line under mpiexec.
    # pytest flushes its own progress output, so a killed stage still shows how far it got.
    base_env = dict(os.environ)
    base_env.pop("HPCCKPT_TEST_MPI_SIZE", None)

    py = sys.executable
    results: list[StageResult] = []

    if args.only in (None, "serial"):
        cmd = [py, "-m", "pytest", "tests", "-m", "not mpi", "-q", "-p", "no:cacheprovider", *extra]
        results.append(run_stage("serial", cmd, base_env, serial_timeout))

    if args.only in (None, "mpi"):
        mpiexec = find_mpiexec()
        if mpiexec is None:
            print("\n!!!!! no mpiexec found next to the Python interpreter or on PATH "
                  "(install the `mpich` wheel); MPI stages failed", flush=True)
            for n in sizes:
                results.append(StageResult(f"mpi-n={n}", ok=False, failed=1, notes=["no mpiexec"]))
        else:
            for n in sizes:
                env = dict(base_env)
                env["HPCCKPT_TEST_MPI_SIZE"] = str(n)
                cmd = [mpiexec, "-n", str(n), py, "-m", "pytest", "tests", "-m", "mpi",
                       "--with-mpi", "-q", "-x", "-p", "no:cacheprovider", *extra]
                results.append(run_stage(f"mpi-n={n}", cmd, env, mpi_timeout))

    if args.only in (None, "slurm"):
        tmp = Path(tempfile.mkdtemp(prefix="hpcckpt-slurm-stage-"))
        name, cmd, env, timeout = slurm_stage(extra, tmp)
        results.append(run_stage(name, cmd, {**base_env, **env}, timeout))
        shutil.rmtree(tmp, ignore_errors=True)

    total_passed = sum(r.passed for r in results)
    total_failed = sum(r.failed for r in results)
    print("\n===== stages =====")
    for r in results:
        extra_note = f"  ({'; '.join(r.notes)})" if r.notes else ""
        print(f"  {r.name:10s} {'ok' if r.ok else 'FAILED':6s} {r.passed:5d} passed "
              f"{r.failed:5d} failed {r.skipped:5d} skipped {r.seconds:8.1f} s{extra_note}")
    all_ok = all(r.ok for r in results)
    total_skipped = sum(r.skipped for r in results)
    print(f"{total_passed} passed, {total_failed} failed"
          + (f", {total_skipped} skipped" if total_skipped else ""), flush=True)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
