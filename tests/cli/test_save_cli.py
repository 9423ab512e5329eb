"""``hpcckpt save`` and training directories from the command line: resume, --step on
inspect/merge/reshard/load, kill -9 of one rank at each phase of a save (then the
previous committed step loads bit-exact and a new run cleans up and resumes),
preemption by SIGTERM (exit status 75)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import hpcckpt
from hpcckpt.layout.box import Box
from hpcckpt.ops.save import EXIT_PREEMPTED, synthetic_slice
from hpcckpt.storage import training as tdir

from helpers import _kill_group, assert_bytes_equal, clean_env, find_mpiexec, run_cli

FMT = "hpcckpt.strategy/1"
TENSORS = {
    "emb": {"shape": [300, 8], "dtype": "BF16"},                      # replicated
    "w": {"shape": [10, 7], "dtype": "F32", "split": ["tp", None]},
    "v": {"shape": [5, 6], "dtype": "F8_E4M3", "split": [None, "tp"]},
    "s": {"shape": [], "dtype": "I64"},
    "z": {"shape": [0, 3], "dtype": "F16", "split": ["tp", None]},
}


def write_strategy(path: Path, mesh: dict) -> Path:
    path.write_text(yaml.safe_dump({"format": FMT, "mesh": mesh, "tensors": TENSORS},
                                   sort_keys=False))
    return path


def cli(args, n=None, env=None, timeout=180):
    return run_cli([os.fspath(a) for a in args], n=n, timeout=timeout, env=env)


def ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
    return p


def single() -> hpcckpt.Strategy:
    return hpcckpt.strategy_from_dict({"format": FMT, "mesh": {"dp": 1}, "tensors": {
        n: {k: v for k, v in t.items() if k != "split"} for n, t in TENSORS.items()}})


def check_step(d: Path, step: int, at: str | None = None) -> None:
    """Loads (one process, whole tensors) bit-exact as the synthetic model after ``step``."""
    s = single()
    got = hpcckpt.load(str(d), s, None, step=at)
    for t in s.tensors:
        assert_bytes_equal(got[t.name], synthetic_slice(t.name, t.dtype, t.shape,
                                                        Box.full(t.shape), step), t.name)


def files_left(d: Path) -> dict[str, list[str]]:
    return {p.name: sorted(os.listdir(p)) for p in sorted(d.glob("rank_*"))}


@pytest.fixture(scope="module")
def s2(tmp_path_factory) -> Path:
    return write_strategy(tmp_path_factory.mktemp("strategies") / "tp2.yaml", {"tp": 2})


def test_save_resume_and_step_everywhere(tmp_path, s2):
    d = tmp_path / "checkpoint"
    p = ok(cli(["save", d, "--strategy", s2, "--synthetic", "--steps", "4", "--save-steps", "2",
                "--keep-max", "2", "--dedup", "--json"], n=2))
    doc = json.loads(p.stdout.strip().splitlines()[-1])
    assert (doc["op"], doc["saves"], doc["latest"], doc["exit_status"]) == ("save", 2, "1_4", 0)
    assert doc["resumed_from"] is None and doc["dedup"] == "balanced"
    assert doc["bytes_written"] == 2 * sum(  # each distinct byte once per save
        int(np.prod(t["shape"], dtype=np.int64)) * {"BF16": 2, "F32": 4, "F8_E4M3": 1,
                                                     "I64": 8, "F16": 2}[t["dtype"]]
        for t in TENSORS.values())
    check_step(d, 4)
    check_step(d, 2, "1_2")
    # re-run: resumes after step 4, MindSpore's prefix suffix on the new files
    p = ok(cli(["save", d, "--strategy", s2, "--synthetic", "--steps", "6", "--save-steps", "2",
                "--keep-max", "2"], n=2))
    assert "resumed from committed step 1_4" in p.stdout
    assert "latest committed step: 1_6" in p.stdout
    assert files_left(d)["rank_1"] == ["CKP_rank_1-1_4.safetensors",
                                       "CKP_rank_1_1-1_6.safetensors", "meta.json"]
    check_step(d, 6)
    # every reader takes --step
    p = ok(cli(["inspect", d, "--step", "1_4", "--json"]))
    info = json.loads(p.stdout)
    assert info["complete"] is True and "step 1_4" in info["description"]
    ok(cli(["merge", d, tmp_path / "merged", "--step", "1_4"], n=2))
    got = hpcckpt.load(str(tmp_path / "merged"), single(), None)
    for t in single().tensors:
        assert_bytes_equal(got[t.name], synthetic_slice(t.name, t.dtype, t.shape,
                                                        Box.full(t.shape), 4), t.name)
    s3 = write_strategy(tmp_path / "tp3.yaml", {"tp": 3})
    ok(cli(["reshard", d, tmp_path / "tp3", "--strategy", s3, "--step", "1_6"], n=3))
    check_step(tmp_path / "tp3", 6)
    ok(cli(["load", d, "--strategy", s3, "--step", "1_4", "--against", tmp_path / "merged"], n=3))
    p = cli(["load", d, "--strategy", s3, "--step", "1_5"], n=3)
    assert p.returncode == 1
    assert (f"hpcckpt load: error: rank 0: {d}: no committed step 1_5 (committed: 1_4, 1_6)"
            in p.stderr.splitlines()), p.stderr


@pytest.mark.parametrize("phase,rank,latest", [("stage", 1, 2), ("write", 1, 2),
                                               ("renamed", 0, 2), ("rotate", 1, 3)])
def test_kill_one_rank_at_each_phase(tmp_path, s2, phase, rank, latest):
    """kill -9 of one rank in step 3's save (rank 0 for "renamed": every file renamed,
    the record it writes not yet): the last committed step loads bit-exact; a new run
    removes the leftovers, resumes from it and commits on."""
    d = tmp_path / "checkpoint"
    p = cli(["save", d, "--strategy", s2, "--synthetic", "--steps", "5", "--keep-max", "2"],
            n=2, env={"HPCCKPT_FAULT": f"{phase}@{rank}:3"})
    assert p.returncode != 0, p.stdout
    recs = tdir.list_records(d)
    assert (recs[-1].epoch, recs[-1].step) == (1, latest)
    check_step(d, latest)
    if phase == "renamed":   # step 3's files are complete and renamed, but not committed
        assert "CKP_rank_1-1_3.safetensors" in files_left(d)["rank_1"]
    if phase == "rotate":    # step 1's record is gone, its files not yet
        assert [r.step for r in recs] == [2, 3]
        assert "CKP_rank_1-1_1.safetensors" in files_left(d)["rank_1"]
    p = ok(cli(["save", d, "--strategy", s2, "--synthetic", "--steps", "6", "--keep-max", "2"],
               n=2))
    assert f"resumed from committed step 1_{latest}" in p.stdout
    check_step(d, 6)
    names = {f for r in tdir.list_records(d) for f in r.files}
    for rank_dir, files in files_left(d).items():
        assert [f for f in files if f != "meta.json"] == sorted(
            f.split("/")[1] for f in names if f.startswith(rank_dir + "/")), (rank_dir, files)


def test_sigterm_saves_the_step_and_exits_75(tmp_path, s2):
    d = tmp_path / "checkpoint"
    cmd = [find_mpiexec(), "-n", "2", os.sys.executable, "-m", "hpcckpt", "save", str(d),
           "--strategy", str(s2), "--synthetic", "--steps", "100000", "--save-steps", "100000",
           "--compute-seconds", "0.02"]
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (d / "strategy.yaml").exists():   # the manager is open: handler installed
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)            # mpiexec forwards it to every rank
        out, err = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    assert proc.returncode == EXIT_PREEMPTED, f"{proc.returncode}\n{out}\n{err}"
    assert "preempted: step saved, stopping (exit status 75: requeue)" in out
    (rec,) = tdir.list_records(d)
    assert 0 < rec.step < 100000
    check_step(d, rec.step)


def test_save_from_weights(tmp_path, s2):
    """--from: the weights loaded under the strategy are what is saved (each step changes
    every tensor's first byte)."""
    from safetensors.numpy import save_file
    from helpers import make_tensors
    full = make_tensors({n: (t["shape"], t["dtype"]) for n, t in TENSORS.items()
                         if t["dtype"] not in ("BF16", "F8_E4M3")}, seed=7)
    s = {n: t for n, t in TENSORS.items() if n in full}
    sp = tmp_path / "s.yaml"
    sp.write_text(yaml.safe_dump({"format": FMT, "mesh": {"tp": 2}, "tensors": s},
                                 sort_keys=False))
    save_file(full, str(tmp_path / "model.safetensors"))
    d = tmp_path / "checkpoint"
    ok(cli(["save", d, "--strategy", sp, "--from", tmp_path / "model.safetensors",
            "--steps", "3", "--dedup", "whole"], n=2))
    one = hpcckpt.strategy_from_dict({"format": FMT, "mesh": {"dp": 1}, "tensors": {
        n: {k: v for k, v in t.items() if k != "split"} for n, t in s.items()}})
    got = hpcckpt.load(str(d), one, None)
    for name, a in full.items():
        want = a.copy()
        if want.size:
            want.reshape(-1).view(np.uint8)[0] = 3
        assert_bytes_equal(got[name], want, name)
