"""inspect checks rank files against the manifest (issue 8 item 11): truncated or empty
files, a chunk missing from its file, a dtype that disagrees; a damaged checkpoint is
reported with every problem and `hpcckpt inspect` exits 1 (on every rank)."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import hpcckpt
from hpcckpt.formats.safetensors import build_header, read_header
from hpcckpt.ops.filecopy import CopyOptions
from hpcckpt.ops.inspect import describe_path

from helpers import run_cli

OPTS = CopyOptions(fsync=False, progress=False)
STRATEGY = {"format": "hpcckpt.strategy/1", "mesh": {"tp": 3},
            "tensors": {"t1": {"shape": [9, 4], "dtype": "F32", "split": ["tp", None]},
                        "t2": {"shape": [5], "dtype": "F32"}}}
F1 = "rank_1/model_rank_1.safetensors"
F2 = "rank_2/model_rank_2.safetensors"


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inspect")
    head, _ = build_header([("t1", "F32", (9, 4)), ("t2", "F32", (5,))])
    (d / "model.safetensors").write_bytes(head + np.arange(41, dtype=np.float32).tobytes())
    hpcckpt.split(str(d / "model.safetensors"), str(d / "dist"),
                  hpcckpt.strategy_from_dict(STRATEGY), options=OPTS)
    return d / "dist"


def damage(dist: Path, tmp_path: Path, change) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(dist, out)
    change(out)
    return out


def rewrite_header(path: Path, edit) -> None:
    """Edit a file's header JSON in place, keeping its length (same-size edits only)."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    text = data[8:8 + n].decode()
    new = edit(text)
    assert len(new) == len(text)
    data[8:8 + n] = new.encode()
    path.write_bytes(bytes(data))


def test_a_healthy_checkpoint_is_complete(dist):
    info = describe_path(str(dist))
    assert info["complete"] is True and "problems" not in info


def test_truncated_and_empty_rank_files(dist, tmp_path):
    size1 = (dist / F1).stat().st_size

    def change(d):
        with open(d / F1, "r+b") as f:
            f.truncate(size1 - 8)
        (d / F2).write_bytes(b"")
    info = describe_path(str(damage(dist, tmp_path, change)))
    assert info["complete"] is False
    assert info["problems"] == [f"{F1}: {size1 - 8} bytes, the manifest records {size1}",
                                f"{F2}: 0 bytes, the manifest records {size1}"]


def test_chunk_missing_from_its_file_and_dtype_mismatch(dist, tmp_path):
    def change(d):
        rewrite_header(d / F1, lambda t: t.replace('"t1"', '"u1"'))
        rewrite_header(d / F2, lambda t: t.replace('"t2":{"dtype":"F32"', '"t2":{"dtype":"I32"'))
    info = describe_path(str(damage(dist, tmp_path, change)))
    assert info["problems"] == [
        f"{F1}: has no tensor 't1' (the manifest lists its chunk [3:6, 0:4] there)",
        f"{F2}: tensor 't2' is I32 [5], the manifest says its chunk [0:5] is F32 [5]"]


def test_format_1_without_sizes_still_finds_a_truncated_file(dist, tmp_path):
    from hpcckpt.storage.manifest import read_manifest

    def change(d):
        (d / "manifest.json").write_text(json.dumps(read_manifest(d).expanded()))
        with open(d / F1, "r+b") as f:
            f.truncate(read_header(d / F1).data_start + 4)
    bad = damage(dist, tmp_path, change)
    info = describe_path(str(bad))
    assert info["problems"] == [f"{bad / F1}: tensor 't1': data_offsets [0, 48] are outside "
                                "the data region of 4 bytes"]


@pytest.mark.timeout(120)
def test_cli_exits_1_for_a_damaged_checkpoint(dist, tmp_path):
    bad = damage(dist, tmp_path, lambda d: (d / F2).write_bytes(b""))
    p = run_cli(["inspect", bad, "--json"])
    assert p.returncode == 1, p.stderr
    assert json.loads(p.stdout)["problems"] == [
        f"{F2}: 0 bytes, the manifest records {(dist / F2).stat().st_size}"]
    assert run_cli(["inspect", dist, "--json"]).returncode == 0
