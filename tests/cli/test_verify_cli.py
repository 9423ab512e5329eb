"""``hpcckpt verify`` on the command line: report, verdict, exit status on every rank,
messages word for word."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import hpcckpt
from hpcckpt.layout import strategy_from_dict, write_strategy_yaml
from hpcckpt.ops.filecopy import CopyOptions
from hpcckpt.formats.safetensors import read_header
from hpcckpt.storage.manifest import read_manifest

from helpers import make_tensors, run_cli, write_safetensors_file

FMT = "hpcckpt.strategy/1"
TENSORS = {"w": ([6, 4], "F32"), "b": ([6], "F16")}
DOC = {"format": FMT, "mesh": {"dp": 2, "tp": 2}, "tensors": {
    "w": {"shape": [6, 4], "dtype": "F32", "split": ["tp", None]},
    "b": {"shape": [6], "dtype": "F16", "split": ["tp"], "zero": "dp"}}}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verify_cli")
    full = make_tensors(TENSORS, seed=2)
    (root / "hf").mkdir()
    write_safetensors_file(root / "hf" / "model.safetensors", full,
                           {n: dt for n, (_, dt) in TENSORS.items()})
    s = strategy_from_dict(DOC, "s")
    write_strategy_yaml(s, root / "s.yaml")
    hpcckpt.split(str(root / "hf"), str(root / "dist"), s,
                  options=CopyOptions(fsync=False, progress=False))
    return root


def copy(ckpt: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ckpt / "dist", tmp_path / "dist"))


def test_clean_table_and_verdict(ckpt):
    p = run_cli(["verify", ckpt / "dist"], n=3)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == f"verify deep: {ckpt / 'dist'} (distributed, 4 file(s)) on 3 rank(s)"
    assert lines[1].split() == ["rank", "files", "checked", "seconds", "GB/s", "problems"]
    assert [ln.split()[0] for ln in lines[2:5]] == ["0", "1", "2"]
    assert lines[-1].startswith("OK: nothing wrong found (")
    assert len(lines) == 6


def test_json_one_line(ckpt):
    p = run_cli(["verify", ckpt / "dist", "--json", "--quick"], n=2)
    assert p.returncode == 0, p.stderr
    (line,) = p.stdout.splitlines()
    doc = json.loads(line)
    assert (doc["ok"], doc["mode"], doc["bytes_checked"], doc["problems"]) == \
        (True, "quick", 0, [])
    assert [r["rank"] for r in doc["per_rank"]] == [0, 1]


def test_coverage_and_mismatch_found(ckpt, tmp_path):
    d = copy(ckpt, tmp_path)
    m = read_manifest(d).expanded()   # format 1: every chunk listed, so one can be dropped
    chunks = m["tensors"]["w"]["chunks"]               # w's [3:6, 0:4] box, ranks 1 and 3
    dropped = [c for c in chunks if c["offsets"] == [3, 0]]
    m["tensors"]["w"]["chunks"] = [c for c in chunks if c["offsets"] != [3, 0]]
    m["tensors"]["b"]["dtype"] = "BF16"                  # every b header disagrees
    (d / "manifest.json").write_text(json.dumps(m))
    p = run_cli(["verify", d, "--quick"])
    assert p.returncode == 1, p.stderr
    lines = [ln.strip() for ln in p.stdout.splitlines()[3:-1]]
    assert [c["file"] for c in dropped] == ["rank_1/model_rank_1.safetensors",
                                            "rank_3/model_rank_3.safetensors"]
    b0 = read_header(d / "rank_0" / "model_rank_0.safetensors").tensors["b"]
    w1 = read_header(d / "rank_1" / "model_rank_1.safetensors").tensors["w"]
    assert lines[0] == ("mismatch: rank_0/model_rank_0.safetensors: tensor 'b' chunk [0:2]: "
                        f"bytes {b0.begin}-{b0.end}: header says F16 [2], the manifest BF16 [2] "
                        "(rank 0)")
    assert (f"mismatch: rank_1/model_rank_1.safetensors: tensor 'w': bytes {w1.begin}-{w1.end}: "
            "the header holds it but the manifest does not list it here (rank 0)") in lines
    assert ("coverage: manifest.json: tensor 'w': is incomplete: stored chunks cover 12 of 24 "
            "elements (rank 0)") in lines
    assert p.stdout.splitlines()[-1] == "FAILED: 7 problem(s) (metadata only in " + \
        p.stdout.splitlines()[-1].split(" in ", 1)[1]


def test_fast_path_finds_planted_problems(ckpt, tmp_path):
    # format 2 with every tensor given by the strategy: step 2 takes each file's chunks
    # from Strategy.rank_boxes of its rank; a wrong header and a bad entry are still found
    d = copy(ckpt, tmp_path)
    doc = json.loads((d / "manifest.json").read_text())
    assert all("chunks" not in t for t in doc["tensors"].values())   # the fast path
    doc["tensors"]["b"]["xxh3"] = doc["tensors"]["b"]["xxh3"][:16]  # 1 checksum, 4 chunks
    (d / "manifest.json").write_text(json.dumps(doc))
    f = d / "rank_2" / "model_rank_2.safetensors"
    raw = bytearray(f.read_bytes())
    at = raw.index(b'"shape":[3,4]')              # rank 2 holds w[0:3, 0:4]
    raw[at:at + 13] = b'"shape":[4,3]'
    f.write_bytes(bytes(raw))
    p = run_cli(["verify", d, "--quick"], n=2)
    assert p.returncode == 1, p.stderr
    lines = [ln.strip() for ln in p.stdout.splitlines()[4:-1]]
    hdr = {r: read_header(d / f"rank_{r}" / f"model_rank_{r}.safetensors").tensors
           for r in range(4)}
    w2 = hdr[2]["w"]
    unlisted = [f"mismatch: rank_{r}/model_rank_{r}.safetensors: tensor 'b': bytes "
                f"{hdr[r]['b'].begin}-{hdr[r]['b'].end}: the header holds it but the manifest "
                f"does not list it here (rank {r % 2})" for r in range(4)]
    assert lines == [
        unlisted[0],
        f"mismatch: rank_2/model_rank_2.safetensors: tensor 'w' chunk [0:3, 0:4]: bytes "
        f"{w2.begin}-{w2.end}: header says F32 [4, 3], the manifest F32 [3, 4] (rank 0)",
        unlisted[2], unlisted[1], unlisted[3],
        "coverage: manifest.json: tensor 'b': 'xxh3' must hold 4 checksums of 16 hex digits, "
        f"one per chunk of the strategy, got '{doc['tensors']['b']['xxh3']}' (rank 1)"], \
        p.stdout


@pytest.mark.parametrize("args, message", [
    (["verify", "{tmp}/nowhere"], "{tmp}/nowhere: no such file or directory"),
    (["verify", "{tmp}"], "{tmp}: no safetensors checkpoint here (no "
     "model.safetensors.index.json, manifest.json, rank_<r>/ directories or .safetensors files)"),
    (["verify", "{tmp}", "--quick", "--finite"], "--quick reads no tensor byte: it cannot be "
     "combined with --finite or --against"),
    (["verify", "{tmp}", "--atol", "1"], "--atol/--rtol need --against"),
])
def test_unusable_input_exits_2(tmp_path, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    p = run_cli(args, n=2)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stderr.splitlines() == [f"hpcckpt verify: error: {message.format(tmp=tmp_path)}"]


def test_usage_error_exits_2(ckpt):
    p = run_cli(["verify", ckpt / "dist", "--quick", "--deep"])
    assert p.returncode == 2
    assert "not allowed with argument --quick" in p.stderr


def test_every_rank_exits_1_on_problems(ckpt, tmp_path):
    d = copy(ckpt, tmp_path)
    (d / "rank_2" / "model_rank_2.safetensors").unlink()
    code = ("import sys, os\nfrom hpcckpt.cli.main import main\nfrom mpi4py import MPI\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    os.write(1, f'@@{MPI.COMM_WORLD.Get_rank()}={e.code}\\n'.encode())\n")
    from helpers import clean_env, find_mpiexec
    p = subprocess.run([find_mpiexec(), "-n", "3", sys.executable, "-c", code, "verify",
                        str(d)], env=clean_env(), capture_output=True, text=True, timeout=120)
    assert sorted(ln for ln in p.stdout.splitlines() if ln.startswith("@@")) == \
        ["@@0=1", "@@1=1", "@@2=1"], p.stdout + p.stderr
    assert "missing: rank_2/model_rank_2.safetensors: file not found (rank 2)" in p.stdout
