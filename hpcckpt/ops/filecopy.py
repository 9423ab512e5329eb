"""Fill output files from a stored source: split, merge and shared-filesystem reshard.

The write protocol itself (taking OUT, partial files, checksums, fsync, rename, marker,
undo on failure) is ``ops.commit``; this module gives it a read callback that assembles
each output tile from the stored chunks overlapping it, read through ``ChunkReader``
(which verifies a chunk's recorded checksum when its bytes pass whole).
"""
from __future__ import annotations

import time
from typing import Iterable, Sequence

from ..comm.wrapper import Comm
from ..errors import FormatError
from ..layout.box import Box
from ..planning.outputs import OutputEntry, OutputFile, WritePiece
from ..planning.runs import strided_runs
from ..layout.tensor import TensorInfo
from ..planning.sources import SourceIndex
from ..storage.chunkio import ChunkReader
from .commit import (DEFAULT_BUFFER, OutputCommit, ReadFn, RecordsFn, WriteOptions,
                     check_not_input, checksum_of)
from .result import OpResult

CopyOptions = WriteOptions   #: the name the commands and tests know
__all__ = ["DEFAULT_BUFFER", "CopyOptions", "check_not_input", "checksum_of", "source_reader",
           "write_files"]


def source_reader(reader: ChunkReader, source: SourceIndex) -> ReadFn:
    """A ``ReadFn`` assembling each tile from the stored chunks overlapping it."""
    cache: dict[tuple[str, Box], tuple[TensorInfo, list]] = {}

    def read(e: OutputEntry, tile: Box, out: memoryview) -> None:
        got = cache.get((e.name, e.box))
        if got is None:
            cache.clear()   # entries are written one after another: keep one
            got = cache[(e.name, e.box)] = (e.tensor,
                                            [c for c, _ in source.overlapping(e.name, e.box)])
        t, cands = got
        isz = e.itemsize
        covered = 0
        for chunk in cands:
            region = chunk.box.intersect(tile)
            if region is None:
                continue
            reader.read(chunk, t, strided_runs(region, chunk.box, tile, isz), out)
            covered += region.volume
        if covered != tile.volume:
            raise FormatError(f"tensor {e.name!r}: the source does not store all of {tile} "
                              f"(covers {covered} of {tile.volume} elements)")
    return read


def write_files(comm: Comm, source: SourceIndex, source_root, out: str,
                files: list[OutputFile], pieces: list[list[WritePiece]], records: RecordsFn,
                op: str, opts: WriteOptions, *, inputs: Iterable[str] = (),
                markers: Sequence[str] = (), dirs: Iterable[str] = (),
                marker_first: bool = False, checksums_needed: bool = True) -> OpResult:
    """Write ``files`` under ``out`` from ``source``: ``pieces[r]`` by rank r, file i
    created by rank i mod size, then ``records`` (see ``OutputCommit.commit``). With
    ``opts.dry_run`` only the plan's byte counts are reported."""
    t0 = time.perf_counter()
    mine = pieces[comm.rank] if comm.rank < len(pieces) else []
    written = sum(p.nbytes for p in mine)
    if opts.dry_run:
        per_rank = comm.allgather({"rank": comm.rank, "bytes_read": written,
                                   "bytes_written": written})
        return OpResult.from_rows(op, out, len(files), per_rank, time.perf_counter() - t0,
                                  comm.size, dry_run=True)
    reader = ChunkReader(source_root, scratch_bytes=opts.buffer_size)
    try:
        with OutputCommit(comm, out, files, options=opts, op=f"hpcckpt {op}", inputs=inputs,
                          markers=markers, dirs=dirs, checksums=checksums_needed) as job:
            job.create(range(comm.rank, len(files), comm.size))
            job.fill(pieces, source_reader(reader, source))
            job.commit(records, marker_first=marker_first)
    finally:
        reader.close()
    per_rank = comm.allgather({"rank": comm.rank, "bytes_read": reader.bytes_read,
                               "bytes_written": written, **reader.verify_counts()})
    seconds = comm.allreduce_max(time.perf_counter() - t0)
    return OpResult.from_rows(op, out, len(files), per_rank, seconds, comm.size,
                              extra=verify_totals(per_rank))


def verify_totals(per_rank) -> dict:
    """Job totals of the chunk checksum counters (``ChunkReader.verify_counts``)."""
    keys = ("chunks_verified", "chunks_read_in_part")
    return {k: sum(r.get(k, 0) for r in per_rank) for k in keys}


# ---- the node-local reshard's own copy of the protocol, until it moves onto
# OutputCommit (after ops/exchange.py is split by role) ------------------------------
import os as _os  # noqa: E402
import shutil as _shutil  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

from ..errors import CheckpointIOError as _IOErr, UsageError as _UsageError  # noqa: E402
from ..storage.atomic import fsync_dir as _fsync_dir, partial_name as _partial  # noqa: E402
from ..storage.fileio import pwrite_all as _pwrite_all  # noqa: E402
from .commit import _hash_entry as hash_entry  # noqa: E402,F401


def prepare_output_dir(comm: Comm, out: str, overwrite: bool, markers: tuple[str, ...],
                       inputs: tuple[str, ...] = (), mine: bool | None = None) -> None:
    if mine is None:
        mine = comm.rank == 0
    with comm.step("prepare output"):
        if mine:
            p = _Path(out)
            check_not_input(out, inputs)
            if p.exists() and not p.is_dir():
                raise _UsageError(f"{out}: exists and is not a directory")
            if p.exists() and any(p.iterdir()):
                if not overwrite:
                    raise _UsageError(f"{out}: output directory is not empty "
                                      "(pass --overwrite to replace it)")
                for m in markers:
                    (p / m).unlink(missing_ok=True)
                _shutil.rmtree(p)
            p.mkdir(parents=True, exist_ok=True)


def rename_partials(created: list[str], fsync: bool) -> None:
    dirs = dict.fromkeys(_os.path.dirname(p) for p in created)
    for path in created:
        _os.replace(path, path[: -len(".partial")])
    created.clear()
    if fsync:
        for d in dirs:
            _fsync_dir(d or ".")


def remove_files(paths: list[str]) -> None:
    for path in paths:
        try:
            _os.unlink(path)
        except OSError:
            pass


def create_partial(final: str, f: OutputFile, fsync: bool = False) -> str:
    path = _partial(final)
    _os.makedirs(_os.path.dirname(path) or ".", exist_ok=True)
    try:
        fd = _os.open(path, _os.O_WRONLY | _os.O_CREAT | _os.O_TRUNC, 0o644)
    except OSError as e:
        raise _IOErr(f"{path}: cannot create: {e.strerror or e}") from None
    try:
        try:
            _os.ftruncate(fd, f.size)
            _pwrite_all(fd, memoryview(f.header), 0, path)
        except OSError as e:
            raise _IOErr(f"{path}: cannot size to {f.size} bytes: {e.strerror or e}") from None
    finally:
        _os.close(fd)
    return path


def open_rw(path: str) -> int:
    try:
        return _os.open(path, _os.O_RDWR)
    except OSError as e:
        raise _IOErr(f"{path}: cannot open for writing: {e.strerror or e}") from None


def fsync_fd(fd: int, path: str) -> None:
    try:
        _os.fsync(fd)
    except OSError as e:
        raise _IOErr(f"{path}: fsync failed: {e.strerror or e}") from None
