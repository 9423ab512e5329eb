"""safetensors dtype names, their sizes and numpy equivalents.

The engine moves bytes and only needs item sizes; numpy dtypes are needed only when
a caller wants arrays (``hpcckpt.load``). ml_dtypes supplies BF16 and the FP8 types
that numpy lacks (and that ``safetensors.numpy`` cannot load).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from .errors import FormatError

#: safetensors dtype name -> numpy dtype. Only whole-byte types: the engine slices at
#: element granularity, which sub-byte types (F4, F6) do not allow.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32),
    "F32": np.dtype(np.float32),
    "C64": np.dtype(np.complex64),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64),
}

_NAME_OF = {dt: name for name, dt in NUMPY_DTYPES.items()}


def itemsize(dtype: str, where: str = "") -> int:
    """Bytes per element of a safetensors dtype name; FormatError naming ``where`` if unknown."""
    try:
        return NUMPY_DTYPES[dtype].itemsize
    except KeyError:
        known = " ".join(NUMPY_DTYPES)
        raise FormatError(f"{where}unknown dtype {dtype!r} (known: {known})") from None


def numpy_dtype(dtype: str) -> np.dtype:
    itemsize(dtype)
    return NUMPY_DTYPES[dtype]


def dtype_name(dt: np.dtype) -> str:
    """safetensors name of a numpy dtype (``bfloat16`` -> ``BF16``)."""
    try:
        return _NAME_OF[np.dtype(dt)]
    except KeyError:
        raise FormatError(f"numpy dtype {np.dtype(dt)} has no safetensors name") from None
