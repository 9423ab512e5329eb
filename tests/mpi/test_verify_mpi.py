"""hpcckpt.verify at any world size: every checkpoint kind, every byte read once, every
planted defect found (and nothing else), the same report on every rank."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import hpcckpt
from hpcckpt.layout import strategy_from_dict, write_strategy_yaml
from hpcckpt.ops.filecopy import CopyOptions
from hpcckpt.ops.verify import verify
from hpcckpt.formats.safetensors import read_header

from helpers import barrier, flip_bit, make_tensors, rank_size, write_safetensors_file

pytestmark = pytest.mark.mpi

FMT = "hpcckpt.strategy/1"
TENSORS = {
    "emb": ([12, 6], "BF16"),
    "w": ([7, 5], "F32"),
    "f8": ([5, 9], "F8_E4M3"),
    "pos": ([11], "I64"),
    "scale": ([], "F32"),
    "empty": ([0, 3], "F32"),
}
DOC = {"format": FMT, "mesh": {"dp": 2, "tp": 2}, "tensors": {
    "emb": {"shape": [12, 6], "dtype": "BF16", "split": ["tp", None]},
    "w": {"shape": [7, 5], "dtype": "F32", "split": [None, "tp"], "zero": "dp"},
    "f8": {"shape": [5, 9], "dtype": "F8_E4M3", "split": [None, "tp"]},
    "pos": {"shape": [11], "dtype": "I64", "zero": "dp"},
    "scale": {"shape": [], "dtype": "F32"},
    "empty": {"shape": [0, 3], "dtype": "F32", "split": ["tp", None]},
}}
QUIET = CopyOptions(fsync=False, progress=False)


def finite_tensors() -> dict[str, np.ndarray]:
    """make_tensors' bits, with every float made finite (so --finite finds only what a
    test plants)."""
    out = make_tensors(TENSORS, seed=5)
    out["w"] = (np.arange(35, dtype=np.float32) / 7).reshape(7, 5)
    for name, a in out.items():
        if a.dtype.kind in "fV" or str(a.dtype) in ("bfloat16", "float8_e4m3fn"):
            out[name] = np.nan_to_num(a.astype(np.float32), nan=1.0, posinf=2.0,
                                      neginf=-2.0).astype(a.dtype)
    return out


def write_complete(path: Path, tensors: dict[str, np.ndarray]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors_file(path / "model.safetensors", tensors,
                           {n: dt for n, (_, dt) in TENSORS.items()}, {"format": "pt"})


@pytest.fixture
def ckpts(comm, shared_tmp):
    """hf/, dist/ (full), dedup/, hf_sharded/ (merge with index), strategy file."""
    if rank_size(comm)[0] == 0:
        s = strategy_from_dict(DOC, "s")
        write_strategy_yaml(s, shared_tmp / "s.yaml")
        write_complete(shared_tmp / "hf", finite_tensors())
        hpcckpt.split(str(shared_tmp / "hf"), str(shared_tmp / "dist"), s, options=QUIET)
        hpcckpt.split(str(shared_tmp / "hf"), str(shared_tmp / "dedup"), s, dedup=True,
                      options=QUIET)
        hpcckpt.merge(str(shared_tmp / "dist"), str(shared_tmp / "hf_sharded"),
                      max_shard_size=200, options=QUIET)
    barrier(comm)
    return shared_tmp


def stored_data_bytes(root: Path) -> int:
    """Every tensor byte of every .safetensors file under root (headers excluded)."""
    return sum(e.nbytes for p in root.rglob("*.safetensors")
               for e in read_header(p).tensors.values())


def damage(fn):
    """Run fn on rank 0 only, then make every rank wait for it."""
    def run(comm, *args):
        if rank_size(comm)[0] == 0:
            fn(*args)
        barrier(comm)
    return run


@pytest.mark.parametrize("kind", ["dist", "dedup", "hf", "hf_sharded", "hf_file", "nomanifest"])
def test_clean_checkpoint_every_kind(comm, ckpts, kind):
    path = {"hf_file": ckpts / "hf" / "model.safetensors"}.get(kind, ckpts / kind)
    strategy = None
    if kind == "nomanifest":
        damage(lambda: (shutil.copytree(ckpts / "dist", ckpts / kind),
                        os.unlink(ckpts / kind / "manifest.json")))(comm)
        strategy = hpcckpt.load_strategy(ckpts / "s.yaml")
    root = path.parent if path.is_file() else path
    for deep in (True, False):
        rep = verify(str(path), comm, strategy=strategy, deep=deep, finite=deep)
        assert rep.problems == (), [p.line() for p in rep.problems]
        assert rep.world_size == rank_size(comm)[1]
        assert rep.bytes_checked == (stored_data_bytes(root) if deep else 0)
    rows = rep.per_rank
    assert [r["rank"] for r in rows] == list(range(rank_size(comm)[1]))


def test_bytes_divided_evenly(comm, ckpts):
    rep = verify(str(ckpts / "dist"), comm)
    per = [r["bytes_checked"] for r in rep.per_rank]
    largest = max(e.nbytes for p in (ckpts / "dist").rglob("*.safetensors")
                  for e in read_header(p).tensors.values())
    total = stored_data_bytes(ckpts / "dist")
    assert sum(per) == total
    assert max(per) - total / len(per) <= largest


def test_every_planted_defect_found_and_nothing_else(comm, ckpts):
    d = ckpts / "bad"
    r1 = d / "rank_1" / "model_rank_1.safetensors"
    e = read_header(ckpts / "dist" / "rank_1" / "model_rank_1.safetensors").tensors["emb"]

    def plant():
        shutil.copytree(ckpts / "dist", d)
        flip_bit(r1, e.begin + 3, 0x10)                                          # a read chunk
        os.truncate(d / "rank_2" / "model_rank_2.safetensors",
                    os.path.getsize(d / "rank_2" / "model_rank_2.safetensors") - 1)  # 1 byte short
        (d / "rank_3" / "model_rank_3.safetensors").unlink()               # missing
    damage(plant)(comm)
    rep = verify(str(d), comm)
    got = sorted((p.kind, p.file, p.tensor) for p in rep.problems)
    assert got == [("checksum", "rank_1/model_rank_1.safetensors", "emb"),
                   ("header", "rank_2/model_rank_2.safetensors", None),
                   ("missing", "rank_3/model_rank_3.safetensors", None),
                   ("size", "rank_2/model_rank_2.safetensors", None)]
    size = (d / "rank_2" / "model_rank_2.safetensors").stat().st_size
    short = next(p for p in rep.problems if p.kind == "size")
    assert (short.message, short.byte_range) == (
        f"file is {size} bytes, the manifest records {size + 1}", (size, size + 1))
    flipped = next(p for p in rep.problems if p.kind == "checksum")
    assert flipped.box == "[6:12, 0:6]" and flipped.byte_range == (e.begin, e.end)
    # every rank holds the same report
    assert comm is None or comm.allgather([p.line() for p in rep.problems]).count(
        [p.line() for p in rep.problems]) == comm.Get_size()
    quick = verify(str(d), comm, deep=False)
    assert sorted((p.kind, p.file) for p in quick.problems) == [
        ("header", "rank_2/model_rank_2.safetensors"),
        ("missing", "rank_3/model_rank_3.safetensors"),
        ("size", "rank_2/model_rank_2.safetensors")]


def test_replica_difference_without_manifest(comm, ckpts):
    """No checksums recorded (MindSpore-written): copies of a box are compared by hash."""
    d = ckpts / "ms"
    r2 = d / "rank_2" / "model_rank_2.safetensors"
    e = read_header(ckpts / "dist" / "rank_2" / "model_rank_2.safetensors").tensors["emb"]

    def plant():
        shutil.copytree(ckpts / "dist", d)
        os.unlink(d / "manifest.json")
        flip_bit(r2, e.begin, 0x10)
    damage(plant)(comm)
    rep = verify(str(d), comm, strategy=hpcckpt.load_strategy(ckpts / "s.yaml"))
    assert [(p.kind, p.tensor, p.box) for p in rep.problems] == [("replica", "emb", "[0:6, 0:6]")]
    assert "rank_0/model_rank_0.safetensors" in rep.problems[0].message
    assert "rank_2/model_rank_2.safetensors" in rep.problems[0].message


def test_against_other_layout(comm, ckpts):
    rep = verify(str(ckpts / "dedup"), comm, against=str(ckpts / "hf"))
    assert rep.problems == ()
    other = ckpts / "hf_changed"

    def plant():
        t = finite_tensors()
        t["w"][3, 4] += 1.0
        t["w"][5, 0] += 1e-5
        write_complete(other, t)
    damage(plant)(comm)
    rep = verify(str(ckpts / "dist"), comm, against=str(other))
    assert len(rep.problems) == 1, [p.line() for p in rep.problems]
    p = rep.problems[0]
    # w is split [null, tp] and ZeRO over dp: [3, 4] and [5, 0] lie in different chunks,
    # perhaps read by different ranks; the count is summed, the first index is the least
    assert (p.kind, p.tensor, p.file, p.box) == ("differs", "w", "rank_1/model_rank_1.safetensors",
                                                "[0:4, 3:5]")
    assert p.message == f"2 element(s) differ from {other}, the first at index [3, 4]"
    loose = verify(str(ckpts / "dist"), comm, against=str(other), atol=1e-4)
    assert [(q.kind, q.tensor) for q in loose.problems] == [("differs", "w")]
    assert loose.problems[0].message == (f"1 element(s) differ from {other}, the first at "
                                         "index [3, 4]")
    assert verify(str(ckpts / "dist"), comm, against=str(other), atol=2.0).problems == ()


def test_finite_finds_nan(comm, ckpts):
    d = ckpts / "nan"

    def plant():
        t = finite_tensors()
        t["w"][2, 1] = np.nan
        t["w"][6, 4] = np.inf
        t["emb"][11, 5] = np.nan
        write_complete(d, t)
    damage(plant)(comm)
    rep = verify(str(d), comm, finite=True)
    assert sorted((p.kind, p.tensor, p.message) for p in rep.problems) == [
        ("nonfinite", "emb", "1 NaN/Inf element(s), the first at index [11, 5]"),
        ("nonfinite", "w", "2 NaN/Inf element(s), the first at index [2, 1]")]
    assert verify(str(d), comm).problems == ()     # without --finite, NaN is data
