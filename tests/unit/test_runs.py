"""Boxes -> byte runs (hpcckpt.planning.runs), checked exactly and against numpy."""
from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from hpcckpt.layout.box import Box
from hpcckpt.planning.runs import (ByteRun, StridedRuns, byte_runs, flat_range_to_boxes,
                                   strided_runs, tile_contiguous)


def B(offsets, sizes) -> Box:
    return Box(tuple(offsets), tuple(sizes))


def sl(box: Box, origin=None) -> tuple[slice, ...]:
    origin = origin or (0,) * box.ndim
    return tuple(slice(o - b, o - b + n) for o, b, n in zip(box.offsets, origin, box.sizes))


# ---------------------------------------------------------------------------------
# exact runs
# ---------------------------------------------------------------------------------
def test_columns_of_4x4_f32():
    src = B([0, 0], [4, 4])
    region = B([0, 2], [4, 2])
    runs = byte_runs(region, src, region, 4)
    assert runs == [ByteRun(8, 0, 8), ByteRun(24, 8, 8), ByteRun(40, 16, 8), ByteRun(56, 24, 8)]
    sr = strided_runs(region, src, region, 4)
    assert sr == StridedRuns(8, 0, 8, (4,), (16,), (8,))
    assert sr.num_runs == 4 and sr.nbytes == 32
    assert sr.src_span() == (8, 64)
    assert sr.dst_span() == (0, 32)


def test_columns_into_larger_destination():
    # region columns 2:4 of a 4x4 source, landing in a destination box [0:4, 1:5]
    runs = byte_runs(B([0, 2], [4, 2]), B([0, 0], [4, 4]), B([0, 1], [4, 4]), 4)
    assert runs == [ByteRun(8, 4, 8), ByteRun(24, 20, 8), ByteRun(40, 36, 8), ByteRun(56, 52, 8)]


def test_row_slab_is_one_run():
    src = B([0, 0, 0], [6, 3, 5])
    region = B([2, 0, 0], [3, 3, 5])
    assert byte_runs(region, src, region, 2) == [ByteRun(2 * 15 * 2, 0, 3 * 15 * 2)]
    sr = strided_runs(region, src, region, 2)
    assert sr.counts == () and sr.num_runs == 1
    # same slab inside a destination that is the full tensor: still one run
    assert byte_runs(region, src, src, 2) == [ByteRun(60, 60, 90)]


def test_single_row_partial_is_one_run():
    # leading dims of size 1 add nothing
    src = B([0, 0, 0], [4, 3, 5])
    region = B([1, 2, 1], [1, 1, 3])
    assert byte_runs(region, src, region, 4) == [ByteRun(((1 * 3 + 2) * 5 + 1) * 4, 0, 12)]


def test_scalar_is_one_run_of_itemsize():
    s = Box((), ())
    assert byte_runs(s, s, s, 8) == [ByteRun(0, 0, 8)]
    sr = strided_runs(s, s, s, 2)
    assert sr.num_runs == 1 and sr.nbytes == 2


@pytest.mark.parametrize("region,src", [
    (B([0, 0], [0, 4]), B([0, 0], [4, 4])),
    (B([1, 2], [2, 0]), B([0, 0], [4, 4])),
    (B([0], [0]), B([0], [0])),
    (B([0, 0, 0], [3, 0, 2]), B([0, 0, 0], [3, 0, 2])),
])
def test_zero_size_region_has_no_runs(region, src):
    assert byte_runs(region, src, region, 4) == []
    assert strided_runs(region, src, region, 4).nbytes == 0


def test_3d_middle_block():
    # src is a [1:4, 0:4, 2:8] box of a bigger tensor (storage-relative offsets differ)
    src = B([1, 0, 2], [3, 4, 6])
    dst = B([2, 1, 3], [2, 2, 4])
    region = B([2, 1, 4], [2, 2, 3])
    runs = byte_runs(region, src, dst, 2)
    # src strides (elements): 24, 6, 1; dst strides: 8, 4, 1
    want = []
    for i in range(2):
        for j in range(2):
            s = ((1 + i) * 24 + (1 + j) * 6 + 2) * 2
            d = (i * 8 + j * 4 + 1) * 2
            want.append(ByteRun(s, d, 6))
    assert runs == want
    sr = strided_runs(region, src, dst, 2)
    assert sr.counts == (2, 2)
    assert sr.src_strides == (48, 12) and sr.dst_strides == (16, 8)


def test_3d_full_trailing_planes_merge():
    # region spans dims 1 and 2 fully in both boxes: one run per index of dim 0... and dim 0
    # is contiguous too, so a single run
    src = B([0, 0, 0], [5, 2, 3])
    dst = B([1, 0, 0], [3, 2, 3])
    region = B([1, 0, 0], [3, 2, 3])
    assert byte_runs(region, src, dst, 4) == [ByteRun(24, 0, 72)]
    # full in src but not in dst along dim 2: runs of one row
    dst2 = B([1, 0, 0], [3, 2, 4])
    runs = byte_runs(region, src, dst2, 4)
    assert runs == [ByteRun(24 + (i * 2 + j) * 12, (i * 8 + j * 4) * 4, 12)
                    for i in range(3) for j in range(2)]


def test_runs_in_increasing_order():
    sr = strided_runs(B([1, 1, 1], [2, 3, 2]), B([0, 0, 0], [4, 5, 6]), B([0, 0, 0], [4, 5, 6]), 4)
    runs = list(sr.runs())
    assert len(runs) == sr.num_runs == 6
    assert [r.src_offset for r in runs] == sorted(r.src_offset for r in runs)
    assert [r.dst_offset for r in runs] == sorted(r.dst_offset for r in runs)
    lo, hi = sr.src_span()
    assert lo == runs[0].src_offset and hi == runs[-1].src_offset + runs[-1].length


def test_offsets_lists_every_run_in_order():
    sr = StridedRuns(100, 7, 4, (2, 3), (1000, 10), (50, 5))
    src, dst = sr.offsets()
    assert src == [100, 110, 120, 1100, 1110, 1120]
    assert dst == [7, 12, 17, 57, 62, 67]
    assert [(r.src_offset, r.dst_offset, r.length) for r in sr.runs()] == [
        (s, d, 4) for s, d in zip(src, dst)]
    assert StridedRuns(5, 6, 9, (), (), ()).offsets() == ([5], [6])   # one run
    assert StridedRuns(5, 6, 0, (3,), (1,), (1,)).offsets() == ([], [])  # empty


# ---------------------------------------------------------------------------------
# against numpy
# ---------------------------------------------------------------------------------
def _rand_box_in(rng: random.Random, outer: Box, allow_empty=True) -> Box:
    offs, sizes = [], []
    for o, n in zip(outer.offsets, outer.sizes):
        lo = rng.randint(0, n)
        hi = rng.randint(lo, n)
        if not allow_empty and hi == lo:
            if n == 0:
                raise ValueError
            lo = min(lo, n - 1)
            hi = lo + 1
        offs.append(o + lo)
        sizes.append(hi - lo)
    return Box(tuple(offs), tuple(sizes))


def _apply(runs, src_bytes: np.ndarray, dst_bytes: np.ndarray) -> None:
    for r in runs:
        src = src_bytes[r.src_offset:r.src_offset + r.length]
        dst_bytes[r.dst_offset:r.dst_offset + r.length] = src


@pytest.mark.parametrize("seed", range(300))
def test_runs_match_numpy(seed):
    rng = random.Random(seed)
    ndim = rng.randint(0, 4)
    itemsize = rng.choice([1, 2, 4, 8])
    dtype = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[itemsize]
    shape = tuple(rng.randint(0, 5) for _ in range(ndim))
    full = Box.full(shape)
    src_box = _rand_box_in(rng, full)
    dst_box = _rand_box_in(rng, full)
    region = src_box.intersect(dst_box) if ndim else Box((), ())
    if region is None:
        region = Box(src_box.offsets, (0,) * ndim)
        dst_box = src_box  # region must lie inside both
    # a sub-region of the common part, sometimes
    if ndim and rng.random() < 0.5 and not region.is_empty():
        region = _rand_box_in(rng, region)
    n_src = src_box.volume
    tensor = np.arange(math.prod(shape), dtype=dtype).reshape(shape) + 1
    src = np.ascontiguousarray(tensor[sl(src_box)])
    dst = np.zeros(dst_box.sizes, dtype=dtype)
    src_bytes = src.reshape(-1).view(np.uint8)
    dst_bytes = dst.reshape(-1).view(np.uint8)
    assert src_bytes.size == n_src * itemsize
    runs = byte_runs(region, src_box, dst_box, itemsize)
    _apply(runs, src_bytes, dst_bytes)
    want = np.zeros(dst_box.sizes, dtype=dtype)
    want[sl(region, dst_box.offsets)] = tensor[sl(region)]
    np.testing.assert_array_equal(dst, want)
    # exactly the region's bytes, no overlap between runs
    assert sum(r.length for r in runs) == region.volume * itemsize
    dsts = sorted((r.dst_offset, r.dst_offset + r.length) for r in runs)
    assert all(a[1] <= b[0] for a, b in zip(dsts, dsts[1:]))
    sr = strided_runs(region, src_box, dst_box, itemsize)
    assert sr.nbytes == region.volume * itemsize
    if runs:
        assert sr.src_span() == (min(r.src_offset for r in runs),
                                 max(r.src_offset + r.length for r in runs))
        assert sr.dst_span() == (dsts[0][0], dsts[-1][1])
    # the runs are maximal: no two consecutive runs are adjacent in both buffers
    for a, b in zip(runs, runs[1:]):
        assert not (a.src_offset + a.length == b.src_offset
                    and a.dst_offset + a.length == b.dst_offset)


# ---------------------------------------------------------------------------------
# flat_range_to_boxes
# ---------------------------------------------------------------------------------
def _flat_indices(shape, box: Box) -> np.ndarray:
    idx = np.arange(math.prod(shape)).reshape(shape)
    return idx[sl(box)].reshape(-1)


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 1, 3), (7,), (), (1, 1), (2, 3, 1, 2), (4, 1),
                                   (1, 5)])
def test_flat_range_to_boxes_exhaustive(shape):
    total = math.prod(shape)
    ndim = len(shape)
    for a in range(total + 1):
        for b in range(a, total + 1):
            boxes = flat_range_to_boxes(shape, a, b)
            if a == b:
                assert boxes == []
                continue
            assert 1 <= len(boxes) <= max(1, 2 * ndim - 1), (shape, a, b, boxes)
            pos = a
            for box in boxes:
                assert box.ndim == ndim
                assert not box.is_empty()
                assert Box.full(shape).contains(box)
                flat = _flat_indices(shape, box)
                # contiguous, and following on from the previous box
                assert flat.tolist() == list(range(pos, pos + box.volume)), (shape, a, b, box)
                pos += box.volume
            assert pos == b


def test_flat_range_to_boxes_examples():
    assert flat_range_to_boxes((3, 4, 5), 3, 57) == [
        B([0, 0, 3], [1, 1, 2]), B([0, 1, 0], [1, 3, 5]), B([1, 0, 0], [1, 4, 5]),
        B([2, 0, 0], [1, 3, 5]), B([2, 3, 0], [1, 1, 2])]
    assert flat_range_to_boxes((3, 4, 5), 0, 60) == [B([0, 0, 0], [3, 4, 5])]
    assert flat_range_to_boxes((3, 4, 5), 20, 40) == [B([1, 0, 0], [1, 4, 5])]
    assert flat_range_to_boxes((), 0, 1) == [Box((), ())]
    assert flat_range_to_boxes((7,), 2, 5) == [B([2], [3])]
    assert flat_range_to_boxes((7,), 4, 4) == []


# ---------------------------------------------------------------------------------
# tile_contiguous
# ---------------------------------------------------------------------------------
def _contiguous_boxes(storage):
    """Every non-empty box that is contiguous in row-major ``storage``."""
    total = math.prod(storage)
    seen = set()
    for a in range(total):
        for b in range(a + 1, total + 1):
            for box in flat_range_to_boxes(storage, a, b):
                if box not in seen:
                    seen.add(box)
                    yield box


def _check_tiles(box, storage, itemsize, max_bytes, tiles):
    full = Box.full(storage)
    pos = None
    for t in tiles:
        assert box.contains(t) and not t.is_empty()
        # each tile is contiguous in the storage: one run
        assert len(byte_runs(t, full, t, itemsize)) == 1, (box, t)
        assert t.volume * itemsize <= max_bytes or t.volume == 1, (box, t, max_bytes)
        start = _flat_indices(storage, t)[0]
        if pos is not None:
            assert start == pos  # in order, no gap
        pos = start + t.volume
    assert sum(t.volume for t in tiles) == box.volume
    assert _flat_indices(storage, tiles[0])[0] == _flat_indices(storage, box)[0]


@pytest.mark.parametrize("storage", [(3, 4, 5), (6,), (2, 1, 3), (1, 1, 4)])
@pytest.mark.parametrize("itemsize,max_bytes", [(4, 4), (4, 12), (4, 20), (2, 7), (1, 1000),
                                                (4, 60)])
def test_tile_contiguous(storage, itemsize, max_bytes):
    for box in _contiguous_boxes(storage):
        tiles = tile_contiguous(box, storage, itemsize, max_bytes)
        _check_tiles(box, storage, itemsize, max_bytes, tiles)


def test_tile_contiguous_examples():
    assert tile_contiguous(B([1, 0], [3, 4]), (5, 4), 4, 20) == [
        B([1, 0], [1, 4]), B([2, 0], [1, 4]), B([3, 0], [1, 4])]
    assert tile_contiguous(B([1, 0], [3, 4]), (5, 4), 4, 32) == [
        B([1, 0], [2, 4]), B([3, 0], [1, 4])]
    assert tile_contiguous(B([1, 0], [3, 4]), (5, 4), 4, 48) == [B([1, 0], [3, 4])]
    assert tile_contiguous(Box((), ()), (), 8, 4) == [Box((), ())]


@pytest.mark.parametrize("box,storage", [(B([0], [3]), (3,)), (B([1, 0], [1, 1]), (2, 2)),
                                         (B([0], [1]), (1,))])
def test_tile_contiguous_element_larger_than_max(box, storage):
    tiles = tile_contiguous(box, storage, 8, 4)
    assert tiles == [Box(tuple(o + i if d == 0 else o for d, o in enumerate(box.offsets)),
                         (1,) * box.ndim) for i in range(box.volume)]


def test_tile_contiguous_random_large():
    rng = random.Random(7)
    for _ in range(200):
        storage = tuple(rng.randint(1, 6) for _ in range(rng.randint(1, 4)))
        total = math.prod(storage)
        a = rng.randrange(total)
        b = rng.randint(a + 1, total)
        itemsize = rng.choice([1, 2, 4])
        max_bytes = rng.randint(itemsize, 40)
        for box in flat_range_to_boxes(storage, a, b):
            _check_tiles(box, storage, itemsize, max_bytes,
                         tile_contiguous(box, storage, itemsize, max_bytes))


def test_elem_grid_product_is_cheap():
    # a large region is one value, not millions of tuples
    sr = strided_runs(B([0, 0], [4096, 2048]), B([0, 0], [4096, 4096]),
                      B([0, 0], [4096, 2048]), 4)
    assert sr.counts == (4096,) and sr.length == 8192
    assert sr.nbytes == 4096 * 2048 * 4
    assert list(itertools.islice(sr.runs(), 2)) == [ByteRun(0, 0, 8192), ByteRun(16384, 8192, 8192)]
