"""Fill output files from a stored source, every rank writing its pieces in place.

The protocol (all steps collective, any rank's failure fails every rank):

1. plan      pieces per rank (pure), already computed by the caller
2. create    creators make ``<file>.partial`` at full size with its header
3. copy      each rank reads the source regions of its pieces through a bounded
             buffer and writes them with positioned writes, hashing whole entries
             (unless the output keeps no checksums). With fsync, the writeback of each
             window starts as soon as it is written and each rank fsyncs the files it
             wrote: the disk works while the copy goes on, not after it
4. checksum  entries split across ranks are hashed by one rank after a barrier
5. commit    partial files are renamed; rank 0 writes the index/manifest last

On failure every rank removes the partial files it created; nothing looks complete.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import xxhash

from ..comm.wrapper import Comm
from ..errors import CheckpointIOError, FormatError, RankFailure, UsageError
from ..layout.box import Box
from ..planning.outputs import OutputFile, WritePiece
from ..planning.runs import strided_runs, tile_contiguous
from ..planning.sources import SourceIndex, TensorInfo
from ..storage.atomic import fsync_dir, partial_name
from ..storage.chunkio import ChunkReader
from ..storage.safetensors_io import pread_into, pwrite_all, start_writeback
from .progress import Progress
from .result import OpResult

DEFAULT_BUFFER = 4 << 20   #: small enough to stay in the CPU cache between read and write


@dataclass(frozen=True)
class CopyOptions:
    buffer_size: int = DEFAULT_BUFFER
    fsync: bool = True
    dry_run: bool = False
    overwrite: bool = False
    progress: bool = True


def checksum_of(data) -> str:
    return "xxh3_64:" + xxhash.xxh3_64_hexdigest(data)


def prepare_output_dir(comm: Comm, out: str, overwrite: bool, markers: tuple[str, ...],
                       inputs: tuple[str, ...] = (), mine: bool | None = None) -> None:
    """Rank 0 (or every rank with ``mine``, for per-node outputs) checks/creates OUT.
    An existing non-empty OUT needs ``overwrite``; its commit markers are removed first
    so it never looks complete while being rewritten. OUT may not be, contain or lie
    inside an input (``--overwrite`` would delete the input)."""
    if mine is None:
        mine = comm.rank == 0
    with comm.step("prepare output"):
        if mine:
            p = Path(out)
            check_not_input(out, inputs)
            if p.exists() and not p.is_dir():
                raise UsageError(f"{out}: exists and is not a directory")
            if p.exists() and any(p.iterdir()):
                if not overwrite:
                    raise UsageError(f"{out}: output directory is not empty "
                                     "(pass --overwrite to replace it)")
                for m in markers:
                    (p / m).unlink(missing_ok=True)
                shutil.rmtree(p)
            p.mkdir(parents=True, exist_ok=True)


def check_not_input(out: str, inputs: tuple[str, ...]) -> None:
    o = Path(out).resolve()
    for i in inputs:
        src = Path(i).resolve()
        # OUT would be deleted (--overwrite) or written into: it must not hold the input,
        # nor lie inside an input directory
        inside_out = src == o or o in src.parents
        if inside_out or (src.is_dir() and src in o.parents):
            raise UsageError(f"{out}: output directory overlaps the input {i}; "
                             "choose another output directory")


def write_files(comm: Comm, source: SourceIndex, source_root, out: str,
                files: list[OutputFile], pieces: list[list[WritePiece]],
                commit: Callable[[dict[tuple[int, int], str]], None], op: str,
                opts: CopyOptions, marker_first: bool = False,
                checksums_needed: bool = True) -> OpResult:
    """Run steps 2-5 above. ``commit(checksums)`` runs on rank 0 after every rename, or
    before them with ``marker_first`` (complete weights, see below). Without
    ``checksums_needed`` nothing is hashed and ``commit`` gets an empty mapping."""
    t0 = time.perf_counter()
    mine = pieces[comm.rank] if comm.rank < len(pieces) else []
    written = sum(p.nbytes for p in mine)
    if opts.dry_run:
        per_rank = comm.allgather({"rank": comm.rank, "bytes_read": written,
                                   "bytes_written": written})
        return OpResult.from_rows(op, out, len(files), per_rank, time.perf_counter() - t0,
                                  comm.size, dry_run=True)
    created: list[str] = []
    reader = ChunkReader(source_root, scratch_bytes=opts.buffer_size)
    handles: dict[int, int] = {}
    checksums: dict[tuple[int, int], str] = {}
    try:
        with comm.step("create files"):
            for i, f in enumerate(files):
                if i % comm.size == comm.rank:
                    created.append(_create(os.path.join(out, f.path), f, opts.fsync))
        with comm.step("copy"):
            progress = Progress(written, f"{op} (rank 0)", comm.rank == 0 and opts.progress)
            buf = bytearray(min(opts.buffer_size, max((p.nbytes for p in mine), default=0)) or 1)
            hashers: dict[tuple[int, int], object] = {}
            for p in mine:
                f = files[p.file]
                fd = handles.get(p.file)
                if fd is None:
                    fd = handles[p.file] = _open_rw(os.path.join(out, partial_name(f.path)))
                h = (hashers.setdefault((p.file, p.entry), xxhash.xxh3_64())
                     if p.whole and checksums_needed else None)
                _copy_piece(reader, source, f, p, fd, os.path.join(out, f.path), buf, h, progress,
                            opts.fsync)
            for key, h in hashers.items():
                checksums[key] = "xxh3_64:" + h.hexdigest()
            del buf
            if opts.fsync:
                for i, fd in handles.items():
                    _fsync(fd, os.path.join(out, partial_name(files[i].path)))
            progress.close()
        with comm.step("checksum"):
            if checksums_needed:
                for (fi, ei) in _split_entries_owned(pieces, comm.rank):
                    checksums[(fi, ei)] = _hash_entry(
                        os.path.join(out, partial_name(files[fi].path)), files[fi].entries[ei],
                        opts.buffer_size)
                if comm.rank == 0:
                    for fi, f in enumerate(files):
                        for ei, e in enumerate(f.entries):
                            if e.nbytes == 0:
                                checksums[(fi, ei)] = checksum_of(b"")
        gathered = comm.gather((checksums, reader.bytes_read))
        # Distributed outputs: the manifest, written after every rename, is the commit.
        # Complete weights have no single marker, so the index/name map goes first and
        # the renames make the output whole: a failure before the last rename leaves an
        # index naming files that do not exist, which no reader takes for complete.
        for name in (("commit", "rename") if marker_first else ("rename", "commit")):
            with comm.step(name):
                if name == "rename":
                    rename_partials(created, opts.fsync)
                elif comm.rank == 0:
                    allsums = {}
                    for sums, _ in gathered:
                        allsums.update(sums)
                    commit(allsums)
    except RankFailure:
        remove_files(created)
        raise
    finally:
        reader.close()
        for fd in handles.values():
            os.close(fd)
    per_rank = comm.allgather({"rank": comm.rank, "bytes_read": reader.bytes_read,
                               "bytes_written": written})
    seconds = comm.allreduce_max(time.perf_counter() - t0)
    return OpResult.from_rows(op, out, len(files), per_rank, seconds, comm.size)


def rename_partials(created: list[str], fsync: bool) -> None:
    """Give this rank's ``*.partial`` files their final names (emptying ``created``, so a
    later failure removes nothing); with ``fsync`` the renames themselves survive a crash."""
    dirs = dict.fromkeys(os.path.dirname(p) for p in created)
    for path in created:
        os.replace(path, path[: -len(".partial")])
    created.clear()
    if fsync:
        for d in dirs:
            fsync_dir(d or ".")


def remove_files(paths: list[str]) -> None:
    """Best-effort removal of this rank's partial files after a failed run."""
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass


def _create(final: str, f: OutputFile, fsync: bool = False) -> str:
    """``<final>.partial`` at its full size with its header. A file with no data bytes
    is complete now (fsynced here with ``fsync``: no rank will write it again)."""
    path = partial_name(final)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as e:
        raise CheckpointIOError(f"{path}: cannot create: {e.strerror or e}") from None
    try:
        try:
            os.ftruncate(fd, f.size)
            pwrite_all(fd, memoryview(f.header), 0, path)
        except OSError as e:
            raise CheckpointIOError(f"{path}: cannot size to {f.size} bytes: "
                                    f"{e.strerror or e}") from None
        if fsync and f.data_bytes == 0:
            _fsync(fd, path)
    finally:
        os.close(fd)
    return path


def _open_rw(path: str) -> int:
    """An existing output file, for positioned writes (and the reads of read-modify-write
    windows, see ``chunkio.write_runs_to_file``)."""
    try:
        return os.open(path, os.O_RDWR)
    except OSError as e:
        raise CheckpointIOError(f"{path}: cannot open for writing: {e.strerror or e}") from None


def _fsync(fd: int, path: str) -> None:
    try:
        os.fsync(fd)
    except OSError as e:
        raise CheckpointIOError(f"{path}: fsync failed: {e.strerror or e}") from None


def _copy_piece(reader: ChunkReader, source: SourceIndex, f: OutputFile, p: WritePiece, fd: int,
                path: str, buf: bytearray, hasher, progress: "Progress",
                writeback: bool = False) -> None:
    """Fill piece ``p`` tile by tile (a tile: contiguous in the output, at most the
    buffer); ``writeback`` starts writing each tile to disk as soon as it is written."""
    e = f.entries[p.entry]
    t = TensorInfo(e.name, e.global_shape, e.dtype)
    isz = e.itemsize
    cands = source.overlapping(e.name, p.box)
    strides = _elem_strides(e.box.sizes)
    for tile_rel in tile_contiguous(p.box.shifted(e.box.offsets), e.box.sizes, isz, len(buf)):
        tile = Box(tuple(o + b for o, b in zip(tile_rel.offsets, e.box.offsets)), tile_rel.sizes)
        nbytes = tile.volume * isz
        covered = 0
        for chunk, _ in cands:
            region = chunk.box.intersect(tile)
            if region is None:
                continue
            reader.read(chunk, t, strided_runs(region, chunk.box, tile, isz), buf)
            covered += region.volume
        if covered != tile.volume:
            raise FormatError(f"tensor {e.name!r}: the source does not store all of {tile} "
                              f"(covers {covered} of {tile.volume} elements) for {f.path}")
        view = memoryview(buf)[:nbytes]
        if hasher is not None:
            hasher.update(view)
        offset = e.begin + sum(o * s for o, s in zip(tile_rel.offsets, strides)) * isz
        pwrite_all(fd, view, offset, path)
        if writeback:
            start_writeback(fd, offset, nbytes)
        progress.update(nbytes)


def _elem_strides(sizes):
    out, acc = [], 1
    for s in reversed(sizes):
        out.append(acc)
        acc *= s
    return tuple(reversed(out))


def _split_entries_owned(pieces: list[list[WritePiece]], rank: int) -> list[tuple[int, int]]:
    """Entries written by several ranks that ``rank`` must hash (lowest writing rank)."""
    owner: dict[tuple[int, int], int] = {}
    for r, ps in enumerate(pieces):
        for p in ps:
            if not p.whole:
                owner.setdefault((p.file, p.entry), r)
    return [k for k, r in owner.items() if r == rank]


def _hash_entry(path: str, e, buffer_size: int) -> str:
    h = xxhash.xxh3_64()
    buf = bytearray(min(buffer_size, e.nbytes) or 1)
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = e.begin
        while pos < e.end:
            n = min(len(buf), e.end - pos)
            pread_into(fd, memoryview(buf)[:n], pos, path)
            h.update(memoryview(buf)[:n])
            pos += n
    finally:
        os.close(fd)
    return "xxh3_64:" + h.hexdigest()
