"""Output file layouts (hpcckpt.planning.outputs): names, headers, metadata, and that real
bytes written at the planned offsets give files the safetensors library reads back."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from hpcckpt.dtypes import numpy_dtype
from hpcckpt.layout.box import Box
from hpcckpt.layout.yaml_io import strategy_from_dict
from hpcckpt.planning.dedup import plan_dedup
from hpcckpt.planning.outputs import (divide_writes, hf_files, hf_index, make_file,
                                      rank_file, rank_files)
from hpcckpt.layout.tensor import TensorInfo
from hpcckpt.formats.safetensors import read_header

FMT = "hpcckpt.strategy/1"


def B(offsets, sizes) -> Box:
    return Box(tuple(offsets), tuple(sizes))


def _write(path, f, arrays: dict[str, np.ndarray]) -> None:
    """Write ``f``'s header, then every entry's array at its planned offset."""
    with open(path, "wb") as out:
        out.write(f.header)
        out.truncate(f.size)
        for e in f.entries:
            a = np.ascontiguousarray(arrays[e.name])
            assert a.nbytes == e.nbytes
            out.seek(e.begin)
            out.write(a.tobytes())
    assert path.stat().st_size == f.size


# ---------------------------------------------------------------------------------
# make_file: the exact header
# ---------------------------------------------------------------------------------
def test_make_file_golden_header():
    f = make_file("x.safetensors", [("a", "F32", Box.full((2,)), (2,)),
                                    ("b", "U8", Box.full((3,)), (3,))], {"format": "pt"})
    json_part = (b'{"__metadata__":{"format":"pt"},'
                 b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                 b'"b":{"dtype":"U8","shape":[3],"data_offsets":[8,11]}}')
    assert len(json_part) == 138
    expected = b"\x90\x00\x00\x00\x00\x00\x00\x00" + json_part + b"      "  # 138 + 6 = 144 = 0x90
    assert f.header == expected
    assert [(e.name, e.begin, e.end) for e in f.entries] == [("a", 152, 160), ("b", 160, 163)]
    assert f.size == 163 and f.data_bytes == 11
    assert f.path == "x.safetensors" and f.rank is None


def test_make_file_header_of_a_slice_uses_the_box_shape():
    f = make_file("r.safetensors", [("w", "I64", B([1, 0], [1, 2]), (3, 2))])
    assert f.header == (b"\x40\x00\x00\x00\x00\x00\x00\x00"
                        b'{"w":{"dtype":"I64","shape":[1,2],"data_offsets":[0,16]}}' + b" " * 7)
    (e,) = f.entries
    assert (e.begin, e.end, e.nbytes) == (72, 88, 16)
    assert e.box == B([1, 0], [1, 2]) and e.global_shape == (3, 2)


def test_make_file_empty():
    f = make_file("e.safetensors", [])
    assert f.header == b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "
    assert f.entries == () and f.size == 16 and f.data_bytes == 0


@pytest.mark.parametrize("names", [["a"], ["é", "b.c"], ["x" * 13, "y"], ["日本", "z" * 7]])
def test_header_padding_and_contiguous_offsets(names):
    recs = [(n, dt, Box.full(sh), sh) for n, (dt, sh) in
            zip(names, [("F32", (3, 2)), ("U8", (5,)), ("I64", ())])]
    f = make_file("p.safetensors", recs, {"k": "v"})
    (n,) = struct.unpack("<Q", f.header[:8])
    assert n == len(f.header) - 8 and n % 8 == 0
    raw = f.header[8:]
    assert raw == raw.rstrip(b" ") + b" " * (n - len(raw.rstrip(b" ")))
    doc = json.loads(raw.decode("utf-8"))
    assert doc.pop("__metadata__") == {"k": "v"}
    assert list(doc) == names
    pos = 0
    for e in f.entries:
        b, end = doc[e.name]["data_offsets"]
        assert b == pos and end - b == e.nbytes
        assert (e.begin, e.end) == (len(f.header) + b, len(f.header) + end)
        pos = end


# ---------------------------------------------------------------------------------
# real files the safetensors library reads
# ---------------------------------------------------------------------------------
def test_written_file_loads_with_safetensors(tmp_path):
    arrays = {
        "model.w": np.arange(12, dtype=np.float32).reshape(3, 4) * 0.5,
        "ids": np.array([[1, -2], [3, 2**40]], dtype=np.int64),
        "mask": np.array([1, 0, 255], dtype=np.uint8),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "scalar": np.array(7, dtype=np.int64),
    }
    names = {np.float32: "F32", np.int64: "I64", np.uint8: "U8"}
    infos = [TensorInfo(n, a.shape, names[a.dtype.type])
             for n, a in arrays.items()]
    (f,) = hf_files(infos, max_shard_size=10**9)
    p = tmp_path / f.path
    _write(p, f, arrays)
    back = load_file(str(p))
    assert set(back) == set(arrays)
    for n, a in arrays.items():
        assert back[n].dtype == a.dtype and back[n].shape == a.shape
        np.testing.assert_array_equal(back[n], a)
    with safe_open(str(p), framework="np") as sf:
        assert sf.metadata() == {"format": "pt"}
    h = read_header(p)
    assert h.data_start == len(f.header)
    assert {n: (e.begin, e.end) for n, e in h.tensors.items()} == {
        e.name: (e.begin, e.end) for e in f.entries}


def test_written_bf16_file_reads_back_via_header(tmp_path):
    import ml_dtypes
    a = (np.arange(6, dtype=np.float32) - 2.5).astype(ml_dtypes.bfloat16).reshape(2, 3)
    g = np.array([1.0, -0.5], dtype=np.float32).astype(ml_dtypes.float8_e4m3fn)
    f = make_file("b.safetensors", [("a", "BF16", Box.full((2, 3)), (2, 3)),
                                    ("g", "F8_E4M3", Box.full((2,)), (2,))])
    p = tmp_path / f.path
    _write(p, f, {"a": a, "g": g})
    h = read_header(p)
    raw = p.read_bytes()
    for name, want in (("a", a), ("g", g)):
        e = h.entry(name)
        got = np.frombuffer(raw[e.begin:e.end], dtype=numpy_dtype(e.dtype)).reshape(e.shape)
        assert got.tobytes() == want.tobytes()
    with safe_open(str(p), framework="np") as sf:  # the library accepts the header
        assert set(sf.keys()) == {"a", "g"}


# ---------------------------------------------------------------------------------
# hf_files / hf_index
# ---------------------------------------------------------------------------------
def _infos(sizes_bytes):
    return [TensorInfo(f"t{i}", (n,), "U8") for i, n in enumerate(sizes_bytes)]


def test_hf_single_shard_name():
    files = hf_files(_infos([10, 20]), max_shard_size=100)
    assert [f.path for f in files] == ["model.safetensors"]
    assert [e.name for e in files[0].entries] == ["t0", "t1"]


def test_hf_three_shard_names_and_limits():
    files = hf_files(_infos([40, 40, 200, 40]), max_shard_size=100)
    assert [f.path for f in files] == ["model-00001-of-00003.safetensors",
                                       "model-00002-of-00003.safetensors",
                                       "model-00003-of-00003.safetensors"]
    assert [[e.name for e in f.entries] for f in files] == [["t0", "t1"], ["t2"], ["t3"]]
    assert [f.data_bytes for f in files] == [80, 200, 40]


def test_hf_max_shard_size_is_inclusive_and_respected():
    files = hf_files(_infos([50, 50, 1]), max_shard_size=100)
    assert [[e.name for e in f.entries] for f in files] == [["t0", "t1"], ["t2"]]
    sizes = [7, 3, 9, 1, 1, 5, 8, 2, 6, 4]
    files = hf_files(_infos(sizes), max_shard_size=10)
    for f in files:
        assert f.data_bytes <= 10
    assert [e.name for f in files for e in f.entries] == [f"t{i}" for i in range(len(sizes))]
    # greedy: a shard is closed only when the next tensor would not fit
    for f, g in zip(files, files[1:]):
        assert f.data_bytes + g.entries[0].nbytes > 10


def test_hf_big_tensor_first_gets_own_shard():
    files = hf_files(_infos([300, 10, 10]), max_shard_size=100)
    assert [[e.name for e in f.entries] for f in files] == [["t0"], ["t1", "t2"]]
    assert files[0].path == "model-00001-of-00002.safetensors"


def test_hf_ms_layout_names():
    files = hf_files(_infos([40, 40, 200]), max_shard_size=100, layout="ms")
    assert [f.path for f in files] == ["part0.safetensors", "part1.safetensors"]


def test_hf_suffix_kept_in_names():
    files = hf_files(_infos([40, 40, 200]), max_shard_size=100, suffix="ema")
    assert all("ema" in f.path and f.path.endswith(".safetensors") for f in files)
    assert len({f.path for f in files}) == 2


def test_hf_index():
    infos = [TensorInfo("a", (10, 3), "F32"), TensorInfo("b", (7,), "BF16"),
             TensorInfo("c", (), "I64"), TensorInfo("d", (100,), "U8")]
    files = hf_files(infos, max_shard_size=142)
    idx = hf_index(files)
    assert idx == {"metadata": {"total_size": 120 + 14 + 8 + 100},
                   "weight_map": {"a": "model-00001-of-00002.safetensors",
                                  "b": "model-00001-of-00002.safetensors",
                                  "c": "model-00001-of-00002.safetensors",
                                  "d": "model-00002-of-00002.safetensors"}}
    json.dumps(idx)  # serialisable as is


def test_hf_shards_load_with_safetensors(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"layer.{i}.w": rng.standard_normal((i + 1, 5)).astype(np.float32) for i in range(6)}
    infos = [TensorInfo(n, a.shape, "F32") for n, a in arrays.items()]
    files = hf_files(infos, max_shard_size=100)
    assert len(files) > 1
    for f in files:
        _write(tmp_path / f.path, f, arrays)
    idx = hf_index(files)
    for name, fname in idx["weight_map"].items():
        np.testing.assert_array_equal(load_file(str(tmp_path / fname))[name], arrays[name])


# ---------------------------------------------------------------------------------
# rank files
# ---------------------------------------------------------------------------------
@pytest.fixture
def strat():
    return strategy_from_dict({"format": FMT, "mesh": {"dp": 2, "tp": 2}, "tensors": {
        "emb": {"shape": [6, 4], "dtype": "F32", "split": ["tp", None]},
        "w": {"shape": [4, 3], "dtype": "I64", "split": [None, "tp"], "zero": "dp"},
        "norm": {"shape": [4], "dtype": "U8"},
    }}, where="s.yaml")


def test_rank_file_metadata_no_dedup(strat):
    f = rank_file(strat, "llama", 3)
    assert f.path == "rank_3/llama_rank_3.safetensors" and f.rank == 3
    assert [(e.name, e.box) for e in f.entries] == [
        ("emb", B([3, 0], [3, 4])), ("w", B([2, 2], [2, 1])), ("norm", B([0], [4]))]
    (n,) = struct.unpack("<Q", f.header[:8])
    doc = json.loads(f.header[8:8 + n])
    meta = doc["__metadata__"]
    assert meta["format"] == "ms"
    assert meta["remove_redundancy"] == "False"
    assert json.loads(meta["hpcckpt"]) == {
        "emb": {"shape": [6, 4], "offsets": [3, 0]},
        "w": {"shape": [4, 3], "offsets": [2, 2]},
        "norm": {"shape": [4], "offsets": [0]}}
    assert doc["emb"]["shape"] == [3, 4] and doc["w"]["shape"] == [2, 1]


def test_rank_file_metadata_dedup(strat):
    plan = plan_dedup(strat, "whole")
    assign = plan.owners()
    files = rank_files(strat, "p", plan)
    stored = {}
    for r, f in enumerate(files):
        (n,) = struct.unpack("<Q", f.header[:8])
        meta = json.loads(f.header[8:8 + n])["__metadata__"]
        assert meta["format"] == "ms" and meta["remove_redundancy"] == "True"
        assert meta["dedup"] == "whole"
        desc = json.loads(meta["hpcckpt"])
        assert set(desc) == {e.name for e in f.entries}
        for e in f.entries:
            assert desc[e.name] == {"shape": list(e.global_shape), "offsets": list(e.box.offsets)}
            assert assign[(e.name, e.box)] == r
            stored.setdefault(e.name, []).append(e.box)
    # each distinct box once: emb 2 boxes, w 4 boxes, norm 1 box
    assert {n: len(v) for n, v in stored.items()} == {"emb": 2, "w": 4, "norm": 1}
    assert sum(f.data_bytes for f in files) == strat.unique_bytes


def test_rank_files_written_load_with_safetensors(tmp_path, strat):
    full = {"emb": np.arange(24, dtype=np.float32).reshape(6, 4),
            "w": np.arange(12, dtype=np.int64).reshape(4, 3) - 5,
            "norm": np.array([9, 8, 7, 6], dtype=np.uint8)}
    files = rank_files(strat, "p", plan_dedup(strat, "balanced", min_piece=0))
    for f in files:
        p = tmp_path / f.path
        p.parent.mkdir(parents=True, exist_ok=True)
        _write(p, f, {e.name: full[e.name][tuple(slice(o, o + s) for o, s in
                                                 zip(e.box.offsets, e.box.sizes))]
                      for e in f.entries})
    rebuilt = {n: np.full_like(a, -1) if a.dtype != np.uint8 else np.zeros_like(a)
               for n, a in full.items()}
    for f in files:
        p = tmp_path / f.path
        with safe_open(str(p), framework="np") as sf:
            meta = sf.metadata()
            desc = json.loads(meta["hpcckpt"])
            for name in sf.keys():
                a = sf.get_tensor(name)
                offs = desc[name]["offsets"]
                rebuilt[name][tuple(slice(o, o + s) for o, s in zip(offs, a.shape))] = a
    for n in full:
        np.testing.assert_array_equal(rebuilt[n], full[n])


def test_divide_writes_shares_one_big_tensor():
    files = hf_files([TensorInfo("big", (100, 10), "F32"), TensorInfo("s", (3,), "F32")],
                     max_shard_size=10**9)
    pieces = divide_writes(files, 4)
    per_rank = [sum(p.nbytes for p in ps) for ps in pieces]
    assert sum(per_rank) == 4012
    assert max(per_rank) <= 4012 / 4 + 12
    assert all(ps for ps in pieces)
    # whole rows: pieces are contiguous row slabs of the big tensor
    for ps in pieces:
        for p in ps:
            if files[0].entries[p.entry].name == "big":
                assert not p.whole
