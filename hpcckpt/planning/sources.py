"""What a checkpoint stores: for every tensor, its distinct boxes and the files holding each.

Pure: built from parsed headers, a manifest, or a strategy; never opens files itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from ..errors import FormatError
from ..formats.names import rank_dir_of
from ..layout.box import Box
from ..layout.strategy import Strategy
from ..layout.tensor import TensorInfo

@dataclass(frozen=True, slots=True)
class SourceChunk:
    """One distinct stored box of a tensor and every file (relative path) holding a copy."""

    box: Box
    files: tuple[str, ...]
    #: the recorded checksum of each file's copy ("xxh3_64:<hex>" or None), when the
    #: source records them (a manifest); empty otherwise
    checksums: tuple[str | None, ...] = ()

    def rank_dirs(self) -> tuple[int | None, ...]:
        """The ``rank_<r>`` directory of each file (None for files outside rank dirs)."""
        return tuple(rank_dir_of(f) for f in self.files)


class SourceIndex:
    """Tensors and their stored chunks; chunks may be computed lazily per tensor."""

    def __init__(self, tensors: Iterable[TensorInfo],
                 chunks: Mapping[str, list[SourceChunk]] | Callable[[str], list[SourceChunk]],
                 redundancy: str = "full",
                 meeting: Callable[[str, Box], list[SourceChunk] | None] | None = None):
        """``meeting(name, box)``: the chunks of ``name`` meeting ``box``, in the order of
        ``chunks(name)``, found without building the others (None: not for this tensor)."""
        self.tensors: dict[str, TensorInfo] = {t.name: t for t in tensors}
        self._chunks = chunks if callable(chunks) else dict(chunks).__getitem__
        self._meeting = meeting
        self._cache: dict[str, list[SourceChunk]] = {}
        self.redundancy = redundancy

    def chunks(self, name: str) -> list[SourceChunk]:
        got = self._cache.get(name)
        if got is None:
            got = self._cache[name] = self._chunks(name)
        return got

    def overlapping(self, name: str, box: Box) -> list[tuple[SourceChunk, Box]]:
        """Stored chunks of ``name`` meeting ``box``, with the common region."""
        chunks = self._cache.get(name)
        if chunks is None and self._meeting is not None:
            # a rank of a 1024-rank job meets one or two of a tensor's hundreds of chunks
            chunks = self._meeting(name, box)
        out = []
        for c in self.chunks(name) if chunks is None else chunks:
            common = c.box.intersect(box)
            if common is not None:
                out.append((c, common))
        return out

    @property
    def unique_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def check_complete(self, where: str) -> None:
        """Every element of every tensor is stored somewhere, and chunks do not overlap."""
        for name, t in self.tensors.items():
            check_tensor_chunks(where, t, self.chunks(name))


def check_tensor_chunks(where: str, t: TensorInfo, chunks: list[SourceChunk]) -> None:
    """``chunks`` lie inside ``t``, do not overlap, and cover every element of it."""
    full = Box.full(t.shape)
    for c in chunks:
        if not full.contains(c.box):
            raise FormatError(f"{where}: tensor {t.name!r} chunk {c.box} in {c.files[0]} lies "
                              f"outside shape {list(t.shape)}")
    a, b, common = first_overlap(chunks)
    if common is not None:
        raise FormatError(f"{where}: tensor {t.name!r} chunks {a.box} ({a.files[0]}) "
                          f"and {b.box} ({b.files[0]}) overlap in {common}")
    have = sum(c.box.volume for c in chunks)
    if have != math.prod(t.shape):
        raise FormatError(f"{where}: tensor {t.name!r} is incomplete: stored chunks cover "
                          f"{have} of {math.prod(t.shape)} elements")


def first_overlap(chunks: list[SourceChunk]):
    """Two chunks that overlap and their common box, or (None, None, None).

    A sweep along dimension 0: only chunks whose dim-0 intervals meet are compared, so a
    tensor split into hundreds of chunks along dim 0 costs O(n log n), not O(n^2).
    """
    order = sorted((c for c in chunks if c.box.volume), key=lambda c: c.box.offsets[:1])
    active: list[SourceChunk] = []
    for c in order:
        start = c.box.offsets[0] if c.box.ndim else 0
        active = [a for a in active if not a.box.ndim or a.box.offsets[0] + a.box.sizes[0] > start]
        for a in active:
            common = a.box.intersect(c.box)
            if common is not None:
                return a, c, common
        active.append(c)
    return None, None, None


def group_chunks(entries: Iterable[tuple]) -> dict[str, list[SourceChunk]]:
    """(tensor, box, file[, checksum]) records -> distinct chunks with their replica
    files (and their recorded checksums, when every record has one), in order."""
    groups: dict[str, dict[Box, list[tuple[str, str | None]]]] = {}
    for name, box, f, *sum_ in entries:
        if box.volume == 0:
            groups.setdefault(name, {})
            continue
        groups.setdefault(name, {}).setdefault(box, []).append((f, sum_[0] if sum_ else None))
    out = {}
    for n, g in groups.items():
        out[n] = []
        for b, fs in g.items():
            fs.sort(key=lambda x: _file_order(x[0]))
            sums = tuple(s for _, s in fs)
            out[n].append(SourceChunk(b, tuple(f for f, _ in fs),
                                      sums if any(s is not None for s in sums) else ()))
    return out


def _file_order(rel: str):
    r = rank_dir_of(rel)
    return (r if r is not None else -1, rel)


def strategy_source(strategy: Strategy, file_of_rank: Callable[[int], str],
                    holds: Callable[[int, str], bool] | None = None) -> SourceIndex:
    """A source laid out by ``strategy``: rank r's file holds its boxes.

    ``holds(rank, tensor)`` says whether the rank's file really stores the tensor (for
    de-duplicated files); by default every rank stores all of its boxes. Chunks are
    computed per tensor on first use, so a 1024-rank strategy costs nothing up front.
    """
    def chunks(name: str, within: Box | None = None) -> list[SourceChunk]:
        out = []
        for box, ranks in strategy.chunks(name, within):
            files = tuple(file_of_rank(r) for r in ranks if holds is None or holds(r, name))
            if files:
                out.append(SourceChunk(box, files))
        return out

    tensors = [t.info for t in strategy.tensors]
    return SourceIndex(tensors, chunks, meeting=chunks)
