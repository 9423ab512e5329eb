"""Round trips through the Python API under MPI (any world size 1..8).

Every test runs on every rank of the job. Rank 0 writes a complete safetensors file
(all interesting dtypes, a scalar, a zero-size tensor, names with dots and slashes,
uneven dimensions), then the job splits it under several strategies (full and
de-duplicated), checks each rank file and the manifest, reshards between strategies,
merges back and compares every tensor byte for byte.

Checks are spread over the ranks and their outcome is shared (``collective``), so a
failing assertion fails the test on every rank instead of leaving the others waiting
in the next collective call.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import xxhash

import hpcckpt
from hpcckpt.ops.filecopy import CopyOptions
from hpcckpt.formats.safetensors import build_header, read_header
from hpcckpt.storage.manifest import read_manifest

from helpers import (DTYPES, assert_bytes_equal, barrier, box_slices, collective, make_tensors,
                     mine, rank_size)

pytestmark = pytest.mark.mpi

FMT = "hpcckpt.strategy/1"

# ---------------------------------------------------------------------------------
# The model: small tensors, every dtype of interest, awkward names and shapes
# ---------------------------------------------------------------------------------
EMB = "model.embed_tokens.weight"
Q = "model.layers.0/attn.q.weight"
K = "model.layers.0/attn.k.weight"
DOWN = "model.layers.0/mlp.down_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"
MASK = "model.layers.1/attn.mask"
POS = "model.position_ids"
TOK = "model.tokenizer/bytes.table"
SCALE = "model.logit_scale"
EMPTY = "model.layers.1/empty.bias"
HEAD = "lm_head.weight"
TINY = "model.tiny.gate"
EXP = "model.layers.1/experts.w"

TENSORS: dict[str, tuple[list[int], str]] = {
    EMB: ([16, 12], "BF16"),
    Q: ([7, 5], "F32"),
    K: ([7, 5], "F8_E4M3"),
    DOWN: ([5, 9], "F8_E5M2"),
    NORM: ([6], "F16"),
    MASK: ([3, 4], "BOOL"),
    POS: ([11], "I64"),
    TOK: ([13, 3], "U8"),
    SCALE: ([], "F32"),
    EMPTY: ([0, 4], "F32"),
    HEAD: ([10, 6], "BF16"),
    TINY: ([2], "F32"),
    EXP: ([4, 6, 5], "F16"),
}
NUMPY_LOADABLE = ("F32", "I64", "U8")
FULL = make_tensors(TENSORS, seed=1234)


def _t(name: str, **layout) -> dict:
    shape, dtype = TENSORS[name]
    return {"shape": list(shape), "dtype": dtype, **layout}


def _doc(mesh: dict, layouts: dict) -> dict:
    assert set(layouts) == set(TENSORS)
    return {"format": FMT, "mesh": mesh,
            "tensors": {n: _t(n, **layouts[n]) for n in TENSORS}}


STRATEGY_DOCS: dict[str, dict] = {
    # pipeline x data x tensor parallel, ZeRO over dp
    "pp2dp2tp2": _doc({"pp": 2, "dp": 2, "tp": 2}, {
        EMB: {"split": ["tp", None], "stage": 0},
        Q: {"split": ["tp", None], "stage": 0, "zero": "dp"},
        K: {"split": [None, "tp"], "stage": 0},
        DOWN: {"split": [None, "tp"], "stage": 1, "zero": "dp"},
        NORM: {"stage": 0},
        MASK: {"split": ["dp", "tp"]},
        POS: {"zero": "dp"},
        TOK: {"split": ["tp"], "stage": 1, "zero": "dp"},
        SCALE: {},
        EMPTY: {"split": ["tp"]},
        HEAD: {"split": ["tp", None], "stage": 1},
        TINY: {"split": [["dp", "tp"]]},
        EXP: {"split": [None, "tp", "dp"]},
    }),
    # odd tensor parallelism: uneven pieces, zero-size pieces
    "tp3": _doc({"tp": 3}, {
        EMB: {"split": ["tp", None]},
        Q: {"split": ["tp", None]},
        K: {"split": [None, "tp"]},
        DOWN: {"split": [None, "tp"]},
        NORM: {},
        MASK: {"split": [None, "tp"]},
        POS: {"split": ["tp"]},
        TOK: {"split": ["tp", None]},
        SCALE: {},
        EMPTY: {"split": [None, "tp"]},
        HEAD: {"split": [None, "tp"]},
        TINY: {"split": ["tp"]},
        EXP: {"split": [None, None, "tp"]},
    }),
    # explicit list splits (first name major), more pieces than rows
    "dp2tp4": _doc({"dp": 2, "tp": 4}, {
        EMB: {"split": [["tp", "dp"], None]},
        Q: {"split": [["tp", "dp"], None]},
        K: {"split": [None, ["dp", "tp"]]},
        DOWN: {"split": [None, ["tp", "dp"]]},
        NORM: {"zero": "dp"},
        MASK: {"split": ["tp", "dp"]},
        POS: {"split": [["tp", "dp"]]},
        TOK: {"split": [None, "tp"], "zero": "dp"},
        SCALE: {},
        EMPTY: {"split": [["tp", "dp"]]},
        HEAD: {"split": ["tp"], "zero": "dp"},
        TINY: {"split": [["tp", "dp"]]},
        EXP: {"split": ["dp", "tp"]},
    }),
    # irregular explicit boxes (replicas, an empty box, ranks holding nothing) mixed with splits
    "boxes": _doc({"r": 4}, {
        EMB: {"boxes": {0: {"offsets": [0, 0], "sizes": [16, 5]},
                        1: {"offsets": [0, 5], "sizes": [9, 7]},
                        2: {"offsets": [9, 5], "sizes": [7, 7]}}},
        Q: {"boxes": {0: {"offsets": [0, 0], "sizes": [4, 5]},
                      1: {"offsets": [4, 0], "sizes": [3, 2]},
                      2: {"offsets": [4, 2], "sizes": [3, 3]},
                      3: {"offsets": [0, 0], "sizes": [4, 5]}}},
        K: {"boxes": {0: {"offsets": [0, 0], "sizes": [7, 1]},
                      1: {"offsets": [0, 1], "sizes": [7, 4]},
                      2: {"offsets": [0, 0], "sizes": [7, 1]},
                      3: {"offsets": [7, 5], "sizes": [0, 0]}}},
        DOWN: {"split": [None, "r"]},
        NORM: {},
        MASK: {"split": ["r"]},
        POS: {"split": ["r"]},
        TOK: {"boxes": {3: {"offsets": [0, 0], "sizes": [13, 3]}}},
        SCALE: {},
        EMPTY: {"split": ["r"]},
        HEAD: {"split": ["r", None]},
        TINY: {"boxes": {1: {"offsets": [0], "sizes": [1]}, 2: {"offsets": [1], "sizes": [1]}}},
        EXP: {"split": [None, None, "r"]},
    }),
    # one rank holding everything
    "single": _doc({}, {n: {} for n in TENSORS}),
}


def strategy(name: str) -> hpcckpt.Strategy:
    return hpcckpt.strategy_from_dict(STRATEGY_DOCS[name], where=f"{name}.yaml")


OPTS = CopyOptions(fsync=False, progress=False)
TINY_BUFFER = CopyOptions(buffer_size=64, fsync=False, progress=False)


# ---------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------


def write_complete(comm, path: Path) -> Path:
    """Rank 0 writes FULL as one complete safetensors file (header + raw bytes)."""
    def write():
        if rank_size(comm)[0] == 0:
            entries = [(n, dt, tuple(shape)) for n, (shape, dt) in TENSORS.items()]
            head, spans = build_header(entries, {"format": "pt"})
            with open(path, "wb") as f:
                f.write(head)
                for n in TENSORS:
                    assert f.tell() == spans[n][0]
                    f.write(FULL[n].tobytes())
    collective(comm, write)
    return path


def read_tensor(path, name: str) -> np.ndarray:
    """One tensor through hpcckpt's header reader and a raw positioned read."""
    h = read_header(path)
    e = h.entry(name)
    with open(path, "rb") as f:
        f.seek(e.begin)
        raw = f.read(e.nbytes)
    assert len(raw) == e.nbytes, f"{path}: short read of {name!r}"
    return np.frombuffer(raw, dtype=DTYPES[e.dtype]).reshape(e.shape)


def entry_bytes(path, name: str) -> bytes:
    e = read_header(path).entry(name)
    with open(path, "rb") as f:
        f.seek(e.begin)
        return f.read(e.nbytes)


def check_rank_files(comm, dist: Path, s: hpcckpt.Strategy, dedup: bool, prefix: str = "model"):
    """Each rank file holds exactly its strategy boxes (full) or its assigned subset (dedup),
    with the right bytes and the self-describing metadata."""
    def check():
        for r in mine(comm, list(range(s.world_size))):
            path = dist / f"rank_{r}" / f"{prefix}_rank_{r}.safetensors"
            assert path.is_file(), f"missing {path}"
            h = read_header(path)
            assert h.metadata.get("format") == "ms", h.metadata
            assert h.metadata.get("remove_redundancy") == ("True" if dedup else "False"), h.metadata
            desc = json.loads(h.metadata["hpcckpt"])
            expected = {t.name: box for t, box in s.rank_boxes(r)}
            if dedup:
                assert set(h.tensors) <= set(expected), (r, set(h.tensors) - set(expected))
                empty = [n for n, e in h.tensors.items() if math.prod(e.shape) == 0]
                assert not empty, f"rank {r}: dedup file stores empty boxes of {empty}"
            else:
                assert set(h.tensors) == set(expected), (r, set(h.tensors) ^ set(expected))
            assert set(desc) == set(h.tensors), (r, desc.keys(), h.tensors.keys())
            for name in h.tensors:
                box = s.box_of(name, r)
                assert box == expected[name]
                e = h.tensors[name]
                assert e.dtype == TENSORS[name][1], (r, name, e.dtype)
                assert e.shape == box.sizes, (r, name, e.shape, box)
                assert desc[name]["shape"] == TENSORS[name][0], (r, name, desc[name])
                assert desc[name]["offsets"] == list(box.offsets), (r, name, desc[name], box)
                assert_bytes_equal(read_tensor(path, name), FULL[name][box_slices(box)],
                                   f"rank {r} file {name}")
    collective(comm, check)


def check_manifest(comm, dist: Path, s: hpcckpt.Strategy, dedup: bool, prefix: str = "model"):
    """manifest.json: world size, redundancy, files, every chunk's box and its xxh3_64 checksum
    (recomputed from the stored bytes); dedup stores every distinct box exactly once."""
    raw = json.loads((dist / "manifest.json").read_text())
    doc = read_manifest(dist).expanded()   # every chunk listed, as format 1 does

    def check_doc():
        assert raw["format"] == "hpcckpt.manifest/2"
        assert raw["file_sizes"] == [(dist / f).stat().st_size for f in raw["files"]]
        assert doc["world_size"] == s.world_size
        assert doc["redundancy"] == ("dedup" if dedup else "full")
        assert doc["files"] == [f"rank_{r}/{prefix}_rank_{r}.safetensors"
                                for r in range(s.world_size)]
        assert list(doc["tensors"]) == list(TENSORS)
        for name, t in doc["tensors"].items():
            assert t["shape"] == TENSORS[name][0] and t["dtype"] == TENSORS[name][1], (name, t)
            nonempty = [c for c in t["chunks"] if math.prod(c["sizes"]) > 0]
            distinct = {(tuple(b.offsets), tuple(b.sizes)): reps for b, reps in s.chunks(name)}
            got = [(tuple(c["offsets"]), tuple(c["sizes"])) for c in nonempty]
            if dedup:
                assert sorted(got) == sorted(distinct), (name, got, list(distinct))
                for c in nonempty:
                    r = int(c["file"].split("/")[0][len("rank_"):])
                    assert r in distinct[(tuple(c["offsets"]), tuple(c["sizes"]))], (name, c)
            else:
                held = sorted((tuple(b.offsets), tuple(b.sizes))
                              for _, b in ((r, s.box_of(name, r)) for r in range(s.world_size))
                              if b is not None and b.volume > 0)
                assert sorted(got) == held, (name, got, held)

    def check_sums():
        chunks = [(name, c) for name, t in doc["tensors"].items() for c in t["chunks"]]
        for name, c in mine(comm, chunks):
            assert c["checksum"].startswith("xxh3_64:"), c
            data = entry_bytes(dist / c["file"], name)
            assert c["checksum"] == "xxh3_64:" + xxhash.xxh3_64_hexdigest(data), (name, c)
            want = FULL[name][tuple(slice(o, o + z) for o, z in zip(c["offsets"], c["sizes"]))]
            assert data == want.tobytes(), (name, c)
        if rank_size(comm)[0] == 0:
            check_doc()
    collective(comm, check_sums)


def check_complete_dir(comm, out: Path, exclude: tuple[str, ...] = ()):
    """A merged HF directory holds every tensor bit for bit; numpy-loadable dtypes are also
    read back with ``safetensors.numpy`` (the files are plain safetensors)."""
    from safetensors.numpy import load_file
    from safetensors import safe_open

    index = out / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        weight_map = {n: "model.safetensors" for n in TENSORS}
    names = [n for n in TENSORS if not n.startswith(exclude)]

    def check():
        assert sorted(weight_map) == sorted(names), (sorted(weight_map), sorted(names))
        for name in mine(comm, names):
            path = out / weight_map[name]
            assert_bytes_equal(read_tensor(path, name), FULL[name], f"merged {name}")
            if TENSORS[name][1] in NUMPY_LOADABLE:
                with safe_open(str(path), framework="np") as f:
                    assert_bytes_equal(f.get_tensor(name), FULL[name], f"safe_open {name}")
        if rank_size(comm)[0] == 0:
            files = sorted(set(weight_map.values()))
            for fname in files:
                h = read_header(out / fname)
                loadable = [n for n in h.tensors if h.tensors[n].dtype in NUMPY_LOADABLE]
                if len(loadable) == len(h.tensors):
                    loaded = load_file(str(out / fname))
                    for n in loadable:
                        assert_bytes_equal(loaded[n], FULL[n], f"load_file {n}")
            leftovers = [p.name for p in out.iterdir() if p.name.endswith(".partial")]
            assert not leftovers, leftovers
    collective(comm, check)


def check_numpy_only_file(comm, path: Path):
    """A file holding only F32/I64/U8 tensors loads whole with safetensors.numpy.load_file."""
    from safetensors.numpy import load_file

    def check():
        if rank_size(comm)[0] == 0:
            loaded = load_file(str(path))
            want = [n for n in TENSORS if TENSORS[n][1] in NUMPY_LOADABLE]
            assert sorted(loaded) == sorted(want)
            for n in want:
                assert_bytes_equal(loaded[n], FULL[n], f"load_file {n}")
    collective(comm, check)


# ---------------------------------------------------------------------------------
# split -> check -> merge -> compare
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dedup", [False, True], ids=["full", "dedup"])
@pytest.mark.parametrize("sname", list(STRATEGY_DOCS))
def test_split_merge_roundtrip(comm, shared_tmp, sname, dedup):
    s = strategy(sname)
    src = write_complete(comm, shared_tmp / "model.safetensors")
    dist, merged = shared_tmp / "dist", shared_tmp / "merged"

    res = hpcckpt.split(str(src), str(dist), s, dedup=dedup, comm=comm, options=OPTS)
    assert res.files == s.world_size
    assert res.world_size == rank_size(comm)[1]
    assert res.extra["dedup"] is dedup
    assert (dist / "manifest.json").is_file() and (dist / "strategy.yaml").is_file()
    check_rank_files(comm, dist, s, dedup)
    check_manifest(comm, dist, s, dedup)

    res = hpcckpt.merge(str(dist), str(merged), comm=comm, options=OPTS)
    assert res.files == 1 and res.extra["tensors"] == len(TENSORS)
    assert res.bytes_written == sum(a.nbytes for a in FULL.values())
    assert sorted(p.name for p in merged.iterdir()) == ["model.safetensors"]
    check_complete_dir(comm, merged)


@pytest.mark.parametrize("sname,dedup", [("pp2dp2tp2", True), ("dp2tp4", False),
                                         ("boxes", False)])
def test_split_merge_tiny_buffer(comm, shared_tmp, sname, dedup):
    """A 64-byte copy buffer forces every larger entry to be copied in many tiles."""
    s = strategy(sname)
    src = write_complete(comm, shared_tmp / "model.safetensors")
    dist, merged = shared_tmp / "dist", shared_tmp / "merged"
    hpcckpt.split(str(src), str(dist), s, dedup=dedup, comm=comm, options=TINY_BUFFER)
    check_rank_files(comm, dist, s, dedup)
    check_manifest(comm, dist, s, dedup)
    hpcckpt.merge(str(dist), str(merged), comm=comm, options=TINY_BUFFER)
    check_complete_dir(comm, merged)


def test_split_prefix_and_fsync(comm, shared_tmp):
    """Default options (fsync on) and a custom prefix; the manifest records the prefix."""
    s = strategy("tp3")
    src = write_complete(comm, shared_tmp / "model.safetensors")
    dist, merged = shared_tmp / "dist", shared_tmp / "merged"
    hpcckpt.split(str(src), str(dist), s, prefix="llama", comm=comm)
    check_rank_files(comm, dist, s, False, prefix="llama")
    check_manifest(comm, dist, s, False, prefix="llama")
    assert json.loads((dist / "manifest.json").read_text())["prefix"] == "llama"
    hpcckpt.merge(str(dist), str(merged), comm=comm)
    check_complete_dir(comm, merged)


# ---------------------------------------------------------------------------------
# reshard -> check -> merge -> compare
# ---------------------------------------------------------------------------------
RESHARDS = [
    ("pp2dp2tp2", False, "tp3", False, OPTS),
    ("tp3", False, "dp2tp4", False, OPTS),
    ("pp2dp2tp2", True, "pp2dp2tp2", False, OPTS),   # dedup -> full, same layout
    ("dp2tp4", False, "boxes", True, TINY_BUFFER),    # full -> dedup, tiled copies
    ("boxes", True, "single", False, OPTS),
    ("single", False, "pp2dp2tp2", True, OPTS),
]


def _reshard_id(a, b, c, d, o) -> str:
    return (f"{a}{'-dedup' if b else ''}->{c}{'-dedup' if d else ''}"
            f"{'-buf64' if o is TINY_BUFFER else ''}")


@pytest.mark.parametrize("src_name,src_dedup,dst_name,dst_dedup,opts", RESHARDS,
                         ids=[_reshard_id(*r) for r in RESHARDS])
def test_reshard_merge_roundtrip(comm, shared_tmp, src_name, src_dedup, dst_name, dst_dedup, opts):
    src_s, dst_s = strategy(src_name), strategy(dst_name)
    src = write_complete(comm, shared_tmp / "model.safetensors")
    dist, dist2, merged = shared_tmp / "dist", shared_tmp / "dist2", shared_tmp / "merged"
    hpcckpt.split(str(src), str(dist), src_s, dedup=src_dedup, prefix="net", comm=comm,
                  options=OPTS)

    res = hpcckpt.reshard(str(dist), str(dist2), dst_s, dedup=dst_dedup, comm=comm, options=opts)
    assert res.files == dst_s.world_size
    assert res.extra["strategy_world_size"] == dst_s.world_size
    # the prefix is taken from the source's manifest
    check_rank_files(comm, dist2, dst_s, dst_dedup, prefix="net")
    check_manifest(comm, dist2, dst_s, dst_dedup, prefix="net")
    assert hpcckpt.load_strategy(dist2 / "strategy.yaml").to_dict() == dst_s.to_dict()

    hpcckpt.merge(str(dist2), str(merged), comm=comm, options=opts)
    check_complete_dir(comm, merged)


# ---------------------------------------------------------------------------------
# other merge outputs, dry run, reading without a manifest
# ---------------------------------------------------------------------------------
def test_merge_sharded_with_index(comm, shared_tmp):
    """Several shards written concurrently by all ranks, plus model.safetensors.index.json."""
    s = strategy("pp2dp2tp2")
    src = write_complete(comm, shared_tmp / "model.safetensors")
    dist, merged = shared_tmp / "dist", shared_tmp / "merged"
    hpcckpt.split(str(src), str(dist), s, dedup=True, comm=comm, options=OPTS)
    res = hpcckpt.merge(str(dist), str(merged), max_shard_size=100, file_suffix="x",
                        comm=comm, options=OPTS)
    n = res.files
    assert n > 3
    names = sorted(p.name for p in merged.iterdir())
    shards = [f"model-{i:05d}-of-{n:05d}_x.safetensors" for i in range(1, n + 1)]
    assert names == sorted(shards + ["model.safetensors.index.json"])
    idx = json.loads((merged / "model.safetensors.index.json").read_text())
    assert idx["metadata"]["total_size"] == sum(a.nbytes for a in FULL.values())
    check_complete_dir(comm, merged)


def test_merge_exclude_gives_numpy_loadable_file(comm, shared_tmp):
    """Leaving out every non-numpy dtype yields a file safetensors.numpy loads whole."""
    s = strategy("tp3")
    src = write_complete(comm, shared_tmp / "model.safetensors")
    dist, merged = shared_tmp / "dist", shared_tmp / "merged"
    hpcckpt.split(str(src), str(dist), s, comm=comm, options=OPTS)
    exclude = tuple(n for n in TENSORS if TENSORS[n][1] not in NUMPY_LOADABLE)
    res = hpcckpt.merge(str(dist), str(merged), exclude_prefixes=exclude, comm=comm,
                        options=OPTS)
    assert res.extra["tensors"] == len(TENSORS) - len(exclude)
    check_numpy_only_file(comm, merged / "model.safetensors")


def test_merge_ms_layout(comm, shared_tmp):
    s = strategy("dp2tp4")
    src = write_complete(comm, shared_tmp / "model.safetensors")
    dist, merged = shared_tmp / "dist", shared_tmp / "merged"
    hpcckpt.split(str(src), str(dist), s, comm=comm, options=OPTS)
    hpcckpt.merge(str(dist), str(merged), layout="ms", max_shard_size=150, comm=comm,
                  options=OPTS)
    name_map = json.loads((merged / "param_name_map.json").read_text())
    assert sorted(name_map) == sorted(TENSORS)
    assert (merged / "hyper_param.safetensors").is_file()

    def check():
        for name in mine(comm, list(TENSORS)):
            assert name_map[name].startswith("part") and name_map[name].endswith(".safetensors")
            assert_bytes_equal(read_tensor(merged / name_map[name], name), FULL[name], name)
    collective(comm, check)


def test_dry_run_writes_nothing(comm, shared_tmp):
    s = strategy("pp2dp2tp2")
    src = write_complete(comm, shared_tmp / "model.safetensors")
    dist = shared_tmp / "dist"
    opts = CopyOptions(dry_run=True, progress=False)
    res = hpcckpt.split(str(src), str(dist), s, dedup=True, comm=comm, options=opts)
    assert res.dry_run
    assert [r["rank"] for r in res.per_rank] == list(range(rank_size(comm)[1]))
    assert sum(r["bytes_written"] for r in res.per_rank) == sum(a.nbytes for a in FULL.values())
    barrier(comm)
    assert not dist.exists()
    barrier(comm)


def test_merge_without_manifest_given_strategy(comm, shared_tmp):
    """A distributed checkpoint without manifest.json (e.g. MindSpore's) is read via a
    strategy; without one the merge is refused on every rank."""
    s = strategy("tp3")
    src = write_complete(comm, shared_tmp / "model.safetensors")
    dist, merged = shared_tmp / "dist", shared_tmp / "merged"
    hpcckpt.split(str(src), str(dist), s, dedup=True, comm=comm, options=OPTS)
    barrier(comm)
    if rank_size(comm)[0] == 0:
        os.unlink(dist / "manifest.json")
    barrier(comm)
    with pytest.raises(hpcckpt.HpcckptError, match="has no manifest.json"):
        hpcckpt.merge(str(dist), str(merged), comm=comm, options=OPTS)
    hpcckpt.merge(str(dist), str(merged), strategy=s, comm=comm, options=OPTS)
    check_complete_dir(comm, merged)
