"""verify: prove a checkpoint complete and uncorrupted, every rank checking its share.

The protocol (each step collective; a rank that cannot finish a step fails every rank):

1. open      every rank recognises PATH the same way (manifest, index, strategy);
             defects of the commit record itself become problems, an unusable PATH
             an error (exit 2)
2. files     files divided round robin: each exists, has its recorded size and no
             trailing bytes, its header parses and agrees with the manifest or index
             (names, dtypes, shapes, global offsets); no tensor byte is read. Carried
             model files (config, tokenizer) exist with their recorded sizes and, with
             ``--deep``, checksums
3. coverage  tensors divided round robin: chunks lie inside their tensor, do not
             overlap and tile it exactly (replicas aside); replicas record equal checksums
4. read      (``--deep``, the default) every stored chunk copy, read once by one rank:
             the byte stream of all files is cut into balanced contiguous parts
             (``planning.checkwork``). Each chunk is hashed (xxh3-64) and compared with its
             recorded checksum; ``--finite`` scans floating tensors for NaN/Inf;
             ``--against`` compares each distinct box with the same region of another
             checkpoint, exactly or within ``--atol``/``--rtol``
5. report    problems and per-rank counters gathered to rank 0; copies of one box
             without recorded checksums are compared there by their computed hashes

Problems are values (``Problem``): kind, file, tensor, chunk box, byte range and the
rank that found it. A damaged checkpoint is a result (exit 1), never an exception.
"""
from __future__ import annotations

import errno
import gc
import json
import mmap
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

import xxhash

from ..comm.wrapper import Comm, as_comm
from ..dtypes import DTYPES, itemsize
from ..errors import CheckpointIOError, FormatError, HpcckptError, UsageError
from ..formats.names import (CHECKSUM_PREFIX, HF_INDEX, HF_SHARD, MANIFEST,
                             MODEL_FILES_DIR, MS_NAME_MAP, checksum_of)
from ..formats.safetensors import TensorEntry as Entry, open_regular, parse_header, read_header
from ..layout.box import Box
from ..layout.strategy import Strategy
from ..layout.tensor import TensorInfo
from ..planning.checkwork import (CheckItem, Shard, divide_checks, divide_round_robin,
                                  shard_items, tiles_as_grid)
from ..planning.rank_header import rank_header
from ..planning.runs import flat_range_to_boxes, strided_runs
from ..planning.sources import check_tensor_chunks, group_chunks
from ..storage.fileio import pread_into, safe_join
from ..storage.inputs import open_input, rank_dirs
from ..storage.manifest import ManifestIndex, read_manifest

if TYPE_CHECKING:
    from ..storage.chunkio import ChunkReader

#: read buffer per rank when only hashing: each read is hashed while it is still in the
#: CPU cache. 1 GiB from page cache, read + xxh3, 2-core VM: 0.28 s CPU at 256 KiB,
#: 0.50 s at 8 MiB; from disk the kernel's readahead keeps it streaming either way
HASH_BUFFER = 256 << 10
#: read buffer per rank with --finite or --against, whose per-window work (numpy calls,
#: the other checkpoint's reads) wants long windows: W1 --against 9.6 s at 8 MiB, 14.4 s
#: at 256 KiB
CHECK_BUFFER = 8 << 20
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "C64")

#: every kind of problem verify reports, and what it means
PROBLEM_KINDS = {
    "uncommitted": "no commit record: the write did not finish (or another tool wrote it)",
    "manifest": "the commit record (manifest, index, name map) is unreadable or malformed",
    "missing": "a file the checkpoint lists does not exist",
    "size": "a file is shorter or longer than recorded, or bytes follow its data",
    "header": "a safetensors header does not parse or is invalid",
    "mismatch": "a header disagrees with the manifest or index (names, dtypes, shapes, offsets)",
    "coverage": "chunks leave their tensor, overlap, or do not tile it",
    "io": "a read failed or ended early",
    "checksum": "a chunk's bytes differ from its recorded checksum",
    "replica": "copies of one box differ",
    "nonfinite": "NaN or Inf in a floating tensor (--finite)",
    "differs": "elements differ from the --against checkpoint",
}


@dataclass(frozen=True)
class Problem:
    """One defect, located as precisely as it can be.

    Attributes:
        kind: a key of ``PROBLEM_KINDS``.
        file: the file, relative to the checkpoint root (None: the checkpoint as a whole).
        tensor: the tensor's global name, when one is concerned.
        box: the chunk's region, e.g. ``[0:512, 0:2048]``.
        byte_range: absolute ``(start, end)`` offsets in ``file``.
        rank: the job rank that found it.
        message: what is wrong, in words.
    """

    kind: str
    message: str
    file: str | None = None
    tensor: str | None = None
    box: str | None = None
    byte_range: tuple[int, int] | None = None
    rank: int = 0

    def line(self) -> str:
        where = [self.kind]
        if self.file is not None:
            where.append(self.file)
        if self.tensor is not None:
            where.append(f"tensor {self.tensor!r}" + (f" chunk {self.box}" if self.box else ""))
        if self.byte_range is not None:
            where.append(f"bytes {self.byte_range[0]}-{self.byte_range[1]}")
        return ": ".join(where) + f": {self.message} (rank {self.rank})"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "file": self.file, "tensor": self.tensor, "box": self.box,
                "byte_range": list(self.byte_range) if self.byte_range else None,
                "rank": self.rank, "message": self.message}


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` found: the same on every rank."""

    path: str
    kind: str
    mode: str                          #: "quick" or "deep"
    world_size: int
    seconds: float
    per_rank: tuple[dict, ...]         #: rank, files, bytes_checked, seconds, gb_per_s, problems
    problems: tuple[Problem, ...]
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bytes_checked(self) -> int:
        return sum(r["bytes_checked"] for r in self.per_rank)

    def to_dict(self) -> dict:
        return {"op": "verify", "path": self.path, "kind": self.kind, "mode": self.mode,
                "ok": self.ok, "world_size": self.world_size, "seconds": round(self.seconds, 6),
                "bytes_checked": self.bytes_checked,
                "gb_per_s": round(self.bytes_checked / self.seconds / 1e9, 3)
                if self.seconds > 0 else 0.0,
                "per_rank": list(self.per_rank), "problems": [p.to_dict() for p in self.problems],
                **self.extra}


class Expect(NamedTuple):
    """What the commit record says a file holds for one tensor (a NamedTuple: a
    1024-rank manifest's files expect 370,176 of them)."""

    tensor: str
    dtype: str
    box: Box | None                   #: None: the whole tensor, any shape (no record)
    global_shape: tuple[int, ...] | None
    checksum: str | None = None


@dataclass
class Target:
    """A recognised checkpoint, as every rank sees it after step 1."""

    kind: str
    root: str
    files: tuple[str, ...]
    #: expected contents of the given files, {file: [Expect]}; None: anything goes
    expect: Callable[[set[str]], dict[str, list[Expect]]]
    sizes: dict[str, int] | None = None       #: recorded file sizes
    must_exist: tuple[str, ...] = ()          #: other files the checkpoint needs (strategy.yaml)
    coverage: Callable[[str], list[Problem]] | None = None
    tensor_names: tuple[str, ...] = ()
    #: tensor -> dtype as the commit record lists them (None: what the headers hold)
    dtypes: dict[str, str] | None = None
    exclusive: bool = True    #: a header may hold only what the record lists
    hashed: bool = False      #: chunks have replicas whose hashes must be compared
    problems: list[Problem] = field(default_factory=list)   #: found while opening (rank 0)
    #: ``expect`` without checksums, cheaper (step 2 compares headers only); None: expect
    expect_headers: Callable[[set[str]], dict[str, list[Expect]]] | None = None
    #: carried model files (config, tokenizer): {file: (size, checksum)}
    carried: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: file -> (header bytes, file size) it must have exactly, when the record determines
    #: them (rank files of a strategy); a file that differs takes the checked path
    exact_header: Callable[[str], tuple[bytes, int]] | None = None


# ---- step 1: recognise PATH -----------------------------------------------------------
def open_target(path: str, strategy: Strategy | None = None, step: str | None = None
                ) -> Target:
    """Recognise ``path``; raise for an unusable one (UsageError, CheckpointIOError,
    FormatError 'not a checkpoint')."""
    p = Path(path)
    if not p.exists():
        raise CheckpointIOError(f"{path}: no such file or directory")
    if p.is_file() and p.name in (HF_INDEX, MS_NAME_MAP, MANIFEST):
        p = p.parent
    if step is not None or _is_training_dir(p):
        return _training_target(p, strategy, step)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise FormatError(f"{path}: not a .safetensors file nor a checkpoint directory")
        return _complete_target(p.parent, [p.name], None, "complete (single file)")
    if (p / MANIFEST).exists():
        return manifest_target(p)
    if rank_dirs(p):
        if strategy is None:
            t = Target("distributed", str(p), (), lambda fs: {})
            t.problems.append(Problem("uncommitted", f"no {MANIFEST}: the write did not finish, "
                                      "or another tool wrote it (give --strategy for a "
                                      "MindSpore-written checkpoint)", MANIFEST))
            return t
        return _strategy_target(p, strategy)
    for marker in (HF_INDEX, MS_NAME_MAP):
        if (p / marker).exists():
            return _indexed_target(p, marker)
    files = sorted(q.name for q in p.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{path}: no safetensors checkpoint here (no {HF_INDEX}, {MANIFEST}, "
                          "rank_<r>/ directories or .safetensors files)")
    t = _complete_target(p, files, None, "complete (directory of safetensors files)")
    if any(HF_SHARD.match(f) for f in files):
        t.problems.append(Problem("uncommitted", f"sharded weights without {HF_INDEX}: an "
                                  "unfinished merge or an incomplete copy", HF_INDEX))
    return t


def manifest_target(root: Path, name: str = MANIFEST) -> Target:
    """A distributed checkpoint with its manifest (the commit record; a training step's
    record is one too, ``name`` relative to ``root``)."""
    try:
        m = read_manifest(root, name=name) if name != MANIFEST else read_manifest(root)
        files = tuple(str(f) for f in m.files)
        for f in files:
            safe_join(root, f, str(root / name))
    except (FormatError, CheckpointIOError, TypeError) as e:
        t = Target("distributed", str(root), (), lambda fs: {})
        t.problems.append(Problem("manifest", _strip(str(e), str(root / name)), name))
        return t
    sizes = m.file_sizes      # format 2 records them, format 1 does not
    exact = None
    if m.files_are_rank_files():
        rank_of = {f: r for r, f in enumerate(files)}
        exact = lambda f: rank_header(m.layout, rank_of[f])   # noqa: E731
    return Target("distributed", str(root), files, lambda fs: _manifest_expect(m, fs),
                  sizes=dict(sizes) if sizes else None, must_exist=(m.strategy,),
                  coverage=lambda t: _manifest_coverage(m, str(root / name), name, t),
                  tensor_names=tuple(m.shapes), exclusive=True, hashed=True,
                  dtypes={n: dt for n, (_, dt) in m.shapes.items()},
                  expect_headers=lambda fs: _manifest_expect(m, fs, checksums=False),
                  carried={f"{MODEL_FILES_DIR}/{rel}": v for rel, v in m.model_files.items()},
                  exact_header=exact)


def _records(m: ManifestIndex, name: str) -> list[tuple]:
    """``(offsets, sizes, file, checksum)`` of every stored chunk copy of ``name``, as
    the manifest records them (not yet checked)."""
    return [(b.offsets, b.sizes, f, s) for b, f, s in m.records(name)]


def _manifest_expect(m: ManifestIndex, files: set[str], checksums: bool = True
                     ) -> dict[str, list[Expect]]:
    """What the manifest says each of ``files`` holds. One pass over every chunk of the
    manifest, touching only those in ``files`` (a rank's share of 1,024 files).

    Without ``checksums`` (Expect.checksum None), a tensor whose chunks the strategy
    gives, every replica storing its box, is taken from ``Strategy.rank_boxes`` of the
    ranks whose files these are (rank r's file is ``m.files[r]``): only the tensors of
    those ranks' stages, never every chunk of every tensor (a 1024-rank 70B manifest:
    minutes before, at most 370,176 boxes in all now)."""
    out: dict[str, list[Expect]] = {f: [] for f in files}
    names = list(m.shapes)
    if not checksums and m.layout is not None:
        by_rank: dict[str, tuple] = {}     # name -> (dtype, shape)
        names = []
        for name in m.shapes:
            try:
                if m.lists_chunks(name) or not m.check_derived(name):
                    names.append(name)     # listed, or one holder per box: its records
                else:
                    shape, dtype = m.shapes[name]
                    by_rank[name] = (dtype, shape)
            except FormatError:
                continue    # reported by the coverage step
        make = Expect._make
        for r, f in enumerate(m.files):
            got = out.get(f)
            if got is None:
                continue
            for spec, box in m.layout.rank_boxes(r):
                known = by_rank.get(spec.name)
                if known is not None and 0 not in box.sizes:
                    got.append(make((spec.name, known[0], box, known[1], None)))
    for name in names:
        shape, dtype = m.shapes[name]
        try:
            hits = [c for c in _records(m, name) if c[2] in out]
        except (KeyError, TypeError, AttributeError, IndexError, ValueError, FormatError):
            continue    # reported by the coverage step
        for c in hits:
            try:
                box = Box(tuple(c[0]), tuple(c[1]))
            except TypeError:
                continue    # reported by the coverage step
            if 0 not in box.sizes:
                out[c[2]].append(Expect(name, dtype, box, shape, c[3]))
    return out


def _manifest_coverage(m: ManifestIndex, where: str, record: str, name: str) -> list[Problem]:
    """The tensor's chunks tile it exactly; copies of one box record one checksum. A
    grid (what strategies produce) is recognised on plain tuples; anything else goes
    through the general check, which names the defect. ``where``: the manifest's path,
    ``record``: as problems name it (relative to the checkpoint)."""
    shape, dtype = m.shapes[name]
    try:
        if not m.lists_chunks(name):
            # given by the (validated) strategy: a tiling by construction, one checksum per
            # box; what remains is the entry itself (its checksums' count, its holders)
            if not m.check_derived(name):
                m.records(name)    # each holder one of its box's replica ranks
            return []
        sums: dict[tuple, set] = {}
        for offsets, sizes, f, checksum in _records(m, name):
            if not isinstance(f, str):
                raise FormatError(f"chunk file {f!r} is not a file name")
            key = (tuple(offsets), tuple(sizes))
            got = sums.get(key)
            if got is None:
                sums[key] = got = set()
            got.add(checksum)
        if not tiles_as_grid(shape, {k for k in sums if 0 not in k[1]}) or \
                not all(type(x) is int for k in sums for part in k for x in part):
            entries = [(name, Box(tuple(int(x) for x in o), tuple(int(x) for x in z)), f)
                       for o, z, f, _ in _records(m, name)]
            for _, box, f in entries:
                if len(box.sizes) != len(shape):
                    raise FormatError(f"chunk {box} in {f} has {len(box.sizes)} dimensions, "
                                      f"the tensor {len(shape)}")
            check_tensor_chunks(where, TensorInfo(name, shape, dtype),
                                group_chunks(entries).get(name, []))
    except (FormatError, KeyError, TypeError, ValueError) as e:
        msg = _strip(str(e), where)
        for own in (f"tensor {name!r}: ", f"tensor {name!r} "):   # the problem names it
            if msg.startswith(own):
                msg = msg[len(own):]
                break
        return [Problem("coverage", msg, record, name)]
    return [Problem("replica", f"its {len(s)} copies record different checksums "
                    f"({', '.join(sorted(map(str, s)))})", record, name,
                    str(Box(*k)), None)
            for k, s in sums.items() if len(s) > 1]


def _strip(msg: str, where: str) -> str:
    """A message without the leading ``where: `` (the problem names the file itself)."""
    return msg[len(where) + 2:] if msg.startswith(where + ": ") else msg


def _complete_target(root: Path, files: list[str], weight_map: dict | None,
                     kind: str) -> Target:
    def expect(fs: set[str]) -> dict[str, list[Expect]]:
        out: dict[str, list[Expect]] = {f: [] for f in fs}
        for name, f in (weight_map or {}).items():
            if f in out:
                out[f].append(Expect(name, "", None, None))
        return out
    return Target(kind, str(root), tuple(files), expect, exclusive=False)


def _indexed_target(root: Path, marker: str) -> Target:
    """HF weights with their index, or MindSpore's merged layout with its name map."""
    where = root / marker
    kind = "complete (HF index)" if marker == HF_INDEX else "complete (MindSpore merged)"
    try:
        doc = json.loads(where.read_text())
        # MindSpore 2.10 wraps its name map in "weight_map" too
        weight_map = doc["weight_map"] if marker == HF_INDEX or (
            isinstance(doc, dict) and isinstance(doc.get("weight_map"), dict)) else doc
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise FormatError("the map of tensor names to files is not a JSON object of "
                              "strings")
        files = list(dict.fromkeys(weight_map.values()))
        for f in files:
            safe_join(root, f, str(where))
    except (OSError, ValueError, KeyError, TypeError, RecursionError, HpcckptError) as e:
        t = Target(kind, str(root), (), lambda fs: {})
        text = _strip(str(e), str(where)) if isinstance(e, HpcckptError) else \
            f"not a valid index ({type(e).__name__}: {e})"
        t.problems.append(Problem("manifest", text, marker))
        return t
    return _complete_target(root, files, weight_map, kind)


def _strategy_target(root: Path, strategy: Strategy) -> Target:
    """A distributed checkpoint without manifest (MindSpore-written), read through its
    strategy; replicas are compared by the hashes computed while reading."""
    try:
        inp = open_input(root, strategy)
    except (HpcckptError, OSError) as e:
        # every rank file's header is read to open it: a damaged one is this problem
        t = Target("distributed (no manifest)", str(root), (), lambda fs: {})
        msg, rel = str(e), None
        head, sep, rest = msg.partition(": ")
        if sep and head.startswith(str(root) + os.sep):
            msg, rel = rest, os.path.relpath(head, root)
        t.problems.append(Problem("header" if isinstance(e, FormatError) else "missing",
                                  msg, rel))
        return t
    src = inp.source

    def expect(fs: set[str]) -> dict[str, list[Expect]]:
        out: dict[str, list[Expect]] = {f: [] for f in fs}
        for t in src.tensors.values():
            for c in src.chunks(t.name):
                for f in c.files:
                    if f in out:
                        out[f].append(Expect(t.name, t.dtype, c.box, t.shape))
        return out
    return Target("distributed (no manifest)", str(root), tuple(inp.files), expect,
                  exclusive=False, hashed=True,
                  dtypes={t.name: t.dtype for t in src.tensors.values()})


def _training():
    """The save manager's training-directory module, or None in a build without it."""
    try:
        from ..storage import training
    except ImportError:
        return None
    return training


def _is_training_dir(p: Path) -> bool:
    t = _training()
    if t is None:
        return False
    return t.is_training_dir(p) or (p.is_file() and t.is_record_path(p))


def _training_target(p: Path, strategy: Strategy | None, step: str | None) -> Target:
    """One committed step of a training directory (the latest, or ``step``): its commit
    record is its manifest. A directory without any committed step is a problem
    (uncommitted), an unknown ``--step`` an error (exit 2)."""
    t = _training()
    if t is None:
        raise UsageError(f"{p}: --step needs training directories (the save manager), which "
                         "this build does not have")
    if p.is_file():   # DIR/commits/<record>.json: that step
        root, record = p.parent.parent, f"{p.parent.name}/{p.name}"
        label = p.stem.split("-", 1)[1]
    else:
        if not t.is_training_dir(p):
            raise UsageError(f"{p}: --step needs a training directory (one written by "
                             "hpcckpt save or a CheckpointManager)")
        try:
            rec = t.find_record(p, step)
        except FormatError as e:
            tg = Target("training directory", str(p), (), lambda fs: {})
            kind = "uncommitted" if "no committed step" in str(e) else "manifest"
            tg.problems.append(Problem(kind, _strip(str(e), str(p)), t.RECORDS))
            return tg
        root, record, label = p, rec.path, rec.label
    tg = manifest_target(root, record)
    tg.kind = f"training directory, step {label} ({record})"
    return tg


# ---- step 2: files ------------------------------------------------------------------
def check_file(root: str, rel: str, rank: int, expect: list[Expect] | None,
               size: int | None, exclusive: bool) -> tuple[list[Problem], list[Entry] | None]:
    """One file's existence, size and header against what is expected of it.

    Returns the problems and the header's entries (None when the header is unusable)."""
    path = os.path.join(root, rel)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return [Problem("missing", "file not found", rel, rank=rank)], None
    except OSError as e:
        return [Problem("io", f"cannot stat: {e.strerror or e}", rel, rank=rank)], None
    out: list[Problem] = []
    if size is not None and st.st_size != size:
        lo, hi = sorted((st.st_size, size))
        out.append(Problem("size", f"file is {st.st_size} bytes, the manifest records {size}",
                           rel, byte_range=(lo, hi), rank=rank))
    try:
        h = read_header(path)
    except (HpcckptError, OSError, ValueError, RecursionError, MemoryError) as e:
        msg = str(e) if isinstance(e, HpcckptError) else f"{type(e).__name__}: {e}"
        out.append(Problem("header", _strip(msg, path), rel, rank=rank))
        return out, None
    entries = list(h.tensors.values())   # (trailing bytes fail read_header, as in safetensors)
    if expect is not None:
        out += _check_header(h, rel, rank, expect, exclusive)
    return out, entries


def check_file_exact(root: str, rel: str, want: tuple[bytes, int], recorded: int | None,
                     need_entries: bool) -> list[Entry] | None:
    """The file has exactly the header and size ``want`` (and the recorded size): its
    entries (``need_entries``; else an empty list). None when it differs in any way or
    cannot be read: ``check_file`` then names what."""
    head, size = want
    path = os.path.join(root, rel)
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            if os.fstat(f.fileno()).st_size != size or size != (recorded or size) \
                    or f.read(len(head)) != head:
                return None
    except OSError:
        return None
    return list(parse_header(path, head[8:], size).tensors.values()) if need_entries else []


def check_carried(root: str, rel: str, size: int, checksum: str | None, rank: int
                  ) -> list[Problem]:
    """A carried model file (config, tokenizer) exists with its recorded size, and
    with ``checksum`` its bytes hash to it (small files, read whole)."""
    path = os.path.join(root, rel)
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            got = os.fstat(f.fileno()).st_size
            if got != size:
                lo, hi = sorted((got, size))
                return [Problem("size", f"file is {got} bytes, the manifest records {size}",
                                rel, byte_range=(lo, hi), rank=rank)]
            if checksum is None:
                return []
            digest = checksum_of(f.read())
    except FileNotFoundError:
        return [Problem("missing", "file not found", rel, rank=rank)]
    except OSError as e:
        return [Problem("io", f"cannot read: {e.strerror or e}", rel, rank=rank)]
    if digest != checksum:
        return [Problem("checksum", f"bytes hash to {digest}, the manifest records {checksum}",
                        rel, byte_range=(0, size), rank=rank)]
    return []


def _box_text(x: Expect) -> str | None:
    """The chunk as a problem names it: formatted only for a problem (370,176 expected
    chunks at 1024 ranks)."""
    return str(x.box) if x.box is not None else None


def check_manifest_files(root: str, m: ManifestIndex, rank: int = 0,
                         exclusive: bool = True) -> list[Problem]:
    """Step 2 for every file of a manifest in one process (``hpcckpt inspect``): each
    file's existence, size and header against what the manifest records.

    Args:
        root: the checkpoint directory.
        m: its manifest, bound to its strategy when it needs one.
        rank: the rank named in the problems.
        exclusive: also report header tensors the manifest does not list there.
    Returns:
        The problems, file by file in manifest order.
    Example:
        >>> check_manifest_files("dist", read_manifest("dist"))
        []
    """
    expect = _manifest_expect(m, set(m.files), checksums=False)
    sizes = m.file_sizes or {}
    out: list[Problem] = []
    for f in dict.fromkeys(m.files):
        out += check_file(root, f, rank, expect.get(f), sizes.get(f), exclusive)[0]
    return out


_ABSENT = object()


def _check_header(h, rel: str, rank: int, expect: list[Expect], exclusive: bool) -> list[Problem]:
    out = []
    meta = None
    if "hpcckpt" in h.metadata:
        try:
            meta = json.loads(h.metadata["hpcckpt"])
            assert isinstance(meta, dict)
        except (ValueError, AssertionError, RecursionError):
            out.append(Problem("header", "__metadata__ 'hpcckpt' is not a JSON object", rel,
                               rank=rank))
            meta = None
    tensors = h.tensors
    for x in expect:
        name, dtype, box, gshape, _ = x
        e = tensors.get(name)
        if e is None:
            what = "the manifest lists it" if box is not None else "the index maps it here"
            out.append(Problem("mismatch", f"{what} but the header has no such tensor", rel,
                               name, _box_text(x), rank=rank))
            continue
        if box is None:
            continue
        if e.dtype != dtype or e.shape != box.sizes:
            out.append(Problem("mismatch", f"header says {e.dtype} {list(e.shape)}, the "
                               f"manifest {dtype} {list(box.sizes)}", rel, name,
                               _box_text(x), (e.begin, e.end), rank))
            continue
        g = meta.get(name, _ABSENT) if meta is not None else _ABSENT
        if g is not _ABSENT:
            try:
                shape, offsets = tuple(g["shape"]), tuple(g["offsets"])
            except (TypeError, KeyError):
                shape = offsets = None
            if shape != gshape or offsets != box.offsets:
                out.append(Problem("mismatch", f"header metadata places it at offsets "
                                   f"{list(offsets) if offsets else offsets} of shape "
                                   f"{list(shape) if shape else shape}, the manifest at "
                                   f"{list(box.offsets)} of {list(gshape)}", rel,
                                   name, _box_text(x), (e.begin, e.end), rank))
    if exclusive:
        extra = tensors.keys() - {x.tensor for x in expect}
        if extra:   # reported in header order
            out += [Problem("mismatch", "the header holds it but the manifest does not list "
                            "it here", rel, name, byte_range=(e.begin, e.end), rank=rank)
                    for name, e in tensors.items() if name in extra and e.nbytes]
    return out


# ---- step 4: read ---------------------------------------------------------------------
@dataclass
class Against:
    """The ``--against`` checkpoint, opened once per rank."""

    path: str
    source: object
    reader: "ChunkReader"   # storage.chunkio, imported with --against only (start-up)
    atol: float | None
    rtol: float | None
    buf: bytearray | None = None
    counts: dict = field(default_factory=dict)   #: tensor -> [differing, first index]


def build_items(target: Target, entries: dict[str, list[Entry]],
                expect: dict[str, list[Expect]], rank: int) -> tuple[list[CheckItem], dict]:
    """Every readable stored chunk copy, in file order (by offset within a file), and
    each item's absolute start in its file: {(file, tensor): begin}."""
    items: list[CheckItem] = []
    begins: dict[tuple[str, str], int] = {}
    seen: set[tuple[str, Box]] = set()
    for f in target.files:
        ents = entries.get(f)
        if ents is None:
            continue
        exp = {x.tensor: x for x in expect.get(f, ())}
        for e in sorted(ents, key=lambda e: e.begin):
            x = exp.get(e.name)
            if target.exclusive or x is not None and x.box is not None:
                if x is None or x.box is None or e.dtype != x.dtype or e.shape != x.box.sizes:
                    continue   # a mismatch, reported in step 2
                box, checksum = x.box, x.checksum
            else:
                if exp and x is None:
                    continue   # an index maps this name elsewhere
                box, checksum = Box.full(e.shape), None
            if e.dtype not in DTYPES:
                continue
            key = (e.name, box)
            items.append(CheckItem(f, e.name, box, itemsize(e.dtype), checksum, 0,
                                   e.end - e.begin, compare=key not in seen,
                                   hashed=target.hashed))
            seen.add(key)
            begins[(f, e.name)] = e.begin
    return items, begins


def check_items(root: str, items: list[CheckItem], begins: dict, dtypes: dict[str, str],
                rank: int, buffer_size: int, finite: bool, against: Against | None
                ) -> tuple[list[Problem], int, dict]:
    """Read and check this rank's items. Returns problems, bytes read and the hashes
    computed for items without a recorded checksum ({(tensor, box): {file: hash}})."""
    problems: list[Problem] = []
    hashes: dict = {}
    buf = bytearray(max(buffer_size, 64))
    mv = memoryview(buf)
    done = 0
    fds: dict[str, int] = {}
    try:
        for it in items:
            path = os.path.join(root, it.file)
            fd = fds.get(it.file)
            if fd is None:
                try:
                    fd = fds[it.file] = open_regular(path)
                except OSError as e:
                    problems.append(Problem("io", f"cannot open: {e.strerror or e}", it.file,
                                            it.tensor, str(it.box), rank=rank))
                    continue
                _advise_sequential(fd)
            base = begins[(it.file, it.tensor)]
            h = xxhash.xxh3_64() if it.hashed and it.whole else None
            step = max(it.itemsize, len(buf) // it.itemsize * it.itemsize)
            bad_finite = [0, None]
            pos = it.lo
            if h is not None and not finite and against is None:
                pos = _hash_mapped(fd, base + it.lo, base + it.hi, h) - base
                done += pos - it.lo
            ok = True
            while pos < it.hi:   # reads what _hash_mapped did not, naming any error
                n = min(step, it.hi - pos)
                view = mv[:n]
                try:
                    pread_into(fd, view, base + pos, path)
                except CheckpointIOError as e:
                    problems.append(Problem("io", _strip(str(e), path).split(": ", 1)[-1]
                                            if ": " in str(e) else str(e), it.file, it.tensor,
                                            str(it.box), (base + pos, base + pos + n), rank))
                    ok = False
                    break
                done += n
                if h is not None:
                    h.update(view)
                if finite and dtypes[it.tensor] in FLOAT_DTYPES:
                    _scan_finite(view, dtypes[it.tensor], pos // it.itemsize, bad_finite)
                if against is not None and it.compare:
                    _compare_window(against, it, dtypes[it.tensor], view, pos, problems, rank)
                pos += n
            if not ok:
                continue
            rng = (base + it.lo, base + it.hi)
            if bad_finite[0]:
                idx = _unravel(bad_finite[1], it.box)
                problems.append(Problem("nonfinite", f"{bad_finite[0]} NaN/Inf element(s), the "
                                        f"first at index {idx}", it.file, it.tensor,
                                        str(it.box), rng, rank))
            if h is not None:
                got = CHECKSUM_PREFIX + h.hexdigest()
                if it.checksum is not None and got != it.checksum:
                    problems.append(Problem("checksum", f"bytes hash to {got}, the manifest "
                                            f"records {it.checksum}", it.file, it.tensor,
                                            str(it.box), rng, rank))
                elif it.checksum is None:
                    hashes.setdefault((it.tensor, str(it.box)), {})[it.file] = got
    finally:
        for fd in fds.values():
            os.close(fd)
    return problems, done, hashes


#: bytes hashed per mapping (file-backed pages count in RSS while mapped)
MAP_WINDOW = 8 << 20
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)   # Linux 5.14
_mapping = [sys.platform == "linux"]   #: off after a kernel refuses MADV_POPULATE_READ


def _hash_mapped(fd: int, start: int, stop: int, h) -> int:
    """Hash the file's bytes ``[start, stop)`` where they are, through read-only mappings
    of ``MAP_WINDOW`` bytes, without copying them out of the page cache: 1 GiB from page
    cache, 0.15 s against 0.22 s read + hash. Each mapping is populated first
    (``MADV_POPULATE_READ``), so a page that cannot be read (an I/O error, a file cut
    short) fails that call instead of raising SIGBUS when the hash touches it.

    Returns where it stopped: ``stop``, or the start of a window it could not map or
    populate; the caller reads on from there with ``pread``, which names the error and
    its byte range."""
    pos = start
    while pos < stop and _mapping[0]:
        lo = pos - pos % mmap.ALLOCATIONGRANULARITY
        hi = min(stop, lo + MAP_WINDOW)
        try:   # a window past the end of the file is refused here (ValueError)
            m = mmap.mmap(fd, hi - lo, prot=mmap.PROT_READ, offset=lo)
        except (OSError, ValueError):
            return pos
        try:
            m.madvise(_MADV_POPULATE_READ)
            with memoryview(m) as mv:
                h.update(mv[pos - lo:])
        except OSError as e:
            if e.errno == errno.EINVAL:   # a kernel before 5.14: read from now on
                _mapping[0] = False
            return pos
        finally:
            m.close()
        pos = hi
    return pos


def _advise_sequential(fd: int) -> None:
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except (AttributeError, OSError):
        pass


def _scan_finite(view: memoryview, dtype: str, first: int, acc: list) -> None:
    """Count NaN/Inf elements of a window; remember the first one's element index."""
    import numpy as np
    from ..dtypes import numpy_dtype
    arr = np.frombuffer(view, dtype=numpy_dtype(dtype))
    if dtype in ("BF16", "F8_E4M3", "F8_E5M2"):   # ml_dtypes types: test in float32
        arr = arr.astype(np.float32)
    bad = ~np.isfinite(arr)
    n = int(np.count_nonzero(bad))
    if n:
        if acc[1] is None:
            acc[1] = first + int(np.argmax(bad))
        acc[0] += n


def _unravel(flat: int, box: Box) -> list[int]:
    """The global index of element ``flat`` (row-major) of ``box``."""
    idx = []
    for s in reversed(box.sizes):
        idx.append(flat % s if s else 0)
        flat = flat // s if s else 0
    return [o + i for o, i in zip(box.offsets, reversed(idx))]


def _compare_window(ag: Against, it: CheckItem, dtype: str, view: memoryview, pos: int,
                    problems: list[Problem], rank: int) -> None:
    """Compare a window of a stored chunk with the same elements of the other checkpoint."""
    isz = it.itemsize
    a, b = pos // isz, (pos + len(view)) // isz
    if ag.buf is None or len(ag.buf) < len(view):
        ag.buf = bytearray(len(view))
    other = memoryview(ag.buf)[:len(view)]
    t = TensorInfo(it.tensor, (), dtype)   # shape unused by reads
    at = 0
    for sub in flat_range_to_boxes(it.box.sizes, a, b):
        g = Box(tuple(o + s for o, s in zip(sub.offsets, it.box.offsets)), sub.sizes)
        covered = 0
        for chunk, region in ag.source.overlapping(it.tensor, g):
            ag.reader.read(chunk, t, strided_runs(region, chunk.box, g, isz), other, at)
            covered += region.volume
        if covered != g.volume:
            raise FormatError(f"{ag.path}: tensor {it.tensor!r} does not store all of {g}")
        at += g.volume * isz
    if view == other:
        return
    import numpy as np
    from ..dtypes import numpy_dtype
    if ag.atol is None and ag.rtol is None:
        x = np.frombuffer(view, np.uint8).reshape(-1, isz)
        y = np.frombuffer(other, np.uint8).reshape(-1, isz)
        diff = np.flatnonzero((x != y).any(axis=1))
    else:
        nd = numpy_dtype(dtype)
        x = np.frombuffer(view, nd).astype(np.float64)
        y = np.frombuffer(other, nd).astype(np.float64)
        close = np.isclose(x, y, rtol=ag.rtol or 0.0, atol=ag.atol or 0.0, equal_nan=True)
        diff = np.flatnonzero(~close)
    if len(diff):
        c = ag.counts.setdefault(it.tensor, [0, None, it.file, str(it.box)])
        c[0] += len(diff)
        if c[1] is None:
            c[1] = _unravel(a + int(diff[0]), it.box)


# ---- the job ------------------------------------------------------------------------
@contextmanager
def _no_gc():
    """The cyclic garbage collector paused: reading a 1024-rank manifest and its headers
    allocates millions of acyclic dicts, lists and tuples, and the collector's passes
    over them took a fifth of the files step. Any cycle made meanwhile is collected
    when it resumes."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def verify(path: str, comm: Comm, *, strategy: Strategy | None = None, step: str | None = None,
           deep: bool = True, finite: bool = False, against: str | None = None,
           against_strategy: Strategy | None = None, atol: float | None = None,
           rtol: float | None = None, buffer_size: int | None = None,
           shard: Shard | None = None) -> VerifyReport:
    """Verify a checkpoint with every rank of ``comm`` checking its share.

    Args:
        path: any checkpoint hpcckpt reads (distributed, complete, training directory).
        comm: the job: an mpi4py communicator, a ``Comm``, or None for one process.
        strategy: the layout of a distributed checkpoint without manifest.
        step: ``EPOCH_STEP`` of a training directory (default: the latest committed).
        deep: read every stored byte (checksums, replicas); False: metadata only.
        finite: also scan floating tensors for NaN/Inf (deep only).
        against: another checkpoint (any kind and layout) to compare every element with.
        atol, rtol: tolerances of that comparison (default: bit-exact).
        buffer_size: read buffer per rank (default ``HASH_BUFFER``, ``CHECK_BUFFER`` with
            ``finite`` or ``against``).
        shard: read only this shard of the stored bytes (``--shard I/N``, a job array);
            the checks that are not per byte (commit record, files and headers, coverage,
            tensor sets) are reported by shard 0 only.
    Returns:
        The same ``VerifyReport`` on every rank; ``report.ok`` when nothing was found.
    Raises:
        RankFailure / HpcckptError when ``path`` (or ``against``) is unusable.
    Example:
        >>> rep = verify("dist/", MPI.COMM_WORLD)
        >>> rep.ok, rep.bytes_checked
        (True, 2147483648)
    """
    t0 = time.perf_counter()
    comm = as_comm(comm)
    rank = comm.rank
    if (atol is not None or rtol is not None) and against is None:
        raise UsageError("--atol/--rtol need --against")
    if against is not None:
        deep = True    # comparing reads every element
    if buffer_size is None:
        buffer_size = CHECK_BUFFER if finite or against is not None else HASH_BUFFER
    with comm.step("open"), _no_gc():
        target = open_target(path, strategy, step)
        ag = None
        if against is not None:
            other = open_input(against, against_strategy)
            from ..storage.chunkio import ChunkReader
            ag = Against(against, other.source, ChunkReader(other.root), atol, rtol)
    problems: list[Problem] = list(target.problems) if rank == 0 else []
    steps = {"open": round(time.perf_counter() - t0, 4)}
    try:
        return _run(target, comm, problems, deep, finite, ag, buffer_size, t0, path, steps,
                    shard)
    finally:
        if ag is not None:
            ag.reader.close()


def _run(target: Target, comm: Comm, problems: list[Problem], deep: bool, finite: bool,
         ag: Against | None, buffer_size: int, t0: float, path: str,
         steps: dict[str, float], shard: Shard | None = None) -> VerifyReport:
    rank, size = comm.rank, comm.size
    first_shard = shard is None or shard.index == 0

    def lap(name: str) -> None:
        steps[name] = round(time.perf_counter() - t0 - sum(steps.values()), 4)
    files = list(target.files)
    entries: dict[str, list[Entry]] = {}
    with comm.step("files"), _no_gc():
        mine = [files[i] for i in divide_round_robin(len(files), size, rank)]
        sizes = target.sizes or {}
        exact: dict[str, list[Entry]] = {}
        if target.exact_header is not None:
            for f in mine:
                ents = check_file_exact(target.root, f, target.exact_header(f), sizes.get(f),
                                        deep)
                if ents is not None:
                    exact[f] = ents
        rest = {f for f in mine if f not in exact}
        expect = (target.expect_headers or target.expect)(rest) if rest else {}
        for f in mine:
            if f in exact:
                entries[f] = exact[f]
                continue
            found, ents = check_file(target.root, f, rank, expect.get(f), sizes.get(f),
                                     target.exclusive)
            problems += found
            if ents is not None:
                entries[f] = ents
        carried = list(target.carried.items())
        for i in divide_round_robin(len(carried), size, rank):
            f, (want, checksum) = carried[i]
            problems += check_carried(target.root, f, want, checksum if deep else None, rank)
        if rank == 0:
            for f in target.must_exist:
                if not os.path.exists(os.path.join(target.root, f)):
                    problems.append(Problem("missing", "file not found", f))
    lap("files")
    with comm.step("coverage"):
        if target.coverage is not None:
            names = target.tensor_names
            for i in divide_round_robin(len(names), size, rank):
                for p in target.coverage(names[i]):
                    problems.append(Problem(p.kind, p.message, p.file, p.tensor, p.box,
                                            p.byte_range, rank))
    lap("coverage")
    if not first_shard:   # shard 0 reports the per-checkpoint checks; the headers are still
        problems.clear()  # read here: the division of the bytes into shards needs them
    complete = target.coverage is None and target.kind.startswith("complete")
    if complete or deep:   # every rank needs every header's entries
        for part in comm.allgather(entries):
            entries.update(part)
    if complete and rank == 0 and first_shard:
        problems += _complete_consistency(target, entries)
    read_bytes, hashes, files_read = 0, {}, 0
    if deep:
        with comm.step("read"):
            all_expect = target.expect(set(files))
            items, begins = build_items(target, entries, all_expect, rank)
            dtypes = {e.name: e.dtype for ents in entries.values() for e in ents}
            mine_items = divide_checks(shard_items(items, shard) if shard else items,
                                       size)[rank]
            files_read = len({it.file for it in mine_items})
            found, read_bytes, hashes = check_items(target.root, mine_items, begins, dtypes,
                                                    rank, buffer_size, finite, ag)
            problems += found
        lap("read")
        if ag is not None and rank == 0 and first_shard:
            problems += _tensor_set_differences(entries, target, ag)
    seconds = time.perf_counter() - t0
    row = {"rank": rank, "files": files_read if deep else len(mine), "bytes_checked": read_bytes,
           "seconds": round(seconds, 4),
           "gb_per_s": round(read_bytes / seconds / 1e9, 3) if seconds > 0 else 0.0,
           "problems": len(problems), "step_seconds": steps}
    diffs = {name: (*c, rank) for name, c in ag.counts.items()} if ag is not None else {}
    gathered = comm.allgather((row, [p.to_dict() for p in problems], hashes, diffs))
    rows = tuple(g[0] for g in gathered)
    allp = [Problem(**{**d, "byte_range": tuple(d["byte_range"]) if d["byte_range"] else None})
            for g in gathered for d in g[1]]
    allp += _replica_differences(g[2] for g in gathered)
    if ag is not None:
        allp += _merged_differences([g[3] for g in gathered], ag.path)
    total = comm.allreduce_max(time.perf_counter() - t0)
    return VerifyReport(path, target.kind, "deep" if deep else "quick", size, total, rows,
                        tuple(allp), {"files_total": len(files),
                                      **({"shard": str(shard)} if shard else {}),
                                      **({"against": ag.path} if ag is not None else {})})


def _complete_consistency(target: Target, entries: dict[str, list[Entry]]) -> list[Problem]:
    """Complete weights: a tensor stored twice (no index says which), or an index naming
    a tensor its file lacks (reported per file in step 2)."""
    out = []
    owner: dict[str, str] = {}
    mapped = target.expect(set(target.files))
    for f in target.files:
        names = {x.tensor for x in mapped.get(f, ())}
        for e in entries.get(f, ()):
            if names and e.name not in names:
                continue
            if e.name in owner and not names:
                out.append(Problem("mismatch", f"stored twice ({owner[e.name]} and {f}) and no "
                                   f"{HF_INDEX} says which is meant", f, e.name))
            owner.setdefault(e.name, f)
    return out


def _tensor_set_differences(entries, target: Target, ag: Against) -> list[Problem]:
    """Tensors present on one side only, or with another shape or dtype."""
    mine: dict[str, str] = dict(target.dtypes or {})
    if target.dtypes is None:
        for ents in entries.values():
            for e in ents:
                mine.setdefault(e.name, e.dtype)
    theirs = ag.source.tensors
    out = []
    for name in mine:
        if name not in theirs:
            out.append(Problem("differs", f"not in {ag.path}", tensor=name))
        elif theirs[name].dtype != mine[name]:
            out.append(Problem("differs", f"{mine[name]} here but {theirs[name].dtype} in "
                               f"{ag.path}", tensor=name))
    for name in theirs:
        if name not in mine:
            out.append(Problem("differs", f"in {ag.path} but not here", tensor=name))
    return out


def _merged_differences(parts: list[dict], other: str) -> list[Problem]:
    """One ``differs`` problem per tensor: the count summed over every rank's chunks,
    the first index in row-major order (named with the chunk holding it)."""
    merged: dict[str, list] = {}
    for part in parts:
        for name, (n, first, f, box, rank) in part.items():
            m = merged.get(name)
            if m is None:
                merged[name] = [n, first, f, box, rank]
                continue
            m[0] += n
            if first < m[1]:
                m[1:] = [first, f, box, rank]
    return [Problem("differs", f"{n} element(s) differ from {other}, the first at index "
                    f"{first}", f, name, box, rank=rank)
            for name, (n, first, f, box, rank) in merged.items()]


def _replica_differences(parts) -> list[Problem]:
    """Copies of one box (no recorded checksum) whose computed hashes differ."""
    merged: dict = {}
    for hashes in parts:
        for key, per_file in hashes.items():
            merged.setdefault(key, {}).update(per_file)
    out = []
    for (tensor, box), per_file in merged.items():
        if len(set(per_file.values())) > 1:
            desc = ", ".join(f"{f} {h}" for f, h in sorted(per_file.items()))
            out.append(Problem("replica", f"copies differ: {desc}", sorted(per_file)[0],
                               tensor, box))
    return out
