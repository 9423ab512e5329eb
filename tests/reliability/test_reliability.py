"""The reliability suite (issue 11): one test per row of the README's table.

Each row damages a checkpoint or a run in one way and asserts what a user must see:
verify names the defect (kind, file, tensor, box, rank) and exits 1; merge / reshard /
load refuse when they need the damaged bytes (naming the file), or produce exact output
when they do not; a failing or killed rank ends the job on every rank within seconds;
nothing half-written looks complete; the input is intact afterwards.

Faults (ENOSPC, EIO, SIGKILL) are injected by a Python-level shim (``FAULTS`` below) run
in every rank before hpcckpt's main: with ``HPCCKPT_TEST_FAULT=OP:WHAT:RANK:MATCH:SKIP`` set,
rank RANK's ``os.pwrite``/``os.write`` (OP ``write``) or ``os.pread``/``os.preadv``/
``os.readv``/``os.read``/``mmap.mmap`` (OP ``read``) on a file whose path contains MATCH raises
``OSError(WHAT)`` (ENOSPC, EIO) or SIGKILLs the process (KILL), after SKIP such calls.
No root, tmpfs, FUSE or LD_PRELOAD needed: it runs in CI as is.

Every row runs: nothing here is skipped or expected to fail.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import hpcckpt
from hpcckpt.layout import strategy_from_dict, write_strategy_yaml
from hpcckpt.ops.filecopy import CopyOptions
from hpcckpt.ops.verify import PROBLEM_KINDS
from hpcckpt.formats.safetensors import read_header
from hpcckpt.storage.manifest import read_manifest

from helpers import clean_env, flip_bit, make_tensors, run_ranks, write_safetensors_file

TIMEOUT = 60
FMT = "hpcckpt.strategy/1"
TENSORS = {"w": ([64, 32], "F32"), "b": ([64], "BF16"), "s": ([], "F32")}
#: dp2 x tp2: rank = 2 * dp + tp; ranks 2 and 3 hold copies of ranks 0 and 1's boxes.
#: Readers take the first copy (lowest rank): rank_0/rank_1 files are read, rank_2/rank_3
#: files are unread replicas.
DOC = {"format": FMT, "mesh": {"dp": 2, "tp": 2}, "tensors": {
    "w": {"shape": [64, 32], "dtype": "F32", "split": ["tp", None]},
    "b": {"shape": [64], "dtype": "BF16", "split": ["tp"]},
    "s": {"shape": [], "dtype": "F32"}}}
TP4 = {"format": FMT, "mesh": {"tp": 4}, "tensors": {
    "w": {"shape": [64, 32], "dtype": "F32", "split": [None, "tp"]},
    "b": {"shape": [64], "dtype": "BF16", "split": ["tp"]},
    "s": {"shape": [], "dtype": "F32"}}}
READ = "rank_1/model_rank_1.safetensors"      # a file merge reads
UNREAD = "rank_3/model_rank_3.safetensors"    # a replica of READ nobody reads
QUIET = CopyOptions(fsync=False, progress=False)

FAULTS = r"""
import errno as _errno, os as _os, signal as _signal
_spec = _os.environ.get("HPCCKPT_TEST_FAULT")
if _spec and _os.environ.get("PMI_RANK", "0") == _spec.split(":")[2]:
    _op, _what, _rank, _match, _skip = _spec.split(":")
    _left = [int(_skip)]
    def _hit(fd):
        try:
            path = _os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return False
        if _match not in path:
            return False
        _left[0] -= 1
        return _left[0] < 0
    def _wrap(fn):
        def inner(fd, *a, **k):
            if _hit(fd):
                if _what == "KILL":
                    _os.kill(_os.getpid(), _signal.SIGKILL)
                code = getattr(_errno, _what)
                raise OSError(code, _os.strerror(code))
            return fn(fd, *a, **k)
        return inner
    for _n in (("pwrite", "write") if _op == "write" else ("pread", "preadv", "readv", "read")):
        setattr(_os, _n, _wrap(getattr(_os, _n)))
    if _op == "read":   # verify hashes through mappings: the disk error fails the mapping
        import mmap as _mmap
        _mmap.mmap = _wrap(_mmap.mmap)
"""


def run(args, n: int = 1, env: dict | None = None, timeout: float = TIMEOUT):
    """``mpiexec -n n`` hpcckpt ARGS with the fault shim (``helpers.run_ranks``):
    (CompletedProcess, {rank: exit code}, seconds); a run that does not end within
    ``timeout`` is a hang and fails the test."""
    return run_ranks(args, n, prelude=FAULTS, env=env, timeout=timeout)


# ---- data ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability")
    full = make_tensors(TENSORS, seed=11)
    (root / "hf").mkdir()
    write_safetensors_file(root / "hf" / "model.safetensors", full,
                           {n: dt for n, (_, dt) in TENSORS.items()}, {"format": "pt"})
    s = strategy_from_dict(DOC, "s")
    write_strategy_yaml(s, root / "s.yaml")
    write_strategy_yaml(strategy_from_dict(TP4, "tp4"), root / "tp4.yaml")
    hpcckpt.split(str(root / "hf"), str(root / "dist"), s, options=QUIET)
    return root


@pytest.fixture
def dist(pristine, tmp_path) -> Path:
    """A fresh copy of the pristine distributed checkpoint, to damage."""
    return Path(shutil.copytree(pristine / "dist", tmp_path / "dist"))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def verify_problems(path: Path, *extra, n: int = 1) -> tuple[list[dict], subprocess.CompletedProcess]:
    """verify --json: its problems; asserts exit 1 on every rank and one JSON line."""
    p, codes, _ = run(["verify", path, "--json", *extra], n=n)
    assert codes == {r: 1 for r in range(n)}, f"exit codes {codes}\n{p.stdout}\n{p.stderr}"
    # raw_decode: under mpiexec another rank's exit report may share the JSON's line
    doc = json.JSONDecoder().raw_decode(
        next(ln for ln in p.stdout.splitlines() if ln.startswith("{")))[0]
    assert doc["ok"] is False
    return doc["problems"], p


def verify_lines(path: Path, *extra, n: int = 1) -> list[str]:
    """verify's problem lines (table form), asserting exit 1."""
    p, codes, _ = run(["verify", path, *extra], n=n)
    assert codes == {r: 1 for r in range(n)}, f"exit codes {codes}\n{p.stdout}\n{p.stderr}"
    lines = [ln for ln in p.stdout.splitlines() if not ln.startswith("@@rank-exit")]
    assert lines[-1].startswith("FAILED: "), p.stdout
    return [ln.strip() for ln in lines
            if ln.startswith("  ") and ln.strip().split(":")[0] in PROBLEM_KINDS]


def refuses(args, names: str, n: int = 1) -> subprocess.CompletedProcess:
    """The command fails on every rank, naming ``names`` (a file) in its error."""
    p, codes, seconds = run(args, n=n)
    assert codes and all(c != 0 for c in codes.values()), \
        f"{args[0]} accepted damaged input: {codes}\n{p.stdout}\n{p.stderr}"
    assert names in p.stderr, f"error does not name {names}:\n{p.stderr}"
    return p


def _same_tensors(a: Path, b: Path) -> bool:
    ha, hb = read_header(a), read_header(b)
    if set(ha.tensors) != set(hb.tensors):
        return False
    ra, rb = a.read_bytes(), b.read_bytes()
    return all(ra[e.begin:e.end] == rb[hb.tensors[n].begin:hb.tensors[n].end]
               for n, e in ha.tensors.items())


def truncate_to(path: Path, size: int) -> None:
    os.truncate(path, size)


def header_len(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def rewrite_header(path: Path, edit) -> None:
    """Replace the header JSON with ``edit(json_text) -> bytes`` (same data region)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    new = edit(raw[8:8 + n].decode())
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


# ---- truncation ----------------------------------------------------------------------
def _truncations(path: Path) -> dict[str, int]:
    h = read_header(path)
    mid = h.tensors["w"]
    return {"header": header_len(path) // 2, "mid-tensor": (mid.begin + mid.end) // 2,
            "1-byte-short": h.file_size - 1, "empty": 0}


@pytest.mark.parametrize("cut", ["header", "mid-tensor", "1-byte-short", "empty"])
def test_truncated_read_file_verify_names_it(dist, cut):
    f = dist / READ
    truncate_to(f, _truncations(f)[cut])
    problems, _ = verify_problems(dist)
    # the manifest records each file's size: the short file, and its unusable header
    assert {(p["kind"], p["file"]) for p in problems} == {("size", READ), ("header", READ)}, \
        problems


@pytest.mark.parametrize("cut", ["header", "mid-tensor", "1-byte-short", "empty"])
def test_truncated_read_file_merge_refuses(dist, tmp_path, cut):
    f = dist / READ
    truncate_to(f, _truncations(f)[cut])
    refuses(["merge", dist, tmp_path / "out"], READ)
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("cut", ["header", "mid-tensor", "1-byte-short", "empty"])
def test_truncated_unread_replica_verify_names_it(dist, cut):
    f = dist / UNREAD
    truncate_to(f, _truncations(f)[cut])
    problems, _ = verify_problems(dist)
    # the manifest records each file's size: the short file, and its unusable header
    assert {(p["kind"], p["file"]) for p in problems} == {("size", UNREAD), ("header", UNREAD)}, \
        problems


@pytest.mark.parametrize("cut", ["header", "1-byte-short"])
def test_truncated_unread_replica_merge_exact_or_refuses(pristine, dist, tmp_path, cut):
    """merge does not need the replica: it either refuses naming it or writes exact bytes."""
    f = dist / UNREAD
    truncate_to(f, _truncations(f)[cut])
    p, codes, _ = run(["merge", dist, tmp_path / "out"])
    if all(c == 0 for c in codes.values()):
        assert _same_tensors(pristine / "hf" / "model.safetensors",
                             tmp_path / "out" / "model.safetensors")
    else:
        assert UNREAD in p.stderr, p.stderr


@pytest.mark.parametrize("cmd", ["reshard", "load"])
def test_truncated_read_file_reshard_load_refuse(pristine, dist, tmp_path, cmd):
    truncate_to(dist / READ, _truncations(dist / READ)["mid-tensor"])
    args = (["reshard", dist, tmp_path / "out", "--strategy", pristine / "tp4.yaml"]
            if cmd == "reshard" else ["load", dist, "--strategy", pristine / "tp4.yaml"])
    refuses(args, READ, n=4 if cmd == "load" else 1)
    assert not (tmp_path / "out" / "manifest.json").exists()


# ---- flipped bits ---------------------------------------------------------------------
@pytest.mark.parametrize("which", ["read", "unread replica"])
def test_flipped_bit_verify_names_file_tensor_box(dist, which):
    rel = READ if which == "read" else UNREAD
    e = read_header(dist / rel).tensors["w"]
    flip_bit(dist / rel, e.begin + 100)
    lines = verify_lines(dist)
    want = (f"checksum: {rel}: tensor 'w' chunk [32:64, 0:32]: bytes {e.begin}-{e.end}: "
            "bytes hash to xxh3_64:")
    assert len(lines) == 1 and lines[0].startswith(want) and lines[0].endswith("(rank 0)"), lines


def test_flipped_bit_in_read_chunk_merge_refuses(dist, tmp_path):
    e = read_header(dist / READ).tensors["w"]
    flip_bit(dist / READ, e.begin + 100)
    refuses(["merge", dist, tmp_path / "out"], READ)


# ---- manifest / commit record ---------------------------------------------------------
def test_missing_manifest_is_uncommitted(dist, tmp_path):
    (dist / "manifest.json").unlink()
    lines = verify_lines(dist)
    assert lines == ["uncommitted: manifest.json: no manifest.json: the write did not finish, "
                     "or another tool wrote it (give --strategy for a MindSpore-written "
                     "checkpoint) (rank 0)"]
    refuses(["merge", dist, tmp_path / "out"], "manifest.json")


def test_corrupt_manifest_is_uncommitted(dist, tmp_path):
    m = dist / "manifest.json"
    m.write_bytes(m.read_bytes()[: len(m.read_bytes()) // 2])
    problems, _ = verify_problems(dist)
    assert [(p["kind"], p["file"]) for p in problems] == [("manifest", "manifest.json")]
    assert problems[0]["message"].startswith("is not valid JSON: ")
    refuses(["merge", dist, tmp_path / "out"], "manifest.json")


#: a training save runs one rank per strategy rank (s.yaml has 4)
SAVE_RANKS = 4


def _saved(pristine: Path, tmp_path: Path, steps: int = 2) -> Path:
    """A training directory with ``steps`` committed steps (1_1, 1_2, ...) of real weights."""
    out = tmp_path / "train"
    p, codes, _ = run(["save", out, "--strategy", pristine / "s.yaml", "--from",
                       pristine / "hf", "--steps", str(steps), "--no-fsync"], n=SAVE_RANKS)
    assert codes == {r: 0 for r in range(SAVE_RANKS)}, p.stdout + p.stderr
    return out


def _merged_step(train: Path, tmp_path: Path, step: str) -> Path:
    """A committed step merged to complete weights, before any damage: the reference."""
    out = tmp_path / f"ref_{step}"
    p, codes, _ = run(["merge", train, out, "--step", step])
    assert codes == {0: 0}, p.stderr
    return out / "model.safetensors"


def _report_head(p) -> str:
    """verify's first report line (the ranks' exit lines may come before it on stdout)."""
    return next(line for line in p.stdout.splitlines() if not line.startswith("@@rank-exit"))


def _records(train: Path) -> list[Path]:
    return sorted((train / "commits").glob("*.json"))


def test_training_dir_missing_last_record_falls_back(pristine, tmp_path):
    train = _saved(pristine, tmp_path)
    first, last = _records(train)
    ref = _merged_step(train, tmp_path, "1_1")     # each pretend step changes the weights
    last.unlink()                                  # the newest step never committed
    p, codes, _ = run(["verify", train], n=2)
    assert codes == {0: 0, 1: 0}, p.stdout + p.stderr
    assert f"step 1_1 ({first.parent.name}/{first.name})" in _report_head(p), p.stdout
    out = tmp_path / "merged"
    p, codes, _ = run(["merge", train, out])
    assert codes == {0: 0}, p.stderr
    assert _same_tensors(ref, out / "model.safetensors")


def test_training_dir_corrupt_last_record(pristine, tmp_path):
    """A torn record (a crash while the commit record was written) is not a step:
    verify reports it; readers use the previous committed step or refuse, never garbage."""
    train = _saved(pristine, tmp_path)
    first, last = _records(train)
    ref = _merged_step(train, tmp_path, "1_1")
    last.write_bytes(last.read_bytes()[:20])
    problems, _ = verify_problems(train)
    assert [p["kind"] for p in problems] in (["manifest"], ["uncommitted"]), problems
    out = tmp_path / "merged"
    p, codes, _ = run(["merge", train, out])
    if codes == {0: 0}:
        assert _same_tensors(ref, out / "model.safetensors")
    else:
        assert last.name in p.stderr, p.stderr


def test_torn_latest_pointer_is_old_or_new(pristine, tmp_path):
    train = _saved(pristine, tmp_path)
    (train / "latest").write_bytes(b'{"record": "commits/0000')   # torn mid-write
    p, codes, _ = run(["verify", train], n=2)
    assert codes == {0: 0, 1: 0}, p.stdout + p.stderr
    last = _records(train)[-1]
    assert f"({last.parent.name}/{last.name})" in _report_head(p), p.stdout


# ---- malicious headers ------------------------------------------------------------------
def test_huge_header_length(dist, tmp_path):
    f = dist / READ
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 1 << 62) + raw[8:])
    lines = verify_lines(dist)
    assert lines == [f"header: {READ}: header length {1 << 62} goes beyond the end of the "
                     f"file ({len(raw)} bytes) (rank 0)"]
    refuses(["merge", dist, tmp_path / "out"], READ)


def test_nested_json_header_verify(dist):
    f = dist / READ
    rewrite_header(f, lambda _: (b"[" * 100000 + b"]" * 100000))
    problems, _ = verify_problems(dist)
    # a new header changes the file's size, which the manifest records
    assert sorted((p["kind"], p["file"]) for p in problems) == [("header", READ), ("size", READ)]


def test_nested_json_header_merge_refuses(dist, tmp_path):
    rewrite_header(dist / READ, lambda _: (b"[" * 100000 + b"]" * 100000))
    refuses(["merge", dist, tmp_path / "out"], READ)


def test_overlapping_offsets(dist, tmp_path):
    def edit(text: str) -> bytes:
        doc = json.loads(text)
        b0 = doc["b"]["data_offsets"][0]
        doc["s"]["data_offsets"] = [b0, b0 + 4]
        return json.dumps(doc).encode()
    rewrite_header(dist / READ, edit)
    problems, _ = verify_problems(dist)
    assert sorted((p["kind"], p["file"]) for p in problems) == [("header", READ), ("size", READ)]
    assert "overlap" in next(p["message"] for p in problems if p["kind"] == "header")
    refuses(["merge", dist, tmp_path / "out"], READ)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd"])
def test_names_outside_the_checkpoint(dist, tmp_path, name):
    m = dist / "manifest.json"
    doc = read_manifest(dist).expanded()   # format 1: file names in every chunk
    doc["tensors"]["w"]["chunks"][0]["file"] = name
    doc["files"][0] = name
    m.write_text(json.dumps(doc))
    problems, _ = verify_problems(dist)
    assert [(p["kind"], p["file"]) for p in problems] == [("manifest", "manifest.json")]
    assert problems[0]["message"] == f"names file {name!r} outside its directory {dist}"
    refuses(["merge", dist, tmp_path / "out"], name)


def test_duplicate_header_keys(dist, tmp_path):
    def edit(text: str) -> bytes:
        body = text.rstrip()
        entry = re.search(r'"s":\{[^}]*\}', body).group(0)
        return (body[:-1] + "," + entry + "}").encode()
    rewrite_header(dist / READ, edit)
    problems, _ = verify_problems(dist)
    assert sorted((p["kind"], p["file"]) for p in problems) == [("header", READ), ("size", READ)]
    assert next(p["message"] for p in problems if p["kind"] == "header") == \
        "header has the key 's' twice"
    refuses(["merge", dist, tmp_path / "out"], READ)


def test_trailing_bytes_verify(dist):
    with open(dist / READ, "ab") as f:
        f.write(b"\0" * 5)
    size = (dist / READ).stat().st_size
    data = read_header(dist / "rank_0" / "model_rank_0.safetensors").data_start   # same layout
    lines = verify_lines(dist)
    assert lines == [
        f"size: {READ}: bytes {size - 5}-{size}: file is {size} bytes, the manifest records "
        f"{size - 5} (rank 0)",
        f"header: {READ}: 5 byte(s) after the last tensor's data (the data region is "
        f"{size - data} bytes, its tensors end at {size - data - 5}) (rank 0)"]


def test_trailing_bytes_merge_refuses(dist, tmp_path):
    with open(dist / READ, "ab") as f:
        f.write(b"\0" * 5)
    refuses(["merge", dist, tmp_path / "out"], READ)


# ---- wrong launch -------------------------------------------------------------------------
@pytest.mark.parametrize("var", ["SLURM_NTASKS", "PMI_SIZE"])
def test_wrong_launch_refused_before_writing(pristine, tmp_path, var):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "hpcckpt", "split", pristine / "hf", out, "--strategy",
           pristine / "s.yaml"]
    p = subprocess.run(list(map(os.fspath, cmd)), env=clean_env({var: "3"}), timeout=TIMEOUT,
                       capture_output=True, text=True)
    assert p.returncode != 0
    assert f"{var}=3 but the MPI world has 1 rank(s)" in p.stderr, p.stderr
    assert not out.exists()


# ---- ENOSPC / EIO on one rank ---------------------------------------------------------------
def _all_failed(codes: dict, n: int, p) -> None:
    assert sorted(codes) == list(range(n)), f"not every rank reported: {codes}\n{p.stderr}"
    assert all(c != 0 for c in codes.values()), f"a rank exited 0: {codes}\n{p.stderr}"


def _nothing_complete(out: Path) -> None:
    names = [str(q.relative_to(out)) for q in out.rglob("*") if q.is_file()] \
        if out.exists() else []
    bad = [x for x in names if x.endswith((".safetensors", ".partial", "manifest.json",
                                           "index.json"))]
    assert not bad, f"left behind in {out}: {bad}"


def _enospc_split(pristine: Path, out: Path, skip: int) -> None:
    p, codes, seconds = run(["split", pristine / "hf", out, "--strategy", pristine / "s.yaml"],
                            n=2, env={"HPCCKPT_TEST_FAULT": f"write:ENOSPC:1:.partial:{skip}"})
    _all_failed(codes, 2, p)
    assert "No space left on device" in p.stderr and seconds < 30
    _nothing_complete(out)


def test_enospc_on_one_rank_split_mid_copy(pristine, tmp_path):
    # rank 1 creates two of the four rank files (two header writes), then copies: the
    # third write to a .partial file is its first data write
    _enospc_split(pristine, tmp_path / "out", skip=2)


def test_enospc_on_one_rank_split_at_creation(pristine, tmp_path):
    _enospc_split(pristine, tmp_path / "out", skip=0)


def test_eio_on_one_rank_merge(pristine, dist, tmp_path):
    out = tmp_path / "out"
    before = tree_bytes(dist)
    p, codes, seconds = run(["merge", dist, out, "--max-shard-size", "4KB"], n=2,
                            env={"HPCCKPT_TEST_FAULT": "read:EIO:1:model_rank_:0"})
    _all_failed(codes, 2, p)
    assert "Input/output error" in p.stderr and seconds < 30
    _nothing_complete(out)
    assert tree_bytes(dist) == before


def test_eio_on_one_rank_verify(dist):
    """verify reports the unreadable bytes as a problem of the rank that met them."""
    p, codes, _ = run(["verify", dist, "--json"], n=2,
                      env={"HPCCKPT_TEST_FAULT": "read:EIO:1:model_rank_:0"})
    assert codes == {0: 1, 1: 1}, f"{codes}\n{p.stdout}\n{p.stderr}"
    doc = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("{")))
    kinds = {(q["kind"], q["rank"]) for q in doc["problems"]}
    assert kinds in ({("io", 1)}, {("header", 1)}), doc["problems"]
    assert all("Input/output error" in q["message"] for q in doc["problems"])


# ---- kill -9 of one rank mid-write -----------------------------------------------------------
@pytest.mark.parametrize("cmd", ["split", "merge", "reshard"])
def test_kill9_one_rank_mid_write(pristine, dist, tmp_path, cmd):
    out = tmp_path / "out"
    before = tree_bytes(dist)
    src_hf = tree_bytes(pristine / "hf")
    args = {"split": ["split", pristine / "hf", out, "--strategy", pristine / "s.yaml"],
            "merge": ["merge", dist, out, "--max-shard-size", "4KB"],
            "reshard": ["reshard", dist, out, "--strategy", pristine / "tp4.yaml"]}[cmd]
    p, codes, seconds = run(args, n=2, env={"HPCCKPT_TEST_FAULT": "write:KILL:1:.partial:1"})
    assert p.returncode != 0, p.stdout
    assert seconds < 30, f"the job took {seconds:.1f} s to end after a rank was killed"
    assert codes.get(1) is None, "rank 1 was not killed"
    print(f"kill -9 mid-{cmd}: the job ended in {seconds:.1f} s")
    _nothing_complete_after_kill(out)
    assert tree_bytes(dist) == before and tree_bytes(pristine / "hf") == src_hf
    # the retry needs no --overwrite: it takes the dead job's lock and removes its leftovers
    p, codes, _ = run(args, n=2)
    assert codes == {0: 0, 1: 0}, p.stdout + p.stderr
    p, codes, _ = run(["verify", out], n=2)
    assert codes == {0: 0, 1: 0}, p.stdout + p.stderr


def _nothing_complete_after_kill(out: Path) -> None:
    """A killed job cannot clean up, but nothing it left may look complete."""
    if not out.exists():
        return
    done = [str(q.relative_to(out)) for q in out.rglob("*") if q.is_file()
            and q.name.endswith((".safetensors", "manifest.json", "index.json"))]
    assert not done, f"killed job left complete-looking files in {out}: {done}"
    p, codes, _ = run(["verify", out, "--quick"])
    assert codes == {0: 1} or codes == {0: 2}, p.stdout


def test_kill9_one_rank_mid_save(pristine, tmp_path):
    """Kill rank 1 while it writes step 2's file: the job ends, step 1 stays the latest
    committed step and verifies clean."""
    train = tmp_path / "train"
    args = ["save", train, "--strategy", pristine / "s.yaml", "--from", pristine / "hf",
            "--steps", "2", "--no-fsync"]
    p, codes, seconds = run(args, n=SAVE_RANKS, env={"HPCCKPT_FAULT": "write@1:2"})
    assert p.returncode != 0 and codes.get(1) is None, p.stdout + p.stderr
    assert seconds < 30, f"the job took {seconds:.1f} s to end after a rank was killed"
    assert [r.name.split("-", 1)[1] for r in _records(train)] == ["1_1.json"]
    p, codes, _ = run(["verify", train])
    assert codes == {0: 0}, p.stdout + p.stderr


# ---- verify itself on a damaged checkpoint under mpiexec -n 3 -----------------------------------
def test_verify_damaged_checkpoint_three_ranks(dist):
    e1 = read_header(dist / READ).tensors["w"]
    flip_bit(dist / READ, e1.begin + 7)                       # checksum, read file
    e3 = read_header(dist / UNREAD).tensors["b"]
    flip_bit(dist / UNREAD, e3.begin)                         # checksum, unread replica
    truncate_to(dist / "rank_2/model_rank_2.safetensors", 0)          # empty
    (dist / "rank_0/model_rank_0.safetensors").unlink()               # missing
    problems, _ = verify_problems(dist, n=3)
    got = sorted((p["kind"], p["file"], p["tensor"]) for p in problems)
    assert got == [("checksum", READ, "w"), ("checksum", UNREAD, "b"),
                   ("header", "rank_2/model_rank_2.safetensors", None),
                   ("missing", "rank_0/model_rank_0.safetensors", None),
                   ("size", "rank_2/model_rank_2.safetensors", None)], problems
