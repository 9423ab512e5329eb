"""kill -9 of one rank while the complete weights of an integrated save are being
written: the previous step stays committed with its complete weights, and the next
manager opened on the directory removes the half-written integrated directory."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from helpers import clean_env, find_mpiexec

TESTS = Path(__file__).resolve().parents[1]
SCRIPT = """
import os, sys
sys.path[:0] = [{mpi!r}, {tests!r}]
from mpi4py import MPI
from test_exchange_mpi import local_state, strategy
from hpcckpt.ops.save import CheckpointManager
comm = MPI.COMM_WORLD
s = strategy("job", comm.size)
with CheckpointManager(sys.argv[1], s, comm, prefix="m", integrated=True,
                       max_shard_size=200, keep_max=0) as mgr:
    for k in (1, 2):
        mgr.save(local_state(s, comm.rank), 1, k)
"""


def run(script: Path, d: Path, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([find_mpiexec(), "-n", "2", os.sys.executable, str(script), str(d)],
                          env=clean_env(env), capture_output=True, text=True, timeout=180)


def test_kill_one_rank_while_writing_integrated(tmp_path):
    script = tmp_path / "save.py"
    script.write_text(SCRIPT.format(mpi=str(TESTS / "mpi"), tests=str(TESTS)))
    d = tmp_path / "checkpoint"
    p = run(script, d, {"HPCCKPT_FAULT": "integrated@1:2"})
    assert p.returncode != 0
    assert sorted(os.listdir(d / "commits")) == ["000001-1_1.json"]
    half = sorted(os.listdir(d / "integrated" / "m-1_2"))
    assert half and all(n.endswith(".partial") or n.startswith(".") for n in half), half
    whole = d / "integrated" / "m-1_1"
    index = json.loads((whole / "model.safetensors.index.json").read_text())
    assert sorted(os.listdir(whole)) == sorted({*index["weight_map"].values(),
                                                "model.safetensors.index.json"})
    p = run(script, d)                       # a new run: cleans up, saves with suffix _1
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(d / "integrated")) == ["m-1_1", "m_1-1_1", "m_1-1_2"]
    for name in ("m_1-1_1", "m_1-1_2"):
        assert (d / "integrated" / name / "model-00001-of-00006.safetensors").read_bytes() == \
            (whole / "model-00001-of-00006.safetensors").read_bytes()
