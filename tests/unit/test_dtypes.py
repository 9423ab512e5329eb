"""numpy dtypes of safetensors names, and what importing them costs.

``import ml_dtypes`` takes about 0.8 s per rank on these machines: a load of F32 tensors
must not pay it; BF16/FP8 tensors need it and get it.
"""
from __future__ import annotations

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from hpcckpt.dtypes import DTYPES, dtype_name, numpy_dtype
from hpcckpt.formats.safetensors import build_header

from helpers import clean_env


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_numpy_dtype_round_trip(name):
    dt = numpy_dtype(name)
    assert dt.itemsize == DTYPES[name][0]
    assert dtype_name(dt) == name


def test_ml_dtypes_types():
    assert numpy_dtype("BF16") == np.dtype(ml_dtypes.bfloat16)
    assert numpy_dtype("F8_E4M3") == np.dtype(ml_dtypes.float8_e4m3fn)
    assert dtype_name(np.float32) == "F32"


def _write(path, dtype: str, shape, data: bytes) -> None:
    head, _ = build_header([("w", dtype, shape)])
    path.write_bytes(head + data)


_LOAD = """
import json, sys
import hpcckpt
s = hpcckpt.strategy_from_dict({"format": "hpcckpt.strategy/1", "mesh": {"tp": 1},
    "tensors": {"w": {"shape": [4, 3], "dtype": sys.argv[2], "split": ["tp", None]}}})
state = hpcckpt.load(sys.argv[1], s)
print(json.dumps({"ml_dtypes": "ml_dtypes" in sys.modules, "dtype": str(state["w"].dtype),
                  "bytes": state["w"].tobytes().hex()}))
"""


@pytest.mark.parametrize("dtype,itemsize,imports", [("F32", 4, False), ("BF16", 2, True)])
def test_load_imports_ml_dtypes_only_for_its_types(tmp_path, dtype, itemsize, imports):
    data = bytes(range(12 * itemsize))
    _write(tmp_path / "m.safetensors", dtype, (4, 3), data)
    p = subprocess.run([sys.executable, "-c", _LOAD, str(tmp_path / "m.safetensors"), dtype],
                       capture_output=True, text=True, env=clean_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got == {"ml_dtypes": imports, "dtype": str(numpy_dtype(dtype)), "bytes": data.hex()}
