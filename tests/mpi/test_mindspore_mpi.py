"""MindSpore-written checkpoints and legacy conversion at any world size (golden files of
tests/golden/mindspore, made by MindSpore 2.10; see make_golden.py there)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.numpy import load_file

import hpcckpt
from hpcckpt.ops.convert import convert
from hpcckpt.ops.filecopy import CopyOptions

from helpers import collective

pytestmark = pytest.mark.mpi
G = Path(__file__).resolve().parents[1] / "golden" / "mindspore"
OPTS = CopyOptions(fsync=False, progress=False, buffer_size=24)


def test_merge_mindspore_written_layout_ms(comm, shared_tmp):
    """Every rank writes part of part0.safetensors (24-byte tiles): the name map and
    hyper parameters are MindSpore's bytes, the part's data too."""
    s = hpcckpt.load_strategy(G / "strategy_pb", shapes_from=G / "dist")
    out = shared_tmp / "u"
    hpcckpt.merge(str(G / "dist"), str(out), strategy=s, layout="ms", comm=comm, options=OPTS)

    def check():
        for f in ("param_name_map.json", "hyper_param.safetensors"):
            assert (out / f).read_bytes() == (G / "unified" / f).read_bytes(), f
        got, want = load_file(out / "part0.safetensors"), load_file(G / "unified" / "part0.safetensors")
        assert {k: v.tobytes() for k, v in got.items()} == {k: v.tobytes() for k, v in want.items()}
        assert json.loads((out / "param_name_map.json").read_text())["metadata"] == {"total_size": 560}
    collective(comm, check)


def test_convert_files_divided_among_ranks(comm, shared_tmp):
    out = shared_tmp / "c"
    r = convert(str(G / "ckpt" / "ranks"), str(out), comm=comm, options=OPTS)
    assert r.files == 2

    def check():
        for k in (0, 1):
            rel = Path(f"rank_{k}") / "step-1_2.safetensors"
            assert (out / rel).read_bytes() == (G / "ckpt_out" / "ranks" / rel).read_bytes()
    collective(comm, check)
