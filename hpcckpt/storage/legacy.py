"""Legacy checkpoint files read as tensor records: MindSpore ``.ckpt`` and HDF5 weights.

A reader lists its tensors (name, safetensors dtype, shape) and where their bytes are,
without loading them: ``hpcckpt convert`` then reads any region of a tensor (a positioned
read of a ``.ckpt``, an HDF5 hyperslab) into its bounded buffer, so tensors of any size
stream through it.

``.ckpt`` (MindSpore ``checkpoint.proto``): concatenated ``Checkpoint {repeated Value
value = 1}`` messages, ``Value {string tag = 1; TensorProto tensor = 2; MapTensorProto
maptensor = 3}``, ``TensorProto {repeated int64 dims = 1; string tensor_type = 2; bytes
tensor_content = 3}``. A tensor over 512 MiB is several consecutive values with one tag
whose contents join. An optional trailer ``b"crc_num"`` + 10-byte big-endian CRC32 of
everything before it. Encrypted files (AES-GCM, AES-CBC, SM4-CBC) start with MindSpore's
cipher magic. The wire format is walked here (tags and lengths only, with positioned
reads) rather than by ``protobuf``'s parser, which needs the whole file in memory and
would copy every tensor; ``hpcckpt.ms_proto`` holds the same schema for the tests.
"""
from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from typing import Iterator

from ..dtypes import itemsize
from ..errors import CheckpointIOError, FormatError
from .fileio import pread_into

#: MindSpore ``tensor_type`` -> safetensors dtype (``_tensor_to_np_type`` plus BFloat16)
MS_DTYPES = {"Int8": "I8", "UInt8": "U8", "Int16": "I16", "UInt16": "U16", "Int32": "I32",
             "UInt32": "U32", "Int64": "I64", "UInt64": "U64", "Float16": "F16",
             "Float32": "F32", "Float64": "F64", "Bool": "BOOL", "BFloat16": "BF16"}
CRC_TRAILER = b"crc_num"
CRC_BYTES = 17                      #: b"crc_num" + 10-byte big-endian CRC32
CIPHER_MAGIC = bytes.fromhex("d85e3a7f")   #: MindSpore's encrypted block header (0x7F3A5ED8)


@dataclass(frozen=True)
class LegacyTensor:
    """One tensor of a legacy file.

    Attributes:
        name: tensor name in the output.
        dtype: safetensors dtype name.
        shape: global shape.
        pieces: ``.ckpt``: the ``(file offset, length)`` byte ranges whose concatenation is
            the tensor; HDF5: empty (bytes come from the dataset ``source``).
        source: HDF5 dataset path.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[tuple[int, int], ...] = ()
    source: str = ""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


# ---- MindSpore .ckpt ------------------------------------------------------------------
class _Wire:
    """Positioned reads of protobuf wire-format fields from a file."""

    def __init__(self, fd: int, path: str, size: int):
        self.fd, self.path, self.size = fd, path, size

    def read(self, pos: int, n: int) -> bytes:
        buf = bytearray(n)
        pread_into(self.fd, memoryview(buf), pos, self.path)
        return bytes(buf)

    def varint(self, pos: int, end: int, what: str) -> tuple[int, int]:
        head = self.read(pos, min(10, end - pos))
        value = shift = 0
        for i, b in enumerate(head):
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value, pos + i + 1
            shift += 7
        raise FormatError(f"{self.path}: truncated or malformed {what} at byte {pos}")

    def fields(self, start: int, end: int, what: str) -> Iterator[tuple[int, int, int, int]]:
        """(field number, wire type, value or payload start, payload end) of a message."""
        pos = start
        while pos < end:
            key, pos = self.varint(pos, end, f"field key in {what}")
            number, wt = key >> 3, key & 7
            if wt == 0:
                value, pos = self.varint(pos, end, f"varint field {number} in {what}")
                yield number, wt, value, pos
            elif wt == 2:
                n, pos = self.varint(pos, end, f"length of field {number} in {what}")
                if pos + n > end:
                    raise FormatError(f"{self.path}: field {number} of {what} at byte {pos} "
                                      f"claims {n} bytes but the message ends at byte {end} "
                                      "(truncated or corrupt file)")
                yield number, wt, pos, pos + n
                pos += n
            elif wt in (1, 5):
                pos += 8 if wt == 1 else 4
                if pos > end:
                    raise FormatError(f"{self.path}: truncated {what} at byte {end}")
            else:
                raise FormatError(f"{self.path}: not a MindSpore checkpoint: wire type {wt} "
                                  f"of field {number} in {what} at byte {pos}")


def read_ckpt(path: str, check_crc: bool = True) -> list[LegacyTensor]:
    """Every tensor of a MindSpore ``.ckpt`` file, split values rejoined, CRC checked.

    Raises FormatError naming the file (and tensor or byte) for an encrypted, truncated
    or corrupt file, a CRC mismatch, a string, map or Int4 value, or a value whose bytes
    disagree with its dims and type.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise CheckpointIOError(f"{path}: cannot open: {e.strerror or e}") from None
    try:
        size = os.fstat(fd).st_size
        w = _Wire(fd, path, size)
        if size >= 4 and w.read(0, 4) == CIPHER_MAGIC:
            raise FormatError(f"{path}: encrypted MindSpore checkpoint (AES-GCM, AES-CBC or "
                              "SM4-CBC); decrypt it with MindSpore first "
                              "(ms.load_checkpoint(path, dec_key=...) then ms.save_checkpoint)")
        end = size
        if size >= CRC_BYTES and w.read(size - CRC_BYTES, 7) == CRC_TRAILER:
            end = size - CRC_BYTES
            if check_crc:
                want = int.from_bytes(w.read(end + 7, 10), "big")
                got = _crc32(fd, path, end)
                if got != want:
                    raise FormatError(f"{path}: CRC mismatch: the trailer says {want:#010x}, "
                                      f"bytes 0-{end} give {got:#010x} (the file is damaged)")
        return _values(w, end)
    finally:
        os.close(fd)


def _crc32(fd: int, path: str, end: int, block: int = 4 << 20) -> int:
    crc, pos = 0, 0
    buf = bytearray(min(block, end) or 1)
    while pos < end:
        n = min(len(buf), end - pos)
        view = memoryview(buf)[:n]
        pread_into(fd, view, pos, path)
        crc = zlib.crc32(view, crc)
        pos += n
    return crc


def _values(w: _Wire, end: int) -> list[LegacyTensor]:
    order: list[str] = []
    found: dict[str, tuple[str, tuple[int, ...], list[tuple[int, int]], int]] = {}
    last = None
    for number, wt, a, b in w.fields(0, end, "Checkpoint"):
        if number != 1 or wt != 2:
            raise FormatError(f"{w.path}: not a MindSpore checkpoint: field {number} at byte "
                              f"{a} (a .ckpt holds only Checkpoint.value entries)")
        tag, tensor = None, None
        for n2, wt2, a2, b2 in w.fields(a, b, f"value at byte {a}"):
            if n2 == 1 and wt2 == 2:
                tag = w.read(a2, b2 - a2)
            elif n2 == 2 and wt2 == 2:
                tensor = (a2, b2)
            elif n2 == 3:
                raise FormatError(f"{w.path}: value at byte {a} is a MapTensor, which "
                                  "safetensors cannot hold")
        if tag is None or tensor is None:
            raise FormatError(f"{w.path}: value at byte {a} has no {'tag' if tag is None else 'tensor'}")
        try:
            name = tag.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{w.path}: value at byte {a} has a tag that is not UTF-8") from None
        dims: list[int] = []
        ttype, content = None, None
        for n3, wt3, a3, b3 in w.fields(*tensor, f"tensor {name!r}"):
            if n3 == 1 and wt3 == 0:
                dims.append(a3 - (1 << 64) if a3 >= 1 << 63 else a3)
            elif n3 == 1 and wt3 == 2:   # packed dims
                pos = a3
                while pos < b3:
                    v, pos = w.varint(pos, b3, f"dims of {name!r}")
                    dims.append(v - (1 << 64) if v >= 1 << 63 else v)
            elif n3 == 2 and wt3 == 2:
                ttype = w.read(a3, b3 - a3).decode("utf-8", "replace")
            elif n3 == 3 and wt3 == 2:
                content = (a3, b3 - a3)
        if ttype is None or content is None:
            raise FormatError(f"{w.path}: tensor {name!r} (byte {a}) lacks its "
                              f"{'tensor_type' if ttype is None else 'tensor_content'}")
        dtype = MS_DTYPES.get(ttype)
        if dtype is None:
            what = "a string" if ttype == "str" else f"type {ttype!r}"
            raise FormatError(f"{w.path}: tensor {name!r} holds {what}, which safetensors "
                              f"cannot store (types: {' '.join(MS_DTYPES)})")
        if any(d < 0 for d in dims):
            raise FormatError(f"{w.path}: tensor {name!r} has negative dims {dims}")
        if name in found:
            if last != name:
                raise FormatError(f"{w.path}: tensor {name!r} appears twice, not as consecutive "
                                  "parts of one split value")
            d0, s0, pieces, total = found[name]
            if (d0, s0) != (dtype, tuple(dims)):
                raise FormatError(f"{w.path}: parts of split tensor {name!r} disagree: "
                                  f"{d0} {list(s0)} and {dtype} {dims}")
            pieces.append(content)
            found[name] = (d0, s0, pieces, total + content[1])
        else:
            order.append(name)
            found[name] = (dtype, tuple(dims), [content], content[1])
        last = name
    out = []
    for name in order:
        dtype, shape, pieces, total = found[name]
        t = LegacyTensor(name, dtype, shape, tuple(pieces))
        if total != t.nbytes:
            raise FormatError(f"{w.path}: tensor {name!r} is {dtype} {list(shape)} ({t.nbytes} "
                              f"bytes) but its content holds {total} bytes")
        out.append(t)
    return out


# ---- HDF5 (Keras legacy / Hugging Face tf_model.h5, Keras 3 model.weights.h5) ---------
_H5_DTYPES = {"float16": "F16", "float32": "F32", "float64": "F64", "int8": "I8",
              "int16": "I16", "int32": "I32", "int64": "I64", "uint8": "U8", "uint16": "U16",
              "uint32": "U32", "uint64": "U64", "bool": "BOOL"}
RESERVED = "__metadata__"


def import_h5py():
    """h5py, an optional dependency (extra ``hdf5``)."""
    try:
        import h5py
    except ImportError:
        raise FormatError("converting HDF5 needs h5py: pip install 'hpcckpt[hdf5]'") from None
    return h5py


def _attr_list(group, name: str, path: str) -> list[str] | None:
    """A Keras list attribute, also when Keras split it (``name0``, ``name1``, ...)
    because HDF5 caps an attribute at 64 KiB."""
    if name in group.attrs:
        raw = list(group.attrs[name])
    elif f"{name}0" in group.attrs:
        raw, i = [], 0
        while f"{name}{i}" in group.attrs:
            raw.extend(group.attrs[f"{name}{i}"])
            i += 1
    else:
        return None
    out = []
    for x in raw:
        if isinstance(x, bytes):
            try:
                x = x.decode("utf-8")
            except UnicodeDecodeError:
                raise FormatError(f"{path}: attribute {name!r} of {group.name} holds a name that "
                                  "is not UTF-8") from None
        out.append(str(x))
    return out


def read_hdf5(path: str) -> tuple[list[LegacyTensor], str]:
    """Tensors of a Keras weights file and the layout found ("keras-legacy" or "keras3").

    Keras legacy / ``tf_model.h5``: root attribute ``layer_names``, each layer group's
    ``weight_names``; a tensor is named by its weight name without the ``:0`` suffix.
    Keras 3 ``model.weights.h5``: datasets named ``<object path>/vars/<i>``; a tensor is
    named by its HDF5 path. Names are checked: not empty, not ``__metadata__``, unique,
    and a weight name must resolve to a dataset inside its layer's group.
    """
    h5py = import_h5py()
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise FormatError(f"{path}: not an HDF5 file ({e})") from None
    with f:
        layers = _attr_list(f, "layer_names", path)
        out: list[LegacyTensor] = []
        if layers is not None:
            kind = "keras-legacy"
            for layer in layers:
                if layer not in f or not isinstance(f[layer], h5py.Group):
                    raise FormatError(f"{path}: layer_names lists {layer!r}, which is not a group")
                g = f[layer]
                for wn in _attr_list(g, "weight_names", path) or []:
                    obj = g.get(wn) if wn and not wn.startswith("/") else None
                    if not isinstance(obj, h5py.Dataset) or not obj.name.startswith(g.name + "/"):
                        raise FormatError(f"{path}: layer {layer!r} lists weight {wn!r}, which is "
                                          f"not a dataset inside {g.name}")
                    name = wn[:-2] if wn.endswith(":0") else wn
                    out.append(_h5_tensor(path, name, obj))
        else:
            kind = "keras3"
            found: list[str] = []
            f.visititems(lambda n, o: found.append(n) if isinstance(o, h5py.Dataset) else None)
            for n in found:
                out.append(_h5_tensor(path, n, f[n]))
            if not out:
                raise FormatError(f"{path}: HDF5 file holds no datasets")
    seen: set[str] = set()
    for t in out:
        if not t.name or t.name == RESERVED:
            raise FormatError(f"{path}: dataset {t.source} would be named {t.name!r}, which "
                              "safetensors reserves or forbids")
        if t.name in seen:
            raise FormatError(f"{path}: two weights are named {t.name!r}")
        seen.add(t.name)
    return out, kind


def _h5_tensor(path: str, name: str, ds) -> LegacyTensor:
    dt = ds.dtype
    key = dt.name if dt.kind in "fiub" else None
    if dt.kind == "b":
        key = "bool"
    dtype = _H5_DTYPES.get(key) if key else None
    if dtype is None:
        raise FormatError(f"{path}: dataset {ds.name} has type {dt}, which safetensors cannot "
                          "store")
    return LegacyTensor(name, dtype, tuple(int(s) for s in ds.shape), (), ds.name)
