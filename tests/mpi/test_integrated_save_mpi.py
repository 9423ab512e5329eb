"""Integrated saves (``CheckpointManager(..., integrated=True)``): every rank writes its
de-duplicated share of its own slices into the step's complete weights; the result is
byte for byte what ``hpcckpt merge`` makes of the step's distributed files."""
from __future__ import annotations

import errno
import json
import os

import pytest

import hpcckpt
from hpcckpt.errors import CheckpointIOError
from hpcckpt.ops import commit as commit_mod
from hpcckpt.ops.save import CheckpointManager

from helpers import allgather, assert_bytes_equal, barrier, collective, rank_size
from test_exchange_mpi import FULL, TENSORS, local_state, strategy
from test_roundtrip_mpi import NUMPY_LOADABLE, read_tensor
from test_save_mpi import FAILS, failure, state_at

pytestmark = pytest.mark.mpi

SHARD = 200   #: bytes per shard: several shards (and an index) from the small test model


def layout(name: str, size: int):
    """"pp": a pipeline layout where the job size has one (pp2tp2 on 4 ranks,
    pp2dp2tp2 on 8), else the job's own layout."""
    if name == "pp":
        return strategy({4: "pp2tp2", 8: "pp2dp2tp2"}.get(size, "job"), size if size not in
                        (4, 8) else 1)
    return strategy(name, size)


def check_complete_dir(comm, out):
    """Every tensor of the model, bit for bit, in the shards the index (or the single
    ``model.safetensors``) names; numpy-loadable dtypes also through ``safetensors``."""
    from safetensors import safe_open

    def check():
        index = out / "model.safetensors.index.json"
        wmap = (json.loads(index.read_text())["weight_map"] if index.exists()
                else {n: "model.safetensors" for n in TENSORS})
        assert sorted(wmap) == sorted(TENSORS)
        for name, fname in wmap.items():
            assert_bytes_equal(read_tensor(out / fname, name), FULL[name], f"integrated {name}")
            if TENSORS[name][1] in NUMPY_LOADABLE:
                with safe_open(str(out / fname), framework="np") as f:
                    assert_bytes_equal(f.get_tensor(name), FULL[name], f"safe_open {name}")
        assert not [p for p in os.listdir(out) if "partial" in p or "lock" in p]
    collective(comm, check)


def same_files(comm, a, b):
    def check():
        if rank_size(comm)[0] == 0:
            names = sorted(os.listdir(a))
            assert names == sorted(os.listdir(b)), (names, sorted(os.listdir(b)))
            for n in names:
                assert (a / n).read_bytes() == (b / n).read_bytes(), f"{n} differs"
    collective(comm, check)


@pytest.mark.parametrize("name,async_save,dedup", [
    ("job", False, False), ("job", True, True), ("tpN", False, False),
    ("dpN", False, "whole"), ("job-nozero", True, False), ("pp", False, False)])
def test_integrated_equals_merge(comm, shared_tmp, name, async_save, dedup):
    rank, size = rank_size(comm)
    s = layout(name, size)
    d = shared_tmp / "checkpoint"
    with CheckpointManager(d, s, comm, prefix="m", keep_max=2, integrated=True,
                           max_shard_size=SHARD, async_save=async_save, dedup=dedup) as mgr:
        for k in (1, 2):
            assert mgr.save(state_at(s, rank, k), 1, k)
        assert mgr.save(local_state(s, rank), 1, 3)   # FULL itself, as non-contiguous views
        mgr.wait()
        assert mgr.latest() == (1, 3)
    barrier(comm)
    # rotation took step 1's complete weights with its record
    assert sorted(os.listdir(d / "integrated")) == ["m-1_2", "m-1_3"]
    out = d / "integrated" / "m-1_3"
    assert "model.safetensors.index.json" in os.listdir(out)
    check_complete_dir(comm, out)        # every tensor bit for bit; safetensors loads it
    merged = shared_tmp / "merged"
    hpcckpt.merge(str(d), str(merged), max_shard_size=SHARD, comm=comm)
    same_files(comm, out, merged)
    barrier(comm)


def test_integrated_single_file_and_zero_size(comm, shared_tmp):
    """Default shard size: one model.safetensors, no index; zero-size tensors included."""
    rank, size = rank_size(comm)
    s = strategy("job", size)
    d = shared_tmp / "checkpoint"
    with CheckpointManager(d, s, comm, integrated=True) as mgr:
        mgr.save(local_state(s, rank), 2, 5)
    barrier(comm)
    out = d / "integrated" / "CKP-2_5"
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    check_complete_dir(comm, out)
    barrier(comm)


@pytest.mark.parametrize("async_save", [False, True])
def test_integrated_failure_on_one_rank(comm, shared_tmp, monkeypatch, async_save):
    """A write failure on one rank while writing the complete weights: the same error on
    every rank, no complete weights, no rank file and no record of the step; the
    previous step stays the latest, whole."""
    rank, size = rank_size(comm)
    s = strategy("job", size)
    d = shared_tmp / "checkpoint"
    mgr = CheckpointManager(d, s, comm, prefix="m", integrated=True, max_shard_size=SHARD,
                            async_save=async_save)
    mgr.save(local_state(s, rank), 1, 1)
    mgr.wait()
    # the failing rank: the first one with something to write; the shard it writes first
    firsts = allgather(comm, next((mgr._integrated.where[e.name][0]
                                   for e in mgr._integrated.layout.entries if e.nbytes), None))
    bad = next(r for r, f in enumerate(firsts) if f is not None)
    shard = mgr._integrated.files[firsts[bad]].path
    real = commit_mod.write_runs_to_file

    def full_disk(fd, path, begin, runs, data, base=0, exclusive=True):
        raise CheckpointIOError(f"{path}: write failed: {os.strerror(errno.ENOSPC)}")
    if rank == bad:
        monkeypatch.setattr(commit_mod, "write_runs_to_file", full_disk)
    with pytest.raises(FAILS) as e:
        mgr.save(state_at(s, rank, 2), 1, 2)
        mgr.wait()
    monkeypatch.setattr(commit_mod, "write_runs_to_file", real)
    assert failure(e) == (f"rank {bad}: {d}/integrated/m-1_2/{shard}: write failed: "
                          "No space left on device")
    assert mgr.latest() == (1, 1)
    barrier(comm)
    assert sorted(os.listdir(d / "integrated")) == ["m-1_1"]
    assert not [n for n in os.listdir(d / f"rank_{rank}") if "1_2" in n]
    assert sorted(os.listdir(d / "commits")) == ["000001-1_1.json"]
    check_complete_dir(comm, d / "integrated" / "m-1_1")
    mgr.save(local_state(s, rank), 1, 3)     # the manager still works
    mgr.close()
    barrier(comm)
    check_complete_dir(comm, d / "integrated" / "m-1_3")
    barrier(comm)
