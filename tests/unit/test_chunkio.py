"""Positioned reads of stored chunks (hpcckpt.storage.chunkio), checked against numpy
slicing on every read path: one run, one read per long run, runs gathered through the
(capped, lazily allocated) scratch buffer in slabs."""
from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from hpcckpt.layout.box import Box
from hpcckpt.planning.runs import strided_runs
from hpcckpt.layout.tensor import TensorInfo
from hpcckpt.planning.sources import SourceChunk
from hpcckpt.storage import chunkio
from hpcckpt.storage.chunkio import ChunkReader
from hpcckpt.formats.safetensors import build_header


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

    from hpcckpt.storage import fileio as sio
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


def _read_into_wider(tmp_path, chunk_shape, col0, total_cols, rows=slice(None)):
    """Chunk ``chunk_shape`` (2-D, U8) stored alone, read into columns [col0, col0 + c) of
    a row-major destination ``total_cols`` wide, as merge does with column blocks."""
    rng = np.random.default_rng(11)
    data = rng.integers(0, 256, chunk_shape, dtype=np.uint8)
    _write(tmp_path / "c.safetensors", "t", data)
    r, c = chunk_shape
    chunk_box = Box((0, col0), (r, c))
    r0, r1, _ = rows.indices(r)
    region = Box((r0, col0), (r1 - r0, c))
    dst_box = Box((r0, 0), (r1 - r0, total_cols))
    chunk = SourceChunk(chunk_box, ("c.safetensors",))
    reader = ChunkReader(str(tmp_path), scratch_bytes=1 << 16)
    out = bytearray(b"\xab" * (dst_box.volume + 8))
    try:
        reader.read(chunk, TensorInfo("t", (r, total_cols), "U8"),
                    strided_runs(region, chunk_box, dst_box, 1), out, 8)
    finally:
        reader.close()
    got = np.frombuffer(out, np.uint8)
    assert (got[:8] == 0xAB).all()
    got = got[8:].reshape(r1 - r0, total_cols)
    assert np.array_equal(got[:, col0:col0 + c], data[r0:r1]), (chunk_shape, col0, rows)
    others = np.delete(got, np.s_[col0:col0 + c], axis=1)
    assert (others == 0xAB).all()   # nothing written outside the runs
    return reader


@pytest.mark.parametrize("chunk_shape,col0,total", [
    ((64, 100), 50, 300),       # short runs: span read + numpy copy
    ((64, 8192), 8192, 16384),  # scatter, dense source (merge of a column block)
    ((3, 4096), 0, 4096 * 3),   # scatter, exactly SCATTER_RUN
])
def test_read_into_strided_destination(tmp_path, chunk_shape, col0, total):
    reader = _read_into_wider(tmp_path, chunk_shape, col0, total)
    scattered = chunk_shape[1] >= chunkio.SCATTER_RUN
    assert (reader._scratch is None) == scattered


def test_scatter_with_gaps_and_batches(tmp_path, monkeypatch):
    """Source runs with gaps (a column block of a wider stored chunk), batches cut by
    IOV_MAX, gaps wider than the junk cap, and short preadv returns: same bytes."""
    from hpcckpt.storage import fileio as sio
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, (40, 3 * 4096), dtype=np.uint8)
    _write(tmp_path / "g.safetensors", "t", data)
    full = Box((0, 0), data.shape)
    region = Box((2, 4096), (37, 2 * 4096))   # span / bytes = 1.49: scattered, with gaps
    chunk = SourceChunk(full, ("g.safetensors",))
    info = TensorInfo("t", data.shape, "U8")
    want = data[2:39, 4096:3 * 4096].reshape(-1)
    real_preadv = sio.os.preadv
    calls = []

    def short_preadv(fd, views, offset):   # at most 5000 bytes per call
        calls.append(len(views))
        budget, take = 5000, []
        for v in views:
            take.append(v[:budget])
            budget -= len(take[-1])
            if not budget:
                break
        return real_preadv(fd, take, offset)

    for iov_max, junk_cap, preadv in [(1024, 1 << 20, real_preadv), (3, 1 << 20, real_preadv),
                                      (1024, 1, real_preadv), (4, 1 << 20, short_preadv)]:
        monkeypatch.setattr(sio, "IOV_MAX", iov_max)
        monkeypatch.setattr(chunkio, "JUNK_CAP", junk_cap)
        monkeypatch.setattr(sio.os, "preadv", preadv)
        reader = ChunkReader(str(tmp_path))
        out = bytearray(region.volume)
        try:
            reader.read(chunk, info, strided_runs(region, full, region, 1), out)
        finally:
            reader.close()
        assert reader._scratch is None
        assert np.array_equal(np.frombuffer(out, np.uint8), want), (iov_max, junk_cap)
    assert calls and max(calls) <= 4


def test_preadv_into_short_file(tmp_path):
    from hpcckpt.errors import CheckpointIOError
    from hpcckpt.storage.fileio import preadv_into
    p = tmp_path / "short"
    p.write_bytes(b"x" * 100)
    fd = os.open(p, os.O_RDONLY)
    try:
        a, b = bytearray(60), bytearray(60)
        with pytest.raises(CheckpointIOError) as e:
            preadv_into(fd, [memoryview(a), memoryview(b)], 10, str(p))
        assert str(e.value) == f"{p}: file ends before byte 130 (read bytes 10-130)"
        assert a == b"x" * 60 and b[:30] == b"x" * 30
    finally:
        os.close(fd)


def test_pread_into_one_call_when_full_else_the_same_errors(tmp_path, monkeypatch):
    """pread_into's one-call fast path: a full read is one os.preadv; a short read and
    a failing read give preadv_into's errors, word for word."""
    from hpcckpt.errors import CheckpointIOError
    from hpcckpt.storage.fileio import pread_into
    p = tmp_path / "short"
    p.write_bytes(bytes(range(100)))
    calls = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda *a: calls.append(a[2]) or real(*a))
    fd = os.open(p, os.O_RDONLY)
    try:
        buf = bytearray(40)
        pread_into(fd, memoryview(buf), 50, str(p))
        assert buf == bytes(range(50, 90)) and calls == [50]
        with pytest.raises(CheckpointIOError) as e:
            pread_into(fd, memoryview(buf), 80, str(p))
        assert str(e.value) == f"{p}: file ends before byte 120 (read bytes 80-120)"

        def eio(*a):
            raise OSError(5, "Input/output error")
        monkeypatch.setattr(os, "preadv", eio)
        with pytest.raises(CheckpointIOError) as e:
            pread_into(fd, memoryview(buf), 0, str(p))
        assert str(e.value) == f"{p}: read of bytes 0-40 failed: Input/output error"
    finally:
        os.close(fd)


@pytest.mark.parametrize("shape,box", [
    ((6, 4, 2048), ((1, 0, 0), (4, 4, 1024))),     # 1 KiB runs: numpy strided copy
    ((6, 4, 8192), ((1, 1, 4096), (4, 2, 4096))),  # 4 KiB runs: slice per run
    ((3, 20000), ((0, 5), (3, 19990))),            # long runs, odd offsets
])
def test_copy_runs_both_paths(shape, box):
    """A region of one row-major array into the same region of another, by bytes."""
    from hpcckpt.storage.chunkio import LONG_RUN, copy_runs
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, shape, dtype=np.uint8)
    region = Box(*box)
    big = Box((0,) * len(shape), shape)
    sr = strided_runs(region, big, big, 1)
    assert sr.counts and (sr.length >= LONG_RUN) == (sr.length >= 4096)
    dst = bytearray(b"\x5a" * (src.size + 3))
    copy_runs(sr, memoryview(src.reshape(-1)), 0, dst, 3)
    got = np.frombuffer(dst, np.uint8)[3:].reshape(shape)
    sl = tuple(slice(o, o + s) for o, s in zip(region.offsets, region.sizes))
    want = np.full(shape, 0x5A, np.uint8)
    want[sl] = src[sl]
    assert np.array_equal(got, want)
