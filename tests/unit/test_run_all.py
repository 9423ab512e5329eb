"""tests/run_all.py: one line per stage with passed/failed/skipped, a total, and the
closing ``N passed, N failed, N skipped`` line CI reads; a failed stage shows its report."""
from __future__ import annotations

import sys

import pytest

import run_all
from run_all import Stage

PY = sys.executable


def fake_group(*scripts):
    """A stage group whose stages print what pytest would and exit with a status."""
    def stages(args, env):
        return [Stage(f"fake{i}", [PY, "-c", script], env, 30) for i, script in enumerate(scripts)]
    return stages


def test_parse_summaries_counts_skips_and_errors():
    out = ("3 passed, 2 skipped in 0.10s\n"
           "===== 1 failed, 4 passed, 1 error, 5 skipped, 2 warnings in 1.50s =====\n"
           "no tests ran in 0.01s")
    assert run_all.parse_summaries(out) == [(3, 0, 2), (4, 2, 5), (0, 0, 0)]


def test_one_line_per_stage_and_totals(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HPCCKPT_TEST_LOG_DIR", str(tmp_path))
    # the second stage is an MPI stage: every rank prints its summary, counted once
    monkeypatch.setattr(run_all, "GROUPS", {"fake": fake_group(
        "print('banner'); print('5 passed, 1 skipped in 0.50s')",
        "print('3 passed, 2 skipped in 0.1s'); print('3 passed, 2 skipped in 0.1s')")})
    assert run_all.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"stage logs: {tmp_path}"
    shape = [ln.split()[:8] for ln in lines[1:4]]
    assert shape == [["fake0", "ok", "5", "passed", "0", "failed", "1", "skipped"],
                     ["fake1", "ok", "3", "passed", "0", "failed", "2", "skipped"],
                     ["total", "ok", "8", "passed", "0", "failed", "3", "skipped"]]
    assert lines[4:] == ["8 passed, 0 failed, 3 skipped"]
    assert "banner" in (tmp_path / "fake0.log").read_text()


def test_a_failed_stage_prints_its_report(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HPCCKPT_TEST_LOG_DIR", str(tmp_path))
    failing = ("import sys; print('noise'); print('=' * 5 + ' FAILURES ' + '=' * 5); "
               "print('___ test_x ___'); print('assert 1 == 2'); "
               "print('1 failed, 2 passed in 0.2s'); sys.exit(1)")
    monkeypatch.setattr(run_all, "GROUPS", {"fake": fake_group(failing)})
    assert run_all.main([]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:6] == ["fake0", "FAILED", "2", "passed", "1", "failed"]
    assert lines[1].endswith("(exit code 1)")
    assert lines[2:6] == ["    ===== FAILURES =====", "    ___ test_x ___", "    assert 1 == 2",
                          "    1 failed, 2 passed in 0.2s"]
    assert lines[6] == f"    (full output: {tmp_path / 'fake0.log'})"
    assert lines[-1] == "2 passed, 1 failed, 0 skipped"


def test_a_skipped_stage_and_a_missing_launcher(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HPCCKPT_TEST_LOG_DIR", str(tmp_path))

    def stages(args, env):
        return [Stage("slurm", ["sbatch"], env, 30, skip="no sbatch here"),
                Stage("mpi-n=2", [str(tmp_path / "no-mpiexec"), "-n", "2"], env, 30)]
    monkeypatch.setattr(run_all, "GROUPS", {"fake": stages})
    assert run_all.main([]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:2] == ["slurm", "skipped"]
    assert out[1].endswith("(skipped: no sbatch here)")
    assert out[2].split()[:6] == ["mpi-n=2", "FAILED", "0", "passed", "1", "failed"]
    assert out[-1] == "0 passed, 1 failed, 0 skipped"


@pytest.mark.timeout(60)
def test_a_hung_stage_is_killed(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HPCCKPT_TEST_LOG_DIR", str(tmp_path))
    monkeypatch.setattr(run_all, "GROUPS", {"fake": lambda args, env: [
        Stage("hang", [PY, "-c", "import time; print('started', flush=True); time.sleep(600)"],
              env, 2)]})
    assert run_all.main([]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:2] == ["hang", "FAILED"]
    assert out[1].endswith("(timed out after 2 s; process group killed)")
    assert "    started" in out
