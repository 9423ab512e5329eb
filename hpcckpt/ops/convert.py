"""convert: legacy checkpoints (MindSpore ``.ckpt``, Keras/HF HDF5) -> safetensors.

``.ckpt`` output is what ``ms.ckpt_to_safetensors`` writes: a file ``x.ckpt`` becomes
``OUT/x.safetensors`` (every ``.ckpt`` in the name replaced, as MindSpore does), a
directory's ``rank*/`` subdirectories keep their names under OUT, tensors are laid out
in the ``safetensors`` library's order (largest dtype first, then by name) with
metadata ``{"format": "ms"}`` (none when the file holds no tensor). HDF5 ``x.h5`` /
``x.hdf5`` becomes ``OUT/x.safetensors`` in the same order, metadata ``{"format": "tf"}``
(Keras legacy, ``tf_model.h5``) or ``{"format": "keras"}`` (Keras 3).

Protocol: plan (every rank lists the inputs; files are divided among ranks by size,
largest first to the least loaded) -> each rank parses its files (CRC checked) and
streams every tensor through one bounded buffer into ``<out>.partial`` -> rename when
every rank has succeeded. A failure anywhere removes every partial file.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..comm.wrapper import Comm, as_comm
from ..dtypes import library_order
from ..errors import FormatError
from ..storage.atomic import partial_name
from ..storage.legacy import LegacyTensor, hdf5_chunks, read_ckpt, read_hdf5
from ..storage.safetensors_io import build_header, pread_into, pwrite_all
from .filecopy import CopyOptions, _fsync, prepare_output_dir, remove_files, rename_partials
from .result import OpResult

H5_SUFFIXES = (".h5", ".hdf5")


@dataclass(frozen=True)
class ConvertJob:
    """One input file and the safetensors file it becomes (relative to OUT)."""

    src: str
    out: str
    kind: str        #: "ckpt" or "hdf5"
    size: int


def plan_convert(src: str | Path) -> list[ConvertJob]:
    """Every file to convert. A ``.ckpt``/``.h5``/``.hdf5`` file, or a directory with
    ``rank*/`` subdirectories of ``.ckpt`` files (``ms.ckpt_to_safetensors``'s layout)."""
    src = Path(src)
    if src.is_file():
        return [_job(src, src.name)]
    if not src.is_dir():
        raise FormatError(f"{src}: no such file or directory")
    jobs = []
    for d in sorted(p for p in src.iterdir() if p.is_dir() and p.name.startswith("rank")):
        for f in sorted(d.iterdir()):
            if f.name.endswith(".ckpt") and f.is_file():
                jobs.append(_job(f, f"{d.name}/{f.name}"))
    if not jobs:
        raise FormatError(f"{src}: no rank*/ directories with .ckpt files (give a .ckpt, .h5 "
                          "or .hdf5 file, or a directory of rank_<r>/ .ckpt files)")
    return jobs


def _job(path: Path, rel: str) -> ConvertJob:
    if path.name.endswith(".ckpt"):
        return ConvertJob(str(path), rel.replace(".ckpt", ".safetensors"), "ckpt",
                          path.stat().st_size)
    if path.suffix in H5_SUFFIXES:
        return ConvertJob(str(path), rel[: -len(path.suffix)] + ".safetensors", "hdf5",
                          path.stat().st_size)
    raise FormatError(f"{path}: not a .ckpt, .h5 or .hdf5 file")


def divide_jobs(jobs: list[ConvertJob], world: int) -> list[list[int]]:
    """Job indices per rank: largest file first to the rank with the fewest bytes."""
    load = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(jobs)), key=lambda i: (-jobs[i].size, i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[r].append(i)
        load[r] += jobs[i].size
    return [sorted(x) for x in out]


def convert(src: str, out: str, *, comm=None, options: CopyOptions = CopyOptions()) -> OpResult:
    """Convert legacy checkpoint files to safetensors, dividing the files among ranks.

    Args:
        src: a ``.ckpt``, ``.h5`` or ``.hdf5`` file, or a directory of ``rank*/`` ``.ckpt`` files.
        out: output directory (created; non-empty only with ``options.overwrite``).
        comm: an mpi4py communicator, a Comm, or None (one process).
        options: buffer size (the memory bound per rank), fsync, dry run, overwrite.

    Returns:
        The summary (files, bytes read and written, seconds).

    Example:
        >>> convert("ckpt/", "st/", comm=MPI.COMM_WORLD)  # doctest: +SKIP
    """
    comm: Comm = as_comm(comm)
    t0 = time.perf_counter()
    with comm.step("plan"):
        jobs = plan_convert(src)
        mine = divide_jobs(jobs, comm.size)[comm.rank]
    if options.dry_run:
        rows = comm.allgather({"rank": comm.rank, "files": len(mine),
                               "bytes_read": sum(jobs[i].size for i in mine),
                               "bytes_written": sum(jobs[i].size for i in mine)})
        return OpResult.from_rows("convert", out, len(jobs), rows, time.perf_counter() - t0,
                                  comm.size, dry_run=True)
    prepare_output_dir(comm, out, options.overwrite, (), inputs=(str(src),))
    created: list[str] = []
    read = written = 0
    try:
        with comm.step("convert"):
            buf = bytearray(max(1, options.buffer_size))
            for i in mine:
                r, w, path = _convert_one(jobs[i], out, buf, options.fsync)
                created.append(path)
                read += r
                written += w
        with comm.step("rename"):
            rename_partials(created, options.fsync)
    except BaseException:   # RankFailure, or a one-process run's own error
        remove_files(created)
        raise
    rows = comm.allgather({"rank": comm.rank, "files": len(mine), "bytes_read": read,
                           "bytes_written": written})
    seconds = comm.allreduce_max(time.perf_counter() - t0)
    return OpResult.from_rows("convert", out, len(jobs), rows, seconds, comm.size,
                              extra={"inputs": [j.src for j in jobs]})


def _convert_one(job: ConvertJob, out: str, buf: bytearray, fsync: bool) -> tuple[int, int, str]:
    """Write ``job``'s ``.partial`` file; returns (bytes read, bytes written, partial path)."""
    h5 = None
    if job.kind == "ckpt":
        tensors = read_ckpt(job.src)
        meta = {"format": "ms"}
    else:
        tensors, layout = read_hdf5(job.src)
        meta = {"format": "tf" if layout == "keras-legacy" else "keras"}
    tensors = sorted(tensors, key=lambda t: library_order(t.name, t.dtype))
    head, spans = build_header(((t.name, t.dtype, t.shape) for t in tensors),
                               meta if tensors else None)
    final = os.path.join(out, job.out)
    path = partial_name(final)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    read = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pwrite_all(fd, memoryview(head), 0, path)
        if job.kind == "ckpt":
            src_fd = os.open(job.src, os.O_RDONLY)
            try:
                for t in tensors:
                    read += _copy_ranges(src_fd, job.src, t, fd, path, spans[t.name][0], buf)
            finally:
                os.close(src_fd)
        else:
            import h5py
            h5 = h5py.File(job.src, "r")
            for t in tensors:
                pos = spans[t.name][0]
                for piece in hdf5_chunks(h5, t, len(buf)):
                    pwrite_all(fd, piece, pos, path)
                    pos += len(piece)
                    read += len(piece)
                if pos != spans[t.name][1]:
                    raise FormatError(f"{job.src}: dataset {t.source} gave "
                                      f"{pos - spans[t.name][0]} bytes, expected {t.nbytes}")
        if fsync:
            _fsync(fd, path)
    except BaseException:
        os.close(fd)
        fd = -1
        remove_files([path])
        raise
    finally:
        if h5 is not None:
            h5.close()
        if fd >= 0:
            os.close(fd)
    size = len(head) + sum(t.nbytes for t in tensors)
    return read, size, path


def _copy_ranges(src_fd: int, src: str, t: LegacyTensor, fd: int, path: str, pos: int,
                 buf: bytearray) -> int:
    """Copy the tensor's byte ranges (split values in order) through ``buf``."""
    done = 0
    view = memoryview(buf)
    for offset, length in t.pieces:
        at = 0
        while at < length:
            n = min(len(buf), length - at)
            pread_into(src_fd, view[:n], offset + at, src)
            pwrite_all(fd, view[:n], pos + done, path)
            at += n
            done += n
    return done
