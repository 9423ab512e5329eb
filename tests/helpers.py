"""Test helpers shared by serial and MPI tests.

    from helpers import run_cli, make_tensors, assert_bytes_equal
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
import zlib
from collections.abc import Mapping, Sequence

import ml_dtypes
import numpy as np

# safetensors dtype name -> numpy dtype
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

# Environment variables that would make a child process believe it belongs to the
# parent's MPI job (or to the surrounding SLURM allocation).
from hpcckpt.launch import find_mpiexec  # noqa: E402,F401 - re-exported for the tests

_STRIP_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "OMPI_", "SLURM_")
_STRIP_NAMES = {"MPI_LOCALNRANKS", "MPI_LOCALRANKID"}


def clean_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ without MPI/SLURM job variables, then ``env`` applied on top
    (so variables passed explicitly, e.g. SLURM_NTASKS, are kept)."""
    out = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_STRIP_PREFIXES) and k not in _STRIP_NAMES
    }
    if env:
        out.update(env)
    return out


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)


def run_cli(
    args: Sequence[str] | str,
    n: int | None = None,
    timeout: float = 120,
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m hpcckpt ARGS`` (under ``mpiexec -n n`` when ``n`` is given).

    Returns a CompletedProcess with text stdout/stderr; does not check the exit code.
    On timeout the whole process group is killed and AssertionError is raised.
    """
    if isinstance(args, str):
        args = shlex.split(args)
    args = [os.fspath(a) for a in args]
    cmd = [sys.executable, "-m", "hpcckpt", *args]
    if n is not None:
        cmd = [find_mpiexec(), "-n", str(int(n)), *cmd]
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=clean_env(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            out, err = "", ""
        raise AssertionError(
            f"command timed out after {timeout:g} s: {shlex.join(cmd)}\n"
            f"--- stdout ---\n{out}\n--- stderr ---\n{err}"
        ) from None
    except BaseException:
        _kill_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def make_tensors(
    spec: Mapping[str, tuple[Sequence[int], str]], seed: int = 0
) -> dict[str, np.ndarray]:
    """Deterministic random tensors: ``{name: (shape, dtype_name)}`` -> ``{name: array}``.

    Contents are random bytes viewed as the dtype, so every bit pattern (NaNs, infs,
    subnormals, negative zero) occurs; BOOL tensors hold 0/1.  A tensor's content
    depends only on ``seed``, its name, shape and dtype, not on the other entries.
    """
    out: dict[str, np.ndarray] = {}
    for name, (shape, dtype_name) in spec.items():
        key = dtype_name.upper()
        if key not in DTYPES:
            raise ValueError(f"unknown safetensors dtype {dtype_name!r} for tensor {name!r}")
        dt = DTYPES[key]
        shape = tuple(int(s) for s in shape)
        count = int(np.prod(shape, dtype=np.int64))
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode("utf-8"))])
        if dt == np.bool_:
            arr = rng.integers(0, 2, size=count, dtype=np.uint8).astype(np.bool_)
        else:
            raw = rng.integers(0, 256, size=count * dt.itemsize, dtype=np.uint8)
            arr = raw.view(dt)
        out[name] = arr.reshape(shape)  # fresh, C-contiguous, writeable
    return out


def assert_bytes_equal(a, b, what: str = "tensor") -> None:
    """Assert same dtype, same shape and bit-identical contents (NaN-safe)."""
    a = np.asarray(a)
    b = np.asarray(b)
    assert a.dtype == b.dtype, f"{what}: dtype differs: {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape differs: {a.shape} != {b.shape}"
    ab, bb = a.tobytes(), b.tobytes()
    if ab == bb:
        return
    av = np.frombuffer(ab, dtype=np.uint8).reshape(-1, a.dtype.itemsize)
    bv = np.frombuffer(bb, dtype=np.uint8).reshape(-1, b.dtype.itemsize)
    diff = np.nonzero((av != bv).any(axis=1))[0]
    first = int(diff[0])
    idx = np.unravel_index(first, a.shape) if a.ndim else ()
    raise AssertionError(
        f"{what}: contents differ in {diff.size} of {a.size} elements "
        f"(dtype {a.dtype}, shape {a.shape}); first at index {tuple(int(i) for i in idx)}: "
        f"{a.reshape(-1)[first]!r} (bytes {av[first].tobytes().hex()}) != "
        f"{b.reshape(-1)[first]!r} (bytes {bv[first].tobytes().hex()})"
    )


# ---- MPI tests: comm is an mpi4py communicator or None (one process) ----------------
def rank_size(comm) -> tuple[int, int]:
    return (0, 1) if comm is None else (comm.Get_rank(), comm.Get_size())


def barrier(comm) -> None:
    if comm is not None:
        comm.Barrier()


def allgather(comm, obj) -> list:
    return [obj] if comm is None else comm.allgather(obj)


def collective(comm, fn, *args) -> None:
    """Run ``fn`` on every rank; if it fails anywhere, fail on every rank (no hang)."""
    err = None
    try:
        fn(*args)
    except BaseException as e:  # noqa: BLE001 - reported below on every rank
        err = (f"rank {rank_size(comm)[0]}: {type(e).__name__}: {e}\n"
               + "".join(traceback.format_exception(e)))
    bad = [e for e in allgather(comm, err) if e]
    if bad:
        raise AssertionError("check failed on %d rank(s):\n%s" % (len(bad), "\n".join(bad)))


def mine(comm, items):
    """This rank's share of ``items`` (round robin)."""
    r, n = rank_size(comm)
    return [x for i, x in enumerate(items) if i % n == r]


def box_slices(box) -> tuple:
    """numpy index of ``box`` in the full tensor."""
    return tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))


# ---- checkpoints on disk, for tests that damage them ----------------------------------
def write_safetensors_file(path, tensors: Mapping[str, np.ndarray], dtypes: Mapping[str, str],
                           metadata: Mapping[str, str] | None = None):
    """One safetensors file holding ``tensors`` (safetensors dtype names in ``dtypes``)."""
    from hpcckpt.formats.safetensors import build_header
    head, _ = build_header([(n, dtypes[n], a.shape) for n, a in tensors.items()], metadata)
    with open(path, "wb") as f:
        f.write(head)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())
    return path


def flip_bit(path, offset: int, mask: int = 0x01) -> None:
    """XOR the byte at ``offset`` of ``path`` with ``mask``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


#: Python run by each rank of ``mpiexec -n N python -c PRELUDE + RANK_EXIT_WRAP ARGS``:
#: hpcckpt's main, then this rank's exit status on stdout in one write (mpiexec's own
#: status is an aggregate), so a test can see that EVERY rank exits as it should.
RANK_EXIT_WRAP = r"""
import sys
from hpcckpt.cli.main import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code if isinstance(e.code, int) else 1
import os
from mpi4py import MPI
sys.stdout.flush()
os.write(1, f"@@rank-exit {MPI.COMM_WORLD.Get_rank()} {rc}\n".encode())
sys.exit(rc)
"""


def run_ranks(args: Sequence, n: int, *, prelude: str = "",
              env: Mapping[str, str] | None = None, timeout: float = 60):
    """``mpiexec -n n`` hpcckpt ARGS, each rank running ``prelude`` first (fault
    injection) and reporting its own exit status (``RANK_EXIT_WRAP``).

    Returns (CompletedProcess, {rank: exit code}, seconds). A run that does not end
    within ``timeout`` is a hang: its process group is killed and the test fails."""
    cmd = [find_mpiexec(), "-n", str(n), sys.executable, "-c", prelude + RANK_EXIT_WRAP,
           *map(os.fspath, args)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=clean_env(env), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.communicate()
        raise AssertionError(f"hang: {' '.join(cmd)} did not end in {timeout} s") from None
    seconds = time.monotonic() - t0
    codes = {int(r): int(c) for r, c in re.findall(r"@@rank-exit (\d+) (-?\d+)\n", out)}
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), codes, seconds


def assert_nothing_complete(out) -> None:
    """No manifest, no index, no final-named or partial safetensors anywhere under ``out``."""
    from pathlib import Path
    out = Path(out)
    if not out.exists():
        return
    names = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()]
    bad = [n for n in names if n.endswith((".safetensors", ".partial", "manifest.json",
                                           "index.json", "param_name_map.json"))]
    assert not bad, f"left behind in {out}: {bad}"


def read_tensor(path, name: str) -> np.ndarray:
    """One tensor of a safetensors file, read by its header's byte range (any dtype)."""
    from hpcckpt.formats.safetensors import read_header
    e = read_header(path).entry(name)
    with open(path, "rb") as f:
        f.seek(e.begin)
        raw = f.read(e.nbytes)
    return np.frombuffer(raw, DTYPES[e.dtype]).reshape(e.shape)
