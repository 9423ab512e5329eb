"""Boxes to byte ranges: the pure geometry under every copy hpcckpt makes.

A region of a tensor stored row-major inside a larger box is a set of equally long
contiguous byte runs laid out on a regular grid. ``StridedRuns`` describes that set
exactly and compactly (a 4096x2048 region of a 4096x4096 F32 tensor is one value, not
4096 tuples); executors turn it into numpy strided copies or positioned reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

from ..layout.box import Box


@dataclass(frozen=True, slots=True)
class ByteRun:
    """One contiguous copy."""

    src_offset: int  #: first byte in the source buffer or tensor data
    dst_offset: int  #: first byte in the destination buffer or tensor data
    length: int      #: bytes


@dataclass(frozen=True, slots=True)
class StridedRuns:
    """``prod(counts)`` runs of ``length`` bytes each, on a grid.

    Run ``i = (i0, i1, ...)`` (row-major over ``counts``) copies ``length`` bytes from
    ``src_start + sum(i_k * src_strides[k])`` to ``dst_start + sum(i_k * dst_strides[k])``.
    Runs are listed in increasing destination and source order.
    """

    src_start: int
    dst_start: int
    length: int
    counts: tuple[int, ...]
    src_strides: tuple[int, ...]
    dst_strides: tuple[int, ...]

    @property
    def num_runs(self) -> int:
        return math.prod(self.counts)

    @property
    def nbytes(self) -> int:
        return self.num_runs * self.length

    def src_span(self) -> tuple[int, int]:
        """Smallest ``[lo, hi)`` source byte range containing every run."""
        last = sum((c - 1) * s for c, s in zip(self.counts, self.src_strides))
        return self.src_start, self.src_start + last + self.length

    def dst_span(self) -> tuple[int, int]:
        last = sum((c - 1) * s for c, s in zip(self.counts, self.dst_strides))
        return self.dst_start, self.dst_start + last + self.length

    def offsets(self) -> tuple[list[int], list[int]]:
        """(source offsets, destination offsets) of every run, in run order. Built a grid
        level at a time by list comprehensions: executors walking thousands of runs
        spend microseconds here, not a generator step per run."""
        if self.length == 0:
            return [], []
        src, dst = [self.src_start], [self.dst_start]
        for c, ss, ds in zip(self.counts, self.src_strides, self.dst_strides):
            src = [o + i * ss for o in src for i in range(c)]
            dst = [o + i * ds for o in dst for i in range(c)]
        return src, dst

    def runs(self) -> Iterator[ByteRun]:
        """Every run, coalescing nothing further (the grid is already maximal)."""
        for s, d in zip(*self.offsets()):
            yield ByteRun(s, d, self.length)


def strided_runs(region: Box, src_box: Box, dst_box: Box, itemsize: int) -> StridedRuns:
    """Byte runs copying ``region`` from a tensor stored as ``src_box`` to one stored as ``dst_box``.

    Both storage boxes are row-major (C order) with offsets relative to their own start.
    ``region`` must lie inside both. Trailing dimensions that the region spans fully in
    both boxes are merged into one run, so a slab spanning all trailing dimensions is
    a single run.
    """
    assert src_box.contains(region) and dst_box.contains(region), (region, src_box, dst_box)
    n = region.ndim
    if region.volume == 0:
        return StridedRuns(0, 0, 0, (), (), ())
    src_elem = _elem_strides(src_box.sizes)
    dst_elem = _elem_strides(dst_box.sizes)
    src_start = sum((r - b) * s for r, b, s in zip(region.offsets, src_box.offsets, src_elem))
    dst_start = sum((r - b) * s for r, b, s in zip(region.offsets, dst_box.offsets, dst_elem))
    # Merge from the innermost dimension outwards while the region covers the storage.
    k = n  # dims k.. are inside one run
    run = 1
    while k > 0:
        d = k - 1
        run *= region.sizes[d]
        k = d
        if region.sizes[d] != src_box.sizes[d] or region.sizes[d] != dst_box.sizes[d]:
            break
    # Outer dims 0..k-1 form the grid; drop those of size 1 (they add nothing).
    outer = [d for d in range(k) if region.sizes[d] > 1]
    return StridedRuns(
        src_start * itemsize, dst_start * itemsize, run * itemsize,
        tuple(region.sizes[d] for d in outer),
        tuple(src_elem[d] * itemsize for d in outer),
        tuple(dst_elem[d] * itemsize for d in outer))


def byte_runs(region: Box, src_box: Box, dst_box: Box, itemsize: int) -> list[ByteRun]:
    """The runs of :func:`strided_runs` as a list (for tests and small regions)."""
    return list(strided_runs(region, src_box, dst_box, itemsize).runs())


def _elem_strides(sizes: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for s in reversed(sizes):
        out.append(acc)
        acc *= s
    return tuple(reversed(out))


def flat_range_to_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[Box]:
    """Cut the row-major element range ``[start, stop)`` of ``shape`` into boxes.

    Each box is itself contiguous in row-major order and the boxes are in order; at most
    ``2 * ndim - 1`` boxes. A scalar (``shape == ()``) is one box of one element.
    """
    if start >= stop:
        return []
    if not shape:
        return [Box((), ())]
    strides = _elem_strides(shape)
    out: list[Box] = []

    def emit(prefix: tuple[int, ...], dim: int, lo: int, hi: int) -> None:
        # elements [lo, hi) counted from the start of the sub-array at `prefix` (dims < dim fixed)
        if lo >= hi:
            return
        if dim == len(shape) - 1:
            out.append(Box(prefix + (lo,), (1,) * 0 + (hi - lo,)) if not prefix else
                       Box(prefix + (lo,), (1,) * len(prefix) + (hi - lo,)))
            return
        inner = strides[dim]
        first, last = lo // inner, (hi - 1) // inner
        rest = len(shape) - dim - 1
        if first == last:
            emit(prefix + (first,), dim + 1, lo - first * inner, hi - first * inner)
            return
        if lo % inner:
            emit(prefix + (first,), dim + 1, lo - first * inner, inner)
            first += 1
        full_end = last + 1 if hi % inner == 0 else last
        if full_end > first:
            out.append(Box(prefix + (first,) + (0,) * rest,
                           (1,) * len(prefix) + (full_end - first,) + shape[dim + 1:]))
        if hi % inner:
            emit(prefix + (last,), dim + 1, 0, hi - last * inner)

    emit((), 0, start, stop)
    return out


def tile_contiguous(box: Box, storage: tuple[int, ...], itemsize: int, max_bytes: int) -> list[Box]:
    """Cut a box that is contiguous in ``storage`` (row-major, box-relative coords of the
    storage) into contiguous tiles of at most ``max_bytes`` (at least one row element)."""
    if box.volume * itemsize <= max_bytes or box.ndim == 0:
        return [box]
    k = next((d for d in range(box.ndim) if box.sizes[d] > 1), None)
    if k is None:  # a single element larger than the buffer: it is its own tile
        return [box]
    inner = math.prod(box.sizes[k + 1:]) * itemsize
    if inner <= max_bytes:
        step = max(1, max_bytes // inner)
        tiles = []
        for lo in range(0, box.sizes[k], step):
            n = min(step, box.sizes[k] - lo)
            offs = list(box.offsets)
            sizes = list(box.sizes)
            offs[k] += lo
            sizes[k] = n
            tiles.append(Box(tuple(offs), tuple(sizes)))
        return tiles
    tiles = []
    for i in range(box.sizes[k]):
        offs = list(box.offsets)
        sizes = list(box.sizes)
        offs[k] += i
        sizes[k] = 1
        tiles.extend(tile_contiguous(Box(tuple(offs), tuple(sizes)), storage, itemsize, max_bytes))
    return tiles
