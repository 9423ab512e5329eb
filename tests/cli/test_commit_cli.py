"""Nothing lost, nothing half-written (issue 8, items 1-7), through the command line.

Runs that must be caught mid-write are slowed deterministically by the test hook
``HPCCKPT_TEST_WRITE_DELAY`` (seconds per written tile) and a tiny ``--buffer-size``,
so a signal or a second job lands while the first one is writing, whatever the disk.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xxhash
import yaml

from helpers import _kill_group, clean_env, find_mpiexec
from hpcckpt.ops.commit import DELAY_ENV
from hpcckpt.storage.lock import LOCK_NAME
from hpcckpt.formats.safetensors import build_header, read_header
from hpcckpt.storage.manifest import read_manifest
from test_cli import (ROTATED_TRIO_DOC, check_complete, cli, copy_dist, data,  # noqa: F401
                      has_error, ok, write_yaml)

SLOW = {DELAY_ENV: "0.05"}


def start(args, n: int, env: dict) -> subprocess.Popen:
    cmd = [find_mpiexec(), "-n", str(n), sys.executable, "-m", "hpcckpt", *map(os.fspath, args)]
    return subprocess.Popen(cmd, env=clean_env(env), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.communicate()
        raise AssertionError(f"hung: {proc.args} did not finish in {timeout} s") from None


def wait_for_partial(out: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.is_dir() and any(out.rglob("*.partial")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"ended before writing: {finish(proc)}")
        time.sleep(0.05)
    _kill_group(proc)
    raise AssertionError("no partial file appeared")


# ---- 8.1 ------------------------------------------------------------------------------
def test_buffer_size_zero_is_refused(data, tmp_path):
    out = tmp_path / "out"
    p = cli(["split", data["model"], out, "--strategy", data["s3"], "--buffer-size", "0"])
    has_error(p, "hpcckpt split: error: buffer size must be at least 1 byte (got 0)")
    assert not out.exists()


@pytest.mark.parametrize("size", ["1", "3"])
def test_buffer_below_one_element_is_exact(data, tmp_path, size):
    dist, merged = tmp_path / "dist", tmp_path / "merged"
    ok(cli(["split", data["model"], dist, "--strategy", data["s8"], "--buffer-size", size,
            "--no-fsync"], n=3))
    ok(cli(["merge", dist, merged, "--buffer-size", size, "--no-fsync"], n=2))
    check_complete(merged)


# ---- 8.2 ------------------------------------------------------------------------------
def test_second_job_on_one_out_is_refused_and_the_first_completes(data, tmp_path):
    out, merged = tmp_path / "out", tmp_path / "merged"
    first = start(["split", data["model"], out, "--strategy", data["s8"], "--buffer-size", "4",
                   "--no-fsync"], 2, SLOW)
    try:
        wait_for_partial(out, first)
        holder = (out / LOCK_NAME).read_text().strip()
        assert re.fullmatch(r"hpcckpt split, pid \d+ on .+, since \d{4}-\d\d-\d\d "
                            r"\d\d:\d\d:\d\d UTC", holder), holder
        second = cli(["split", data["model"], out, "--strategy", data["s3"], "--overwrite",
                      "--no-fsync"], n=2)
        has_error(second, f"hpcckpt split: error: rank 0: {out}: another job is writing this "
                          f"output directory ({holder}); wait for it to end or choose another "
                          "output directory")
        assert first.poll() is None, "the first job had ended: the test proved nothing"
    finally:
        stdout, stderr = finish(first)
    assert first.returncode == 0, stderr
    assert not (out / LOCK_NAME).exists()
    ok(cli(["merge", out, merged, "--no-fsync"]))
    check_complete(merged)


# ---- 8.3 ------------------------------------------------------------------------------
def test_symlinked_out_is_refused(data, tmp_path):
    real = copy_dist(data["dist8"], tmp_path / "real")
    before = {p: p.read_bytes() for p in real.rglob("*") if p.is_file()}
    link = tmp_path / "link"
    link.symlink_to(real)
    p = cli(["split", data["model"], link, "--strategy", data["s3"], "--overwrite"], n=2)
    has_error(p, f"hpcckpt split: error: rank 0: {link}: is a symbolic link (to {real}); "
                 "give the directory itself")
    assert {p: p.read_bytes() for p in real.rglob("*") if p.is_file()} == before


# ---- 8.4 ------------------------------------------------------------------------------
def _flip(dist: Path, rank: int) -> tuple[Path, str, str]:
    """Flip one bit of t<rank>'s stored bytes; (file, recorded checksum, new checksum)."""
    f = dist / f"rank_{rank}" / f"model_rank_{rank}.safetensors"
    e = read_header(f).entry(f"t{rank}")
    raw = bytearray(f.read_bytes())
    raw[e.begin + 5] ^= 0x10
    f.write_bytes(raw)
    manifest = read_manifest(dist).expanded()   # every chunk listed, as format 1 does
    want = manifest["tensors"][f"t{rank}"]["chunks"][0]["checksum"]
    return f, want, "xxh3_64:" + xxhash.xxh3_64_hexdigest(bytes(raw[e.begin:e.end]))


@pytest.mark.parametrize("cmd, n, rank", [("merge", None, 0), ("reshard", None, 0),
                                          ("reshard --node-local", 3, 2), ("load", 3, 1)])
def test_flipped_bit_is_refused(data, tmp_path, cmd, n, rank):
    """Every reader of stored chunks verifies them: t1's chunk is read whole by rank 0
    (one process), by rank 2 (node-local: it writes t1's new file) or by rank 1 (load)."""
    dist, out = copy_dist(data["trio"], tmp_path / "dist"), tmp_path / "out"
    f, want, got = _flip(dist, 1)
    verb, *flags = cmd.split()
    if verb == "load":
        args = ["load", dist, "--strategy", data["trio_yaml"]]
    else:
        rotated = write_yaml(tmp_path / "rot.yaml", ROTATED_TRIO_DOC)
        args = [verb, dist, out, *flags] + (["--strategy", rotated] if verb == "reshard" else [])
    has_error(cli(args, n=n), f"hpcckpt {verb}: error: rank {rank}: {f}: tensor 't1' chunk [0:16]: "
                              f"checksum mismatch (the bytes read hash to {got}, the manifest "
                              f"records {want}): the file is damaged")
    assert not out.exists()


HALVES_DOC = {"format": "hpcckpt.strategy/1", "mesh": {"tp": 2},
              "tensors": {f"t{r}": {"shape": [16], "dtype": "F32", "split": ["tp"]}
                          for r in range(3)}}


@pytest.mark.parametrize("n, verified, in_part", [(1, 3, 0), (2, 0, 6)])
def test_json_counts_verified_chunks(data, tmp_path, n, verified, in_part):
    """One rank reads both halves of every chunk in order: all verified; two ranks read
    one half each: every chunk read in part by both."""
    halves = write_yaml(tmp_path / "halves.yaml", HALVES_DOC)
    p = ok(cli(["reshard", data["trio"], tmp_path / "out", "--strategy", halves, "--json",
                "--no-fsync"], n=n))
    got = json.loads(p.stdout)
    assert (got["chunks_verified"], got["chunks_read_in_part"]) == (verified, in_part)


# ---- 8.5 ------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("existing", [False, True])
def test_signal_mid_write_cleans_up(data, tmp_path, sig, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    proc = start(["split", data["model"], out, "--strategy", data["s8"], "--buffer-size", "4"],
                 2, SLOW)
    wait_for_partial(out, proc)
    proc.send_signal(sig)   # to mpiexec, which forwards it to every rank (as srun does)
    _, stderr = finish(proc, 30)
    assert proc.returncode != 0
    assert re.search(rf"^hpcckpt split: error: ranks? [\d, -]+: interrupted by {sig.name}", stderr, re.M), \
        stderr
    if existing:
        assert os.listdir(out) == []
    else:
        assert not out.exists(), sorted(str(p) for p in out.rglob("*"))


# ---- 8.6 ------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["split", "reshard"])
def test_failed_run_does_not_block_its_retry(data, tmp_path, cmd):
    """A run failing mid-copy (its source cut short under it) leaves OUT as it found it,
    so the same command runs again."""
    out = tmp_path / "out"
    if cmd == "split":
        src = tmp_path / "model.safetensors"
        shutil.copy(data["model"], src)
        f, args = src, ["split", src, out, "--strategy", data["s8"]]
    else:
        src = copy_dist(data["dist8"], tmp_path / "dist")
        f = src / "rank_0" / "model_rank_0.safetensors"
        args = ["reshard", src, out, "--strategy", data["s3"]]
    saved = f.read_bytes()
    proc = start([*args, "--buffer-size", "4"], 2, SLOW)
    wait_for_partial(out, proc)
    os.truncate(f, read_header(f).data_start)
    _, stderr = finish(proc)
    assert proc.returncode != 0
    # a short read, or the header check if the rank had not opened the file yet
    assert re.search(rf"^hpcckpt {cmd}: error: ranks? [\d, -]+: {re.escape(str(f))}: ", stderr,
                     re.M), stderr
    assert not out.exists(), sorted(str(p) for p in out.rglob("*"))
    f.write_bytes(saved)
    ok(cli(args, n=2))


# ---- 8.7 ------------------------------------------------------------------------------
def _small_fs_run(tmp_path: Path, mount_opts: str) -> subprocess.CompletedProcess:
    """split a 64 KiB tensor (tp2) into OUT on a tmpfs mounted with ``mount_opts``, in a
    private mount namespace; stdout ends with what the filesystem holds afterwards."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a small private tmpfs")
    model, strat, mnt = tmp_path / "model.safetensors", tmp_path / "tp2.yaml", tmp_path / "mnt"
    head, _ = build_header([("w", "F32", (128, 128))], {"format": "pt"})
    model.write_bytes(head + np.arange(128 * 128, dtype=np.float32).tobytes())
    strat.write_text(yaml.safe_dump({"format": "hpcckpt.strategy/1", "mesh": {"tp": 2}, "tensors": {
        "w": {"shape": [128, 128], "dtype": "F32", "split": ["tp", None]}}}, sort_keys=False))
    mnt.mkdir()
    script = ('mount -t tmpfs -o "$1" tmpfs "$2" || exit 99; '
              '"$3" -m hpcckpt split "$4" "$2/out" --strategy "$5"; rc=$?; '
              'echo "@@left:$(cd "$2" && find . -mindepth 1 | sort | tr "\\n" " ")"; exit $rc')
    p = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", mount_opts, str(mnt),
                        sys.executable, str(model), str(strat)], env=clean_env(),
                       capture_output=True, text=True, timeout=60)
    if p.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs in a user namespace: {p.stderr.strip()}")
    return p


@pytest.mark.parametrize("opts, what", [
    ("nr_inodes=5", "rank_0/model_rank_0.safetensors: cannot create"),
    ("size=48k", "rank_1/model_rank_1.safetensors: write of bytes 192-32960 failed"),
    ("size=76k", "strategy.yaml: cannot write"),
    ("size=80k", "manifest.json: cannot write"),
])
def test_full_disk_names_the_file_and_leaves_nothing(tmp_path, opts, what):
    """Inodes run out at file creation; space runs out in the data, on strategy.yaml
    (two 9-page rank files and the lock file fill 76 KiB) or on the manifest."""
    p = _small_fs_run(tmp_path, opts)
    has_error(p, f"hpcckpt split: error: rank 0: {tmp_path}/mnt/out/{what}: No space left on "
                 "device")
    assert p.stdout.splitlines()[-1] == "@@left:", p.stdout
