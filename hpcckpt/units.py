"""Byte sizes as users write them ("5GB", "64MiB") and as we print them."""
from __future__ import annotations

import re

from .errors import UsageError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
          "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal, like transformers' max_shard_size); ``"64MiB"`` binary."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if m and m.group(2).upper() not in _UNITS:
        raise UsageError(f"{text!r}: unknown unit {m.group(2)!r} (units: B, KB, MB, GB, TB, "
                         "KiB, MiB, GiB, TiB; e.g. 5GB, 64MiB, 1048576)")
    if not m:
        raise UsageError(f"{text!r} is not a size (e.g. 5GB, 500MB, 64MiB, 1048576)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
