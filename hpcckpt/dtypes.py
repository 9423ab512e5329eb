"""safetensors dtype names, their sizes and numpy equivalents.

The engine moves bytes and only needs item sizes, so this table is plain Python: split,
merge and reshard never import numpy unless a strided copy needs it (importing numpy
costs 0.13 s per rank, a fifth of a 1 GiB split). numpy dtypes are built on first use,
when a caller wants arrays (``hpcckpt.load``). ml_dtypes supplies BF16 and the FP8 types
that numpy lacks (and that ``safetensors.numpy`` cannot load); it is imported only when
one of those is asked for (0.8 s per rank on these machines).
"""
from __future__ import annotations

from functools import lru_cache

from .errors import FormatError

#: safetensors dtype name -> (bytes per element, numpy or ml_dtypes type name). Only
#: whole-byte types: the engine slices at element granularity, which sub-byte types
#: (F4, F6) do not allow.
DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (1, "bool_"),
    "U8": (1, "uint8"),
    "I8": (1, "int8"),
    "F8_E5M2": (1, "ml_dtypes.float8_e5m2"),
    "F8_E4M3": (1, "ml_dtypes.float8_e4m3fn"),
    "F8_E8M0": (1, "ml_dtypes.float8_e8m0fnu"),
    "I16": (2, "int16"),
    "U16": (2, "uint16"),
    "F16": (2, "float16"),
    "BF16": (2, "ml_dtypes.bfloat16"),
    "I32": (4, "int32"),
    "U32": (4, "uint32"),
    "F32": (4, "float32"),
    "C64": (8, "complex64"),
    "F64": (8, "float64"),
    "I64": (8, "int64"),
    "U64": (8, "uint64"),
}


def itemsize(dtype: str, where: str = "") -> int:
    """Bytes per element of a safetensors dtype name; FormatError naming ``where`` if unknown."""
    try:
        return DTYPES[dtype][0]
    except KeyError:
        known = " ".join(DTYPES)
        raise FormatError(f"{where}unknown dtype {dtype!r} (known: {known})") from None


@lru_cache(maxsize=None)
def numpy_dtype(dtype: str):
    """numpy dtype of a safetensors dtype name. Imports numpy, and ml_dtypes only for
    the types numpy lacks (BF16, FP8): 0.8 s of start-up an F32 load does not pay."""
    itemsize(dtype)
    import numpy as np
    module, _, attr = DTYPES[dtype][1].rpartition(".")
    if module == "ml_dtypes":
        import ml_dtypes
        return np.dtype(getattr(ml_dtypes, attr))
    return np.dtype(getattr(np, attr))


def dtype_name(dt) -> str:
    """safetensors name of a numpy dtype (``bfloat16`` -> ``BF16``)."""
    import numpy as np
    dt = np.dtype(dt)
    # numpy's own types first: ml_dtypes is imported only for a type numpy lacks
    ordered = sorted(DTYPES, key=lambda n: DTYPES[n][1].startswith("ml_dtypes."))
    for name in ordered:
        if numpy_dtype(name) == dt:
            return name
    raise FormatError(f"numpy dtype {dt} has no safetensors name")


#: the ``safetensors`` library's ``Dtype`` enum order (its declaration order). Its
#: ``save_file`` lays tensors out largest dtype first (this order, reversed), then by
#: name; MindSpore writes every safetensors file through it.
SAFETENSORS_ENUM = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3",
                    "F8_E8M0", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64",
                    "I64", "U64")


def library_order(name: str, dtype: str) -> tuple[int, str]:
    """Sort key putting tensors in the order ``safetensors.save_file`` writes them."""
    return (-SAFETENSORS_ENUM.index(dtype), name)
