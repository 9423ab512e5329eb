"""Output files, laid out completely before a byte is written.

Every output file's header (and so every tensor's byte offsets) is computed here, up
front, so that any number of ranks can fill one file concurrently with positioned
writes, and so that ``--dry-run`` knows every byte without touching the disk.
"""
from __future__ import annotations

import json
import math
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable

from ..layout.box import Box
from ..dtypes import DTYPES, itemsize
from ..layout.strategy import Strategy, TensorSpec
from ..formats.names import hf_shard_name, ms_part_name, rank_file_name
from ..formats.safetensors import build_header
from .assign import balanced_cuts
from .dedup import DedupPlan
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
def _rank_records(strategy: Strategy, rank: int, dedup: "DedupPlan | None"
                  ) -> list[tuple[TensorSpec, Box]]:
    """What ``rank``'s file stores, in order: its boxes, or what ``dedup`` gives it."""
    if dedup is None:
        return list(strategy.rank_boxes(rank))
    out = []
    for t, _ in strategy.rank_boxes(rank):
        box = dedup.box_for(rank, t.name)
        if box is not None:
            out.append((t, box))
    return out


def _rank_metadata(dedup: "DedupPlan | None") -> dict[str, str]:
    """A rank file's ``__metadata__`` besides ``hpcckpt`` (which goes third)."""
    return {"format": "ms", "remove_redundancy": "True" if dedup is not None else "False"}


@lru_cache(maxsize=1 << 16)
def _quoted(name: str) -> tuple[str, str]:
    """``name`` as a JSON string in the header (UTF-8 as is) and in the ``hpcckpt``
    metadata (ASCII escapes, as ``json.dumps`` writes by default)."""
    return json.dumps(name, ensure_ascii=False), json.dumps(name)


def _ints(values) -> str:
    return "[" + ",".join(map(str, values)) + "]"   # json.dumps(list(values), ",", ":")


@dataclass(slots=True)
class _HeaderTemplate:
    """A rank header's text for one sequence of tensors held as one pattern of boxes
    (the ranks of a pipeline stage): only the boxes' sizes and offsets vary by rank."""

    specs: tuple            #: the tensors; kept alive because the cache key holds their ids
    desc: str               #: the ``hpcckpt`` metadata, ``{i}``: offsets of distinct box i
    entries: dict = field(default_factory=dict)   #: sizes of the boxes -> (text, spans)


_TEMPLATES: "OrderedDict[tuple, _HeaderTemplate]" = OrderedDict()
_TEMPLATES_KEPT = 64


def _braces(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")   # literal text in a str.format template


def _rank_header(records: list[tuple[TensorSpec, Box]], dedup: "DedupPlan | None"
                 ) -> tuple[bytes, list[tuple[int, int]]]:
    """``build_header`` of a rank file, byte for byte, from text templates: 1,024 rank
    files of a 70B model hold 370,000 entries, and ``json.dumps`` of their dicts took
    4 ms per file (a shared-filesystem writer lays out every file; ``verify --quick``
    compares every header with this). A rank's ~360 records hold ~20 distinct boxes
    (tensors laid out alike share one), and the ranks of a stage differ only in those
    boxes, so a stage's text is built once and each rank fills in its boxes. Returns
    the header (length prefix included) and each record's absolute ``(begin, end)``."""
    specs = tuple([t for t, _ in records])
    slot_of: dict[int, int] = {}
    slots = tuple([slot_of.setdefault(id(b), len(slot_of)) for _, b in records])
    boxes = list({id(b): b for _, b in records}.values())   # in slot order
    key = (tuple(map(id, specs)), slots)
    tpl = _TEMPLATES.get(key)
    if tpl is None:
        pieces = []
        for t, slot in zip(specs, slots):
            inner = _quoted(t.name)[1]
            pieces.append(_braces(f'{inner}:{{"shape":{_ints(t.shape)},"offsets":')
                          + f"{{{slot}}}" + "}}")
        tpl = _TEMPLATES[key] = _HeaderTemplate(specs, "{{" + ",".join(pieces) + "}}")
        if len(_TEMPLATES) > _TEMPLATES_KEPT:
            _TEMPLATES.popitem(last=False)
    sizes = tuple([b.sizes for b in boxes])
    got = tpl.entries.get(sizes)
    if got is None:
        texts = [_ints(s) for s in sizes]
        entries, rel = [], []
        pos = 0
        for t, slot in zip(specs, slots):
            size = DTYPES.get(t.dtype)
            if size is None:
                itemsize(t.dtype, f"tensor {t.name!r}: ")   # raises, naming the tensor
            end = pos + math.prod(sizes[slot]) * size[0]
            entries.append(f'{_quoted(t.name)[0]}:{{"dtype":"{t.dtype}","shape":{texts[slot]},'
                           f'"data_offsets":[{pos},{end}]}}')
            rel.append((pos, end))
            pos = end
        got = ("".join("," + e for e in entries), rel)
        if len(tpl.entries) < _TEMPLATES_KEPT:   # de-duplicated slabs vary by rank
            tpl.entries[sizes] = got
    meta = _rank_metadata(dedup)
    meta["hpcckpt"] = tpl.desc.format(*[_ints(b.offsets) for b in boxes])
    if dedup is not None:
        meta["dedup"] = dedup.mode
    text = ('{"__metadata__":' + json.dumps(meta, separators=(",", ":"), ensure_ascii=False)
            + got[0] + "}")
    raw = text.encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, [(start + b, start + e) for b, e in got[1]]


def rank_header(strategy: Strategy, rank: int, dedup: "DedupPlan | None" = None
                ) -> tuple[bytes, int]:
    """Rank ``rank``'s file header exactly as ``rank_file`` lays it out, and the file's
    size, without building its entries: what ``verify --quick`` expects to find."""
    head, spans = _rank_header(_rank_records(strategy, rank, dedup), dedup)
    return head, spans[-1][1] if spans else len(head)


def rank_file(strategy: Strategy, prefix: str, rank: int, dedup: "DedupPlan | None" = None,
              path: str | None = None) -> OutputFile:
    """Rank ``rank``'s file (at ``path``, default ``rank_file_name``): its boxes, or with
    ``dedup`` only what the plan gives it to store (whole boxes or slabs of them)."""
    records = _rank_records(strategy, rank, dedup)
    head, spans = _rank_header(records, dedup)
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
