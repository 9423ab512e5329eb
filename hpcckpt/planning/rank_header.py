"""A rank file's header, written as text from templates (``rank_file`` lays out the rest).

Split, reshard and the save manager write rank ``r``'s file with exactly these bytes, and
``verify --quick`` compares each header with them instead of decoding it, so this module
imports only what a header needs (it is on verify's start-up path).
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from functools import lru_cache
from typing import TYPE_CHECKING

from ..dtypes import DTYPES, itemsize
from ..formats.safetensors import frame_header
from ..layout.box import Box
from ..layout.strategy import Strategy, TensorSpec

if TYPE_CHECKING:
    from .dedup import DedupPlan


def rank_records(strategy: Strategy, rank: int, dedup: "DedupPlan | None"
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


@lru_cache(maxsize=1 << 16)
def _quoted(name: str) -> tuple[str, str]:
    """``name`` as a JSON string in the header (UTF-8 as is) and in the ``hpcckpt``
    metadata (ASCII escapes, as ``json.dumps`` writes by default)."""
    return json.dumps(name, ensure_ascii=False), json.dumps(name)


def _ints(values) -> str:
    return "[" + ",".join(map(str, values)) + "]"   # json.dumps(list(values), ",", ":")


class _HeaderTemplate:
    """A rank header's text for one sequence of tensors held as one pattern of boxes
    (the ranks of a pipeline stage): only the boxes' sizes and offsets vary by rank."""

    __slots__ = ("specs", "desc", "entries")

    def __init__(self, specs: tuple, desc: str):
        self.specs = specs   #: the tensors; kept alive because the cache key holds their ids
        self.desc = desc     #: the ``hpcckpt`` metadata, ``{i}``: offsets of distinct box i
        self.entries: dict = {}   #: sizes of the boxes -> (text, spans)


_TEMPLATES: "OrderedDict[tuple, _HeaderTemplate]" = OrderedDict()
#: templates kept, and box-size patterns kept per template (each ~40 KiB of text at
#: 360 tensors: at most ~20 MiB in all; a 70B stage's ranks share one or two patterns)
_TEMPLATES_KEPT = 64
_SIZES_KEPT = 8


def _braces(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")   # literal text in a str.format template


def rank_header_spans(records: list[tuple[TensorSpec, Box]], dedup: "DedupPlan | None"
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
        if len(tpl.entries) < _SIZES_KEPT:   # de-duplicated slabs vary by rank
            tpl.entries[sizes] = got
    meta = {"format": "ms", "remove_redundancy": "True" if dedup is not None else "False",
            "hpcckpt": tpl.desc.format(*[_ints(b.offsets) for b in boxes])}
    if dedup is not None:
        meta["dedup"] = dedup.mode
    head = frame_header('{"__metadata__":' + json.dumps(meta, separators=(",", ":"),
                                                        ensure_ascii=False) + got[0] + "}")
    return head, [(len(head) + b, len(head) + e) for b, e in got[1]]


def rank_header(strategy: Strategy, rank: int, dedup: "DedupPlan | None" = None
                ) -> tuple[bytes, int]:
    """Rank ``rank``'s file header exactly as ``rank_file`` lays it out, and the file's
    size, without building its entries: what ``verify --quick`` expects to find."""
    head, spans = rank_header_spans(rank_records(strategy, rank, dedup), dedup)
    return head, spans[-1][1] if spans else len(head)
