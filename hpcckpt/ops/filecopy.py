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
from ..storage.chunkio import ChunkReader, verify_totals
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

