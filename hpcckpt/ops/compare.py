"""Exact comparison of one rank's slices with a reference checkpoint (``load --against``)."""
from __future__ import annotations

import numpy as np

from ..errors import FormatError
from ..layout.box import Box
from ..layout.strategy import Strategy
from ..planning.runs import flat_range_to_boxes, strided_runs
from ..storage.chunkio import ChunkReader
from ..storage.inputs import open_input
from .common import check_tensors_match
from .filecopy import DEFAULT_BUFFER


def compare_slices(arrays: dict[str, np.ndarray], strategy: Strategy, rank: int, ref: str,
                   buffer_size: int = DEFAULT_BUFFER) -> int:
    """Compare this rank's ``arrays`` (its boxes under ``strategy``) with the same regions
    of checkpoint ``ref``, window by window through one bounded buffer.

    Returns the bytes compared. Raises FormatError naming the tensor, rank and byte range
    of the first difference.
    """
    inp = open_input(ref)
    check_tensors_match(inp.source, strategy, ref, "the strategy", allow_extra=True)
    reader = ChunkReader(inp, scratch_bytes=buffer_size)
    buf = np.empty(max(16, buffer_size), np.uint8)
    compared = 0
    try:
        for t, box in strategy.rank_boxes(rank):
            mine = arrays[t.name].reshape(-1).view(np.uint8)
            info = t.info
            isz = t.itemsize
            step = max(1, len(buf) // isz)
            for start in range(0, box.volume, step):
                stop = min(box.volume, start + step)
                lo = start * isz
                pos = 0   # the sub-boxes follow one another in the window
                for sub in flat_range_to_boxes(box.sizes, start, stop):
                    g = Box(tuple(o + s for o, s in zip(sub.offsets, box.offsets)), sub.sizes)
                    for chunk, region in inp.source.overlapping(t.name, g):
                        reader.read(chunk, info, strided_runs(region, chunk.box, g, isz), buf,
                                    pos)
                    pos += g.volume * isz
                n = (stop - start) * isz
                diff = np.flatnonzero(buf[:n] != mine[lo:lo + n])
                if len(diff):
                    first = lo + int(diff[0])
                    raise FormatError(
                        f"tensor {t.name!r} {box} differs from {ref} at byte "
                        f"{first} of this rank's slice ({len(diff)} differing byte(s) in bytes "
                        f"[{lo}, {lo + n}))")
                compared += n
    finally:
        reader.close()
    return compared
