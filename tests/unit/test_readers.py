"""The reader interface (hpcckpt.storage.reader): a new kind of source is one class.

Two readers written here, outside the engine, prove it: an in-memory reader of a
rank-sharded state (no files at all) merged to complete weights, and a ``.npz`` reader
registered for paths, split and read back through ``open_input``. Neither touches
planning or the ops; both give bytes identical to numpy's.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import hpcckpt
from hpcckpt.dtypes import dtype_name
from hpcckpt.errors import FormatError
from hpcckpt.layout.box import Box
from hpcckpt.ops.filecopy import CopyOptions
from hpcckpt.planning.sources import SourceChunk, SourceIndex, TensorInfo
from hpcckpt.storage import inputs
from hpcckpt.storage.inputs import SafetensorsReader, open_input, register_reader
from hpcckpt.storage.reader import CheckpointReader, MetaFiles, check_region

OPTS = CopyOptions(fsync=False, progress=False, buffer_size=64)
STRATEGY = {"format": "hpcckpt.strategy/1", "mesh": {"dp": 2, "tp": 3},
            "tensors": {"w": {"shape": [7, 10], "dtype": "F32", "split": [None, "tp"]},
                        "b": {"shape": [10], "dtype": "I16", "split": ["tp"], "zero": "dp"},
                        "s": {"shape": [], "dtype": "F64"}}}


def full_arrays() -> dict[str, np.ndarray]:
    return {"w": np.arange(70, dtype=np.float32).reshape(7, 10) * 1.5,
            "b": np.arange(10, dtype=np.int16) - 4,
            "s": np.array(3.25)}


class RankStateReader(CheckpointReader):
    """A distributed state held in memory: ``{rank: {tensor: this rank's slice}}``."""

    name = "in-memory rank state"

    def __init__(self, strategy, state: dict[int, dict[str, np.ndarray]]):
        self.kind, self.root, self.strategy = "distributed", "<memory>", strategy
        self.files = tuple(f"rank_{r}/memory" for r in sorted(state))
        self.reads = 0
        entries: dict[str, dict[Box, list[str]]] = {}
        self._data: dict[tuple[str, str], memoryview] = {}
        for r, tensors in state.items():
            for t, box in strategy.rank_boxes(r):
                f = f"rank_{r}/memory"
                self._data[(f, t.name)] = memoryview(np.ascontiguousarray(tensors[t.name])
                                                     .reshape(-1).view(np.uint8))
                entries.setdefault(t.name, {}).setdefault(box, []).append(f)
        self.source = SourceIndex(
            [TensorInfo(t.name, t.shape, t.dtype) for t in strategy.tensors],
            {n: [SourceChunk(b, tuple(fs)) for b, fs in g.items() if b.volume]
             for n, g in entries.items()})

    def read_region(self, file, tensor, box, offset, views):
        data = self._data[(file, tensor.name)]
        check_region(views, offset, len(data))
        self.reads += 1
        for v in views:
            v[:] = data[offset:offset + len(v)]
            offset += len(v)


class NpzReader(CheckpointReader):
    """Complete weights in a numpy ``.npz`` archive, recognised by suffix."""

    name = "numpy archive"

    @classmethod
    def recognise(cls, path: Path) -> bool:
        return path.is_file() and path.suffix == ".npz"

    @classmethod
    def open(cls, path, strategy=None, lazy=False, meta=None):
        self = cls()
        self.kind, self.root, self.files = "complete", str(path.parent), (path.name,)
        with np.load(path) as z:
            self.arrays = {n: z[n] for n in z.files}
        self.source = SourceIndex(
            [TensorInfo(n, a.shape, dtype_name(a.dtype)) for n, a in self.arrays.items()],
            {n: [SourceChunk(Box.full(a.shape), (path.name,))] for n, a in self.arrays.items()})
        return self

    def read_region(self, file, tensor, box, offset, views):
        data = memoryview(self.arrays[tensor.name].reshape(-1).view(np.uint8))
        check_region(views, offset, len(data))
        for v in views:
            v[:] = data[offset:offset + len(v)]
            offset += len(v)


def test_merge_from_an_in_memory_reader(tmp_path):
    strategy = hpcckpt.strategy_from_dict(STRATEGY)
    full = full_arrays()
    state = {r: {t.name: full[t.name][tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))] for t, box in strategy.rank_boxes(r)}
             for r in range(strategy.world_size)}
    reader = RankStateReader(strategy, state)
    hpcckpt.merge(reader, str(tmp_path / "out"), options=OPTS)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(got) == set(full)
    for n, a in full.items():
        assert got[n].dtype == a.dtype and got[n].tobytes() == a.tobytes(), n
    assert reader.reads > 0


def test_registered_reader_is_found_by_path(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "READERS", list(inputs.READERS))
    full = full_arrays()
    np.savez(tmp_path / "weights.npz", **full)
    with pytest.raises(FormatError, match="not a .safetensors file"):
        open_input(tmp_path / "weights.npz")
    register_reader(NpzReader)
    assert isinstance(open_input(tmp_path / "weights.npz"), NpzReader)
    strategy = hpcckpt.strategy_from_dict(STRATEGY)
    hpcckpt.split(str(tmp_path / "weights.npz"), str(tmp_path / "dist"), strategy, options=OPTS)
    back = open_input(tmp_path / "dist")
    assert type(back).__name__ == "ManifestReader" and back.kind == "distributed"
    hpcckpt.merge(str(tmp_path / "dist"), str(tmp_path / "hf"), options=OPTS)
    got = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for n, a in full.items():
        assert got[n].tobytes() == a.tobytes(), n


def test_open_input_returns_a_reader_unchanged():
    reader = RankStateReader(hpcckpt.strategy_from_dict(STRATEGY),
                             {r: {} for r in range(0)})
    assert open_input(reader) is reader
    assert str(reader) == "<memory>"


def test_read_region_past_the_chunk_is_refused(tmp_path):
    """A region beyond a stored chunk would silently copy the next tensor's bytes."""
    full = full_arrays()
    np.savez(tmp_path / "w.npz", **full)
    r = NpzReader.open(tmp_path / "w.npz")
    info = r.source.tensors["b"]
    with pytest.raises(AssertionError, match="read of bytes 16-24 beyond a chunk of 20 bytes"):
        r.read_region("w.npz", info, Box.full(info.shape), 16, [memoryview(bytearray(8))])


def test_safetensors_reader_reads_regions(tmp_path):
    """The file-backed reader: any offset, many views, bytes as stored."""
    from hpcckpt.formats.safetensors import build_header
    a = np.arange(24, dtype=np.int32).reshape(4, 6)
    head, _ = build_header([("x", "I32", a.shape)])
    (tmp_path / "m.safetensors").write_bytes(head + a.tobytes())
    with open_input(tmp_path / "m.safetensors") as r:
        assert isinstance(r, SafetensorsReader)
        info = r.source.tensors["x"]
        v1, v2 = bytearray(5), bytearray(11)
        r.read_region("m.safetensors", info, Box.full(info.shape), 30,
                      [memoryview(v1), memoryview(v2)])
    assert bytes(v1 + v2) == a.tobytes()[30:46]


def test_meta_files_serve_given_bytes_and_count_what_they_open(tmp_path):
    from hpcckpt.storage import reader
    n = len(reader.OPENED)
    (tmp_path / "x.json").write_text(json.dumps({"a": 1}))
    meta = MetaFiles({str(tmp_path / "given.json"): b"[1]", str(tmp_path / "gone"): None})
    assert meta.read(tmp_path / "x.json") == b'{"a": 1}'
    assert meta.read(tmp_path / "missing.json") is None
    assert meta.read(tmp_path / "given.json") == b"[1]" and meta.read(tmp_path / "gone") is None
    assert reader.OPENED[n:] == [str(tmp_path / "x.json")]
