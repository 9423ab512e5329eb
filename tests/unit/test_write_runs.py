"""write_runs_to_file: scattering a box from memory into its place in a file, exactly."""
from __future__ import annotations

import os

import numpy as np
import pytest

from hpcckpt.layout.box import Box
from hpcckpt.planning.runs import strided_runs
from hpcckpt.storage.chunkio import WRITE_RUN, write_runs_to_file


@pytest.mark.parametrize("shape,region,itemsize,window", [
    ((64, 512), Box((3, 256), (40, WRITE_RUN // 4)), 4, 8 << 20),  # one pwrite per run
    ((64, 512), Box((3, 256), (40, 3)), 4, 8 << 20),      # 12-byte runs: merged windows
    ((64, 512), Box((0, 1), (64, 2)), 2, 1000),           # tiny window: many windows
    ((9, 7, 5), Box((2, 1, 1), (5, 4, 3)), 8, 64),        # 3-d, window smaller than a row
    ((5, 300), Box((1, 0), (3, 300)), 1, 8 << 20),        # contiguous: one write
])
def test_scatter_into_file_is_exact(tmp_path, shape, region, itemsize, window):
    rng = np.random.default_rng(0)
    dst_box = Box.full(shape)
    nbytes = dst_box.volume * itemsize
    before = rng.integers(0, 256, nbytes, dtype=np.uint8)
    begin = 123  # the tensor's data starts after a header
    path = tmp_path / "f"
    path.write_bytes(b"h" * begin + before.tobytes() + b"t" * 7)
    data = rng.integers(0, 256, region.volume * itemsize, dtype=np.uint8)
    sr = strided_runs(region, region, dst_box, itemsize)
    fd = os.open(path, os.O_RDWR)
    try:
        write_runs_to_file(fd, str(path), begin, sr, data, 0, max_window=window)
    finally:
        os.close(fd)
    want = before.reshape(*shape, itemsize).copy()
    sl = tuple(slice(o, o + n) for o, n in zip(region.offsets, region.sizes))
    want[sl] = data.reshape(*region.sizes, itemsize)
    got = path.read_bytes()
    assert got[:begin] == b"h" * begin and got[-7:] == b"t" * 7
    assert got[begin:-7] == want.tobytes()
