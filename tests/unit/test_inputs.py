"""Distributed inputs read through manifest.json: every defect named, with or without
``lazy`` (tensors decoded and checked when planning first asks for them)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import hpcckpt
from hpcckpt.errors import FormatError
from hpcckpt.ops.filecopy import CopyOptions
from hpcckpt.storage.inputs import open_input
from hpcckpt.formats.safetensors import build_header
from hpcckpt.storage.manifest import read_manifest

TENSORS = {"a.w": (8, 6), "b/w": (5,), "c": (3, 4)}
STRATEGY = {"format": "hpcckpt.strategy/1", "mesh": {"tp": 2},
            "tensors": {"a.w": {"shape": [8, 6], "dtype": "F32", "split": ["tp", None]},
                        "b/w": {"shape": [5], "dtype": "F32", "split": ["tp"]},
                        "c": {"shape": [3, 4], "dtype": "F32"}}}


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    head, _ = build_header([(n, "F32", s) for n, s in TENSORS.items()])
    with open(d / "model.safetensors", "wb") as f:
        f.write(head)
        for s in TENSORS.values():
            f.write(np.arange(np.prod(s), dtype=np.float32).tobytes())
    hpcckpt.split(str(d / "model.safetensors"), str(d / "dist"),
                  hpcckpt.strategy_from_dict(STRATEGY), options=CopyOptions(fsync=False,
                                                                            progress=False))
    return d / "dist"


def corrupt(dist: Path, tmp_path: Path, change) -> tuple[Path, str]:
    """A copy of ``dist`` whose manifest went through ``change(doc)``."""
    import shutil
    out = tmp_path / "bad"
    shutil.copytree(dist, out)
    doc = read_manifest(out).expanded()   # format 1: every chunk listed, to change
    change(doc)
    (out / "manifest.json").write_text(json.dumps(doc))
    return out, str(out / "manifest.json")


def chunk(doc, name, i):
    return doc["tensors"][name]["chunks"][i]


CASES = {
    "overlap": (lambda d: chunk(d, "a.w", 1).update(offsets=[3, 0]), "a.w",
                "tensor 'a.w' chunks [0:4, 0:6] (rank_0/model_rank_0.safetensors) and [3:7, 0:6] "
                "(rank_1/model_rank_1.safetensors) overlap in [3:4, 0:6]"),
    "outside": (lambda d: chunk(d, "b/w", 1).update(offsets=[4]), "b/w",
                "tensor 'b/w' chunk [4:6] in rank_1/model_rank_1.safetensors lies outside "
                "shape [5]"),
    "incomplete": (lambda d: d["tensors"]["a.w"]["chunks"].pop(), "a.w",
                   "tensor 'a.w' is incomplete: stored chunks cover 24 of 48 elements"),
    "escapes": (lambda d: chunk(d, "c", 0).update(file="../elsewhere.safetensors"), "c",
                "names file '../elsewhere.safetensors' outside its directory {root}"),
    "malformed": (lambda d: chunk(d, "c", 1).pop("sizes"), "c",
                  "malformed manifest: tensor 'c': KeyError: 'sizes'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_manifest_defects_named_eager_and_lazy(dist, tmp_path, case):
    change, name, message = CASES[case]
    bad, where = corrupt(dist, tmp_path, change)
    want = f"{where}: " + message.format(root=bad)
    with pytest.raises(FormatError) as e:
        open_input(bad)
    assert str(e.value) == want
    inp = open_input(bad, lazy=True)   # opening decodes no chunk
    for other in TENSORS:
        if other != name:
            assert inp.source.chunks(other)
    with pytest.raises(FormatError) as e:
        inp.source.chunks(name)
    assert str(e.value) == want


def test_lazy_source_equals_eager(dist):
    eager, lazy = open_input(dist), open_input(dist, lazy=True)
    assert lazy.manifest.world_size == 2 and lazy.manifest.redundancy == "full"
    assert lazy.files == eager.files and lazy.source.tensors == eager.source.tensors
    for n in TENSORS:
        assert lazy.source.chunks(n) == eager.source.chunks(n)
    assert [c.files for c in eager.source.chunks("c")] == [
        ("rank_0/model_rank_0.safetensors", "rank_1/model_rank_1.safetensors")]


def test_manifest_header_defects(dist, tmp_path):
    bad, where = corrupt(dist, tmp_path, lambda d: d.update(format="other/1"))
    with pytest.raises(FormatError) as e:
        open_input(bad, lazy=True)
    assert str(e.value) == (f"{where}: not an hpcckpt manifest (format 'other/1', expected "
                            "'hpcckpt.manifest/2' or 'hpcckpt.manifest/1')")
    bad2, where2 = corrupt(dist, tmp_path / "2", lambda d: d["tensors"]["c"].pop("shape"))
    with pytest.raises(FormatError) as e:
        open_input(bad2, lazy=True)
    assert str(e.value) == f"{where2}: malformed manifest: KeyError: 'shape'"
