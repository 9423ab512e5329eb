"""Output files, laid out completely before a byte is written.

Every output file's header (and so every tensor's byte offsets) is computed here, up
front, so that any number of ranks can fill one file concurrently with positioned
writes, and so that ``--dry-run`` knows every byte without touching the disk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from ..layout.box import Box
from ..layout.strategy import Strategy
from ..formats.names import hf_shard_name, ms_part_name, rank_file_name
from ..formats.safetensors import build_header
from .assign import balanced_cuts
from .dedup import DedupPlan
from .rank_header import rank_header_spans, rank_records
from .runs import flat_range_to_boxes
from ..layout.tensor import TensorInfo


@dataclass(frozen=True, slots=True)
class OutputEntry:
    """One stored box of a tensor in an output file."""

    tensor: TensorInfo          #: the whole tensor (global shape)
    box: Box                    #: global region stored (the full box for complete weights)
    begin: int                  #: absolute file offset of the first byte
    end: int

    @property
    def name(self) -> str:
        return self.tensor.name

    @property
    def dtype(self) -> str:
        return self.tensor.dtype

    @property
    def global_shape(self) -> tuple[int, ...]:
        return self.tensor.shape

    @property
    def itemsize(self) -> int:
        return self.tensor.itemsize

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class OutputFile:
    path: str                   #: relative to the output root
    header: bytes
    entries: tuple[OutputEntry, ...]
    rank: int | None = None     #: strategy rank whose file this is (distributed outputs)

    @property
    def size(self) -> int:
        return self.entries[-1].end if self.entries else len(self.header)

    @property
    def data_bytes(self) -> int:
        return self.size - len(self.header)


def make_file(path: str, records: Iterable[tuple[str, str, Box, tuple[int, ...]]],
              metadata: dict[str, str] | None = None, rank: int | None = None) -> OutputFile:
    """Lay out one file: records are (tensor, dtype, stored box, global shape), in order."""
    records = list(records)
    head, spans = build_header(((n, dt, box.sizes) for n, dt, box, _ in records), metadata)
    entries = tuple(OutputEntry(TensorInfo(n, gshape, dt), box, *spans[n])
                    for n, dt, box, gshape in records)
    return OutputFile(path, head, entries, rank)


# ---- complete (unified) weights -------------------------------------------------
def hf_files(tensors: list[TensorInfo], max_shard_size: int, suffix: str = "",
             layout: str = "hf", metadata: dict[str, str] | None = None) -> list[OutputFile]:
    """Shards of at most ``max_shard_size`` data bytes (a bigger tensor gets its own shard).

    ``layout="hf"``: ``model.safetensors`` or ``model-0000i-of-0000N.safetensors``;
    ``layout="ms"``: MindSpore's ``part<i>.safetensors``.
    """
    groups: list[list[TensorInfo]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    files = []
    for i, g in enumerate(groups):
        name = ms_part_name(i, suffix) if layout == "ms" else hf_shard_name(i, n, suffix)
        files.append(make_file(name, ((t.name, t.dtype, Box.full(t.shape), t.shape) for t in g),
                               metadata or {"format": "pt"}))
    return files


MS_PART_SIZE = 3 << 30   #: MindSpore's unified_safetensors: parts of about 3 GiB


def ms_unified_files(tensors: list[TensorInfo], part_size: int = MS_PART_SIZE,
                     first_seen=lambda name: ()) -> tuple[list[OutputFile], dict]:
    """MindSpore 2.10's ``unified_safetensors`` layout: ``ceil(total / part_size)`` parts
    (at most one per tensor), filled largest tensor first into the lightest part (ties
    in ``first_seen`` order: MindSpore meets tensors rank file by rank file), each part
    laid out in the ``safetensors`` library's order with metadata ``format: ms``,
    ``remove_redundancy: False``. Returns the files and the ``param_name_map.json`` doc.
    """
    from ..dtypes import library_order
    total = sum(t.nbytes for t in tensors)
    n = max(1, min(-(-total // part_size), len(tensors)))
    groups: list[list[TensorInfo]] = [[] for _ in range(n)]
    load = [0] * n
    for t in sorted(tensors, key=lambda t: (-t.nbytes, first_seen(t.name))):
        i = load.index(min(load))
        groups[i].append(t)
        load[i] += t.nbytes
    meta = {"format": "ms", "remove_redundancy": "False"}
    files = [make_file(ms_part_name(i),
                       ((t.name, t.dtype, Box.full(t.shape), t.shape)
                        for t in sorted(g, key=lambda t: library_order(t.name, t.dtype))), meta)
             for i, g in enumerate(groups)]
    name_map = {"metadata": {"total_size": total},
                "weight_map": {t.name: ms_part_name(i) for i, g in enumerate(groups)
                               for t in g}}
    return files, name_map


def hf_index(files: list[OutputFile]) -> dict:
    """``model.safetensors.index.json`` content for the shards."""
    return {"metadata": {"total_size": sum(f.data_bytes for f in files)},
            "weight_map": {e.name: f.path for f in files for e in f.entries}}


# ---- distributed weights -----------------------------------------------------------
def rank_file(strategy: Strategy, prefix: str, rank: int, dedup: "DedupPlan | None" = None,
              path: str | None = None) -> OutputFile:
    """Rank ``rank``'s file (at ``path``, default ``rank_file_name``): its boxes, or with
    ``dedup`` only what the plan gives it to store (whole boxes or slabs of them)."""
    records = rank_records(strategy, rank, dedup)
    head, spans = rank_header_spans(records, dedup)
    entries = tuple(OutputEntry(t.info, box, b, e) for (t, box), (b, e) in zip(records, spans))
    return OutputFile(path or rank_file_name(prefix, rank), head, entries, rank)


def rank_files(strategy: Strategy, prefix: str,
               dedup: "DedupPlan | None" = None) -> list[OutputFile]:
    return [rank_file(strategy, prefix, r, dedup) for r in range(strategy.world_size)]


# ---- who writes what ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WritePiece:
    """A contiguous part of one output entry, written by one rank."""

    file: int        #: index into the file list
    entry: int       #: index into that file's entries
    box: Box         #: global coordinates; contiguous in the entry's storage
    nbytes: int
    whole: bool      #: the piece is the whole entry (its writer can checksum it in passing)


def divide_writes(files: list[OutputFile], world: int) -> list[list[WritePiece]]:
    """Every rank's pieces: bytes balanced across ranks, one large tensor may be shared.

    When there is exactly one file per rank (split/reshard at the strategy's world size),
    rank r writes file r: each rank owns its shard.
    """
    pieces: list[list[WritePiece]] = [[] for _ in range(world)]
    if len(files) == world and all(f.rank == i for i, f in enumerate(files)):
        for i, f in enumerate(files):
            for j, e in enumerate(f.entries):
                if e.nbytes:
                    pieces[i].append(WritePiece(i, j, e.box, e.nbytes, True))
        return pieces
    starts, flat = [], []
    pos = 0
    for i, f in enumerate(files):
        for j, e in enumerate(f.entries):
            if e.nbytes:
                starts.append(pos)
                flat.append((i, j, e, pos))
                pos += e.nbytes
    total = pos
    cuts = balanced_cuts(starts, total, world)
    # align every cut to an element boundary of the entry it falls in
    import bisect
    for r in range(1, world):
        k = bisect.bisect_right(starts, cuts[r]) - 1
        if k >= 0:
            e0 = flat[k][3]
            isz = flat[k][2].itemsize
            cuts[r] = max(cuts[r - 1], e0 + (cuts[r] - e0) // isz * isz)
    for r in range(world):
        a, b = cuts[r], cuts[r + 1]
        if a >= b:
            continue
        k = max(0, bisect.bisect_right(starts, a) - 1)
        while k < len(flat) and flat[k][3] < b:
            i, j, e, e0 = flat[k]
            lo, hi = max(a, e0) - e0, min(b, e0 + e.nbytes) - e0
            if lo < hi:
                isz = e.itemsize
                whole = lo == 0 and hi == e.nbytes
                for sub in flat_range_to_boxes(e.box.sizes, lo // isz, hi // isz):
                    g = Box(tuple(o + s for o, s in zip(sub.offsets, e.box.offsets)), sub.sizes)
                    pieces[r].append(WritePiece(i, j, g, sub.volume * isz, whole))
            k += 1
    return pieces
