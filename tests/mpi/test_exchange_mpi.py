"""Slices moving between ranks over MPI: reshard_state, load and node-local reshard.

Runs under ``mpiexec -n N python -m pytest tests/mpi -m mpi --with-mpi`` for any N
(CI: 1, 2, 3, 4, 8) and serially (N = 1, ``comm`` is None). Strategies of a fixed world
size are skipped, identically on every rank, when the job is too small for them; the
``...N`` strategies adapt to the job size so every world size exercises each path.

Every rank builds the same complete tensors (``FULL``, deterministic), so each rank
checks the slices it ends up with against the slice cut from the complete array, byte
for byte. Checks run through ``collective``: a failure on one rank fails the test on
every rank instead of leaving the others waiting in the next collective call.
"""
from __future__ import annotations

import builtins
import io
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import xxhash

import hpcckpt
from hpcckpt.errors import format_failures
from hpcckpt.ops.filecopy import CopyOptions
from hpcckpt.formats.safetensors import build_header, read_header
from hpcckpt.storage.manifest import read_manifest

from helpers import (DTYPES, allgather, assert_bytes_equal, barrier, box_slices, collective,
                     make_tensors, mine, rank_size)

pytestmark = pytest.mark.mpi

FMT = "hpcckpt.strategy/1"
OPTS = CopyOptions(fsync=False, progress=False)
TINY = {"max_message": 64, "budget": 256}     # many rounds, every message split

# ---------------------------------------------------------------------------------
# The model: every dtype of interest, uneven dims, a scalar, zero-size tensors
# ---------------------------------------------------------------------------------
EMB = "model.embed_tokens.weight"
QKV = "model.layers.0/attn.qkv.weight"
UP = "model.layers.0/mlp.up_proj.weight"
DOWN = "model.layers.1/mlp.down_proj.weight"
MASK = "model.layers.1/attn.mask"
NORM = "model.norm.weight"
SCALE = "model.logit_scale"
EMPTY = "model.layers.1/empty.bias"
EMPTY2 = "model.layers.1/no_cols.weight"
EXP = "model.layers.1/experts.w"
HEAD = "lm_head.weight"
STEP = "optimizer.step"
BIG = "optimizer.exp_avg.model.layers.0/attn.qkv.weight"

TENSORS: dict[str, tuple[list[int], str]] = {
    EMB: ([13, 6], "BF16"),
    QKV: ([9, 7], "F32"),
    UP: ([7, 5], "F8_E4M3"),
    DOWN: ([5, 11], "F8_E5M2"),
    MASK: ([5, 3], "BOOL"),
    NORM: ([7], "F16"),
    SCALE: ([], "F32"),
    EMPTY: ([0, 3], "F32"),
    EMPTY2: ([4, 0], "BF16"),
    EXP: ([3, 4, 5], "I32"),
    HEAD: ([11, 6], "BF16"),
    STEP: ([], "I64"),
    BIG: ([37, 19], "F32"),
}
FULL = make_tensors(TENSORS, seed=4321)
TOTAL = sum(a.nbytes for a in FULL.values())


def _split(*axes):
    """A split list: None for unsplit dims; [a, b] for a list split (None entries drop)."""
    out = []
    for a in axes:
        if isinstance(a, (list, tuple)):
            a = [x for x in a if x]
            a = None if not a else (a[0] if len(a) == 1 else a)
        out.append(a)
    return {"split": out} if any(x is not None for x in out) else {}


def layouts(mesh: dict, zero: bool = True) -> dict:
    """Megatron/MindSpore-like layouts using whichever of tp, dp, pp the mesh has:
    tensor parallel splits (even and uneven), ZeRO over dp, pipeline stages."""
    tp = "tp" if "tp" in mesh else None
    dp = "dp" if "dp" in mesh else None
    z = {"zero": "dp"} if zero and dp else {}
    first = {"stage": 0} if "pp" in mesh else {}
    last = {"stage": mesh["pp"] - 1} if "pp" in mesh else {}
    return {
        EMB: {**_split(tp, None), **first, **z},
        QKV: {**_split(None, tp), **first, **z},
        UP: {**_split(tp, None), **first},
        DOWN: {**_split(None, [tp, dp]), **last},
        MASK: {**_split(dp, tp)},
        NORM: {**z},
        SCALE: {},
        EMPTY: {**_split(tp, None), **z},
        EMPTY2: {**_split(None, tp), **last},
        EXP: {**_split(dp, None, tp), **last},
        HEAD: {**_split(tp, None), **last, **z},
        STEP: {},
        BIG: {**_split(None, tp), **first, **z},
    }


# Irregular explicit boxes: replicas, ranks holding nothing, one box per rank at most.
BOXES3 = {
    EMB: {"boxes": {0: {"offsets": [0, 0], "sizes": [13, 2]},
                    1: {"offsets": [0, 2], "sizes": [5, 4]},
                    2: {"offsets": [5, 2], "sizes": [8, 4]}}},
    QKV: {"boxes": {0: {"offsets": [0, 0], "sizes": [9, 7]},
                    2: {"offsets": [0, 0], "sizes": [9, 7]}}},
    EXP: {"boxes": {1: {"offsets": [0, 0, 0], "sizes": [3, 4, 5]}}},
    BIG: {"boxes": {0: {"offsets": [0, 0], "sizes": [20, 19]},
                    1: {"offsets": [20, 0], "sizes": [17, 10]},
                    2: {"offsets": [20, 10], "sizes": [17, 9]}}},
}

MESHES: dict[str, dict] = {
    "single": {},
    "tp2": {"tp": 2},
    "tp3": {"tp": 3},
    "tp4": {"tp": 4},
    "dp2tp2": {"dp": 2, "tp": 2},
    "pp2tp2": {"pp": 2, "tp": 2},
    "pp4": {"pp": 4},
    "pp2dp3": {"pp": 2, "dp": 3},
    "dp2tp4": {"dp": 2, "tp": 4},
    "pp2dp2tp2": {"pp": 2, "dp": 2, "tp": 2},
    "tp2dp2pp2": {"tp": 2, "dp": 2, "pp": 2},   # the same axes, another rank order
    "boxes3": {"r": 3},
}


def job_mesh(n: int) -> dict:
    """A mesh of exactly n ranks with replicas where n allows (for load)."""
    return {1: {}, 2: {"dp": 2}, 3: {"tp": 3}, 4: {"dp": 2, "tp": 2},
            6: {"pp": 2, "dp": 3}, 8: {"pp": 2, "dp": 2, "tp": 2}}.get(n, {"dp": n})


def strategy(name: str, n: int = 1) -> hpcckpt.Strategy:
    """Strategies by name; "-nozero" drops ZeRO; "dpN"/"tpN"/"job" use the job size n."""
    base, zero = (name[:-len("-nozero")], False) if name.endswith("-nozero") else (name, True)
    if base == "dpN":
        mesh = {"dp": n}
    elif base == "tpN":
        mesh = {"tp": n}
    elif base == "job":
        mesh = job_mesh(n)
    else:
        mesh = MESHES[base]
    lay = layouts(mesh, zero)
    if base == "boxes3":
        lay.update(BOXES3)
    doc = {"format": FMT, "mesh": mesh,
           "tensors": {t: {"shape": list(TENSORS[t][0]), "dtype": TENSORS[t][1], **lay[t]}
                       for t in TENSORS}}
    return hpcckpt.strategy_from_dict(doc, where=f"{name}.yaml")


# ---------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------


def need(comm, n: int) -> None:
    """Skip (on every rank alike) when the job has fewer than n ranks."""
    size = rank_size(comm)[1]
    if size < n:
        pytest.skip(f"needs a job of at least {n} ranks (this one has {size})")


def cut(name: str, box) -> np.ndarray:
    return FULL[name][box_slices(box)]


def local_state(s: hpcckpt.Strategy, rank: int) -> dict[str, np.ndarray]:
    """The slices ``rank`` holds under ``s``, as (mostly non-contiguous) views of FULL."""
    return {t.name: cut(t.name, box) for t, box in s.rank_boxes(rank)}


def check_state(comm, state: dict, s: hpcckpt.Strategy, what: str) -> None:
    """Every rank holds exactly its boxes under ``s`` (nothing beyond s.world_size),
    each bit-identical to the slice of the complete tensor."""
    def check():
        r = rank_size(comm)[0]
        want = {t.name: box for t, box in s.rank_boxes(r)}
        if r >= s.world_size:
            assert state == {}, f"{what}: rank {r} is beyond the strategy but got {sorted(state)}"
        assert set(state) == set(want), (what, r, set(state) ^ set(want))
        for name, box in want.items():
            assert isinstance(state[name], np.ndarray), (what, name, type(state[name]))
            assert_bytes_equal(state[name], cut(name, box), f"{what}: rank {r} {name} {box}")
    collective(comm, check)


def write_complete(comm, path: Path, names=None) -> Path:
    """Rank 0 writes FULL (or ``names`` of it) as one complete safetensors file."""
    names = list(TENSORS) if names is None else list(names)

    def write():
        if rank_size(comm)[0] == 0:
            entries = [(n, TENSORS[n][1], tuple(TENSORS[n][0])) for n in names]
            head, spans = build_header(entries, {"format": "pt"})
            with open(path, "wb") as f:
                f.write(head)
                for n in names:
                    assert f.tell() == spans[n][0]
                    f.write(FULL[n].tobytes())
    collective(comm, write)
    return path


def write_hf_sharded(comm, out: Path, shards: int = 3) -> Path:
    """Rank 0 writes an HF sharded directory: model-0000i-of-0000N.safetensors + index."""
    names = list(TENSORS)

    def write():
        if rank_size(comm)[0] == 0:
            out.mkdir(parents=True, exist_ok=True)
            weight_map = {}
            for i in range(shards):
                part = names[i::shards]
                fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
                write_complete(None, out / fname, part)
                weight_map.update({n: fname for n in part})
            (out / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": TOTAL}, "weight_map": weight_map}))
    collective(comm, write)
    return out


def read_entry(path, name: str) -> np.ndarray:
    e = read_header(path).entry(name)
    with open(path, "rb") as f:
        f.seek(e.begin)
        raw = f.read(e.nbytes)
    assert len(raw) == e.nbytes, f"{path}: short read of {name!r}"
    return np.frombuffer(raw, dtype=DTYPES[e.dtype]).reshape(e.shape)


def rank_of_file(rel: str) -> int:
    head = rel.split("/")[0]
    assert head.startswith("rank_"), rel
    return int(head[len("rank_"):])


# ---------------------------------------------------------------------------------
# 1. reshard_state: in-memory round trips N -> M -> N
# ---------------------------------------------------------------------------------
RESHARD_STATE = [
    ("tp4", "tp3", {}),                      # 4 -> 3 -> 4, uneven pieces
    ("tp4", "tp3", TINY),                    # same, 64-byte messages, 256-byte budget
    ("dp2tp4", "single", {}),                # 8 -> 1 -> 8
    ("single", "pp2dp2tp2", {}),             # 1 -> 8 -> 1
    ("pp2dp3", "dp2tp2", {}),                # 6 -> 4 -> 6, pp and zero
    ("pp2dp2tp2", "tp2dp2pp2", {}),          # 8 -> 8, another mesh order
    ("pp2tp2", "pp4", {}),                   # pipeline stages change
    ("dp2tp2", "dp2tp2-nozero", {}),         # ZeRO off and on again
    ("boxes3", "dp2tp2", {}),                # explicit irregular boxes
    ("tp3", "tp2", {}),                      # 3 -> 2 -> 3
    ("tp2", "single", {}),                   # 2 -> 1 -> 2
    ("dpN", "tpN", {}),                      # the whole job, any size
    ("tpN", "dpN-nozero", TINY),
]


def _rs_id(case) -> str:
    a, b, kw = case
    return f"{a}->{b}" + ("-tiny" if kw else "")


@pytest.mark.parametrize("src_name,dst_name,kw", RESHARD_STATE, ids=map(_rs_id, RESHARD_STATE))
def test_reshard_state_roundtrip(comm, src_name, dst_name, kw):
    rank, size = rank_size(comm)
    a, b = strategy(src_name, size), strategy(dst_name, size)
    need(comm, max(a.world_size, b.world_size))
    start = local_state(a, rank)
    mid = hpcckpt.reshard_state(start, a, b, comm, **kw)
    check_state(comm, mid, b, f"{src_name}->{dst_name}")
    back = hpcckpt.reshard_state(mid, b, a, comm, **kw)
    check_state(comm, back, a, f"{src_name}->{dst_name}->{src_name}")


def test_reshard_state_same_strategy_and_contiguous_copies(comm):
    """Same layout: every slice stays on its rank; the result does not alias the input."""
    rank, size = rank_size(comm)
    s = strategy("job", size)
    start = {n: np.array(a, order="C") for n, a in local_state(s, rank).items()}
    out = hpcckpt.reshard_state(start, s, s, comm)
    check_state(comm, out, s, "identity")

    def no_alias():
        for n, a in out.items():
            assert not np.shares_memory(a, start[n]), n
    collective(comm, no_alias)


# ---------------------------------------------------------------------------------
# 2. load: from complete weights and from distributed checkpoints of any strategy
# ---------------------------------------------------------------------------------
def check_load_stats(comm, stats: dict, s: hpcckpt.Strategy, budget: int | None = None) -> None:
    """Each unique destination byte is read from disk exactly once across the job, by
    one of the ranks holding it; every other replica receives it; nothing else travels.
    Rounds: none when nothing travels; with the default budget (far above these tensors)
    exactly one; with ``budget``, at least what the busiest receiver needs (half the
    budget receives per round)."""
    size = rank_size(comm)[1]

    def check():
        per = stats["per_rank"]
        assert [p["rank"] for p in per] == list(range(size)), per
        assert stats["unique_bytes"] == s.unique_bytes
        replicated = sum(s.rank_bytes(r) for r in range(size))
        got_sent = sum(p["bytes_sent"] for p in per)
        got_recv = sum(p["bytes_received"] for p in per)
        assert got_sent == got_recv, per
        assert got_recv == replicated - s.unique_bytes, (got_recv, replicated, s.unique_bytes)
        read = [p["bytes_read"] for p in per]
        assert sum(read) == s.unique_bytes, (read, s.unique_bytes)
        for p in per:
            assert 0 <= p["bytes_received"] <= s.rank_bytes(p["rank"]), p
            assert p["bytes_read"] + p["bytes_received"] == s.rank_bytes(p["rank"]), p
        if not got_recv:
            assert stats["rounds"] == 0, stats
        elif budget is None:
            assert stats["rounds"] == 1, stats
        else:
            busiest = max(p["bytes_received"] for p in per)
            assert stats["rounds"] >= -(-busiest // (budget // 2)), stats
    collective(comm, check)


def _make_source(comm, root: Path, kind: str) -> str:
    """A checkpoint holding FULL: 'file', 'hf' (sharded + index), or 'dist:NAME[:dedup]'."""
    complete = write_complete(comm, root / "model.safetensors")
    if kind == "file":
        return str(complete)
    if kind == "hf":
        return str(write_hf_sharded(comm, root / "hf"))
    _, name, *flags = kind.split(":")
    size = rank_size(comm)[1]
    dist = root / "dist"
    hpcckpt.split(str(complete), str(dist), strategy(name, size), dedup="dedup" in flags,
                  comm=comm, options=OPTS)
    barrier(comm)
    if rank_size(comm)[0] == 0:
        os.unlink(complete)  # the distributed copy must be the only source
    barrier(comm)
    return str(dist)


LOADS = [
    ("file", "job", {}),
    ("hf", "tpN", {}),
    ("dist:pp2dp3", "job", {}),              # full, another world size
    ("dist:dp2tp4:dedup", "dpN", TINY),      # de-duplicated, tiny messages
    ("dist:job:dedup", "job", {}),           # the same strategy, de-duplicated
    ("dist:boxes3", "tpN-nozero", {}),
]


@pytest.mark.parametrize("src_kind,dst_name,kw", LOADS,
                         ids=[f"{a}->{b}" + ("-tiny" if k else "") for a, b, k in LOADS])
def test_load(comm, shared_tmp, src_kind, dst_name, kw):
    size = rank_size(comm)[1]
    s = strategy(dst_name, size)
    path = _make_source(comm, shared_tmp, src_kind)
    stats: dict = {}
    state = hpcckpt.load(path, s, comm, stats=stats, **kw)
    check_state(comm, state, s, f"load {src_kind} as {dst_name}")
    check_load_stats(comm, stats, s, kw.get("budget"))


def test_load_subset_of_a_complete_file(comm, shared_tmp):
    """A strategy naming only some of the file's tensors loads just those."""
    size = rank_size(comm)[1]
    full = strategy("job", size)
    keep = {EMB, MASK, SCALE, EMPTY, BIG}
    doc = full.to_dict()
    doc["tensors"] = {n: t for n, t in doc["tensors"].items() if n in keep}
    s = hpcckpt.strategy_from_dict(doc, where="subset.yaml")
    path = _make_source(comm, shared_tmp, "file")
    stats: dict = {}
    state = hpcckpt.load(path, s, comm, stats=stats)
    check_state(comm, state, s, "subset")
    check_load_stats(comm, stats, s)


def _garbage_like(s: hpcckpt.Strategy, rank: int) -> dict:
    """Caller arrays for ``rank``'s boxes, filled with bytes no checkpoint holds."""
    from hpcckpt.dtypes import numpy_dtype
    out = {}
    for t, box in s.rank_boxes(rank):
        a = np.empty(box.sizes, numpy_dtype(t.dtype))
        a.reshape(-1).view(np.uint8)[:] = 0xA5
        out[t.name] = a
    return out


@pytest.mark.parametrize("src_kind,dst_name,kw", [("file", "tpN", {}),
                                                  ("dist:dp2tp4:dedup", "dpN", TINY)],
                         ids=["file->tpN", "dist-dedup->dpN-tiny"])
def test_load_into_caller_arrays(comm, shared_tmp, src_kind, dst_name, kw):
    """out=: the caller's arrays (numpy, and plain buffers for F32 tensors) are filled in
    place with exactly the checkpoint's bytes; nothing else is allocated for them."""
    rank, size = rank_size(comm)
    s = strategy(dst_name, size)
    path = _make_source(comm, shared_tmp, src_kind)
    out = _garbage_like(s, rank)
    raw = {}   # F32 tensors as typed memoryviews of bytearrays: the buffer protocol path
    for t, box in s.rank_boxes(rank):
        if t.dtype == "F32" and box.volume and box.sizes:
            raw[t.name] = bytearray(b"\xa5" * box.volume * 4)
            out[t.name] = memoryview(raw[t.name]).cast("B").cast("f", box.sizes)
    before = dict(out)
    stats: dict = {}
    got = hpcckpt.load(path, s, comm, out=out, stats=stats, **kw)

    def same_objects():
        assert got is out
        assert all(out[n] is before[n] for n in before)
    collective(comm, same_objects)
    state = {n: (np.frombuffer(raw[n], np.float32).reshape(out[n].shape) if n in raw else a)
             for n, a in out.items()}
    check_state(comm, state, s, f"load {src_kind} into out=")
    check_load_stats(comm, stats, s, budget=kw.get("budget"))


IN_PLACE_LOADS = [("dist:pp2dp3", "dpN-nozero", {}, 0),       # every forwarded box in place
                  ("dist:pp2dp3", "dpN", {}, 16),             # ZeRO boxes; small ones staged
                  ("dist:dp2tp4:dedup", "dpN-nozero", TINY, 100)]   # both in tiny rounds


@pytest.mark.parametrize("src_kind,dst_name,kw,minimum", IN_PLACE_LOADS,
                         ids=[f"{a}->{b}-min{m}" + ("-tiny" if k else "")
                              for a, b, k, m in IN_PLACE_LOADS])
def test_load_in_place_equals_staged(comm, shared_tmp, monkeypatch, src_kind, dst_name, kw,
                                     minimum):
    """A box forwarded to its replicas travels in place (from the reader's array
    straight into the replica's, here the caller's, by point-to-point messages; down to
    ``IN_PLACE_MIN`` = ``minimum`` bytes) and gives exactly what staging it through the
    exchange buffers gives: the same bytes, traffic and rounds."""
    from hpcckpt.comm.wrapper import Comm
    from hpcckpt.ops import route_exec
    rank, size = rank_size(comm)
    s = strategy(dst_name, size)
    path = _make_source(comm, shared_tmp, src_kind)
    moved = {"in_place": 0, "staged": 0}
    real = Comm.alltoallv_bytes

    def counting(self, sendbuf, sendcounts, recvbuf, recvcounts, sends=(), recvs=()):
        moved["in_place"] += sum(len(memoryview(v)) for _, v in recvs)
        moved["staged"] += sum(recvcounts)
        real(self, sendbuf, sendcounts, recvbuf, recvcounts, sends, recvs)
    monkeypatch.setattr(Comm, "alltoallv_bytes", counting)
    runs = {}
    for name, floor in (("staged", 1 << 40), ("in place", minimum)):
        monkeypatch.setattr(route_exec, "IN_PLACE_MIN", floor)
        stats: dict = {}
        out = _garbage_like(s, rank) if name == "in place" else None   # caller arrays too
        state = hpcckpt.load(path, s, comm, stats=stats, out=out, **kw)
        check_state(comm, state, s, f"load {src_kind} as {dst_name}, {name}")
        check_load_stats(comm, stats, s, kw.get("budget"))
        runs[name] = ({k: v for k, v in stats.items() if k != "seconds"}, dict(moved))
        moved.update(in_place=0, staged=0)

    def same():
        (staged, by_buffers), (in_place, by_messages) = runs["staged"], runs["in place"]
        assert in_place == staged
        received = staged["per_rank"][rank]["bytes_received"]
        assert by_buffers == {"in_place": 0, "staged": received}
        assert sum(by_messages.values()) == received
        if minimum == 0:
            assert by_messages["staged"] == 0, by_messages
    collective(comm, same)
    mixed = allgather(comm, runs["in place"][1])
    if size > 1:   # the cases are chosen so that both ways are taken
        assert sum(m["in_place"] for m in mixed) > 0, mixed
        assert sum(m["staged"] for m in mixed) > 0 or minimum == 0, mixed


def test_load_out_refuses_wrong_arrays(comm, shared_tmp):
    """out= arrays that do not match the rank's boxes: refused before any byte is read,
    the same error on every rank naming the rank, the tensor and the box."""
    rank, size = rank_size(comm)
    s = strategy("tpN", size)
    path = str(write_complete(comm, shared_tmp / "model.safetensors"))
    last = size - 1
    out = _garbage_like(s, rank)
    box = s.box_of(EMB, 0)
    failures = {0: (f"rank 0: out[{EMB!r}] is float32 {list(box.sizes)} but the strategy "
                    f"gives this rank BF16 {list(box.sizes)} at {box}")}
    if rank == 0:
        out[EMB] = out[EMB].astype(np.float32)
    if size > 1:
        hbox = s.box_of(BIG, last)
        failures[last] = (f"rank {last}: out[{BIG!r}] is float32 [{hbox.sizes[0] + 1}, "
                          f"{hbox.sizes[1]}] but the strategy gives this rank F32 "
                          f"{list(hbox.sizes)} at {hbox}")
        if rank == last:
            out[BIG] = np.zeros((hbox.sizes[0] + 1, hbox.sizes[1]), np.float32)
    with pytest.raises(hpcckpt.HpcckptError) as ei:
        hpcckpt.load(path, s, comm, out=out)
    expect_error(comm, ei, failures)

    qbox = s.box_of(BIG, last)
    cases = [  # (what rank ``last`` passes for BIG, its error)
        (None, f"rank {last}: out lacks tensor {BIG!r} (its box {qbox})"),
        (np.zeros((qbox.sizes[1], qbox.sizes[0]), np.float32).T,
         f"rank {last}: out[{BIG!r}] is not a writable C-contiguous array"),
        (np.frombuffer(bytes(qbox.volume * 4), np.float32).reshape(qbox.sizes),
         f"rank {last}: out[{BIG!r}] is not a writable C-contiguous array"),
        (bytearray(qbox.volume * 4),
         f"rank {last}: out[{BIG!r}] is a buffer of 1-byte items [{qbox.volume * 4}] but the "
         f"strategy gives this rank F32 {list(qbox.sizes)} at {qbox}"),
        ([0.0] * qbox.volume,
         f"rank {last}: out[{BIG!r}] is a list, neither a numpy array nor a buffer"),
    ]
    for bad, msg in cases:
        out = _garbage_like(s, rank)
        if rank == last:
            if bad is None:
                del out[BIG]
            else:
                out[BIG] = bad
        with pytest.raises(hpcckpt.HpcckptError) as ei:
            hpcckpt.load(path, s, comm, out=out)
        expect_error(comm, ei, {last: msg})
        if comm is None:
            assert isinstance(ei.value, hpcckpt.UsageError)
    # the job is still usable, and a right out= fills in place
    out = _garbage_like(s, rank)
    check_state(comm, hpcckpt.load(path, s, comm, out=out), s, "after the errors")


# ---------------------------------------------------------------------------------
# 3. node-local reshard: every rank sees only its own directories
# ---------------------------------------------------------------------------------
class OpenedPaths:
    """Records every path opened or listed below ``root`` (files and directories)."""

    def __init__(self, monkeypatch, root: Path):
        self.root = os.path.realpath(root)
        self.paths: list[str] = []
        for mod, attr in ((os, "open"), (builtins, "open"), (io, "open"),
                          (os, "listdir"), (os, "scandir"), (os, "stat")):
            monkeypatch.setattr(mod, attr, self._wrap(getattr(mod, attr)))

    def _wrap(self, fn):
        def wrapper(*args, **kwargs):
            p = args[0] if args else kwargs.get("path", kwargs.get("file", "."))
            if isinstance(p, (str, bytes, os.PathLike)):
                full = os.path.realpath(os.fsdecode(p))
                if full == self.root or full.startswith(self.root + os.sep):
                    self.paths.append(full)
            return fn(*args, **kwargs)
        return wrapper

    def outside(self, *allowed: Path) -> list[str]:
        ok = [os.path.realpath(a) for a in allowed]
        return sorted({p for p in self.paths
                       if not any(p == a or p.startswith(a + os.sep) for a in ok)})


def distribute(comm, src: Path, base: Path) -> None:
    """Copy the checkpoint ``src`` into per-rank directories base/node{j}/ckpt: rank j
    gets rank_<r> for r % size == j plus manifest.json and strategy.yaml; then ``src``
    is removed so no rank can fall back on a shared copy."""
    rank, size = rank_size(comm)

    def copy():
        mine_dir = base / f"node{rank}" / "ckpt"
        mine_dir.mkdir(parents=True)
        for f in ("manifest.json", "strategy.yaml"):
            shutil.copy2(src / f, mine_dir / f)
        for d in sorted(src.iterdir()):
            if d.name.startswith("rank_") and int(d.name[5:]) % size == rank:
                shutil.copytree(d, mine_dir / d.name)
    collective(comm, copy)
    barrier(comm)
    if rank == 0:
        shutil.rmtree(src)
    barrier(comm)


def expected_received(src_manifest: dict, dst: hpcckpt.Strategy, dst_holders,
                      size: int) -> list[int]:
    """Bytes job rank k must receive: elements of its destination files that none of its
    own source files store (computed element by element from the manifests/strategies)."""
    recv = [0] * size
    for t in dst.tensors:
        shape, dtype = TENSORS[t.name]
        have = [np.zeros(shape, bool) for _ in range(size)]
        for c in src_manifest["tensors"][t.name]["chunks"]:
            have[rank_of_file(c["file"]) % size][
                tuple(slice(o, o + z) for o, z in zip(c["offsets"], c["sizes"]))] = True
        needs = [np.zeros(shape, bool) for _ in range(size)]
        for d, box in dst_holders(t.name):
            needs[d % size][box_slices(box)] = True
        for k in range(size):
            recv[k] += int((needs[k] & ~have[k]).sum()) * DTYPES[dtype].itemsize
    return recv


def check_dist_files(comm, root_of, s: hpcckpt.Strategy, dedup: bool, prefix: str) -> None:
    """Destination file d (written by job rank d % size, found under root_of(d)) holds
    exactly its boxes (or its de-duplicated share) with the right bytes and metadata."""
    rank, size = rank_size(comm)

    def check():
        for d in range(rank, s.world_size, size):
            path = root_of(d) / f"rank_{d}" / f"{prefix}_rank_{d}.safetensors"
            assert path.is_file(), f"missing {path}"
            h = read_header(path)
            assert h.metadata.get("remove_redundancy") == ("True" if dedup else "False")
            desc = json.loads(h.metadata["hpcckpt"])
            want = {t.name: box for t, box in s.rank_boxes(d)}
            if dedup:
                assert set(h.tensors) <= set(want), (d, set(h.tensors) - set(want))
            else:
                assert set(h.tensors) == set(want), (d, set(h.tensors) ^ set(want))
            for name in h.tensors:
                box = want[name]
                if dedup:  # balanced: a slab of the rank's box may be stored
                    box = hpcckpt.Box(tuple(desc[name]["offsets"]), tuple(h.tensors[name].shape))
                    assert want[name].contains(box), (d, name, box, want[name])
                assert desc[name]["offsets"] == list(box.offsets), (d, name, desc[name])
                assert_bytes_equal(read_entry(path, name), cut(name, box), f"file {d} {name}")
    collective(comm, check)


def check_manifest_chunks(comm, ckpt: Path, s: hpcckpt.Strategy, dedup: bool) -> dict:
    """Checksums recomputed from the stored bytes; dedup stores each distinct box once."""
    doc = read_manifest(ckpt).expanded()

    def check():
        assert doc["world_size"] == s.world_size
        assert doc["redundancy"] == ("dedup" if dedup else "full")
        assert list(doc["tensors"]) == [t.name for t in s.tensors]
        chunks = [(n, c) for n, t in doc["tensors"].items() for c in t["chunks"]]
        for name, c in mine(comm, chunks):
            path = ckpt / c["file"]
            e = read_header(path).entry(name)
            with open(path, "rb") as f:
                f.seek(e.begin)
                data = f.read(e.nbytes)
            assert c["checksum"] == "xxh3_64:" + xxhash.xxh3_64_hexdigest(data), (name, c)
            want = FULL[name][tuple(slice(o, o + z) for o, z in zip(c["offsets"], c["sizes"]))]
            assert data == want.tobytes(), (name, c)
        if dedup:
            for t in s.tensors:
                got = sorted((tuple(c["offsets"]), tuple(c["sizes"]))
                             for c in doc["tensors"][t.name]["chunks"] if math.prod(c["sizes"]))
                reps = {(tuple(b.offsets), tuple(b.sizes)): rs for b, rs in s.chunks(t.name)}
                assert got == sorted(reps), (t.name, got, sorted(reps))
                for c in doc["tensors"][t.name]["chunks"]:
                    if math.prod(c["sizes"]):
                        key = (tuple(c["offsets"]), tuple(c["sizes"]))
                        assert rank_of_file(c["file"]) in reps[key], (t.name, c)
    collective(comm, check)
    return doc


NODE_LOCAL = [
    ("pp2dp2tp2", False, "tp3", False, {}),
    ("tp3", True, "dp2tp2", False, TINY),      # de-duplicated source, tiny messages
    ("dp2tp4", False, "pp2dp3", True, TINY),   # de-duplicated destination
    ("job", False, "tpN-nozero", False, {}),
]


def _nl_id(case) -> str:
    a, ad, b, bd, kw = case
    return (f"{a}{'-dedup' if ad else ''}->{b}{'-dedup' if bd else ''}"
            + ("-tiny" if kw else ""))


@pytest.mark.parametrize("src_name,src_dedup,dst_name,dst_dedup,kw", NODE_LOCAL,
                         ids=map(_nl_id, NODE_LOCAL))
def test_reshard_node_local(comm, shared_tmp, monkeypatch, src_name, src_dedup, dst_name,
                            dst_dedup, kw):
    rank, size = rank_size(comm)
    a, b = strategy(src_name, size), strategy(dst_name, size)
    complete = write_complete(comm, shared_tmp / "model.safetensors")
    src = shared_tmp / "src"
    hpcckpt.split(str(complete), str(src), a, dedup=src_dedup, prefix="net", comm=comm,
                  options=OPTS)
    src_manifest = read_manifest(src).expanded()
    distribute(comm, src, shared_tmp)
    barrier(comm)
    if rank == 0:
        os.unlink(complete)
    barrier(comm)

    my_in, my_out = shared_tmp / f"node{rank}" / "ckpt", shared_tmp / f"out{rank}" / "ckpt"
    opened = OpenedPaths(monkeypatch, shared_tmp)
    res = hpcckpt.reshard(str(shared_tmp / "node{rank}" / "ckpt"),
                          str(shared_tmp / "out{rank}" / "ckpt"), b, dedup=dst_dedup,
                          node_local=True, comm=comm, options=OPTS, **kw)
    monkeypatch.undo()

    def only_own_dirs():
        bad = opened.outside(my_in, my_out.parent)
        assert not bad, f"rank {rank} touched other ranks' files: {bad[:5]}"
        assert any(p.startswith(os.path.realpath(my_in)) for p in opened.paths)
    collective(comm, only_own_dirs)

    # each rank's output directory: its own destination files, manifest, strategy
    check_dist_files(comm, lambda d: shared_tmp / f"out{d % size}" / "ckpt", b, dst_dedup, "net")

    def own_out_dir():
        dirs = sorted(p.name for p in my_out.iterdir() if p.name.startswith("rank_"))
        assert dirs == sorted(f"rank_{d}" for d in range(rank, b.world_size, size)), dirs
        assert (my_out / "manifest.json").is_file() and (my_out / "strategy.yaml").is_file()
        # rank 0 builds the manifest once; every node's copy is the same bytes
        assert ((my_out / "manifest.json").read_bytes()
                == (shared_tmp / "out0" / "ckpt" / "manifest.json").read_bytes())
        assert hpcckpt.load_strategy(my_out / "strategy.yaml").to_dict() == b.to_dict()
        assert not [p for p in my_out.rglob("*.partial")]
    collective(comm, own_out_dir)

    # assemble the per-rank outputs into one checkpoint, check it and merge it back
    whole = shared_tmp / "assembled"

    def assemble():
        if rank == 0:
            whole.mkdir()
            for f in ("manifest.json", "strategy.yaml"):
                shutil.copy2(my_out / f, whole / f)
    collective(comm, assemble)
    barrier(comm)

    def copy_mine():
        for d in range(rank, b.world_size, size):
            shutil.copytree(my_out / f"rank_{d}", whole / f"rank_{d}")
    collective(comm, copy_mine)
    barrier(comm)
    dst_manifest = check_manifest_chunks(comm, whole, b, dst_dedup)
    merged = shared_tmp / "merged"
    hpcckpt.merge(str(whole), str(merged), comm=comm, options=OPTS)

    def check_merged():
        for name in mine(comm, list(TENSORS)):
            assert_bytes_equal(read_entry(merged / "model.safetensors", name), FULL[name],
                               f"merged {name}")
    collective(comm, check_merged)

    # counters: bytes sent over MPI == bytes whose owner (job rank) changes
    if dst_dedup:
        def dst_holders(name):
            for c in dst_manifest["tensors"][name]["chunks"]:
                yield rank_of_file(c["file"]), hpcckpt.Box(tuple(c["offsets"]), tuple(c["sizes"]))
    else:
        def dst_holders(name):
            for d in range(b.world_size):
                box = b.box_of(name, d)
                if box is not None:
                    yield d, box
    want_recv = expected_received(src_manifest, b, dst_holders, size)
    written = (b.unique_bytes if dst_dedup
               else sum(b.rank_bytes(d) for d in range(b.world_size)))
    needed = sum(b.rank_bytes(d) for d in range(b.world_size))

    def check_counters():
        per = res.per_rank
        assert [p["rank"] for p in per] == list(range(size)), per
        sent = [p["bytes_sent"] for p in per]
        recv = [p["bytes_received"] for p in per]
        assert recv == want_recv, (recv, want_recv)
        assert sum(sent) == sum(want_recv), (sent, want_recv)
        assert res.extra["bytes_sent"] == sum(want_recv)
        assert res.extra["transport"] == "node-local"
        assert res.extra["strategy_world_size"] == b.world_size
        assert res.files == b.world_size
        assert sum(p["bytes_written"] for p in per) == res.bytes_written == written
        assert res.bytes_read == sum(p["bytes_read"] for p in per)
        assert b.unique_bytes <= res.bytes_read <= needed, (res.bytes_read, needed)
        if kw and max(want_recv):
            # no rank receives more than its budget (or 16 bytes per sender) per round
            per_round = max(kw["budget"], 16 * (size - 1))
            assert res.extra["rounds"] >= -(-max(want_recv) // per_round), res.extra
        if size == 1:
            assert sent == [0] and recv == [0]
    collective(comm, check_counters)


# ---------------------------------------------------------------------------------
# 4. errors: the same hpcckpt error on every rank, never a hang
# ---------------------------------------------------------------------------------
def expect_error(comm, exc_info, failures: dict[int, str], step: str = "plan") -> None:
    """The same hpcckpt error on every rank, with the exact text.

    One process: the rank's own error. A job: a RankFailure naming every failing rank;
    when every rank fails with the same message, the plain error raised alike on every
    rank is accepted too (a verdict every rank reaches by itself needs no exchange).
    """
    e = exc_info.value
    seen = allgather(comm, (type(e).__name__, str(e)))

    def check():
        assert isinstance(e, hpcckpt.HpcckptError), type(e)
        assert all(x == seen[0] for x in seen), f"ranks raised different errors: {seen}"
        same = len(set(failures.values())) == 1 and set(failures) == set(range(len(seen)))
        if isinstance(e, hpcckpt.RankFailure):
            assert comm is not None, "one process reports its own error, not a RankFailure"
            assert e.step == step, e.step
            assert e.failures == failures, e.failures
            assert str(e) == format_failures(failures), str(e)
        else:
            assert comm is None or same, f"only a RankFailure can report {failures}: got {e!r}"
            assert str(e) == next(iter(failures.values())), str(e)
    collective(comm, check)


def test_reshard_state_missing_tensor_on_one_rank(comm):
    rank, size = rank_size(comm)
    a, b = strategy("dpN", size), strategy("tpN", size)
    state = local_state(a, rank)
    last = size - 1
    box = a.box_of(QKV, last)
    if rank == last:
        del state[QKV]
    with pytest.raises(hpcckpt.HpcckptError) as ei:
        hpcckpt.reshard_state(state, a, b, comm)
    expect_error(comm, ei, {last: f"rank {last}: local_state lacks tensor {QKV!r} (its box {box})"})
    # the job is still usable afterwards
    state = local_state(a, rank)
    check_state(comm, hpcckpt.reshard_state(state, a, b, comm), b, "after the error")


def test_reshard_state_wrong_dtype_and_shape(comm):
    rank, size = rank_size(comm)
    a, b = strategy("tpN", size), strategy("single")
    state = local_state(a, rank)
    box = a.box_of(EMB, 0)
    failures = {0: (f"rank 0: tensor {EMB!r} is float32 {list(box.sizes)} but the source "
                    f"strategy gives this rank BF16 {list(box.sizes)} at {box}")}
    if rank == 0:
        state[EMB] = state[EMB].astype(np.float32)
    if size > 1:
        last = size - 1
        hbox = a.box_of(BIG, last)
        failures[last] = (f"rank {last}: tensor {BIG!r} is float32 [{hbox.sizes[0] + 1}, "
                          f"{hbox.sizes[1]}] but the source strategy gives this rank F32 "
                          f"{list(hbox.sizes)} at {hbox}")
        if rank == last:
            state[BIG] = np.zeros((hbox.sizes[0] + 1, hbox.sizes[1]), np.float32)
    with pytest.raises(hpcckpt.HpcckptError) as ei:
        hpcckpt.reshard_state(state, a, b, comm)
    expect_error(comm, ei, failures)


def test_reshard_state_refuses_strategy_larger_than_job(comm):
    rank, size = rank_size(comm)
    a, b = strategy("single"), strategy("tpN", size + 1)
    with pytest.raises(hpcckpt.HpcckptError) as ei:
        hpcckpt.reshard_state(local_state(a, rank), a, b, comm)
    msg = f"destination strategy has {size + 1} ranks but the job only {size}"
    expect_error(comm, ei, {r: msg for r in range(size)})
    if comm is None:
        assert isinstance(ei.value, hpcckpt.UsageError)


def test_reshard_state_tensor_missing_from_source_strategy(comm):
    rank, size = rank_size(comm)
    b = strategy("tpN", size)
    doc = b.to_dict()
    del doc["tensors"][NORM]
    a = hpcckpt.strategy_from_dict(doc, where="short.yaml")
    with pytest.raises(hpcckpt.HpcckptError) as ei:
        hpcckpt.reshard_state(local_state(a, rank), a, b, comm)
    msg = (f"tensor {NORM!r} is in the destination strategy but not in the source strategy")
    expect_error(comm, ei, {r: msg for r in range(size)})


def test_load_refuses_wrong_world_size(comm, shared_tmp):
    size = rank_size(comm)[1]
    s = strategy("tpN", size + 1)
    path = write_complete(comm, shared_tmp / "model.safetensors")
    with pytest.raises(hpcckpt.HpcckptError) as ei:
        hpcckpt.load(str(path), s, comm)
    msg = (f"strategy has {size + 1} ranks but the job has {size}; "
           f"launch with mpiexec -n {size + 1}")
    expect_error(comm, ei, {r: msg for r in range(size)})


def test_node_local_missing_rank_dir_fails_everywhere(comm, shared_tmp):
    """A source file no rank holds: every rank fails with the same error naming it."""
    rank, size = rank_size(comm)
    a, b = strategy("tp3"), strategy("tp2")
    complete = write_complete(comm, shared_tmp / "model.safetensors")
    src = shared_tmp / "src"
    hpcckpt.split(str(complete), str(src), a, dedup=True, prefix="net", comm=comm, options=OPTS)
    doc = read_manifest(src).expanded()
    distribute(comm, src, shared_tmp)
    barrier(comm)
    if rank == 2 % size:
        shutil.rmtree(shared_tmp / f"node{rank}" / "ckpt" / "rank_2")
    barrier(comm)
    # the chunks stored only in the lost file, by tensor
    lost = "rank_2/net_rank_2.safetensors"
    only_there = {(n, str(hpcckpt.Box(tuple(c["offsets"]), tuple(c["sizes"]))))
                  for n, t in doc["tensors"].items() for c in t["chunks"] if c["file"] == lost}
    with pytest.raises(hpcckpt.HpcckptError) as ei:
        hpcckpt.reshard(str(shared_tmp / "node{rank}" / "ckpt"),
                        str(shared_tmp / "out{rank}" / "ckpt"), b, node_local=True,
                        comm=comm, options=OPTS)
    e = ei.value
    seen = allgather(comm, (type(e).__name__, str(e)))
    # which ranks notice depends on which routes each plans; every one names a chunk
    # of the lost file, and every rank raises the same error
    failures = getattr(e, "failures", {0: str(e)})
    pattern = re.compile(r"tensor '(.+)' chunk (\[.*\]): no rank has (\S+) on its node")

    def check():
        assert all(x == seen[0] for x in seen), f"ranks raised different errors: {seen}"
        assert isinstance(e, hpcckpt.RankFailure if comm is not None else hpcckpt.FormatError), e
        assert failures
        for r, m in failures.items():
            got = pattern.fullmatch(m)
            assert got, (r, m)
            assert got.group(3) == lost, (r, m)
            assert (got.group(1), got.group(2)) in only_there, (r, m, only_there)
        if comm is not None:
            assert e.step == "plan routes", e.step
            assert str(e) == format_failures(failures), str(e)
    collective(comm, check)

    def nothing_committed():
        assert not (shared_tmp / f"out{rank}" / "ckpt" / "manifest.json").exists()
    collective(comm, nothing_committed)
