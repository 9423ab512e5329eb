"""``manifest.json``: the record of a complete distributed checkpoint (SPEC 2.2).

Written last and atomically; its presence means "complete". For every tensor: its
global shape, dtype and every stored chunk with file and checksum; for every rank file
its size in bytes.

Format 2 (written since issue 8/9; format 1 is still read)::

    {"format": "hpcckpt.manifest/2", "world_size": 8, "redundancy": "full" | "dedup",
     "strategy": "strategy.yaml", "strategy_digest": "<xxh3_64 of the layout>",
     "prefix": "model", "checksum": "xxh3_64",
     "files": ["rank_0/model_rank_0.safetensors", ...],     # rank r's file is files[r]
     "file_sizes": [123456, ...],                           # bytes, one per file
     "model_files": {"config.json": {"size": 612, "checksum": "xxh3_64:<hex>"}, ...},
                               # optional: the model directory's non-weight files, kept
                               # under model_files/ (storage.model_files)
     "tensors": {
       "w": {"shape": [8, 6], "dtype": "F32", "xxh3": "<16 hex digits per chunk>"},
       "v": {"shape": [8], "dtype": "F32", "xxh3": "...", "holders": [3, 0, ...]},
       "u": {"shape": [4], "dtype": "F32",
             "chunks": [[[0], [4], [0, 1], "xxh3_64:<hex>"], ...]}}}

A tensor stored as its strategy lays it out (what split and reshard write) lists no
chunk: its distinct non-empty boxes are ``Strategy.chunks(name)`` of the checkpoint's
own strategy file, in that order, and ``xxh3`` holds one checksum per box (replicas hold
the same bytes). Every replica rank stores the box, or with ``holders`` the one rank
given per box (de-duplicated; -1 = every replica). Any other tensor lists its chunks:
``[offsets, sizes, [file indices], checksum]``, replicas of a box in one row. At 1024
ranks a 70B-style checkpoint's manifest shrinks from 70 MiB (format 1: every chunk an
object with box, file and checksum) to about 5 MiB.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointIOError, FormatError, quote
from ..formats.names import CHECKSUM_PREFIX, MANIFEST, STRATEGY_FILE, rank_dir_of
from ..formats.safetensors import load_json
from ..layout.box import Box
from ..layout.strategy import MAX_WORLD, Strategy
from .fileio import safe_join
from . import model_files

FORMAT = "hpcckpt.manifest/2"
FORMAT_V1 = "hpcckpt.manifest/1"
_PREFIX = CHECKSUM_PREFIX
CHECKSUM = _PREFIX.rstrip(":")
_HEX16 = re.compile(r"[0-9a-f]{16}")
REDUNDANCY = ("full", "dedup")


@dataclass(frozen=True, slots=True)
class ManifestChunk:
    box: Box
    file: str           #: relative to the checkpoint root
    checksum: str       #: "xxh3_64:<16 hex digits>" of the chunk's stored bytes


@dataclass(frozen=True, slots=True)
class ManifestTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[ManifestChunk, ...]


@dataclass(frozen=True)
class Manifest:
    """A manifest as written. ``layout``: the strategy the files were written under
    (the checkpoint's ``strategy`` file); tensors stored as it lays them out are
    written without their chunk lists."""

    world_size: int
    redundancy: str                 #: "full" (every rank's boxes) or "dedup" (each box once)
    tensors: tuple[ManifestTensor, ...]
    files: tuple[str, ...]          #: every rank file, including ones holding no tensor
    strategy: str = STRATEGY_FILE
    prefix: str = ""
    file_sizes: tuple[int, ...] = ()    #: bytes of each of ``files``
    layout: Strategy | None = field(default=None, compare=False, repr=False)
    #: the model directory's non-weight files carried under ``model_files/``:
    #: ``{path: {"size": n, "checksum": c}}`` (storage.model_files)
    model_files: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        """The format-2 document (see the module docstring)."""
        fid = {f: i for i, f in enumerate(self.files)}
        lay = self.layout
        by_rank = lay is not None and lay.world_size == len(self.files) and all(
            rank_dir_of(f) == i for i, f in enumerate(self.files))
        doc = {"format": FORMAT, "world_size": self.world_size, "redundancy": self.redundancy,
               "strategy": self.strategy}
        if lay is not None:
            doc["strategy_digest"] = strategy_digest(lay)
        doc.update({"prefix": self.prefix, "checksum": CHECKSUM, "files": list(self.files),
                    "file_sizes": list(self.file_sizes)})
        if self.model_files:
            doc["model_files"] = self.model_files
        doc["tensors"] = {}
        for t in self.tensors:
            entry: dict = {"shape": list(t.shape), "dtype": t.dtype}
            derived = _derive(lay, t, fid) if by_rank else None
            if derived is None:
                rows: dict[tuple[Box, str], list[int]] = {}
                for c in t.chunks:
                    if c.box.volume:
                        rows.setdefault((c.box, c.checksum), []).append(fid[c.file])
                entry["chunks"] = [[list(b.offsets), list(b.sizes), fs, s]
                                   for (b, s), fs in rows.items()]
            else:
                entry.update(derived)
            doc["tensors"][t.name] = entry
        return doc


def strategy_digest(strategy: Strategy) -> str:
    """xxh3_64 of the strategy's canonical JSON: a reader given the same strategy need
    not parse the checkpoint's strategy file again (at 1024 ranks: 0.08 s, 0.45 s as
    block YAML)."""
    import xxhash
    return xxhash.xxh3_64_hexdigest(json.dumps(strategy.to_dict(), separators=(",", ":")).encode())


def _derive(layout: Strategy, t: ManifestTensor, fid: dict[str, int]) -> dict | None:
    """``t``'s compact entry when its chunks are exactly what ``layout`` gives (every
    replica, or one holder per box) and replicas agree on the checksum; else None."""
    spec = layout.by_name.get(t.name)
    if spec is None or spec.shape != t.shape or spec.dtype != t.dtype:
        return None
    groups: dict[Box, list[tuple[int, str]]] = {}
    for c in t.chunks:
        if c.box.volume:
            groups.setdefault(c.box, []).append((fid[c.file], c.checksum))
    boxes = layout.chunks(t.name)
    if len(boxes) != len(groups):
        return None
    hexes, holders = [], []
    for box, ranks in boxes:
        g = groups.get(box)
        if g is None or len({s for _, s in g}) != 1:
            return None
        s = g[0][1]
        if not (isinstance(s, str) and s.startswith(_PREFIX)
                and _HEX16.fullmatch(s[len(_PREFIX):])):
            return None
        held = sorted(f for f, _ in g)
        if held == list(ranks):
            holders.append(-1)
        elif len(held) == 1 and held[0] in ranks:
            holders.append(held[0])
        else:
            return None
        hexes.append(s[len(_PREFIX):])
    out: dict = {"xxh3": "".join(hexes)}
    if any(h != -1 for h in holders):
        out["holders"] = holders
    return out


_MALFORMED = (KeyError, TypeError, ValueError, AttributeError, IndexError)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class ManifestIndex:
    """``manifest.json`` as read: header fields checked and tensor shapes now, each
    tensor's chunks decoded on first use (a rank planning a reshard or a load needs the
    chunks of the few hundred tensors its boxes touch, of thousands).

    Format 2 tensors without a chunk list need the checkpoint's strategy: ``bind`` it
    (``needs_layout`` says whether any does). Format 1 lists every chunk object; each
    becomes a compact ``(offsets, sizes, file, checksum)`` tuple as it is parsed
    (``read_manifest``).
    """

    def __init__(self, doc: dict, where: str):
        fmt = doc.get("format") if isinstance(doc, dict) else None
        if fmt not in (FORMAT, FORMAT_V1):
            raise FormatError(f"{where}: not an hpcckpt manifest (format {quote(fmt)}, "
                              f"expected {FORMAT!r} or {FORMAT_V1!r})")
        self.where, self.version = where, 2 if fmt == FORMAT else 1
        self.layout: Strategy | None = None
        ws, red = doc.get("world_size"), doc.get("redundancy")
        if not _is_int(ws) or not 1 <= ws <= MAX_WORLD:
            raise FormatError(f"{where}: 'world_size' must be a positive integer of at most "
                              f"{MAX_WORLD}, got {quote(ws)}")
        if red not in REDUNDANCY:
            raise FormatError(f"{where}: 'redundancy' is {quote(red)}; expected 'full' or "
                              "'dedup'")
        self.world_size, self.redundancy = ws, red
        files = doc.get("files", [])
        if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
            raise FormatError(f"{where}: 'files' must be a list of file names, got {quote(files)}")
        self.files = tuple(sys.intern(f) for f in files)
        sizes = doc.get("file_sizes")
        if self.version == 2 and (not isinstance(sizes, list) or len(sizes) != len(files)
                                  or not all(_is_int(n) and n >= 0 for n in sizes)):
            raise FormatError(f"{where}: 'file_sizes' must give each of the {len(files)} files "
                              f"its size in bytes, got {quote(sizes)}")
        #: bytes of each rank file, by name (format 1 records none)
        self.file_sizes: dict[str, int] | None = dict(zip(self.files, sizes)) \
            if self.version == 2 else None
        for key in ("strategy", "prefix", "strategy_digest"):
            if key in doc and not isinstance(doc[key], str):
                raise FormatError(f"{where}: {key!r} must be a string, got {quote(doc[key])}")
        self.strategy: str = doc.get("strategy", STRATEGY_FILE)
        self.prefix: str = doc.get("prefix", "")
        self.strategy_digest: str | None = doc.get("strategy_digest")
        #: carried non-weight files: path -> (size, checksum)
        self.model_files = model_files.parse_entries(doc.get("model_files"), where)
        tensors = doc.get("tensors")
        if not isinstance(tensors, dict):
            raise FormatError(f"{where}: 'tensors' must map tensor names to their entries, "
                              f"got {quote(tensors)}")
        self._tensors: dict = tensors
        try:
            #: name -> (shape, dtype), in the manifest's order
            self.shapes = {name: (tuple(_dim(x) for x in t["shape"]), _dtype(t["dtype"]))
                           for name, t in tensors.items()}
        except _MALFORMED as e:
            raise FormatError(f"{where}: malformed manifest: {type(e).__name__}: {e}") from None
        self.needs_layout = self.version == 2 and any("chunks" not in t for t in tensors.values())

    def bind(self, layout: Strategy, layout_where: str) -> None:
        """Attach the checkpoint's strategy (read from ``layout_where``), which must
        agree with the manifest's world size; format-2 tensors without chunk lists are
        decoded from it."""
        if layout.world_size != self.world_size:
            raise FormatError(f"{self.where}: world_size {self.world_size} disagrees with "
                              f"{layout_where}, which has {layout.world_size} ranks")
        self.layout = layout

    # ---- chunks -------------------------------------------------------------
    def records(self, name: str) -> list[tuple[Box, str, str | None]]:
        """(box, file, checksum) of every stored copy of a chunk of ``name``; boxes of
        zero volume (nothing stored) may be left out."""
        try:
            t = self._tensors[name]
            if self.version == 1:
                return [_v1_record(c) for c in t["chunks"]]
            if "chunks" in t:
                return [(Box(tuple(_dim(x) for x in offs), tuple(_dim(x) for x in sizes)),
                         self._file(i), s if isinstance(s, str) else None)
                        for offs, sizes, fids, s in t["chunks"] for i in fids]
        except _MALFORMED as e:
            raise FormatError(f"{self.where}: malformed manifest: tensor {name!r}: "
                              f"{type(e).__name__}: {e}") from None
        return self._derived(name, t)

    def derived_chunks(self, name: str, within: Box | None = None
                       ) -> list[tuple[Box, tuple[str, ...], tuple[str, ...]]] | None:
        """(box, files, checksums) per distinct box of a tensor whose chunks the strategy
        gives (format 2 without a chunk list), files in rank order; None for a tensor
        listing its chunks. Such chunks tile the tensor by construction (the strategy
        was validated), so readers need not check them for overlaps and gaps.

        ``within``: only the boxes meeting it, in the same order, or None when they are
        not found without decoding every box (``holders``, or not one file per rank)."""
        t = self._tensors.get(name)
        if self.version == 1 or not isinstance(t, dict) or "chunks" in t:
            return None
        if within is not None:
            if t.get("holders") is not None or len(self.files) != self.world_size:
                return None
            self._check_derived(name, t, self._strategy_spec_count(name))
            sums = t["xxh3"]
            return [(b, tuple(self.files[r] for r in ranks),
                     (_PREFIX + sums[16 * i:16 * i + 16],) * len(ranks))
                    for i, b, ranks in self.layout.chunk_positions(name, within)]
        out: dict[Box, tuple[list[str], list[str]]] = {}
        for b, f, s in self._derived(name, t):
            fs, ss = out.setdefault(b, ([], []))
            fs.append(f)
            ss.append(s)
        return [(b, tuple(fs), tuple(ss)) for b, (fs, ss) in out.items()]

    def _file(self, i) -> str:
        if not _is_int(i) or not 0 <= i < len(self.files):
            raise ValueError(f"file index {quote(i)} is not one of the {len(self.files)} files")
        return self.files[i]

    def lists_chunks(self, name: str) -> bool:
        """Whether ``name`` lists its own chunks (format 1, or a format-2 entry with
        ``chunks``); False: the checkpoint's strategy gives them."""
        t = self._tensors.get(name)
        return self.version == 1 or not isinstance(t, dict) or "chunks" in t

    def check_derived(self, name: str) -> bool:
        """For a tensor whose chunks the strategy gives: raise the FormatError that
        decoding them would (``records``), without building a box. Returns True when
        every replica rank stores each box (no ``holders``): rank ``r``'s file then
        holds exactly ``Strategy.rank_boxes(r)``'s box of it. The shape of a 1024-rank
        manifest's check: 2,892 tensors, 370,176 chunk copies, no chunk built."""
        t = self._tensors[name]
        self._check_derived(name, t, self._strategy_spec_count(name))
        return t.get("holders") is None

    def files_are_rank_files(self) -> bool:
        """Whether rank ``r``'s file must be exactly what ``planning.outputs.rank_file``
        lays out for the checkpoint's strategy (split, reshard and save write nothing
        else): format 2, every replica storing its box (no de-duplication), one file per
        rank in ``rank_<r>/``, and every tensor of the strategy, as it gives them, listed
        with its chunks given by it. Then a header is checked by comparing its bytes with
        ``rank_header``'s (``verify --quick``: 1,024 headers of 82 KiB are not decoded).
        Anything else, malformed entries included, answers False: the checked path then
        decides and names each defect."""
        lay = self.layout
        if (self.version != 2 or lay is None or self.redundancy != "full"
                or len(self.files) != lay.world_size or len(self._tensors) != len(lay.tensors)
                or any(rank_dir_of(f) != r for r, f in enumerate(self.files))):
            return False
        by_name = lay.by_name
        try:
            for name, t in self._tensors.items():
                spec = by_name.get(name)
                if (spec is None or type(t) is not dict or "chunks" in t
                        or t.get("holders") is not None
                        or (spec.shape, spec.dtype) != self.shapes[name]):
                    return False
                self._check_derived(name, t, lay.chunk_count(name))
        except FormatError:
            return False
        return True

    def _strategy_spec_count(self, name: str) -> int:
        at = f"{self.where}: tensor {name!r}"
        lay = self.layout
        if lay is None:
            raise FormatError(f"{at}: its chunks are given by the checkpoint's strategy, "
                              "which was not read")
        spec = lay.by_name.get(name)
        shape, dtype = self.shapes[name]
        if spec is None or spec.shape != shape or spec.dtype != dtype:
            got = "absent" if spec is None else f"{spec.dtype} {list(spec.shape)}"
            raise FormatError(f"{at}: is {dtype} {list(shape)} but {got} in the checkpoint's "
                              f"strategy {self.strategy}")
        return lay.chunk_count(name)

    def _check_derived(self, name: str, t: dict, n: int) -> None:
        at = f"{self.where}: tensor {name!r}"
        sums, holders = t.get("xxh3"), t.get("holders")
        if not isinstance(sums, str) or len(sums) != 16 * n:
            raise FormatError(f"{at}: 'xxh3' must hold {n} checksums of 16 hex "
                              f"digits, one per chunk of the strategy, got {quote(sums)}")
        if holders is not None and (not isinstance(holders, list) or len(holders) != n):
            raise FormatError(f"{at}: 'holders' must name one rank per chunk "
                              f"({n}), got {quote(holders)}")

    def _derived(self, name: str, t: dict) -> list[tuple[Box, str, str]]:
        at = f"{self.where}: tensor {name!r}"
        self._strategy_spec_count(name)
        boxes = self.layout.chunks(name)
        self._check_derived(name, t, len(boxes))
        sums, holders = t["xxh3"], t.get("holders")
        out = []
        for i, (box, ranks) in enumerate(boxes):
            s = _PREFIX + sums[16 * i:16 * i + 16]
            h = -1 if holders is None else holders[i]
            if h == -1:
                out += [(box, self.files[r], s) for r in ranks]
            elif _is_int(h) and h in ranks:
                out.append((box, self.files[h], s))
            else:
                raise FormatError(f"{at}: holder {quote(h)} of chunk {box} is not one of "
                                  f"its replica ranks")
        return out

    def expanded(self) -> dict:
        """The manifest in format 1 (every chunk an object with box, file and checksum):
        for tools and tests that read chunk lists as JSON."""
        return {"format": FORMAT_V1, "world_size": self.world_size,
                "redundancy": self.redundancy, "strategy": self.strategy,
                "prefix": self.prefix, "files": list(self.files),
                "tensors": {n: {"shape": list(shape), "dtype": dtype,
                                "chunks": [{**b.to_dict(), "file": f, "checksum": s}
                                           for b, f, s in self.records(n)]}
                            for n, (shape, dtype) in self.shapes.items()}}


def _dim(x) -> int:
    if not _is_int(x) or x < 0:
        raise ValueError(f"{quote(x)} is not a size or offset")
    return x


def _dtype(x) -> str:
    if not isinstance(x, str):
        raise ValueError(f"dtype {quote(x)} is not a string")
    return x


def _v1_record(c) -> tuple[Box, str, str | None]:
    if type(c) is not tuple:   # not a chunk as _compact_chunk saw it
        c = (c["offsets"], c["sizes"], c["file"], None)
    offsets, sizes, file, s = c
    if not isinstance(file, str):
        raise ValueError(f"file {quote(file)} is not a file name")
    return (Box(tuple(_dim(x) for x in offsets), tuple(_dim(x) for x in sizes)), file,
            s if isinstance(s, str) else None)


def _compact_chunk(pairs: list[tuple[str, object]]):
    """json object hook: a format-1 chunk ``{"offsets", "sizes", "file", "checksum"}``
    becomes the tuple ``(offsets, sizes, file, checksum)`` (its file name interned:
    ~1,000 distinct names among 370,000 chunks); any other object stays a dict."""
    d = dict(pairs)
    if len(d) <= 4 and "file" in d and "offsets" in d and "sizes" in d \
            and isinstance(d["file"], str):
        return d["offsets"], d["sizes"], sys.intern(d["file"]), d.get("checksum")
    return d


def read_manifest(root: str | Path, meta=None, bind: bool = True,
                  name: str = MANIFEST) -> ManifestIndex:
    """Parse ``root/<name>`` (``manifest.json``, or a training step's record in the same
    format); ``meta`` (a ``reader.MetaFiles``) supplies its bytes. With ``bind``, the
    checkpoint's strategy file is read and bound when the manifest needs it
    (``ManifestReader`` binds one itself, from a given strategy if it can)."""
    path = Path(root) / name
    if meta is None:
        from .reader import MetaFiles
        meta = MetaFiles()
    raw = meta.read(path)
    if raw is None:
        raise CheckpointIOError(f"{path}: not found")
    m = ManifestIndex(load_json(raw, str(path), object_pairs_hook=_compact_chunk), str(path))
    if bind and m.needs_layout:
        from ..layout.yaml_io import strategy_from_yaml_text
        where = Path(root) / m.strategy
        text = meta.read(safe_join(root, m.strategy, str(path)))
        if text is None:
            raise FormatError(f"{where}: not found, and {path} gives its tensors' chunks by it")
        m.bind(strategy_from_yaml_text(text, str(where)), str(where))
    return m
