"""CheckpointManager under MPI (any world size: 1, 2, 3, 4, 8): every dtype, uneven and
zero-size boxes; full, balanced and whole de-duplication, sync and async; rotation;
restore bit-exact into the same strategy, into others (tp, dp, pp, ZeRO) and at another
world size; an asynchronous failure on one rank raised on all; ENOSPC on one rank."""
from __future__ import annotations

import errno
import functools
import json
import os
import signal

import numpy as np
import pytest

import hpcckpt
from hpcckpt.ops import commit as commit_mod
from hpcckpt.ops.save import CheckpointManager
from hpcckpt.storage.inputs import open_input

from helpers import allgather, assert_bytes_equal, barrier, collective, rank_size
from test_exchange_mpi import FULL, TENSORS, check_state, local_state, strategy

pytestmark = pytest.mark.mpi


def failure(excinfo) -> str:
    """'rank R: message' of a failure: a RankFailure, or in one process the error itself."""
    e = excinfo.value
    return str(e) if isinstance(e, hpcckpt.RankFailure) else f"rank 0: {e}"


FAILS = (hpcckpt.RankFailure, hpcckpt.CheckpointIOError)


@functools.lru_cache(maxsize=4)
def full_at(k: int) -> dict[str, np.ndarray]:
    """The model after k steps: FULL with every byte shifted by k (bit patterns change)."""
    out = {}
    for name, a in FULL.items():
        b = a.copy()
        b.reshape(-1).view(np.uint8)[:] += np.uint8(k)
        out[name] = b
    return out


def state_at(s, rank, k):
    f = full_at(k)
    return {t.name: f[t.name][tuple(slice(o, o + n) for o, n in zip(box.offsets, box.sizes))]
            for t, box in s.rank_boxes(rank)}


def check_loaded(comm, got, s, k, what):
    f = full_at(k)

    def check():
        r = rank_size(comm)[0]
        want = {t.name: box for t, box in s.rank_boxes(r)}
        assert set(got) == set(want), (what, set(got) ^ set(want))
        for name, box in want.items():
            assert_bytes_equal(got[name], f[name][tuple(slice(o, o + n) for o, n in
                                                      zip(box.offsets, box.sizes))],
                               f"{what}: rank {r} {name} {box}")
    collective(comm, check)


@pytest.mark.parametrize("dedup,async_save", [(False, False), ("balanced", True),
                                              ("whole", False), (True, False)])
def test_save_rotate_restore(comm, shared_tmp, dedup, async_save):
    rank, size = rank_size(comm)
    s = strategy("job", size)
    d = shared_tmp / "checkpoint"
    with CheckpointManager(d, s, comm, prefix="m", keep_max=2, save_steps=1, dedup=dedup,
                           async_save=async_save) as mgr:
        for k in range(1, 4):
            assert mgr.save(state_at(s, rank, k), 1, k)
        mgr.wait()
        assert mgr.latest() == (1, 3)
        if async_save:
            mine = sum(e.nbytes for e in mgr._main.layout.entries)
            assert mgr.staging_bytes == mine
    barrier(comm)
    recs = sorted(os.listdir(d / "commits"))
    assert recs == ["000002-1_2.json", "000003-1_3.json"]
    doc = json.loads((d / "commits" / recs[-1]).read_text())
    assert doc["redundancy"] == ("dedup" if dedup else "full")
    with open_input(d) as src:
        stored = sum(c.box.volume * t.itemsize * len(c.files)
                     for n, t in src.source.tensors.items() for c in src.source.chunks(n))
    if dedup:
        assert stored == sum(a.nbytes for a in FULL.values())   # each byte once
    assert sorted(os.listdir(d / f"rank_{rank}")) == [
        f"m_rank_{rank}-1_2.safetensors", f"m_rank_{rank}-1_3.safetensors", "meta.json"]
    # the same strategy, the latest and an older step
    check_loaded(comm, hpcckpt.load(str(d), s, comm), s, 3, "latest")
    check_loaded(comm, hpcckpt.load(str(d), s, comm, step=(1, 2)), s, 2, "step 1_2")
    # other layouts of the same world size: tp only, dp only (all replicated), ZeRO off
    for other in ("tpN", "dpN", "job-nozero"):
        o = strategy(other, size)
        check_loaded(comm, hpcckpt.load(str(d), o, comm), o, 3, other)
    # another world size: one rank alone, and pp2*tp2 on the first four ranks
    if rank == 0:
        one = strategy("single")
        got = hpcckpt.load(str(d), one, None)
        for name in TENSORS:
            assert_bytes_equal(got[name], full_at(3)[name], f"single {name}")
    if size >= 4 and comm is not None:
        sub = comm.Split(0 if rank < 4 else 1, rank)
        if rank < 4:
            o = strategy("pp2tp2")
            check_loaded(sub, hpcckpt.load(str(d), o, sub), o, 3, "pp2tp2 on 4 ranks")
        sub.Free()
    barrier(comm)


def test_async_failure_on_one_rank_raised_on_all(comm, shared_tmp, monkeypatch):
    """ENOSPC on the last rank in a background save: save() returned, wait() raises the
    same error on every rank; the previous step stays the latest and loads; the failed
    step leaves no file."""
    rank, size = rank_size(comm)
    s = strategy("job", size)
    d = shared_tmp / "checkpoint"
    mgr = CheckpointManager(d, s, comm, keep_max=3, async_save=True)
    mgr.save(state_at(s, rank, 1), 1, 1)
    mgr.wait()
    real = commit_mod.pwrite_all

    def full_disk(fd, buf, offset, path):
        if offset == 0:              # the header, at creation
            return real(fd, buf, offset, path)
        raise hpcckpt.CheckpointIOError(f"{path}: write of bytes {offset}-{offset + len(buf)} "
                                        f"failed: {os.strerror(errno.ENOSPC)}")
    if rank == size - 1:
        monkeypatch.setattr(commit_mod, "pwrite_all", full_disk)
    assert mgr.save(state_at(s, rank, 2), 1, 2) is True        # staged; the thread fails
    with pytest.raises(FAILS) as e:
        mgr.wait()
    monkeypatch.setattr(commit_mod, "pwrite_all", real)
    if comm is not None:
        assert e.value.step == "write" and list(e.value.failures) == [size - 1]
    f = d / f"rank_{size - 1}" / f"CKP_rank_{size - 1}-1_2.safetensors"
    mine = next(en for en in mgr._main.layout.entries if en.nbytes)
    first = allgather(comm, mine)[size - 1]      # the failing rank's first entry
    assert failure(e) == (f"rank {size - 1}: {f}: write of bytes {first.begin}-{first.end} "
                          "failed: No space left on device")
    assert mgr.latest() == (1, 1)
    barrier(comm)
    assert sorted(os.listdir(d / f"rank_{rank}")) == [f"CKP_rank_{rank}-1_1.safetensors",
                                                      "meta.json"]
    check_loaded(comm, hpcckpt.load(str(d), s, comm), s, 1, "after the failure")
    mgr.save(state_at(s, rank, 3), 1, 3)     # the manager still works
    mgr.close()
    check_loaded(comm, hpcckpt.load(str(d), s, comm), s, 3, "after recovery")


def test_sync_enospc_on_one_rank(comm, shared_tmp, monkeypatch):
    rank, size = rank_size(comm)
    s = strategy("job", size)
    d = shared_tmp / "checkpoint"
    with CheckpointManager(d, s, comm, dedup=True) as mgr:
        mgr.save(state_at(s, rank, 1), 1, 1)
        if rank == 0:
            def no_space(fd):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            monkeypatch.setattr(commit_mod.os, "fsync", no_space)
        with pytest.raises(FAILS) as e:
            mgr.save(state_at(s, rank, 2), 1, 2)
        assert failure(e) == (f"rank 0: {d}/rank_0/CKP_rank_0-1_2.safetensors: fsync failed: "
                              "No space left on device")
        assert mgr.latest() == (1, 1)
    barrier(comm)
    assert not [n for n in os.listdir(d / f"rank_{rank}") if "1_2" in n]


@pytest.mark.parametrize("async_save", [True, False])
def test_preemption_signal_on_one_rank(comm, shared_tmp, async_save):
    """SIGUSR1 on rank 0 only: the next save() call saves that step on every rank (though
    save_steps says not to) and sets preempted everywhere; later calls do nothing."""
    rank, size = rank_size(comm)
    s = strategy("job", size)
    d = shared_tmp / "checkpoint"
    old = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    try:
        with CheckpointManager(d, s, comm, save_steps=100, async_save=async_save) as mgr:
            mgr.install_signal_handler()
            assert mgr.save(state_at(s, rank, 1), 1, 1) is False
            if rank == 0:
                os.kill(os.getpid(), signal.SIGUSR1)
            assert mgr.save(state_at(s, rank, 2), 1, 2) is True
            assert mgr.preempted is True
            assert mgr.latest() == (1, 2)                     # committed before returning
            assert mgr.save(state_at(s, rank, 3), 1, 3) is False
    finally:
        signal.signal(signal.SIGUSR1, old[0])
        signal.signal(signal.SIGTERM, old[1])
    assert allgather(comm, True) == [True] * size
    check_loaded(comm, hpcckpt.load(str(d), s, comm), s, 2, "preempted step")


@pytest.mark.parametrize("async_save", [False, True])
def test_balanced_slabs_written_from_memory(comm, shared_tmp, async_save):
    """A replicated 4 MiB tensor is divided into one slab per rank, each written straight
    from the rank's slice (sync) or its staging copy (async); it loads back bit-exact."""
    from hpcckpt.ops.save import synthetic_state
    rank, size = rank_size(comm)
    s = hpcckpt.strategy_from_dict({"format": "hpcckpt.strategy/1", "mesh": {"dp": size},
                                    "tensors": {"big": {"shape": [1 << 20, 1], "dtype": "F32"},
                                                "w": {"shape": [7, 3], "dtype": "I16",
                                                      "split": ["dp", None]}}})
    d = shared_tmp / "checkpoint"
    state = synthetic_state(s, rank, 5)
    with CheckpointManager(d, s, comm, dedup=True, async_save=async_save) as mgr:
        mgr.save(state, 1, 5)
        if async_save:   # this rank's share only
            assert mgr.staging_bytes == sum(e.nbytes for e in mgr._main.layout.entries)
    got = hpcckpt.load(str(d), s, comm)
    with open_input(d) as src:
        slabs = src.source.chunks("big")

    def check():
        assert len(slabs) == size and all(len(c.files) == 1 for c in slabs)
        for name, a in state.items():
            assert_bytes_equal(got[name], a, name)
    collective(comm, check)
