"""The one write protocol (hpcckpt.ops.commit), in one process: what a failed or
refused job leaves behind, temporary names, the lock, buffer sizes below one element."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hpcckpt
from hpcckpt.comm.wrapper import Comm
from hpcckpt.dtypes import DTYPES as ITEMSIZES
from hpcckpt.errors import CheckpointIOError, UsageError
from hpcckpt.layout.box import Box
from hpcckpt.ops.commit import OutputCommit, WriteOptions
from hpcckpt.planning.outputs import WritePiece, make_file
from hpcckpt.storage.lock import LOCK_NAME
from hpcckpt.formats.safetensors import build_header, read_header

FAST = WriteOptions(fsync=False, progress=False)


def _files():
    """Two small files: a (3, 4) F32 tensor and a (5,) I16 one."""
    return [make_file("rank_0/a.safetensors", [("x", "F32", Box((0, 0), (3, 4)), (3, 4))]),
            make_file("rank_1/b.safetensors", [("y", "I16", Box((0,), (5,)), (5,))])]


def _whole(files):
    return [[WritePiece(i, j, e.box, e.nbytes, True)
             for i, f in enumerate(files) for j, e in enumerate(f.entries)]]


def _fill_with(byte: int):
    def read(entry, tile, out):
        out[:] = bytes([byte]) * len(out)
    return read


def _write(out, files=None, read=None, records=None, **kw):
    files = files or _files()
    with OutputCommit(Comm(None), str(out), files, options=kw.pop("options", FAST),
                      op="hpcckpt test", **kw) as job:
        job.create(range(len(files)))
        job.fill(_whole(files), read or _fill_with(7))
        job.commit(records or (lambda sums: [("marker.json", b"{}")]))
    return job


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ---- 8.1: any buffer size works exactly, 0 is refused -------------------------------
def test_buffer_size_zero_is_refused():
    with pytest.raises(UsageError) as e:
        WriteOptions(buffer_size=0)
    assert str(e.value) == "buffer size must be at least 1 byte (got 0)"


TP2 = {"format": "hpcckpt.strategy/1", "mesh": {"tp": 2}, "tensors": {}}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from(sorted(ITEMSIZES)), rows=st.integers(1, 5), cols=st.integers(1, 6),
       elements=st.integers(0, 3), extra=st.integers(0, 7), seed=st.integers(0, 2**32 - 1))
def test_any_buffer_size_round_trips_exactly(dtype, rows, cols, elements, extra, seed):
    """split (rows over tp) then merge, both with a buffer of a few bytes: from 1 byte
    (less than one element) to a few elements, every dtype, bytes exact."""
    isz = ITEMSIZES[dtype][0]
    buffer = max(1, elements * isz + extra % max(1, isz))
    raw = np.random.default_rng(seed).integers(0, 256, rows * cols * isz, np.uint8).tobytes()
    doc = {**TP2, "tensors": {"w": {"shape": [rows, cols], "dtype": dtype, "split": ["tp", None]},
                              "v": {"shape": [cols], "dtype": dtype}}}
    strategy = hpcckpt.strategy_from_dict(doc, "test strategy")
    opts = WriteOptions(buffer_size=buffer, fsync=False, progress=False)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "model.safetensors"
        head, _ = build_header([("w", dtype, (rows, cols)), ("v", dtype, (cols,))], {})
        src.write_bytes(head + raw + raw[:cols * isz])
        hpcckpt.split(str(src), f"{d}/dist", strategy, options=opts)
        hpcckpt.merge(f"{d}/dist", f"{d}/merged", options=opts)
        got = Path(d, "merged", "model.safetensors")
        h = read_header(got)
        data = got.read_bytes()
        assert data[h.entry("w").begin:h.entry("w").end] == raw
        assert data[h.entry("v").begin:h.entry("v").end] == raw[:cols * isz]


# ---- 8.2: one writer per OUT; a job renames only its own files -----------------------
def test_second_writer_of_one_out_is_refused(tmp_path):
    out = tmp_path / "out"
    with OutputCommit(Comm(None), str(out), _files(), options=FAST, op="hpcckpt split"):
        with pytest.raises(UsageError) as e:
            _write(out, options=WriteOptions(fsync=False, progress=False, overwrite=True))
        assert str(e.value) == (f"{out}: another job is writing this output directory "
                                "(hpcckpt split in this process); wait for it to end or choose "
                                "another output directory")
        assert (out / LOCK_NAME).is_file()   # the refused job removed nothing
    assert not out.exists()                  # the first job ended without a commit


def test_temporary_names_are_the_jobs_own(tmp_path, monkeypatch):
    """Without a lock (a filesystem without locks), another writer's temporary file of
    the same output file survives, and the job renames only its own."""
    monkeypatch.setattr("hpcckpt.ops.commit.OutputLock.acquire", lambda self: None)
    out = tmp_path / "out"
    files = _files()
    foreign = out / "rank_0" / "a.safetensors.0badf00d.partial"
    seen = {}

    def read(entry, tile, view):
        if not foreign.exists():
            foreign.write_bytes(b"another job's bytes")
            seen["temps"] = sorted(p.name for p in (out / "rank_0").iterdir())
        view[:] = b"\x07" * len(view)

    job = _write(out, files, read=read)
    assert sorted(seen["temps"]) == sorted(["a.safetensors.0badf00d.partial",
                                            f"a.safetensors.{job.token}.partial"])
    assert foreign.read_bytes() == b"another job's bytes"
    got = (out / "rank_0" / "a.safetensors").read_bytes()
    assert got == files[0].header + b"\x07" * 48


# ---- 8.3: a symlinked OUT ------------------------------------------------------------
def test_symlinked_out_is_refused_before_anything_is_removed(tmp_path):
    target = tmp_path / "real"
    _write(target)
    before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(UsageError) as e:
        _write(link, options=WriteOptions(fsync=False, progress=False, overwrite=True))
    assert str(e.value) == f"{link}: is a symbolic link (to {target}); give the directory itself"
    assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before


# ---- 8.6: a failed job leaves OUT as it found it ------------------------------------
def _fails_at(when: str):
    def read(entry, tile, out):
        if when == "read":
            raise CheckpointIOError("src: boom")
        out[:] = b"\x01" * len(out)

    def records(sums):
        raise CheckpointIOError("marker: boom")
    return read, records


@pytest.mark.parametrize("when", ["read", "records"])
@pytest.mark.parametrize("existing", ["absent", "empty", "nested"])
def test_failed_job_leaves_out_as_found(tmp_path, when, existing):
    out = tmp_path / "out" if existing != "nested" else tmp_path / "a" / "b" / "out"
    if existing == "empty":
        out.mkdir()
    read, records = _fails_at(when)
    with pytest.raises(CheckpointIOError):
        _write(out, read=read, records=records)
    if existing == "empty":
        assert _tree(out) == []
    else:
        assert _tree(tmp_path) == []


def test_failed_job_keeps_existing_files(tmp_path):
    """keep_existing (a save manager adding a step): the files already there stay."""
    out = tmp_path / "out"
    (out / "rank_0").mkdir(parents=True)
    (out / "rank_0" / "old.safetensors").write_bytes(b"old")
    read, records = _fails_at("records")
    with pytest.raises(CheckpointIOError):
        _write(out, read=read, records=records, keep_existing=True)
    assert _tree(out) == ["rank_0", "rank_0/old.safetensors"]
    _write(out, keep_existing=True)
    assert _tree(out) == ["marker.json", "rank_0", "rank_0/a.safetensors", "rank_0/old.safetensors",
                          "rank_1", "rank_1/b.safetensors"]


def test_overwrite_failure_leaves_an_empty_out(tmp_path):
    out = tmp_path / "out"
    _write(out)
    read, _ = _fails_at("read")
    with pytest.raises(CheckpointIOError):
        _write(out, read=read, options=WriteOptions(fsync=False, progress=False, overwrite=True))
    assert _tree(out) == []


def test_success_leaves_no_lock_and_checksums(tmp_path):
    out = tmp_path / "out"
    got = {}
    _write(out, records=lambda sums: got.update(sums) or [("marker.json", b"{}")])
    assert _tree(out) == ["marker.json", "rank_0", "rank_0/a.safetensors", "rank_1",
                          "rank_1/b.safetensors"]
    import xxhash
    assert got == {(0, 0): "xxh3_64:" + xxhash.xxh3_64_hexdigest(b"\x07" * 48),
                   (1, 0): "xxh3_64:" + xxhash.xxh3_64_hexdigest(b"\x07" * 10)}


# ---- 8.7: a full disk names the file and leaves nothing ----------------------------
def test_write_errors_name_the_file_and_leave_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = os.pwrite

    def full(fd, data, offset):
        if offset > 0 and len(data) == 48:   # the first tile of rank_0/a's data
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)
    monkeypatch.setattr("hpcckpt.storage.fileio.os.pwrite", full)
    files = _files()
    with pytest.raises(CheckpointIOError) as e:
        _write(out, files)
    begin = files[0].entries[0].begin
    assert str(e.value) == (f"{out}/rank_0/a.safetensors: write of bytes {begin}-{begin + 48} "
                            "failed: No space left on device")
    assert not out.exists()


# ---- push mode (bytes arriving from the network) -------------------------------------
def test_push_writes_hash_in_order_and_read_back_otherwise(tmp_path, monkeypatch):
    """Front-to-back writes are hashed in passing; an entry written out of order, or
    with a gap filled later, is read back: the checksums are those of the bytes on disk
    either way. Strided runs dense in the entry count as in order."""
    import xxhash
    from hpcckpt.planning.runs import strided_runs
    files = [make_file("rank_0/a.safetensors", [("x", "U8", Box((0,), (100,)), (100,)),
                                                ("y", "U8", Box((0,), (100,)), (100,)),
                                                ("z", "U8", Box((0, 0), (4, 5)), (4, 5))])]
    data = bytes(range(100))
    read_back = []
    real = __import__("hpcckpt.ops.commit", fromlist=["_hash_entry"])._hash_entry
    monkeypatch.setattr("hpcckpt.ops.commit._hash_entry",
                        lambda path, e, n: read_back.append(e.name) or real(path, e, n))
    got = {}
    with OutputCommit(Comm(None), str(tmp_path / "out"), files, options=FAST) as job:
        with job.comm.step("exchange"):
            job.create([0])
            job.write(0, 0, 0, data[:40])
            job.write(0, 0, 40, data[40:])
            job.write(0, 1, 60, data[60:])     # out of order
            job.write(0, 1, 0, data[:60])
            zone = Box((0, 0), (4, 5))
            for rows in (Box((0, 0), (2, 5)), Box((2, 0), (2, 5))):   # dense, in order
                job.write_runs(0, 2, strided_runs(rows, rows, zone, 1), data, rows.offsets[0] * 5)
        job.commit(lambda sums: got.update(sums) or [])
    assert read_back == ["y"]
    assert got == {(0, 0): "xxh3_64:" + xxhash.xxh3_64_hexdigest(data),
                   (0, 1): "xxh3_64:" + xxhash.xxh3_64_hexdigest(data),
                   (0, 2): "xxh3_64:" + xxhash.xxh3_64_hexdigest(data[:20])}


def test_per_rank_outs_commit_each(tmp_path):
    """shared=False: the rank takes, fills and commits its own OUT, records included."""
    out = tmp_path / "node0"
    _write(out, shared=False, dirs=["rank_0", "rank_2"])
    assert _tree(out) == ["marker.json", "rank_0", "rank_0/a.safetensors", "rank_1",
                          "rank_1/b.safetensors", "rank_2"]
