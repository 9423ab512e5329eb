"""Positioned reads of stored chunks (hpcckpt.storage.chunkio), checked against numpy
slicing on every read path: one run, one read per long run, runs gathered through the
(capped, lazily allocated) scratch buffer in slabs."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from hpcckpt.layout.box import Box
from hpcckpt.planning.runs import strided_runs
from hpcckpt.planning.sources import SourceChunk, TensorInfo
from hpcckpt.storage import chunkio
from hpcckpt.storage.chunkio import ChunkReader
from hpcckpt.storage.safetensors_io import build_header


def _write(path, name, arr):
    head, offs = build_header([(name, "U8", arr.shape)])
    with open(path, "wb") as f:
        f.write(head)
        f.write(arr.tobytes())
    return offs[name][0]


SHAPES = [(64, 8192), (16, 300000), (4, 6, 5000), (3, 70000), (128, 3)]


@pytest.mark.parametrize("shape", SHAPES)
def test_read_matches_numpy(tmp_path, shape):
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, shape, dtype=np.uint8)
    _write(tmp_path / "a.safetensors", "t", data)
    full = Box((0,) * len(shape), shape)
    chunk = SourceChunk(full, ("a.safetensors",))
    info = TensorInfo("t", shape, "U8")
    reader = ChunkReader(str(tmp_path), scratch_bytes=1 << 16)
    try:
        cuts = [sorted({0, n // 3, n // 2, n - 1, n}) for n in shape]
        for lo_hi in itertools.product(*[list(zip(c, c[1:])) for c in cuts]):
            region = Box(tuple(lo for lo, _ in lo_hi), tuple(hi - lo for lo, hi in lo_hi))
            if region.volume == 0:
                continue
            sr = strided_runs(region, full, region, 1)
            out = np.full(region.volume + 16, 0xAB, np.uint8)
            reader.read(chunk, info, sr, out, 16)
            want = data[tuple(slice(lo, hi) for lo, hi in lo_hi)].reshape(-1)
            assert np.array_equal(out[16:], want), region
            assert (out[:16] == 0xAB).all()
    finally:
        reader.close()
    assert reader._scratch is None or len(reader._scratch) <= chunkio.SCRATCH_CAP


def test_start_writeback(tmp_path, monkeypatch):
    """A hint only: harmless on a file, and it switches itself off where refused."""
    import os

    from hpcckpt.storage import safetensors_io as sio
    monkeypatch.setattr(sio, "_SFR", True)
    p = tmp_path / "f"
    fd = os.open(p, os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"x" * 100_000)
        sio.start_writeback(fd, 0, 100_000)
        sio.start_writeback(fd, 0, 0)
    finally:
        os.close(fd)
    r, w = os.pipe()
    try:
        sio.start_writeback(w, 0, 10)   # ESPIPE on Linux: turned off, no exception
        sio.start_writeback(w, 0, 10)
    finally:
        os.close(r)
        os.close(w)
    assert p.read_bytes() == b"x" * 100_000
