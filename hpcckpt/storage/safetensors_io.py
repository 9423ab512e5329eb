"""safetensors headers and positioned I/O.

The format: 8-byte little-endian header length N, N bytes of JSON (padded with spaces
to a multiple of 8), then the data region. Tensor ``data_offsets`` are relative to the
data region. We read and validate headers ourselves (the data region never needs to be
loaded whole) and compute output headers up front so several ranks can fill one file
with positioned writes.
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from ..dtypes import DTYPES, itemsize
from ..errors import CheckpointIOError, FormatError, quote

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor in a safetensors file; ``begin``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    data_start: int
    file_size: int
    tensors: Mapping[str, TensorEntry]
    metadata: Mapping[str, str] = field(default_factory=dict)

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.tensors[name]
        except KeyError:
            raise FormatError(f"{self.path}: has no tensor {name!r}") from None


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and validate a safetensors header (only the header bytes are read)."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: file is {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise FormatError(f"{path}: header length {n} goes beyond the end of the "
                                  f"file ({size} bytes)")
            if n > MAX_HEADER_BYTES:
                raise FormatError(f"{path}: header length {n} exceeds {MAX_HEADER_BYTES} bytes")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointIOError(f"{path}: file not found") from None
    except OSError as e:
        raise CheckpointIOError(f"{path}: cannot read: {e.strerror or e}") from None
    return parse_header(path, raw, size)


def load_json(raw: bytes | str, where: str, what: str = "", object_pairs_hook=None):
    """``json.loads`` of an untrusted file, every failure one ``FormatError`` naming it:
    invalid JSON or UTF-8, nesting too deep for the parser (a ``RecursionError``
    otherwise), and duplicate keys in any object (the last would silently win).
    ``what`` names the part (``"header"``); ``object_pairs_hook`` post-processes objects."""
    what = f"{what} " if what else ""

    def unique(pairs):
        if len(pairs) > 1:
            seen = set()
            for k, _ in pairs:
                if k in seen:
                    raise FormatError(f"{where}: {what}has the key {quote(k)} twice")
                seen.add(k)
        return object_pairs_hook(pairs) if object_pairs_hook else dict(pairs)

    try:
        return json.loads(raw, object_pairs_hook=unique)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{where}: {what}is not valid JSON: {e}") from None
    except RecursionError:
        raise FormatError(f"{where}: {what}is nested too deeply to be valid") from None


def parse_header(path: str, raw: bytes, file_size: int) -> SafetensorsHeader:
    doc = load_json(raw, path, "header")
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: header is not a JSON object")
    data_start = 8 + len(raw)
    data_len = file_size - data_start
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{path}: __metadata__ must map strings to strings")
    tensors: dict[str, TensorEntry] = {}
    for name, t in doc.items():
        at = f"{path}: tensor {name!r}"
        if not isinstance(t, dict) or not {"dtype", "shape", "data_offsets"} <= set(t):
            raise FormatError(f"{at}: entry needs dtype, shape and data_offsets")
        dtype, shape, offs = t["dtype"], t["shape"], t["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise FormatError(f"{at}: unknown dtype {quote(dtype)}")
        if (not isinstance(shape, list)
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise FormatError(f"{at}: bad shape {quote(shape)}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise FormatError(f"{at}: bad data_offsets {quote(offs)}")
        b, e = offs
        if not 0 <= b <= e <= data_len:
            raise FormatError(f"{at}: data_offsets [{b}, {e}] are outside the data region "
                              f"of {data_len} bytes")
        want = math.prod(shape) * itemsize(dtype)
        if e - b != want:
            raise FormatError(f"{at}: {dtype} {shape} needs {want} bytes but data_offsets "
                              f"[{b}, {e}] hold {e - b}")
        tensors[name] = TensorEntry(name, dtype, tuple(shape), data_start + b, data_start + e)
    ordered = sorted((t for t in tensors.values() if t.nbytes), key=lambda t: t.begin)
    for a, b in zip(ordered, ordered[1:]):
        if b.begin < a.end:
            raise FormatError(
                f"{path}: tensors {a.name!r} (bytes {a.begin - data_start}-{a.end - data_start}) "
                f"and {b.name!r} (bytes {b.begin - data_start}-{b.end - data_start}) overlap")
    end = ordered[-1].end - data_start if ordered else 0
    if end != data_len:   # the safetensors library refuses these too
        raise FormatError(f"{path}: {data_len - end} byte(s) after the last tensor's data "
                          f"(the data region is {data_len} bytes, its tensors end at {end})")
    return SafetensorsHeader(path, data_start, file_size, tensors, dict(meta))


def build_header(entries: Iterable[tuple[str, str, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Header bytes (length prefix included) and each tensor's absolute ``(begin, end)``.

    Tensors are laid out in the order given, back to back, as the safetensors library
    requires (no holes). The JSON is padded with spaces to a multiple of 8 bytes.
    """
    doc: dict = {}
    if metadata:
        doc["__metadata__"] = dict(metadata)
    rel: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, dtype, shape in entries:
        n = math.prod(shape) * itemsize(dtype, f"tensor {name!r}: ")
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        rel[name] = (pos, pos + n)
        pos += n
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    head = struct.pack("<Q", len(raw)) + raw
    return head, {k: (len(head) + b, len(head) + e) for k, (b, e) in rel.items()}


# ---- positioned I/O --------------------------------------------------------------
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def pread_into(fd: int, buf: memoryview, offset: int, path: str) -> None:
    """Fill ``buf`` from ``offset``; a short read is an error naming the byte range."""
    preadv_into(fd, [buf], offset, path)


def preadv_into(fd: int, views: list[memoryview], offset: int, path: str) -> None:
    """Fill ``views`` in order from the consecutive file bytes at ``offset`` (a scatter
    read: one ``preadv`` per ``IOV_MAX`` views); a short read names the byte range."""
    views = [v for v in views if len(v)]
    end = offset + sum(len(v) for v in views)
    i, pos = 0, offset
    while i < len(views):
        try:
            n = os.preadv(fd, views[i:i + IOV_MAX], pos)
        except OSError as e:
            raise CheckpointIOError(f"{path}: read of bytes {offset}-{end} failed: "
                                    f"{e.strerror or e}") from None
        if n == 0:
            raise CheckpointIOError(f"{path}: file ends before byte {end} "
                                    f"(read bytes {offset}-{end})")
        pos += n
        while n:   # drop the views filled, trim a partly filled one
            if n >= len(views[i]):
                n -= len(views[i])
                i += 1
            else:
                views[i], n = views[i][n:], 0


def pwrite_all(fd: int, buf: memoryview, offset: int, path: str) -> None:
    done, want = 0, len(buf)
    while done < want:
        try:
            done += os.pwrite(fd, buf[done:], offset + done)
        except OSError as e:
            raise CheckpointIOError(f"{path}: write of bytes {offset}-{offset + want} failed: "
                                    f"{e.strerror or e}") from None


# ---- durability ---------------------------------------------------------------
def _sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        f = libc.sync_file_range
    except (OSError, AttributeError, ImportError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    f.restype = ctypes.c_int
    return f


_SFR_WRITE = 2   # SYNC_FILE_RANGE_WRITE
_SFR: object = os.environ.get("HPCCKPT_NO_EARLY_WRITEBACK", "") in ("", "0")   # True: not looked up yet


def start_writeback(fd: int, offset: int, n: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + n)`` to disk now (Linux
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; no wait, no durability promise). Run
    after each written window, it lets the disk work while the copy goes on, so the
    closing ``fsync`` finds little left to do. A no-op elsewhere or on failure."""
    global _SFR
    if _SFR is True:
        _SFR = _sync_file_range()
    if _SFR and n > 0 and _SFR(fd, offset, n, _SFR_WRITE) != 0:
        _SFR = None   # ENOSYS or an fd type that refuses it: fsync alone does the job


class FileHandles:
    """Open file descriptors by path, a bounded number at a time (LRU)."""

    def __init__(self, writable: bool = False, limit: int = 64):
        self._fds: dict[str, int] = {}
        self._flags = os.O_RDWR if writable else os.O_RDONLY
        self._limit = limit

    def get(self, path: str) -> int:
        fd = self._fds.pop(path, None)
        if fd is None:
            if len(self._fds) >= self._limit:
                old = next(iter(self._fds))
                os.close(self._fds.pop(old))
            try:
                fd = os.open(path, self._flags)
            except OSError as e:
                raise CheckpointIOError(f"{path}: cannot open: {e.strerror or e}") from None
        self._fds[path] = fd  # most recent last
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def safe_join(root: str | Path, rel: str, where: str) -> str:
    """``root/rel``, refusing names that leave ``root`` (absolute paths, ``..``)."""
    root_p = Path(root).resolve()
    target = (root_p / rel).resolve()
    if Path(rel).is_absolute() or root_p != target and root_p not in target.parents:
        raise FormatError(f"{where}: names file {rel!r} outside its directory {root}")
    return str(Path(root) / rel)
