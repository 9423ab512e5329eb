"""The safetensors file format: headers read, validated and built.

The format: 8-byte little-endian header length N, N bytes of JSON (padded with spaces
to a multiple of 8), then the data region. Tensor ``data_offsets`` are relative to the
data region. We read and validate headers ourselves (the data region never needs to be
loaded whole) and compute output headers up front so several ranks can fill one file
with positioned writes.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import struct
from operator import itemgetter
from dataclasses import dataclass, field
from typing import Iterable, Mapping, NamedTuple

from ..dtypes import DTYPES, itemsize
from ..errors import CheckpointIOError, FormatError, quote

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_ESCAPED_COLON = re.compile(r"\\u003[aA]")


class TensorEntry(NamedTuple):
    """One tensor in a safetensors file; ``begin``/``end`` are absolute file offsets.

    A NamedTuple, not a frozen dataclass: a 1024-rank checkpoint's headers hold 370,000
    of them, and ``_make`` builds one in a tenth of a frozen dataclass's ``__init__``."""

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


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def open_regular(path: str | os.PathLike) -> int:
    """A read-only descriptor of the checkpoint file ``path``; an ``OSError`` naming what
    it is when it is not a regular file. A FIFO put where a checkpoint file belongs
    would block the open forever (no writer) and a device would read without end:
    ``O_NONBLOCK`` makes the open return, the file type is checked, and the flag (which
    regular files ignore) is cleared."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a file")
            raise OSError(errno.EINVAL, f"not a regular file ({kind})")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike) -> bytes:
    """The whole of the checkpoint file ``path`` (``open_regular``'s checks)."""
    with os.fdopen(open_regular(path), "rb") as f:
        return f.read()


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and validate a safetensors header (only the header bytes are read)."""
    path = str(path)
    try:
        with os.fdopen(open_regular(path), "rb") as f:
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


def _plain_json(raw: bytes) -> dict | None:
    """The header as ``json.loads`` alone decodes it (the C decoder, no per-object
    hook: a 1024-rank checkpoint has 370,000 objects in its headers) when that provably
    equals ``load_json``'s result, i.e. no object has a key twice; None when it cannot
    tell (``load_json`` then decides, naming the defect).

    A plain dict keeps one pair per distinct key, so duplicates show as fewer pairs in
    the parsed objects than there are pairs in the text. Each pair has one ``:`` outside
    strings; the text's ``:`` count minus those inside the strings we know (top-level
    keys, ``__metadata__``'s keys and values) bounds the text's pairs from above, and
    the pairs of the top-level object and its object values bound the parsed pairs from
    below. When the two bounds meet, the parsed objects hold every pair of the text. A
    colon written as an escape would spoil the count: such a header takes the slow path.
    """
    if json.detect_encoding(raw) != "utf-8":
        return None
    try:
        text = raw.decode("utf-8", "surrogatepass")   # as json.loads decodes bytes
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if type(doc) is not dict or _ESCAPED_COLON.search(text):
        return None
    pairs = len(doc)
    for v in doc.values():
        if type(v) is dict:
            pairs += len(v)
    known = "".join(doc)
    meta = doc.get("__metadata__")
    if type(meta) is dict:
        known += "".join(meta) + "".join(v for v in meta.values() if type(v) is str)
    return doc if text.count(":") - known.count(":") == pairs else None


def parse_header(path: str, raw: bytes, file_size: int) -> SafetensorsHeader:
    doc = _plain_json(raw)
    if doc is None:
        doc = load_json(raw, path, "header")
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: header is not a JSON object")
    data_start = 8 + len(raw)
    data_len = file_size - data_start
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{path}: __metadata__ must map strings to strings")
    tensors: dict[str, TensorEntry] = {}
    spans = []
    for name, t in doc.items():
        dtype, shape, b, e = _plain_entry(t, data_len) or _checked_entry(path, name, t, data_len)
        tensors[name] = TensorEntry._make((name, dtype, tuple(shape), data_start + b,
                                           data_start + e))
        if b != e:
            spans.append((b, e, name))
    spans.sort(key=itemgetter(0))   # stable: ties in header order, as the message names them
    for (b0, e0, a), (b1, e1, b) in zip(spans, spans[1:]):
        if b1 < e0:
            raise FormatError(f"{path}: tensors {a!r} (bytes {b0}-{e0}) and {b!r} "
                              f"(bytes {b1}-{e1}) overlap")
    end = spans[-1][1] if spans else 0
    if end != data_len:   # the safetensors library refuses these too
        raise FormatError(f"{path}: {data_len - end} byte(s) after the last tensor's data "
                          f"(the data region is {data_len} bytes, its tensors end at {end})")
    return SafetensorsHeader(path, data_start, file_size, tensors, dict(meta))


def _plain_entry(t, data_len: int) -> tuple | None:
    """A valid tensor entry's ``(dtype, shape, begin, end)`` (relative offsets) in a few
    operations (370,000 entries at 1024 ranks); None for anything else, which
    ``_checked_entry`` then names. Accepts only what ``_checked_entry`` accepts: the
    product of the shape is an int only if the shape holds ints (or bools, refused
    here); only a list of two ints unpacks into two ints (JSON has no tuples, a string or
    object unpacks into strings)."""
    try:
        dtype, shape, (b, e) = t["dtype"], t["shape"], t["data_offsets"]
        want = math.prod(shape) * DTYPES[dtype][0]
    except (TypeError, KeyError, ValueError):
        return None
    if (type(want) is int and type(shape) is list and type(b) is int and type(e) is int
            and 0 <= b <= e <= data_len and e - b == want and bool not in map(type, shape)
            and min(shape, default=0) >= 0):
        return dtype, shape, b, e
    return None


def _checked_entry(path: str, name: str, t, data_len: int) -> tuple:
    """One tensor entry validated step by step: its ``(dtype, shape, begin, end)``
    (relative offsets), or a FormatError naming the first defect."""
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
    return dtype, shape, b, e


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
    head = frame_header(json.dumps(doc, separators=(",", ":"), ensure_ascii=False))
    return head, {k: (len(head) + b, len(head) + e) for k, (b, e) in rel.items()}


def frame_header(text: str) -> bytes:
    """A header's JSON text as the file holds it: its length (8 bytes, little-endian),
    then the UTF-8 bytes padded with spaces to a multiple of 8."""
    raw = text.encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
