"""The ``hpcckpt`` command line (SPEC 3), run as subprocesses, serially and under mpiexec.

Serial tests (not marked ``mpi``): each test starts ``python -m hpcckpt`` itself, as one
process or under ``mpiexec -n N``. Fixtures build the inputs in-process with the Python
API (no MPI), so only the command under test pays the launch cost.

Error messages are asserted word for word: the CLI prints
``hpcckpt <cmd>: error: rank R: <message>`` on rank 0's stderr.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import hpcckpt
from hpcckpt.ops.filecopy import CopyOptions
from hpcckpt.formats.safetensors import build_header, read_header
from hpcckpt.storage.manifest import read_manifest
from hpcckpt.units import format_bytes

import helpers
from helpers import (DTYPES, assert_bytes_equal, assert_nothing_complete,  # noqa: F401
                     clean_env, make_tensors, read_tensor, run_cli)

FMT = "hpcckpt.strategy/1"
TIMEOUT = 60

# ---------------------------------------------------------------------------------
# A small model and two layouts
# ---------------------------------------------------------------------------------
EMB = "model.embed_tokens.weight"
Q = "model.layers.0/attn.q.weight"
DOWN = "model.layers.0/mlp.down_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"
POS = "model.position_ids"
MASK = "model.layers.0/attn.mask"
SCALE = "model.logit_scale"
EMPTY = "model.empty.bias"
ADAM_M = "adam_m.model.layers.0/attn.q.weight"
ADAM_V = "adam_v.model.layers.0/attn.q.weight"
HEAD = "lm_head.weight"

TENSORS: dict[str, tuple[list[int], str]] = {
    EMB: ([10, 6], "BF16"),
    Q: ([7, 5], "F32"),
    DOWN: ([5, 9], "F8_E4M3"),
    NORM: ([6], "F16"),
    POS: ([11], "I64"),
    MASK: ([3, 4], "BOOL"),
    SCALE: ([], "F32"),
    EMPTY: ([0, 3], "F32"),
    ADAM_M: ([7, 5], "F32"),
    ADAM_V: ([7, 5], "F32"),
    HEAD: ([10, 6], "BF16"),
}
FULL = make_tensors(TENSORS, seed=7)
TOTAL = sum(a.nbytes for a in FULL.values())


def _doc(mesh: dict, layouts: dict) -> dict:
    return {"format": FMT, "mesh": mesh,
            "tensors": {n: {"shape": TENSORS[n][0], "dtype": TENSORS[n][1], **layouts.get(n, {})}
                        for n in TENSORS}}


PP2DP2TP2 = _doc({"pp": 2, "dp": 2, "tp": 2}, {
    EMB: {"split": ["tp", None], "stage": 0},
    Q: {"split": ["tp", None], "stage": 0, "zero": "dp"},
    DOWN: {"split": [None, "tp"], "stage": 1, "zero": "dp"},
    NORM: {"stage": 0},
    POS: {"zero": "dp"},
    MASK: {"split": ["dp", "tp"]},
    EMPTY: {"split": ["tp"]},
    ADAM_M: {"split": ["tp", None], "stage": 0, "zero": "dp"},
    ADAM_V: {"split": ["tp", None], "stage": 0, "zero": "dp"},
    HEAD: {"split": ["tp", None], "stage": 1},
})
TP3 = _doc({"tp": 3}, {
    EMB: {"split": ["tp", None]},
    Q: {"split": ["tp", None]},
    DOWN: {"split": [None, "tp"]},
    POS: {"split": ["tp"]},
    MASK: {"split": [None, "tp"]},
    EMPTY: {"split": [None, "tp"]},
    ADAM_M: {"split": [None, "tp"]},
    ADAM_V: {"split": ["tp"]},
    HEAD: {"split": [None, "tp"]},
})

# three one-tensor rank files: rank r's file is read only by the rank writing tensor t<r>
TRIO_TENSORS = {f"t{r}": ([16], "F32") for r in range(3)}
TRIO = make_tensors(TRIO_TENSORS, seed=3)
TRIO_DOC = {"format": FMT, "mesh": {"r": 3},
            "tensors": {f"t{r}": {"shape": [16], "dtype": "F32",
                                  "boxes": {r: {"offsets": [0], "sizes": [16]}}}
                        for r in range(3)}}
#: the same tensors, each moved to the next rank: t<r> on rank r + 1 (mod 3)
ROTATED_TRIO_DOC = {**TRIO_DOC, "tensors": {
    f"t{r}": {"shape": [16], "dtype": "F32", "boxes": {(r + 1) % 3: {"offsets": [0], "sizes": [16]}}}
    for r in range(3)}}
NO_WRITE = CopyOptions(fsync=False, progress=False)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtypes: dict[str, str]) -> Path:
    head, _ = build_header([(n, dtypes[n], a.shape) for n, a in tensors.items()], {"format": "pt"})
    with open(path, "wb") as f:
        f.write(head)
        for a in tensors.values():
            f.write(a.tobytes())
    return path


def write_yaml(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Inputs shared by the module (tests copy what they modify)."""
    d = tmp_path_factory.mktemp("cli-data")
    out = {
        "model": write_safetensors(d / "model.safetensors", FULL,
                                   {n: dt for n, (_, dt) in TENSORS.items()}),
        "s8": write_yaml(d / "pp2dp2tp2.yaml", PP2DP2TP2),
        "s3": write_yaml(d / "tp3.yaml", TP3),
        "trio_model": write_safetensors(d / "trio.safetensors", TRIO,
                                        {n: "F32" for n in TRIO}),
        "trio_yaml": write_yaml(d / "trio.yaml", TRIO_DOC),
    }
    # distributed checkpoints made in-process (no MPI)
    out["dist8"] = d / "dist8"
    hpcckpt.split(str(out["model"]), str(out["dist8"]), hpcckpt.load_strategy(out["s8"]),
                  options=NO_WRITE)
    out["dist8_dedup"] = d / "dist8_dedup"
    hpcckpt.split(str(out["model"]), str(out["dist8_dedup"]), hpcckpt.load_strategy(out["s8"]),
                  dedup=True, options=NO_WRITE)
    out["trio"] = d / "trio"
    hpcckpt.split(str(out["trio_model"]), str(out["trio"]), hpcckpt.load_strategy(out["trio_yaml"]),
                  options=NO_WRITE)
    return out


# ---------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------
def cli(args, n=None, **kw) -> subprocess.CompletedProcess:
    return run_cli([os.fspath(a) for a in args], n=n, timeout=TIMEOUT, **kw)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
    return p


def has_error(p: subprocess.CompletedProcess, line: str) -> None:
    """Non-zero exit and ``line`` exactly, as one line of stderr."""
    assert p.returncode != 0, f"expected failure\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
    assert line in p.stderr.splitlines(), f"want line:\n{line}\n--- stderr was:\n{p.stderr}"


def run_ranks(args, n: int, timeout: float = TIMEOUT, prelude: str = ""):
    """``helpers.run_ranks`` with this module's timeout."""
    return helpers.run_ranks(args, n, prelude=prelude, timeout=timeout)


def fails_everywhere(args, n: int, line: str, prelude: str = "") -> subprocess.CompletedProcess:
    p, codes, seconds = run_ranks(args, n, prelude=prelude)
    has_error(p, line)
    assert sorted(codes) == list(range(n)), f"not every rank reported its exit: {codes}\n{p.stderr}"
    assert all(c != 0 for c in codes.values()), f"a rank exited 0: {codes}\n{p.stderr}"
    assert seconds < 30, f"took {seconds:.1f} s"
    # rank 0 alone prints the error, once, naming every failing rank
    assert p.stderr.splitlines() == [line], p.stderr
    return p




def check_complete(out: Path, names=None, weight_map: dict | None = None) -> None:
    names = list(TENSORS) if names is None else names
    if weight_map is None:
        idx = out / "model.safetensors.index.json"
        weight_map = (json.loads(idx.read_text())["weight_map"] if idx.exists()
                      else {n: "model.safetensors" for n in names})
    assert sorted(weight_map) == sorted(names)
    for n in names:
        assert_bytes_equal(read_tensor(out / weight_map[n], n), FULL[n], n)


def copy_dist(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------
# split / merge / reshard round trips
# ---------------------------------------------------------------------------------
def test_split_merge_n8_summary_once(data, tmp_path):
    dist, out = tmp_path / "dist", tmp_path / "out"
    s = hpcckpt.load_strategy(data["s8"])
    p = ok(cli(["split", data["model"], dist, "--strategy", data["s8"], "--dedup",
                "--prefix", "llama", "--no-fsync"], n=8))
    lines = p.stdout.splitlines()
    assert len(lines) == 1, p.stdout
    written = format_bytes(TOTAL)  # dedup: every element stored exactly once
    assert re.fullmatch(rf"split: 8 file\(s\), {written} written, {written} read in "
                        rf"\d+\.\d\d s \(\d+\.\d\d GB/s\) on 8 rank\(s\) -> {re.escape(str(dist))}",
                        lines[0]), lines[0]
    assert sorted(os.listdir(dist)) == sorted(["manifest.json", "strategy.yaml"]
                                              + [f"rank_{r}" for r in range(8)])
    for r in range(8):
        assert os.listdir(dist / f"rank_{r}") == [f"llama_rank_{r}.safetensors"]
    assert json.loads((dist / "manifest.json").read_text())["redundancy"] == "dedup"
    assert hpcckpt.load_strategy(dist / "strategy.yaml").to_dict() == s.to_dict()

    p = ok(cli(["merge", dist, out, "--no-fsync"], n=8))
    assert len(p.stdout.splitlines()) == 1 and p.stdout.startswith("merge: 1 file(s), "), p.stdout
    assert " on 8 rank(s) -> " in p.stdout
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    check_complete(out)
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="np") as f:
        assert sorted(f.keys()) == sorted(TENSORS)
        for n in (Q, POS, ADAM_M):
            assert_bytes_equal(f.get_tensor(n), FULL[n], n)


# Every rank reports at exit whether numpy was imported.
_REPORT_NUMPY = ("import atexit, os, sys\n"
                 "atexit.register(lambda: os.write(1, f'@@numpy {\"numpy\" in sys.modules}\\n'"
                 ".encode()))\n")


def test_contiguous_copies_never_import_numpy(data, tmp_path):
    """Start-up is part of every job's time (0.13 s per rank for numpy + ml_dtypes):
    split, merge and node-local reshard of contiguous runs move bytes without it; a
    strided copy of short runs loads it."""
    dist, out = tmp_path / "dist", tmp_path / "out"
    for args in (["split", data["trio_model"], dist, "--strategy", data["trio_yaml"]],
                 ["merge", dist, out]):
        p, codes, _ = run_ranks(args + ["--no-fsync"], 2, prelude=_REPORT_NUMPY)
        assert codes == {0: 0, 1: 0}, p.stderr
        assert re.findall(r"@@numpy (\w+)", p.stdout) == ["False", "False"], p.stdout
    for n in TRIO:
        assert_bytes_equal(read_tensor(out / "model.safetensors", n), TRIO[n], n)
    # node-local reshard, every tensor to another rank: bytes travel over MPI
    rotated = write_yaml(tmp_path / "rotated.yaml", ROTATED_TRIO_DOC)
    for j in range(2):
        node = tmp_path / f"node{j}"
        node.mkdir()
        for name in ("manifest.json", "strategy.yaml"):
            shutil.copy(dist / name, node / name)
        for r in range(j, 3, 2):
            shutil.copytree(dist / f"rank_{r}", node / f"rank_{r}")
    p, codes, _ = run_ranks(["reshard", tmp_path / "node{rank}", tmp_path / "moved{rank}",
                             "--strategy", rotated, "--node-local", "--json", "--no-fsync"], 2,
                            prelude=_REPORT_NUMPY)
    assert codes == {0: 0, 1: 0}, p.stderr
    assert re.findall(r"@@numpy (\w+)", p.stdout) == ["False", "False"], p.stdout
    # mpiexec forwards each rank's writes as they come: another rank's "@@..." line may
    # land between rank 0's JSON and its newline, so decode the object and ignore the rest
    summary = next(ln for ln in p.stdout.splitlines() if ln.startswith("{"))
    doc, _ = json.JSONDecoder().raw_decode(summary)
    # t0 (dir 0 -> file 1) and t1 (dir 1 -> file 2) change job rank; t2 (dir 2 -> file 0) not
    assert doc["bytes_sent"] == 2 * 64
    for r in range(3):
        got = tmp_path / f"moved{((r + 1) % 3) % 2}" / f"rank_{(r + 1) % 3}"
        assert_bytes_equal(read_tensor(next(got.glob("*.safetensors")), f"t{r}"),
                           TRIO[f"t{r}"], f"t{r}")
    # the control: DOWN is stored by column blocks, so merging it needs a strided copy
    p, codes, _ = run_ranks(["merge", data["dist8"], tmp_path / "out8", "--no-fsync"], 1,
                            prelude=_REPORT_NUMPY)
    assert codes == {0: 0} and re.findall(r"@@numpy (\w+)", p.stdout) == ["True"], p.stdout


def test_inspect_a_naming_file_describes_its_checkpoint(data, tmp_path):
    """manifest.json or an HF index stands for its directory (not a MindSpore strategy)."""
    by_dir = json.loads(ok(cli(["inspect", data["dist8"], "--json"])).stdout)
    by_file = json.loads(ok(cli(["inspect", data["dist8"] / "manifest.json", "--json"])).stdout)
    assert by_file == by_dir and by_dir["kind"] == "distributed"
    hf = tmp_path / "hf"
    ok(cli(["merge", data["dist8"], hf, "--max-shard-size", "200B", "--no-fsync"]))
    doc = json.loads(ok(cli(["inspect", hf / "model.safetensors.index.json", "--json"])).stdout)
    assert doc["kind"] == "complete" and doc["tensors"] == len(TENSORS) and doc["files"] > 1


def test_json_summary_rank0_only(data, tmp_path):
    dist = tmp_path / "dist"
    p = ok(cli(["split", data["model"], dist, "--strategy", data["s3"], "--json"], n=3))
    lines = p.stdout.splitlines()
    assert len(lines) == 1, p.stdout
    doc = json.loads(lines[0])
    assert doc["op"] == "split" and doc["files"] == 3 and doc["world_size"] == 3
    assert doc["dry_run"] is False and doc["dedup"] is False and doc["strategy_world_size"] == 3
    assert [r["rank"] for r in doc["per_rank"]] == [0, 1, 2]
    s = hpcckpt.load_strategy(data["s3"])
    full_bytes = sum(s.rank_bytes(r) for r in range(3))
    assert doc["bytes_written"] == full_bytes == sum(r["bytes_written"] for r in doc["per_rank"])
    assert doc["output"] == str(dist)
    assert (dist / "manifest.json").is_file()


def test_merge_summary_once_n3(data, tmp_path):
    out = tmp_path / "out"
    p = ok(cli(["merge", data["dist8"], out], n=3))
    lines = p.stdout.splitlines()
    assert len(lines) == 1, p.stdout
    t = format_bytes(TOTAL)
    assert re.fullmatch(rf"merge: 1 file\(s\), {t} written, {t} read in \d+\.\d\d s "
                        rf"\(\d+\.\d\d GB/s\) on 3 rank\(s\) -> {re.escape(str(out))}", lines[0])
    check_complete(out)


def test_merge_max_shard_size_index_n8(data, tmp_path):
    out = tmp_path / "out"
    p = ok(cli(["merge", data["dist8_dedup"], out, "--max-shard-size", "200B", "--json"], n=8))
    doc = json.loads(p.stdout)
    n = doc["files"]
    assert n >= 3, doc
    shards = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert doc["shards"] == shards
    assert sorted(os.listdir(out)) == sorted(shards + ["model.safetensors.index.json"])
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert idx["metadata"]["total_size"] == TOTAL
    assert set(idx["weight_map"].values()) == set(shards)
    for f in shards:  # every shard's tensors add up to at most 200 bytes unless it holds one
        h = read_header(out / f)
        data_bytes = sum(e.nbytes for e in h.tensors.values())
        assert data_bytes <= 200 or len(h.tensors) == 1, (f, data_bytes)
    check_complete(out)
    # the sharded HF directory (index + shards) is itself a valid input
    dist = tmp_path / "dist"
    ok(cli(["split", out, dist, "--strategy", data["s3"], "--no-fsync"]))
    s = hpcckpt.load_strategy(data["s3"])
    for r in range(3):
        f = dist / f"rank_{r}" / f"model_rank_{r}.safetensors"
        for t, box in s.rank_boxes(r):
            sl = tuple(slice(o, o + z) for o, z in zip(box.offsets, box.sizes))
            assert_bytes_equal(read_tensor(f, t.name), FULL[t.name][sl], f"rank {r} {t.name}")


def test_merge_exclude_prefix_and_suffix(data, tmp_path):
    out = tmp_path / "out"
    ok(cli(["merge", data["dist8"], out, "--exclude-prefix", "adam_m.", "--exclude-prefix",
            "adam_v.", "--file-suffix", "fp", "--no-fsync"], n=3))
    assert sorted(os.listdir(out)) == ["model_fp.safetensors"]
    keep = [n for n in TENSORS if not n.startswith("adam_")]
    check_complete(out, keep, {n: "model_fp.safetensors" for n in keep})
    out2 = tmp_path / "out2"
    p = cli(["merge", data["dist8"], out2, "--exclude-prefix", "model.", "--exclude-prefix",
             "adam_", "--exclude-prefix", "lm_head."])
    has_error(p, f"hpcckpt merge: error: rank 0: {data['dist8']}: no tensor left to merge after "
                 "--exclude-prefix")
    assert not out2.exists()


def test_merge_layout_ms(data, tmp_path):
    dist, out = copy_dist(data["dist8"], tmp_path / "dist"), tmp_path / "out"
    (dist / "rank_0" / "meta.json").write_text(
        json.dumps({"last_epoch": 3, "last_step": 42, "last_ckpt_file": "x"}))
    ok(cli(["merge", dist, out, "--layout", "ms", "--max-shard-size", "150B"], n=3))
    names = sorted(os.listdir(out))
    parts = [n for n in names if n.startswith("part")]
    assert len(parts) >= 2 and parts == sorted(f"part{i}.safetensors" for i in range(len(parts)))
    assert sorted(set(names) - set(parts)) == ["hyper_param.safetensors", "param_name_map.json"]
    name_map = json.loads((out / "param_name_map.json").read_text())["weight_map"]
    assert set(name_map.values()) == set(parts)
    check_complete(out, list(TENSORS), name_map)
    hp = out / "hyper_param.safetensors"
    assert int(read_tensor(hp, "epoch_num")) == 3 and int(read_tensor(hp, "step_num")) == 42


def test_reshard_then_inspect_and_merge(data, tmp_path):
    dist2, out = tmp_path / "dist2", tmp_path / "out"
    p = ok(cli(["reshard", data["dist8"], dist2, "--strategy", data["s3"], "--dedup",
                "--json"], n=3))
    doc = json.loads(p.stdout)
    assert doc["op"] == "reshard" and doc["files"] == 3 and doc["dedup"] is True
    assert doc["transport"] == "shared-fs" and doc["bytes_written"] == TOTAL
    p = ok(cli(["inspect", dist2, "--json"]))
    info = json.loads(p.stdout)
    assert (info["kind"], info["world_size"], info["redundancy"], info["complete"]) == \
        ("distributed", 3, "dedup", True)
    assert info["mesh"] == {"tp": 3} and info["tensors"] == len(TENSORS)
    ok(cli(["merge", dist2, out]))
    check_complete(out)


# ---------------------------------------------------------------------------------
# dry run
# ---------------------------------------------------------------------------------
def test_dry_run_prints_plan_writes_nothing(data, tmp_path):
    out = tmp_path / "out"
    p = ok(cli(["merge", data["dist8"], out, "--dry-run"], n=3))
    lines = p.stdout.splitlines()
    assert lines[0] == (f"merge plan (dry run, nothing written): 1 file(s), "
                        f"{format_bytes(TOTAL)} to write on 3 rank(s)"), p.stdout
    assert lines[1].split() == ["rank", "bytes_read", "bytes_written"]
    assert [ln.split()[0] for ln in lines[2:]] == ["0", "1", "2"]
    assert len(lines) == 5
    assert not out.exists()

    dist = tmp_path / "dist"
    p = ok(cli(["split", data["model"], dist, "--strategy", data["s8"], "--dry-run", "--json"],
               n=3))
    doc = json.loads(p.stdout)
    assert len(p.stdout.splitlines()) == 1
    assert doc["dry_run"] is True and doc["files"] == 8 and len(doc["per_rank"]) == 3
    s = hpcckpt.load_strategy(data["s8"])
    assert doc["bytes_written"] == sum(s.rank_bytes(r) for r in range(8))
    assert not dist.exists()


# ---------------------------------------------------------------------------------
# inspect and strategy show
# ---------------------------------------------------------------------------------
def test_inspect_human_and_json(data, tmp_path):
    p = ok(cli(["inspect", data["model"], "--json"]))
    info = json.loads(p.stdout)
    assert info["kind"] == "complete" and info["tensors"] == len(TENSORS)
    assert info["unique_bytes"] == TOTAL and info["files"] == 1 and info["complete"] is True
    assert info["dtypes"] == {"BF16": 2, "F32": 5, "F8_E4M3": 1, "F16": 1, "I64": 1, "BOOL": 1}

    p = ok(cli(["inspect", data["dist8"], "--tensors"]))
    lines = p.stdout.splitlines()
    assert f"{'kind':>18}: distributed" in lines
    assert f"{'world_size':>18}: 8" in lines
    assert f"{'redundancy':>18}: full" in lines
    assert f"{'unique_bytes':>18}: {format_bytes(TOTAL)} ({TOTAL} bytes)" in lines
    assert f"{'complete':>18}: True" in lines
    assert f"  {Q}  F32 [7, 5]  chunks=4" in lines  # 2 tp x 2 dp pieces
    assert f"  {EMPTY}  F32 [0, 3]  chunks=0" in lines

    p = ok(cli(["inspect", data["s8"], "--json"]))
    info = json.loads(p.stdout)
    assert info["kind"] == "strategy" and info["world_size"] == 8
    assert list(info["mesh"]) == ["pp", "dp", "tp"]

    # under mpiexec only rank 0 prints
    p = ok(cli(["inspect", data["dist8"], "--json"], n=3))
    assert len(p.stdout.splitlines()) == 1 and json.loads(p.stdout)["complete"] is True

    # a rank file gone: inspect reports the problem
    broken = copy_dist(data["dist8"], tmp_path / "broken")
    (broken / "rank_5" / "model_rank_5.safetensors").unlink()
    p = cli(["inspect", broken, "--json"])
    assert p.returncode == 1, p.stderr   # not complete: the report says why, the status too
    info = json.loads(p.stdout)
    assert info["complete"] is False
    assert info["problems"] == ["missing file rank_5/model_rank_5.safetensors"]

    # a distributed checkpoint whose manifest never got written
    partial = copy_dist(data["dist8"], tmp_path / "unfinished")
    (partial / "manifest.json").unlink()
    p = cli(["inspect", partial, "--json"])
    assert p.returncode == 1, p.stderr
    info = json.loads(p.stdout)
    assert info == {"kind": "distributed", "path": str(partial), "complete": False,
                    "problem": "no manifest.json: the write did not finish"}


def test_strategy_show(data):
    s = hpcckpt.load_strategy(data["s3"])
    per_rank = [s.rank_bytes(r) for r in range(3)]
    p = ok(cli(["strategy", "show", data["s3"]]))
    assert p.stdout == (f"mesh tp3 = 3 ranks, {len(TENSORS)} tensors, {format_bytes(TOTAL)} "
                        f"unique, {format_bytes(min(per_rank))}..{format_bytes(max(per_rank))} "
                        "per rank\n")

    p = ok(cli(["strategy", "show", data["s3"], "--tensor", Q]))
    # Q: F32 [7, 5] split [tp, null] -> rows 3, 2, 2
    assert p.stdout.splitlines() == [
        f"{Q}: F32 [7, 5] on mesh tp3",
        "  rank    0 (tp=0): [0:3, 0:5]  60 B  replicas [0]",
        "  rank    1 (tp=1): [3:5, 0:5]  40 B  replicas [1]",
        "  rank    2 (tp=2): [5:7, 0:5]  40 B  replicas [2]",
    ]

    p = ok(cli(["strategy", "show", data["s8"], "--tensor", NORM, "--json"]))
    doc = json.loads(p.stdout)
    assert doc["tensor"] == NORM and doc["shape"] == [6] and doc["dtype"] == "F16"
    assert [r["box"] for r in doc["ranks"]] == \
        [{"offsets": [0], "sizes": [6]}] * 4 + [None] * 4  # stage 0 = pp coordinate 0

    p = ok(cli(["strategy", "show", data["s8"], "--yaml"]))
    doc = yaml.safe_load(p.stdout)
    assert list(doc["mesh"]) == ["pp", "dp", "tp"]  # mesh order kept, not sorted
    assert hpcckpt.strategy_from_dict(doc).to_dict() == \
        hpcckpt.load_strategy(data["s8"]).to_dict()

    p = cli(["strategy", "show", data["s3"], "--tensor", "nope"])
    has_error(p, f"hpcckpt strategy: error: rank 0: {data['s3']}: no tensor 'nope'")


# ---------------------------------------------------------------------------------
# errors: every rank exits non-zero, quickly, with the exact message; nothing complete
# ---------------------------------------------------------------------------------
def test_error_missing_input(data, tmp_path):
    missing, out = tmp_path / "nope.safetensors", tmp_path / "out"
    fails_everywhere(["split", missing, out, "--strategy", data["s3"]], 3,
                     f"hpcckpt split: error: ranks 0-2: {missing}: no such file or directory")
    assert not out.exists()
    p = cli(["merge", tmp_path / "nodist", out], n=1)
    has_error(p, f"hpcckpt merge: error: rank 0: {tmp_path / 'nodist'}: no such file or directory")
    assert not out.exists()


def _bad_file(path: Path, header: dict, data_len: int, length: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    n = len(raw) if length is None else length
    path.write_bytes(n.to_bytes(8, "little") + raw + bytes(data_len))
    return path


def _one_tensor_strategy(tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "s.yaml", {"format": FMT, "mesh": {"tp": 3}, "tensors": {
        "a": {"shape": [4], "dtype": "F32", "split": ["tp"]},
        "b": {"shape": [4], "dtype": "F32"}}})


@pytest.mark.parametrize("case", ["header_beyond_file", "overlap", "size_mismatch"])
def test_error_malformed_safetensors(tmp_path, case):
    s = _one_tensor_strategy(tmp_path)
    bad, out = tmp_path / "bad.safetensors", tmp_path / "out"
    if case == "header_beyond_file":
        _bad_file(bad, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 16,
                  length=4096)
        msg = (f"{bad}: header length 4096 goes beyond the end of the file "
               f"({bad.stat().st_size} bytes)")
    elif case == "overlap":
        _bad_file(bad, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, 24)
        msg = f"{bad}: tensors 'a' (bytes 0-16) and 'b' (bytes 8-24) overlap"
    else:
        _bad_file(bad, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, 12)
        msg = f"{bad}: tensor 'a': F32 [4] needs 16 bytes but data_offsets [0, 12] hold 12"
    fails_everywhere(["split", bad, out, "--strategy", s], 3,
                     f"hpcckpt split: error: ranks 0-2: {msg}")
    assert_nothing_complete(out)
    p = cli(["inspect", bad])
    has_error(p, f"hpcckpt inspect: error: rank 0: {msg}")


def test_error_index_names_file_outside(data, tmp_path):
    model = tmp_path / "hf"
    model.mkdir()
    shutil.copy(data["model"], tmp_path / "evil.safetensors")  # exists, but must not be read
    idx = model / "model.safetensors.index.json"
    idx.write_text(json.dumps({"metadata": {"total_size": TOTAL},
                               "weight_map": {n: "../evil.safetensors" for n in TENSORS}}))
    out = tmp_path / "out"
    fails_everywhere(["split", model, out, "--strategy", data["s3"]], 3,
                     f"hpcckpt split: error: ranks 0-2: {idx}: names file '../evil.safetensors' "
                     f"outside its directory {model}")
    assert_nothing_complete(out)


def test_error_strategy_unknown_axis(data, tmp_path):
    bad = write_yaml(tmp_path / "bad.yaml", {"format": FMT, "mesh": {"tp": 2}, "tensors": {
        "w": {"shape": [4, 4], "dtype": "F32", "split": ["xx", None]}}})
    msg = f"{bad}: tensor 'w': unknown axis 'xx' in split[0] (mesh axes: tp)"
    out = tmp_path / "out"
    fails_everywhere(["split", data["model"], out, "--strategy", bad], 3,
                     f"hpcckpt split: error: ranks 0-2: {msg}")
    assert not out.exists()
    has_error(cli(["strategy", "show", bad]), f"hpcckpt strategy: error: rank 0: {msg}")


LAUNCH_MSG = ("SLURM_NTASKS=8 but the MPI world has 1 rank(s): launch with `srun` or "
              "`mpiexec -n 8` using the MPI that mpi4py was built against "
              "(or set HPCCKPT_SKIP_LAUNCH_CHECK=1)")


def test_launch_check_refuses(data, tmp_path):
    out = tmp_path / "out"
    args = ["split", data["model"], out, "--strategy", data["s3"]]
    p = cli(args, n=1, env={"SLURM_NTASKS": "8"})
    has_error(p, f"hpcckpt split: error: rank 0: {LAUNCH_MSG}")
    assert not out.exists()
    p = cli(["inspect", data["s3"]], env={"SLURM_NTASKS": "8"})  # no mpiexec at all
    has_error(p, f"hpcckpt inspect: error: rank 0: {LAUNCH_MSG}")
    assert p.stdout == ""
    ok(cli(args, n=1, env={"SLURM_NTASKS": "8", "HPCCKPT_SKIP_LAUNCH_CHECK": "1"}))
    assert (out / "manifest.json").is_file()


def test_error_output_not_empty(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    fails_everywhere(["split", data["model"], out, "--strategy", data["s3"]], 3,
                     f"hpcckpt split: error: rank 0: {out}: output directory is not empty "
                     "(pass --overwrite to replace it)")
    assert os.listdir(out) == ["keep.txt"]
    ok(cli(["split", data["model"], out, "--strategy", data["s3"], "--overwrite"], n=3))
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_leftovers_of_a_killed_job_are_removed(data, tmp_path):
    """kill -9 leaves the lock file and the job's temporary files: the next job takes
    the lock, sees that its holder (on this host) has ended, and removes them without
    --overwrite."""
    out = tmp_path / "out"
    (out / "rank_1").mkdir(parents=True)
    holder = (f"hpcckpt split, pid {_dead_pid()} on {os.uname().nodename}, since 2026-12-01 "
              "10:00:00 UTC")
    (out / ".hpcckpt.lock").write_text(holder + "\n")
    (out / "rank_1" / "model_rank_1.safetensors.0badf00d.partial").write_bytes(b"x" * 100)
    (out / "manifest.json.0badf00d.partial").write_bytes(b"{")
    p = ok(cli(["split", data["model"], out, "--strategy", data["s3"]], n=3))
    assert p.stderr.splitlines() == [
        f"hpcckpt: {out}: removed 2 temporary file(s) of an unfinished job ({holder})"]
    assert not list(out.rglob("*.partial")) and not (out / ".hpcckpt.lock").exists()
    assert ok(cli(["verify", out, "--json"])).returncode == 0


@pytest.mark.parametrize("holder", [
    "hpcckpt split, pid {pid} on another-node-{host}, since 2026-12-01 10:00:00 UTC",  # remote
    "hpcckpt split, pid {own} on {host}, since 2026-12-01 10:00:00 UTC",  # alive (the test)
    None])                                                                # no lock file
def test_leftovers_need_overwrite_unless_their_job_provably_ended(data, tmp_path, holder):
    """Locks prove nothing across hosts where the filesystem keeps them per client (NFS
    mounted nolock): a holder on another host, a live one, or none: OUT is refused."""
    out = tmp_path / "out"
    out.mkdir()
    if holder is not None:
        (out / ".hpcckpt.lock").write_text(holder.format(
            pid=_dead_pid(), own=os.getpid(), host=os.uname().nodename) + "\n")
    (out / "model.safetensors.0badf00d.partial").write_bytes(b"x")
    fails_everywhere(["split", data["model"], out, "--strategy", data["s3"]], 3,
                     f"hpcckpt split: error: rank 0: {out}: output directory is not empty "
                     "(pass --overwrite to replace it)")
    assert "model.safetensors.0badf00d.partial" in os.listdir(out)


def test_leftovers_beside_other_files_need_overwrite(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".hpcckpt.lock").write_text(f"hpcckpt split, pid {_dead_pid()} on "
                                       f"{os.uname().nodename}, since 2026-12-01 10:00:00 UTC\n")
    (out / "model.safetensors.0badf00d.partial").write_bytes(b"x")
    (out / "notes.partial").write_text("not a temporary name")   # no job token: the user's
    fails_everywhere(["split", data["model"], out, "--strategy", data["s3"]], 3,
                     f"hpcckpt split: error: rank 0: {out}: output directory is not empty "
                     "(pass --overwrite to replace it)")
    assert sorted(os.listdir(out)) == ["model.safetensors.0badf00d.partial", "notes.partial"]


def test_error_rank_file_deleted(data, tmp_path):
    dist, out = copy_dist(data["trio"], tmp_path / "dist"), tmp_path / "out"
    gone = dist / "rank_2" / "model_rank_2.safetensors"
    gone.unlink()
    # rank 2 writes t2, the only tensor of rank_2's file: only rank 2 fails
    fails_everywhere(["merge", dist, out], 3,
                     f"hpcckpt merge: error: rank 2: {gone}: file not found")
    assert_nothing_complete(out)
    p = cli(["merge", dist, out, "--overwrite"], n=1)
    has_error(p, f"hpcckpt merge: error: rank 0: {gone}: file not found")
    assert_nothing_complete(out)


def test_error_truncated_rank_file(data, tmp_path):
    dist, out = copy_dist(data["trio"], tmp_path / "dist"), tmp_path / "out"
    f = dist / "rank_1" / "model_rank_1.safetensors"
    start = read_header(f).data_start
    os.truncate(f, start + 10)
    p = cli(["merge", dist, out], n=1)
    has_error(p, f"hpcckpt merge: error: rank 0: {f}: tensor 't1': data_offsets [0, 64] are "
                 "outside the data region of 10 bytes")
    assert_nothing_complete(out)
    os.truncate(f, 20)  # cut inside the header
    (length,) = np.frombuffer(f.read_bytes()[:8], "<u8")
    p = cli(["merge", dist, out, "--overwrite"])
    has_error(p, f"hpcckpt merge: error: rank 0: {f}: header length {length} goes beyond the "
                 "end of the file (20 bytes)")
    assert_nothing_complete(out)


def test_one_rank_fails_mid_copy(data, tmp_path):
    """Only the rank that reads the truncated file fails; the others finish their copy and
    then every rank exits non-zero, quickly, and the half-written output is removed."""
    dist, out = copy_dist(data["trio"], tmp_path / "dist"), tmp_path / "out"
    f = dist / "rank_1" / "model_rank_1.safetensors"
    os.truncate(f, read_header(f).data_start + 10)
    p = fails_everywhere(["merge", dist, out, "--no-fsync"], 3,
                         f"hpcckpt merge: error: rank 1: {f}: tensor 't1': data_offsets [0, 64] "
                         "are outside the data region of 10 bytes")
    assert "ranks" not in p.stderr  # ranks 0 and 2 did not fail
    assert not out.exists()  # the job had started writing, created OUT and removed it


def test_reshard_names_a_bad_manifest_chunk_before_writing(data, tmp_path):
    """Reshard decodes the manifest lazily, tensor by tensor: the rank whose file needs
    the damaged tensor names it in the plan step, before any output exists."""
    dist, out = copy_dist(data["trio"], tmp_path / "dist"), tmp_path / "out"
    doc = read_manifest(dist).expanded()
    doc["tensors"]["t1"]["chunks"][0]["offsets"] = [8]
    (dist / "manifest.json").write_text(json.dumps(doc))
    rotated = write_yaml(tmp_path / "rotated.yaml", ROTATED_TRIO_DOC)
    p = fails_everywhere(["reshard", dist, out, "--strategy", rotated, "--no-fsync"], 3,
                         f"hpcckpt reshard: error: rank 2: {dist / 'manifest.json'}: tensor "
                         "'t1' chunk [8:24] in rank_1/model_rank_1.safetensors lies outside "
                         "shape [16]")
    assert "ranks" not in p.stderr   # ranks 0 and 1 write t2 and t0
    assert not out.exists()


def test_trio_merges_when_intact(data, tmp_path):
    """Control for the failure tests above: the same command succeeds on intact input."""
    out = tmp_path / "out"
    ok(cli(["merge", data["trio"], out], n=3))
    for n, a in TRIO.items():
        assert_bytes_equal(read_tensor(out / "model.safetensors", n), a, n)


def test_error_strategy_disagrees_with_source(data, tmp_path):
    doc = json.loads(json.dumps(TP3))
    doc["tensors"][Q]["shape"] = [8, 5]
    bad = write_yaml(tmp_path / "q8.yaml", doc)
    out = tmp_path / "out"
    p = cli(["split", data["model"], out, "--strategy", bad])
    has_error(p, f"hpcckpt split: error: rank 0: tensor {Q!r} is F32 [7, 5] in {data['model']} "
                 "but F32 [8, 5] in the strategy")
    assert not out.exists()
    del doc["tensors"][Q]
    bad = write_yaml(tmp_path / "noq.yaml", doc)
    p = cli(["reshard", data["dist8"], out, "--strategy", bad])
    has_error(p, f"hpcckpt reshard: error: rank 0: tensor {Q!r} is in {data['dist8']} but not "
                 "in the destination strategy")
    assert not out.exists()


# ---------------------------------------------------------------------------------
# regressions for bugs found by these tests (fixed)
# ---------------------------------------------------------------------------------
_ENOSPC_ON_INDEX = """
import errno
import hpcckpt.ops.commit as _c
_write = _c.atomic_write_bytes
def _full_disk(path, *a, **k):
    if str(path).endswith(".index.json"):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return _write(path, *a, **k)
_c.atomic_write_bytes = _full_disk
"""


def test_failed_index_write_leaves_nothing_complete(data, tmp_path):
    out = tmp_path / "out"
    p, codes, _ = run_ranks(["merge", data["dist8"], out, "--max-shard-size", "200B"], 3,
                            prelude=_ENOSPC_ON_INDEX)
    assert p.returncode != 0 and codes and all(c != 0 for c in codes.values()), p.stderr
    assert "No space left on device" in p.stderr
    q = cli(["inspect", out, "--json"])
    info = json.loads(q.stdout) if q.returncode == 0 else {}
    assert info.get("complete") is not True, f"failed merge output looks complete: {info}"
    assert_nothing_complete(out)


@pytest.mark.parametrize("cmd", ["reshard", "merge", "split"])
def test_output_overlapping_input_is_refused(data, tmp_path, cmd):
    if cmd == "split":
        src = tmp_path / "hf"
        src.mkdir()
        shutil.copy(data["model"], src / "model.safetensors")
        args = ["split", src / "model.safetensors", src, "--strategy", data["s3"]]
        keep = src / "model.safetensors"
    else:
        src = copy_dist(data["dist8"], tmp_path / "dist")
        args = [cmd, src, src] + (["--strategy", data["s3"]] if cmd == "reshard" else [])
        keep = src / "manifest.json"
    p = cli(args + ["--overwrite"])
    assert keep.exists(), f"{cmd} deleted its own input {keep} (exit {p.returncode}: {p.stderr})"
    assert p.returncode != 0


# ---------------------------------------------------------------------------------
# load: every unique byte read once, replicas over MPI, exact comparison
# ---------------------------------------------------------------------------------
DP3 = _doc({"dp": 3}, {})


def _load_json(args, n) -> dict:
    p = ok(cli(["load", *args, "--json"], n=n))
    assert len(p.stdout.splitlines()) == 1, p.stdout
    return json.loads(p.stdout)


@pytest.mark.parametrize("source", ["model", "dist8", "dist8_dedup"])
def test_load_reads_each_unique_byte_once(data, tmp_path, source):
    """Fully replicated (dp3): each byte read by one rank, the other two receive it."""
    s = write_yaml(tmp_path / "dp3.yaml", DP3)
    doc = _load_json([data[source], "--strategy", s, "--against", data["model"]], n=3)
    reads = [r["bytes_read"] for r in doc["per_rank"]]
    assert sum(reads) == doc["unique_bytes"] == TOTAL
    assert sum(r["bytes_received"] for r in doc["per_rank"]) == 2 * TOTAL
    assert doc["bytes_sent"] == 2 * TOTAL and doc["identical"] is True
    assert doc["bytes_compared"] == 3 * TOTAL
    assert max(reads) < TOTAL  # the reading is shared, not done by one rank


def test_load_tp3_from_dist_smallest_exchange(data, tmp_path):
    """The smallest messages and budget the CLI accepts (the API's tests go smaller)."""
    s = write_yaml(tmp_path / "tp3.yaml", TP3)
    doc = _load_json([data["dist8"], "--strategy", s, "--against", data["model"],
                      "--max-message", "64KiB", "--exchange-budget", "1MiB"], n=3)
    strat = hpcckpt.load_strategy(s)
    held = [strat.rank_bytes(r) for r in range(3)]
    assert [r["bytes_held"] for r in doc["per_rank"]] == held
    assert sum(r["bytes_read"] for r in doc["per_rank"]) == TOTAL
    assert sum(r["bytes_received"] for r in doc["per_rank"]) == sum(held) - TOTAL
    assert doc["bytes_compared"] == sum(held)


def test_load_human_summary(data):
    p = ok(cli(["load", data["dist8"], "--strategy", data["s3"], "--against", data["model"]], n=3))
    lines = p.stdout.splitlines()
    assert len(lines) == 2, p.stdout
    assert lines[0].startswith(f"load: {format_bytes(TOTAL)} read from disk "
                               f"({format_bytes(TOTAL)} unique), "), lines[0]
    assert lines[0].endswith(f"on 3 rank(s) <- {data['dist8']}"), lines[0]
    s = hpcckpt.load_strategy(data["s3"])
    assert lines[1] == (f"identical to {data['model']}: "
                        f"{format_bytes(sum(s.rank_bytes(r) for r in range(3)))} compared")


def test_load_against_differing_reference(data, tmp_path):
    bad = dict(FULL)
    q = bad[Q].copy()
    q.view(np.uint32)[4, 1] ^= 0xFFFFFFFF  # all four bytes of element [4, 1] differ
    bad[Q] = q
    ref = write_safetensors(tmp_path / "bad.safetensors", bad,
                            {n: dt for n, (_, dt) in TENSORS.items()})
    fails_everywhere(["load", data["dist8"], "--strategy", data["s3"], "--against", ref], 3,
                     f"hpcckpt load: error: rank 1: tensor '{Q}' [3:5, 0:5] differs from {ref} "
                     "at byte 24 of this rank's slice (4 differing byte(s) in bytes [0, 40))")


def test_load_wrong_world_size(data):
    fails_everywhere(["load", data["dist8"], "--strategy", data["s3"]], 2,
                     "hpcckpt load: error: strategy has 3 ranks but the job has 2; "
                     "launch with mpiexec -n 3")


def test_load_dry_run_plan(data, tmp_path):
    s = write_yaml(tmp_path / "dp3.yaml", DP3)
    doc = _load_json([data["model"], "--strategy", s, "--dry-run"], n=3)
    assert doc["dry_run"] is True and len(doc["per_rank"]) == 3
    assert sum(r["bytes_read"] for r in doc["per_rank"]) == TOTAL
    assert sum(r["bytes_received"] for r in doc["per_rank"]) == 2 * TOTAL


# ---------------------------------------------------------------------------------
# planning one rank of a bigger job, without MPI
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", [[], ["--node-local"]])
def test_simulated_rank_plan_matches_real_dry_run(data, tmp_path, transport):
    """Rank 5 of an 8-rank job planned alone equals rank 5's row of a real 8-rank dry run."""
    args = ["reshard", data["dist8"], tmp_path / "out", "--strategy", data["s8"], "--dry-run",
            "--json", *transport]
    sim = json.loads(ok(cli(args + ["--simulate-world", "8", "--simulate-rank", "5"])).stdout)
    real = json.loads(ok(cli(args, n=8)).stdout)
    assert sim["simulated"] is True and len(sim["per_rank"]) == 1
    mine = sim["per_rank"][0]
    row = real["per_rank"][5]
    keys = ["rank", "bytes_read", "bytes_written"] + (["bytes_sent", "bytes_received"]
                                                      if transport else [])
    assert {k: mine[k] for k in keys} == {k: row[k] for k in keys}
    assert mine["bytes_written"] == hpcckpt.load_strategy(data["s8"]).rank_bytes(5)
    assert not (tmp_path / "out").exists()


def test_simulated_plan_without_checkpoint(data, tmp_path):
    """A checkpoint that is not on this machine is planned from its strategy alone."""
    missing = tmp_path / "elsewhere"
    doc = json.loads(ok(cli(["load", missing, "--strategy", data["s8"], "--src-strategy",
                             data["s8"], "--dry-run", "--json", "--simulate-world", "8",
                             "--simulate-rank", "7"])).stdout)
    assert doc["simulated"] is True and len(doc["per_rank"]) == 1
    row = doc["per_rank"][0]
    # the same rank of a real 8-rank dry run on the checkpoint split for that strategy
    real = _load_json([data["dist8"], "--strategy", data["s8"], "--dry-run"], n=8)
    keys = ("rank", "bytes_read", "bytes_received", "bytes_sent")
    assert {k: row[k] for k in keys} == {k: real["per_rank"][7][k] for k in keys}
    held = hpcckpt.load_strategy(data["s8"]).rank_bytes(7)
    assert row["rank"] == 7 and row["bytes_read"] + row["bytes_received"] == held > 0
    assert not missing.exists()
    p = cli(["load", missing, "--strategy", data["s8"], "--dry-run", "--simulate-world", "8"])
    has_error(p, f"hpcckpt load: error: {missing}: does not exist; a simulated dry run of a "
                 "checkpoint that is not here needs --src-strategy")


def test_simulate_needs_dry_run(data, tmp_path):
    p = cli(["reshard", data["dist8"], tmp_path / "o", "--strategy", data["s8"],
             "--simulate-world", "8"])
    assert p.returncode == 2
    has_error(p, "hpcckpt reshard: error: --simulate-world plans one rank of a job that is not "
                 "running; it needs --dry-run")
    p = cli(["reshard", data["dist8"], tmp_path / "o", "--strategy", data["s8"], "--dry-run",
             "--simulate-world", "8", "--simulate-rank", "8"])
    has_error(p, "hpcckpt reshard: error: --simulate-rank 8 is not a rank of a 8-rank job")


# ---------------------------------------------------------------------------------
# the command line as a new user meets it: floors, uniform flags, usage, errors in the
# user's words, one report per job, closed pipes
# ---------------------------------------------------------------------------------
def usage_error(p: subprocess.CompletedProcess, usage: str, line: str) -> None:
    """Exit 2, the (sub)command's usage line first, then exactly ``line``."""
    assert p.returncode == 2, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    lines = p.stderr.splitlines()
    assert lines[0].startswith(f"usage: {usage} "), p.stderr
    assert lines[-1] == line, p.stderr


def test_exchange_settings_below_the_floor_are_refused(data, tmp_path):
    p = cli(["load", data["dist8"], "--strategy", data["s3"], "--max-message", "1"])
    usage_error(p, "hpcckpt load", "hpcckpt load: error: argument --max-message: 1 is below "
                "the floor of 64.00 KiB (smaller messages make many tiny MPI calls)")
    p = cli(["reshard", data["dist8"], tmp_path / "out", "--strategy", data["s3"],
             "--node-local", "--exchange-budget", "1023KiB"])
    usage_error(p, "hpcckpt reshard", "hpcckpt reshard: error: argument --exchange-budget: "
                "1023KiB is below the floor of 1.00 MiB (smaller budgets make many tiny rounds)")
    assert not (tmp_path / "out").exists()


def test_every_command_takes_json_and_dry_run():
    """SPEC 3 and the README: every (sub)command, including those added later, except
    those that only print text on a login node without MPI (``jobs``)."""
    from hpcckpt.cli.main import _subparsers, build_parser
    leaves = [p for p in _subparsers(build_parser())
              if not any(isinstance(a, __import__("argparse")._SubParsersAction)
                         for a in p._actions) and p.get_default("needs_mpi") is not False]
    assert {"hpcckpt inspect", "hpcckpt strategy show", "hpcckpt split"} <= \
        {p.prog for p in leaves}
    for p in leaves:
        assert {"--json", "--dry-run", "--debug"} <= set(p._option_string_actions), p.prog


def test_a_run_builds_only_the_command_it_names():
    """Start-up is every rank's wall time: `hpcckpt verify` imports no other command, no
    copy machinery and no numpy; its parser is the full parser's `verify`."""
    from hpcckpt.cli.main import build_parser, named_command
    assert named_command(["--debug", "verify", "dist/"]) == "verify"
    assert named_command(["--help", "verify"]) is None and named_command(["bogus"]) is None
    assert named_command([]) is None
    argv = ["--debug", "verify", "dist/", "--quick", "--json"]
    assert build_parser().parse_args(argv) == build_parser(command="verify").parse_args(argv)
    code = ("import sys; from hpcckpt.cli.main import build_parser; "
            "build_parser(command='verify'); "
            "print(sorted(m for m in sys.modules if m.startswith(('hpcckpt.cli.', 'hpcckpt.ops', "
            "'numpy'))))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert eval(p.stdout) == ["hpcckpt.cli.common", "hpcckpt.cli.main", "hpcckpt.cli.verify"]


def test_read_only_commands_accept_dry_run_and_json(data):
    a = json.loads(ok(cli(["inspect", data["dist8"], "--json"])).stdout)
    b = json.loads(ok(cli(["inspect", data["dist8"], "--dry-run", "--json", "--debug"])).stdout)
    assert a == b and a["complete"] is True
    p = ok(cli(["strategy", "show", data["s3"], "--dry-run", "--json"]))
    assert json.loads(p.stdout)["world_size"] == 3


def test_argparse_errors_show_the_subcommands_usage(data):
    usage_error(cli(["inspect", data["dist8"], "--bogus"]), "hpcckpt inspect",
                "hpcckpt inspect: error: unrecognized arguments: --bogus")
    usage_error(cli(["strategy", "show", data["s3"], "--tensors"]), "hpcckpt strategy show",
                "hpcckpt strategy show: error: unrecognized arguments: --tensors")
    usage_error(cli(["split", data["model"]]), "hpcckpt split",
                "hpcckpt split: error: the following arguments are required: out, --strategy")


def test_errors_in_the_users_words(data, tmp_path):
    from hpcckpt.cli.main import build_parser
    p = cli(["split", data["model"], tmp_path / "out", "--strategy", data["s3"],
             "--buffer-size", "4XB"])
    usage_error(p, "hpcckpt split", "hpcckpt split: error: argument --buffer-size: '4XB': "
                "unknown unit 'XB' (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB; "
                "e.g. 5GB, 64MiB, 1048576)")
    p = cli(["merge", data["dist8"], tmp_path / "out", "--max-shard-size", "big"])
    usage_error(p, "hpcckpt merge", "hpcckpt merge: error: argument --max-shard-size: 'big' "
                "is not a size (e.g. 5GB, 500MB, 64MiB, 1048576)")
    assert not (tmp_path / "out").exists()

    actions = next(a for a in build_parser()._actions if a.dest == "command").choices
    strategy_actions = ", ".join(next(a for a in actions["strategy"]._actions
                                      if a.dest == "strategy_cmd").choices)
    usage_error(cli(["strategy"]), "hpcckpt strategy",
                f"hpcckpt strategy: error: `hpcckpt strategy` needs one of: {strategy_actions} "
                "(see `hpcckpt strategy --help`)")
    usage_error(cli([]), "hpcckpt", f"hpcckpt: error: `hpcckpt` needs one of: "
                f"{', '.join(actions)} (see `hpcckpt --help`)")

    hf = tmp_path / "some_hf_dir"
    ok(cli(["merge", data["dist8"], hf, "--max-shard-size", "200B", "--no-fsync"]))
    assert (hf / "model.safetensors.index.json").is_file()
    has_error(cli(["strategy", "show", hf]),
              f"hpcckpt strategy: error: rank 0: {hf}: is a checkpoint (safetensors files), "
              "not a strategy; give a strategy YAML file, or a distributed checkpoint "
              "directory holding strategy.yaml")


def test_an_error_on_every_rank_is_reported_once(data, tmp_path):
    missing, out = tmp_path / "nope.safetensors", tmp_path / "out"
    line = (f"hpcckpt split: error: ranks 0-2: {missing}: no such file or directory")
    p = fails_everywhere(["split", missing, out, "--strategy", data["s3"], "--json"], 3, line)
    assert p.stderr.splitlines() == [line], p.stderr   # no per-rank repetition
    report = [ln for ln in p.stdout.splitlines() if not ln.startswith("@@")]
    assert [json.loads(ln) for ln in report] == [
        {"error": f"ranks 0-2: {missing}: no such file or directory", "ranks": [0, 1, 2]}]


def test_a_one_rank_error_is_json_too(data, tmp_path):
    dist, out = copy_dist(data["trio"], tmp_path / "dist"), tmp_path / "out"
    f = dist / "rank_1" / "model_rank_1.safetensors"
    os.truncate(f, read_header(f).data_start + 10)
    msg = f"{f}: tensor 't1': data_offsets [0, 64] are outside the data region of 10 bytes"
    p = fails_everywhere(["merge", dist, out, "--no-fsync", "--json"], 3,
                         f"hpcckpt merge: error: rank 1: {msg}")
    report = [ln for ln in p.stdout.splitlines() if not ln.startswith("@@")]
    assert [json.loads(ln) for ln in report] == [{"error": f"rank 1: {msg}", "ranks": [1]}]
    # a usage error with --json: the same shape, printed once for the whole job
    p, codes, _ = run_ranks(["merge", dist, out, "--json", "--max-shard-size", "5XB"], 2)
    assert codes == {0: 2, 1: 2}, p.stderr
    report = [ln for ln in p.stdout.splitlines() if not ln.startswith("@@")]
    err = ("argument --max-shard-size: '5XB': unknown unit 'XB' (units: B, KB, MB, GB, TB, "
           "KiB, MiB, GiB, TiB; e.g. 5GB, 64MiB, 1048576)")
    assert [json.loads(ln) for ln in report] == [{"error": err, "ranks": [0, 1]}]
    assert p.stderr.count(err) == 1, p.stderr


def test_load_dry_run_in_one_process_points_at_simulate_world(data):
    p = cli(["load", data["dist8"], "--strategy", data["s3"], "--dry-run"])
    has_error(p, f"hpcckpt load: error: {data['s3']}: strategy has 3 ranks but the job has 1; "
                 "launch with mpiexec -n 3, or plan one of its ranks in this process with "
                 "--dry-run --simulate-world 3 --simulate-rank R")
    doc = json.loads(ok(cli(["load", data["dist8"], "--strategy", data["s3"], "--dry-run",
                             "--json", "--simulate-world", "3", "--simulate-rank", "2"])).stdout)
    assert [r["rank"] for r in doc["per_rank"]] == [2]


@pytest.mark.parametrize("args", [["inspect", "dist8", "--tensors"],
                                  ["merge", "dist8", "OUT", "--dry-run"]])
def test_a_closed_stdout_ends_quietly(data, tmp_path, args):
    """``hpcckpt inspect ... | head``: the reader left; no traceback, the status a shell
    gives a tool stopped by SIGPIPE (141)."""
    args = [data.get(a, tmp_path / "out" if a == "OUT" else a) for a in args]
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: the first write fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "hpcckpt", *map(os.fspath, args)],
                              stdout=write_end, stderr=subprocess.PIPE, text=True,
                              env=clean_env(), timeout=TIMEOUT)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, ""), proc.stderr


@pytest.mark.parametrize("env, expected", [
    ({}, True),                                                      # no launcher: one process
    ({"PMI_SIZE": "4", "MPI_LOCALNRANKS": "4", "PMI_RANK": "1"}, True),        # Hydra, one node
    ({"PMI_SIZE": "8", "MPI_LOCALNRANKS": "4", "PMI_RANK": "1"}, False),       # Hydra, two
    ({"PMI_SIZE": "8", "PMI_RANK": "1"}, False),                     # a PMI that does not say
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, False),
    ({"SLURM_PROCID": "0", "SLURM_NNODES": "1", "SLURM_NTASKS": "4"}, True),  # srun
    ({"SLURM_PROCID": "0", "SLURM_NNODES": "2", "SLURM_STEP_NUM_NODES": "1"}, True),
    ({"SLURM_PROCID": "3", "SLURM_NNODES": "2"}, False),
    ({"SLURM_NTASKS": "4"}, False),                                  # an allocation, no task
])
def test_one_node_from_the_launchers_environment(env, expected):
    # on one node the CLI turns UCX's memory hooks off (40 ms of start-up per rank)
    from hpcckpt.cli.main import one_node
    assert one_node(env) is expected
