"""``hpcckpt verify`` on the command line: report, verdict, exit status on every rank,
messages word for word."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash

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


@pytest.mark.timeout(120)
def test_carried_model_files_checked(ckpt, tmp_path):
    # --quick: each carried file exists with its recorded size; --deep: its checksum too
    from hpcckpt.ops.verify import verify
    hf = Path(shutil.copytree(ckpt / "hf", tmp_path / "hf"))
    (hf / "config.json").write_text('{"model_type": "gpt2"}')
    (hf / "tok").mkdir()
    (hf / "tok" / "vocab.txt").write_text("a\nb\n")
    d = tmp_path / "dist"
    hpcckpt.split(str(hf), str(d), strategy_from_dict(DOC, "s"),
                  options=CopyOptions(fsync=False, progress=False))
    assert verify(str(d), None).ok
    (d / "model_files" / "config.json").unlink()
    (d / "model_files" / "tok" / "vocab.txt").write_text("a\nc\n")   # same size
    sums = read_manifest(d).model_files
    quick = [p.line() for p in verify(str(d), None, deep=False).problems]
    assert quick == ["missing: model_files/config.json: file not found (rank 0)"]
    deep = [p.line() for p in verify(str(d), None).problems]
    got = "xxh3_64:" + xxhash.xxh3_64_hexdigest(b"a\nc\n")
    assert deep == quick + [f"checksum: model_files/tok/vocab.txt: bytes 0-4: bytes hash to "
                            f"{got}, the manifest records {sums['tok/vocab.txt'][1]} (rank 0)"]


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
    # Hydra forwards each rank's output in chunks, so a rank's line may land mid-line
    assert sorted(re.findall(r"@@\d=\d+", p.stdout)) == ["@@0=1", "@@1=1", "@@2=1"], \
        p.stdout + p.stderr
    assert "missing: rank_2/model_rank_2.safetensors: file not found (rank 2)" in p.stdout


def _shard_runs(d: Path, count: int, n: int = 2) -> list[tuple[int, dict]]:
    out = []
    for i in range(count):
        p = run_cli(["verify", d, "--shard", f"{i}/{count}", "--json"], n=n)
        assert p.returncode in (0, 1), p.stderr
        out.append((p.returncode, json.loads(p.stdout)))
    return out


def test_shards_read_every_byte_once(ckpt):
    whole = json.loads(run_cli(["verify", ckpt / "dist", "--json"]).stdout)
    runs = _shard_runs(ckpt / "dist", 3)
    assert [(code, r["shard"], r["ok"]) for code, r in runs] == \
        [(0, "0/3", True), (0, "1/3", True), (0, "2/3", True)]
    assert all(r["bytes_checked"] > 0 for _, r in runs)
    assert sum(r["bytes_checked"] for _, r in runs) == whole["bytes_checked"]
    p = run_cli(["verify", ckpt / "dist", "--shard", "1/3"], n=2)
    assert p.stdout.splitlines()[0] == \
        f"verify deep: {ckpt / 'dist'} (distributed, 4 file(s)) on 2 rank(s), shard 1/3"


@pytest.mark.parametrize("which, finder", [(0, 0), (-1, 2)])
def test_flipped_bit_found_by_its_shard_only(ckpt, tmp_path, which, finder):
    """The first file's first data byte is in shard 0, the last file's last byte in the
    last shard: exactly that shard reports the checksum, the others are clean."""
    d = copy(ckpt, tmp_path)
    rel = read_manifest(d).files[which]
    f = d / rel
    raw = bytearray(f.read_bytes())
    pos = read_header(f).data_start if which == 0 else len(raw) - 1
    raw[pos] ^= 0x10
    f.write_bytes(bytes(raw))
    runs = _shard_runs(d, 3)
    assert [code for code, _ in runs] == [1 if i == finder else 0 for i in range(3)]
    (prob,) = runs[finder][1]["problems"]
    assert (prob["kind"], prob["file"]) == ("checksum", str(rel))


def test_per_checkpoint_checks_in_shard_0_only(ckpt, tmp_path):
    d = copy(ckpt, tmp_path)
    (d / "rank_3" / "model_rank_3.safetensors").unlink()
    runs = _shard_runs(d, 2)
    assert [code for code, _ in runs] == [1, 0]
    assert [(p["kind"], p["file"]) for p in runs[0][1]["problems"]] == \
        [("missing", "rank_3/model_rank_3.safetensors")]


@pytest.mark.parametrize("shard, message", [
    ("3/3", "--shard 3/3: shard 3 out of range 0..2 (shards count from 0)"),
    ("0/0", "--shard 0/0: the shard count N must be at least 1"),
    ("1of3", "--shard '1of3': expected I/N, shard I of N counted from 0 (e.g. 0/4)"),
])
def test_shard_errors(ckpt, shard, message):
    p = run_cli(["verify", ckpt / "dist", "--shard", shard], n=2)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stderr.splitlines() == [f"hpcckpt verify: error: {message}"]


def test_mindspore_written_checkpoint(tmp_path):
    """A MindSpore-written directory, given its strategy file (shapes from the files):
    clean, then with one rank file truncated by a byte, which another rank's file of the
    same tensors lets verify name instead of refusing the directory."""
    gold = Path(__file__).resolve().parents[1] / "golden" / "mindspore"
    d = tmp_path / "dist"
    shutil.copytree(gold / "dist", d)
    args = ["verify", d, "--strategy", gold / "merged_strategy.ckpt"]
    p = run_cli(args, n=2)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.splitlines()[0] == (f"verify deep: {d} (distributed (no manifest), "
                                        "8 file(s)) on 2 rank(s)")
    f = d / "rank_3" / "llama_rank_3-1_4.safetensors"
    f.write_bytes(f.read_bytes()[:-1])
    p = run_cli(args + ["--json"], n=2)
    assert p.returncode == 1, p.stdout + p.stderr
    doc = json.loads(p.stdout.splitlines()[-1])
    assert [(q["kind"], q["file"], q["message"]) for q in doc["problems"]] == [
        ("header", "rank_3/llama_rank_3-1_4.safetensors",
         "tensor 'model.layers.0.attn.w': data_offsets [76, 100] are outside the data "
         "region of 99 bytes")]


def _flip(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


def _damage(d: Path, case: str) -> None:
    """One defect planted in a copy of the split checkpoint."""
    f0, f1 = (d / f"rank_{r}" / f"model_rank_{r}.safetensors" for r in (0, 1))
    if case == "key byte":                  # a tensor renamed, same length
        raw = f0.read_bytes()
        f0.write_bytes(raw.replace(b'"w":{', b'"v":{', 1))
    elif case == "offset digit":            # hpcckpt metadata: another box, same length
        raw = f0.read_bytes()
        at = raw.index(b'\\"offsets\\":[0')
        f0.write_bytes(raw[:at + 13] + b"1" + raw[at + 14:])
    elif case == "length prefix":
        _flip(f0, 0)
    elif case == "data byte":               # not a header defect: --quick finds nothing
        _flip(f0, f0.stat().st_size - 1)
    elif case == "truncated":
        f0.write_bytes(f0.read_bytes()[:-1])
    elif case == "appended":
        f0.write_bytes(f0.read_bytes() + b"\0")
    elif case == "swapped":                 # a valid rank file, of another rank
        shutil.copyfile(f1, f0)
    elif case == "missing":
        f0.unlink()
    elif case == "recorded size":
        doc = json.loads((d / "manifest.json").read_text())
        doc["file_sizes"][0] += 8
        (d / "manifest.json").write_text(json.dumps(doc))
    elif case == "checksum count":
        doc = json.loads((d / "manifest.json").read_text())
        doc["tensors"]["b"]["xxh3"] = doc["tensors"]["b"]["xxh3"][:16]
        (d / "manifest.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("case", ["none", "key byte", "offset digit", "length prefix",
                                  "data byte", "truncated", "appended", "swapped", "missing",
                                  "recorded size", "checksum count"])
@pytest.mark.parametrize("deep", [False, True])
def test_exact_header_path_reports_what_the_checked_path_does(ckpt, tmp_path, monkeypatch,
                                                              case, deep):
    # a rank file of a strategy whose header is byte for byte rank_header's is not
    # decoded; anything else takes the checked path, so both give the same report
    from hpcckpt.ops import verify as ops_verify
    from hpcckpt.ops.verify import verify
    from hpcckpt.storage.manifest import ManifestIndex
    d = copy(ckpt, tmp_path)
    _damage(d, case)
    checked_files = []
    check_file = ops_verify.check_file
    monkeypatch.setattr(ops_verify, "check_file",
                        lambda root, f, *a: checked_files.append(f) or check_file(root, f, *a))
    fast = verify(str(d), None, deep=deep)
    intact = {"none": 4, "data byte": 4, "checksum count": 0, "recorded size": 3}.get(case, 3)
    assert len(checked_files) == 4 - intact, checked_files
    assert read_manifest(d).files_are_rank_files() == (case != "checksum count")
    monkeypatch.setattr(ManifestIndex, "files_are_rank_files", lambda self: False)
    checked = verify(str(d), None, deep=deep)
    assert fast.problems == checked.problems
    assert fast.bytes_checked == checked.bytes_checked
    assert fast.ok == (case == "none" or case == "data byte" and not deep)


def test_hash_mapped_equals_reading_and_stops_where_a_page_cannot_be_read(tmp_path,
                                                                        monkeypatch):
    import mmap
    from hpcckpt.ops import verify as ops_verify
    data = bytes(range(256)) * (3 * 4096 + 77)             # windows, pages, a ragged end
    f = tmp_path / "f.bin"
    f.write_bytes(data)
    monkeypatch.setattr(ops_verify, "MAP_WINDOW", 64 << 10)
    fd = os.open(f, os.O_RDONLY)
    try:
        for start, stop in [(0, len(data)), (5, len(data) - 3), (4095, 4097), (100, 100)]:
            h = xxhash.xxh3_64()
            assert ops_verify._hash_mapped(fd, start, stop, h) == stop
            assert h.hexdigest() == xxhash.xxh3_64_hexdigest(data[start:stop])
        # a window past the end of the file is not mapped
        assert ops_verify._hash_mapped(fd, 0, len(data) + 10, xxhash.xxh3_64()) == \
            len(data) // (64 << 10) * (64 << 10)
        # the file cut short after the mapping was made: populating the mapping fails
        # (EFAULT) where touching it would have raised SIGBUS and killed the rank
        real = mmap.mmap

        def map_then_truncate(*a, **k):
            m = real(*a, **k)
            os.truncate(f, 8192)
            return m
        monkeypatch.setattr(mmap, "mmap", map_then_truncate)
        assert ops_verify._hash_mapped(fd, 65536, 131072, xxhash.xxh3_64()) == 65536
    finally:
        os.close(fd)
