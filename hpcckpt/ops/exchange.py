"""Operations whose bytes travel between ranks: node-local reshard, load, reshard_state.

plan (pure ``plan_routes``) -> coordinate (stream totals) -> execute: local routes are
copied through a bounded buffer; the rest move in bounded rounds of Alltoallv
(``comm.exchange``). A provider reads each region it sends exactly once.
"""
from __future__ import annotations

import bisect
import os
import time
import zlib
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import xxhash

from ..comm.exchange import DEFAULT_BUDGET, DEFAULT_MAX_MESSAGE, exchange_streams
from ..comm.wrapper import Comm, as_comm
from ..dtypes import numpy_dtype
from ..errors import FormatError, RankFailure, UsageError
from ..layout.box import Box
from ..layout.strategy import Strategy
from ..planning.dedup import plan_dedup
from ..planning.outputs import rank_file, rank_files
from ..planning.routes import (Route, RoutePlan, destinations_touching, plan_routes,
                               prefer_receiver)
from ..planning.runs import flat_range_to_boxes, strided_runs
from ..planning.sources import SourceChunk, SourceIndex, TensorInfo, strategy_source
from ..storage.atomic import atomic_write_bytes, json_bytes, partial_name
from ..storage.chunkio import ChunkReader, copy_runs, write_runs_to_file
from ..storage.safetensors_io import pwrite_all, start_writeback
from ..storage.inputs import open_input, open_source, rank_dirs
from ..storage.manifest import MANIFEST
from ..storage.training import step_path
from ..layout.yaml_io import write_strategy_yaml
from .common import build_manifest, check_tensors_match
from .filecopy import (DEFAULT_BUFFER, CopyOptions, _create, _fsync, _hash_entry, _open_rw,
                       checksum_of, prepare_output_dir, remove_files, rename_partials)
from .result import OpResult

if TYPE_CHECKING:
    import numpy as np
# numpy is imported by the functions that return arrays (load, reshard_state); the
# node-local reshard moves bytes through bytearrays and never loads it

#: read(route, sub_box, out, out_base): C-order bytes of sub_box (inside route.region)
#: into a writable byte buffer (bytearray, memoryview or uint8 array)
ReadFn = Callable[[Route, Box, "memoryview", int], None]
#: write(route, sub_box, data, base): C-order bytes of sub_box into every local target
WriteFn = Callable[[Route, Box, "memoryview", int], None]


@dataclass
class RouteStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_local: int = 0
    rounds: int = 0


def execute_routes(comm: Comm, plan: RoutePlan, read: ReadFn, write: WriteFn, buffer_size: int,
                   budget: int, max_message: int, step: str = "exchange") -> RouteStats:
    stats = RouteStats()
    with comm.step(f"{step}: local copies"):
        # no bigger than the largest local route, and freed before the exchange
        buf = bytearray(max(16, min(buffer_size, max((r.nbytes for r in plan.local),
                                                      default=0))))
        for route in plan.local:
            stats.bytes_local += copy_route(route, read, write, buf)
        del buf
    send_tot, recv_tot = plan.totals(comm.size)
    sends = {k: _Stream(rs) for k, rs in plan.sends.items()}
    recvs = {j: _Stream(rs) for j, rs in plan.recvs.items()}

    def fill(k: int, off: int, view: memoryview) -> None:
        for route, lo, hi, pos in sends[k].walk(off, len(view)):
            for sub, a, _ in _pieces(route, lo, hi, None):
                read(route, sub, view, pos + a - lo)

    def drain(j: int, off: int, view: memoryview) -> None:
        for route, lo, hi, pos in recvs[j].walk(off, len(view)):
            for sub, a, _ in _pieces(route, lo, hi, None):
                write(route, sub, view, pos + a - lo)

    def align(k: int, off: int, n: int) -> int:
        return sends[k].align(off, n)

    counters = exchange_streams(comm, send_tot, recv_tot, fill, drain, align, budget,
                                max_message, step=step)
    stats.bytes_sent = counters["bytes_sent"]
    stats.bytes_received = counters["bytes_received"]
    stats.rounds = counters["rounds"]
    return stats


def copy_route(route: Route, read: ReadFn, write: WriteFn, buf: bytearray) -> int:
    """A local route, through ``buf``; returns its bytes."""
    for sub, _, _ in _pieces(route, 0, route.nbytes, len(buf)):
        read(route, sub, buf, 0)
        write(route, sub, buf, 0)
    return route.nbytes


class BoxAssembler:
    """Write-combining for destination boxes that receive bytes over MPI.

    Written piece by piece, such a box is often many short strided runs: a source split
    by columns written into a file split by rows costs one ``pwrite`` per row half. A
    box that fits ``cap`` is instead assembled in memory when its first received bytes
    arrive (its local regions read straight into place, so they leave the local-copy
    phase), then written with one ``pwrite`` per target once every byte is in. Boxes
    that would overflow ``cap`` fall back to piece-by-piece writes, so memory stays
    bounded whatever the order of arrival.
    """

    def __init__(self, plan: RoutePlan, cap: int, read_into: Callable[[Route, bytearray], None],
                 write_piece: WriteFn, write_box: Callable[[tuple[str, Box], bytearray], None],
                 read: ReadFn, buffer_size: int):
        self.cap, self.read, self.buffer_size = cap, read, buffer_size
        self.read_into, self.write_piece, self.write_box = read_into, write_piece, write_box
        self.missing: dict[tuple[str, Box], int] = {}   # received bytes still to come
        for routes in plan.recvs.values():
            for r in routes:
                key = (r.tensor.name, r.dst_box)
                if r.dst_box.volume * r.tensor.itemsize <= cap:
                    self.missing[key] = self.missing.get(key, 0) + r.nbytes
        self.deferred: dict[tuple[str, Box], list[Route]] = {}
        kept = []
        for r in plan.local:
            key = (r.tensor.name, r.dst_box)
            if key in self.missing:
                self.deferred.setdefault(key, []).append(r)
            else:
                kept.append(r)
        self.plan = RoutePlan(plan.rank, plan.sends, plan.recvs, kept)
        self.staged: dict[tuple[str, Box], bytearray] = {}
        self.opened: set[tuple[str, Box]] = set()
        self.staged_bytes = 0
        self.bytes_local = 0

    def write(self, route: Route, sub: Box, data: memoryview, base: int) -> None:
        key = (route.tensor.name, route.dst_box)
        if route.provider == route.receiver or key not in self.missing:
            self.write_piece(route, sub, data, base)
            return
        arr = self.staged.get(key)
        if key not in self.opened:  # the first bytes of this box
            self.opened.add(key)
            arr = self._open(key, route)
        isz = route.tensor.itemsize
        if arr is None:
            self.write_piece(route, sub, data, base)
        else:
            copy_runs(strided_runs(sub, sub, route.dst_box, isz), data, base, arr, 0)
        self.missing[key] -= sub.volume * isz
        if self.missing[key] == 0 and arr is not None:
            self.write_box(key, arr)
            del self.staged[key]
            self.staged_bytes -= len(arr)

    def _open(self, key: tuple[str, Box], route: Route) -> bytearray | None:
        local = self.deferred.pop(key, [])
        nbytes = route.dst_box.volume * route.tensor.itemsize
        if self.staged_bytes + nbytes > self.cap:  # full: this box goes piece by piece
            buf = bytearray(max(16, min(self.buffer_size, max((r.nbytes for r in local),
                                                              default=0))))
            for r in local:
                self.bytes_local += copy_route(r, self.read, self.write_piece, buf)
            return None
        arr = self.staged[key] = bytearray(nbytes)
        self.staged_bytes += nbytes
        for r in local:
            self.read_into(r, arr)
            self.bytes_local += r.nbytes
        return arr

    def check_done(self) -> None:
        left = [k for k, n in self.missing.items() if n] + list(self.staged) + list(self.deferred)
        if left:  # pragma: no cover - a planning bug, never silently a hole in a file
            name, box = left[0]
            raise FormatError(f"tensor {name!r} {box}: not every byte arrived")


class InOrderHashes:
    """xxh3-64 of destination boxes whose bytes are written front to back."""

    def __init__(self):
        self.hashers: dict = {}
        self.done: dict = {}       # key -> bytes hashed so far, or -1 once out of order

    def update(self, key, offset: int, data: memoryview) -> None:
        if self.done.get(key, 0) != offset:
            self.spoil(key)
            return
        self.hashers.setdefault(key, xxhash.xxh3_64()).update(memoryview(data))
        self.done[key] = offset + len(data)

    def spoil(self, key) -> None:
        self.done[key] = -1
        self.hashers.pop(key, None)

    def digest(self, key, nbytes: int) -> str | None:
        """The checksum if exactly ``nbytes`` were hashed in order (empty boxes too)."""
        if nbytes == 0:
            return checksum_of(b"")
        if self.done.get(key) != nbytes:
            return None
        return "xxh3_64:" + self.hashers[key].hexdigest()


class _Stream:
    """The routes between one pair of ranks, as one byte stream."""

    def __init__(self, routes: list[Route]):
        self.routes = routes
        self.starts = [0, *accumulate(r.nbytes for r in routes)]

    def walk(self, off: int, n: int):
        """(route, lo, hi, position in the window) for stream bytes [off, off + n)."""
        i = bisect.bisect_right(self.starts, off) - 1
        end = off + n
        while off < end and i < len(self.routes):
            r0 = self.starts[i]
            lo, hi = off - r0, min(end, self.starts[i + 1]) - r0
            if hi > lo:
                yield self.routes[i], lo, hi, off - (end - n)
            off = r0 + hi
            i += 1

    def align(self, off: int, n: int) -> int:
        """Largest m <= n so that off + m ends on an element boundary."""
        end = off + n
        i = bisect.bisect_right(self.starts, end) - 1
        if i >= len(self.routes) or end == self.starts[i]:
            return n
        isz = self.routes[i].tensor.itemsize
        cut = self.starts[i] + (end - self.starts[i]) // isz * isz
        return max(0, cut - off)


def _pieces(route: Route, lo: int, hi: int, max_bytes: int | None):
    """Sub-boxes (global coords) of route.region covering its C-order bytes [lo, hi),
    optionally in windows of at most ``max_bytes``; yields (box, byte_lo, byte_hi)."""
    isz = route.tensor.itemsize
    step = (hi - lo) if max_bytes is None else max(isz, max_bytes // isz * isz)
    reg = route.region
    for a in range(lo, hi, step or 1):
        b = min(hi, a + step)
        pos = a
        for sub in flat_range_to_boxes(reg.sizes, a // isz, b // isz):
            g = Box(tuple(o + s for o, s in zip(sub.offsets, reg.offsets)), sub.sizes)
            nb = g.volume * isz
            yield g, pos, pos + nb
            pos += nb


def _region_reader(reader_for: Callable[[Route], tuple]) -> ReadFn:
    """Build a ReadFn from a function giving (kind, source, replica) per route."""
    def read(route: Route, sub: Box, out: memoryview, base: int) -> None:
        kind, src, replica = reader_for(route)
        sr = strided_runs(sub, route.src.box, sub, route.tensor.itemsize)
        if kind == "file":
            src.read(route.src, route.tensor, sr, out, base, replica)
        else:
            copy_runs(sr, src, 0, out, base)
    return read


def _memory_writer(targets: dict[tuple[str, Box], "np.ndarray"]) -> WriteFn:
    def write(route: Route, sub: Box, data: memoryview, base: int) -> None:
        arr = targets[(route.tensor.name, route.dst_box)]
        copy_runs(strided_runs(sub, sub, route.dst_box, route.tensor.itemsize), data, base, arr, 0)
    return write


def _as_bytes(a: "np.ndarray") -> "np.ndarray":
    import numpy as np
    return a.reshape(-1).view(np.uint8)


def _allocate(strategy: Strategy, rank: int):
    """Arrays for the rank's boxes: ``{name: array}`` and their byte views by (name, box)."""
    import numpy as np
    out: dict[str, np.ndarray] = {}
    targets: dict[tuple[str, Box], np.ndarray] = {}
    for t, box in strategy.rank_boxes(rank):
        out[t.name] = np.empty(box.sizes, numpy_dtype(t.dtype))
        targets[(t.name, box)] = _as_bytes(out[t.name])
    return out, targets


# ---- load -------------------------------------------------------------------------
def plan_load(source: SourceIndex, strategy: Strategy, rank: int) -> RoutePlan:
    """Rank ``rank``'s routes for loading ``strategy`` from ``source``. Pure.

    Every distinct destination box has one reader among the ranks holding it; the
    reader reads the whole box from disk into its own slice (local routes), then
    forwards it from memory to the box's other holders: each unique byte is read from
    disk once. The reader is picked by a hash of the tensor's name, so replicas share
    the reading; deciding it per box (rather than balancing bytes over every chunk of the
    job, as de-duplication does) keeps planning O(this rank's boxes).
    """
    order = {t.name: i for i, t in enumerate(strategy.tensors)}  # the same on every rank
    destinations, readers = [], {}
    for t, box in strategy.rank_boxes(rank):
        if box.is_empty():
            continue
        holders = strategy.replicas(t.name, rank)
        readers[(t.name, box)] = holders[zlib.crc32(t.name.encode()) % len(holders)]
        destinations.append((order[t.name], TensorInfo(t.name, t.shape, t.dtype), box, holders))
    return plan_routes(rank, destinations, source, lambda c, t, d, k: readers[(t.name, d)])


def load(path: str, strategy: Strategy, comm=None, *, budget: int = DEFAULT_BUDGET,
         max_message: int = DEFAULT_MAX_MESSAGE, buffer_size: int = DEFAULT_BUFFER,
         stats: dict | None = None, src_strategy: Strategy | None = None,
         step: tuple[int, int] | str | None = None) -> dict[str, "np.ndarray"]:
    """This rank's slices of every tensor under ``strategy``, from any checkpoint.

    Complete HF weights or a distributed checkpoint of any strategy, full or
    de-duplicated (recognised from the files). Each distinct destination box is read
    from disk once, by one of the ranks holding it; its replicas receive it over MPI.

    Args:
        path: checkpoint directory or file.
        strategy: the layout the caller wants; its world size must equal the job's.
        comm: mpi4py communicator or None (one process).
        src_strategy: the source's layout, only for a distributed checkpoint without a
            manifest (MindSpore's); otherwise everything is read from the files.
        step: for a training directory (``CheckpointManager``), the committed step to
            load, ``(epoch, step)`` or ``"EPOCH_STEP"``; default the latest committed.
        stats: if given, filled with ``per_rank`` counters (bytes_read from disk,
            bytes_received and bytes_sent over MPI), ``rounds``, ``seconds`` and
            ``unique_bytes``.
    Returns:
        ``{name: array}`` for every tensor this rank holds (numpy, dtype from the file;
        bf16/fp8 as ml_dtypes).
    """
    comm = as_comm(comm)
    t0 = time.perf_counter()
    _check_world(strategy, comm)  # the same verdict on every rank: no step needed
    with comm.step("plan"):
        inp = open_input(step_path(path, step), src_strategy, lazy=True)
        check_tensors_match(inp.source, strategy, str(path), "the strategy", allow_extra=True)
        plan = plan_load(inp.source, strategy, comm.rank)
        out, targets = _allocate(strategy, comm.rank)
    reader = ChunkReader(inp.root, scratch_bytes=buffer_size)
    file_read = _region_reader(lambda r: ("file", reader, 0))

    def read(route: Route, sub: Box, buf: memoryview, base: int) -> None:
        if route.receiver == comm.rank:
            file_read(route, sub, buf, base)
        else:  # forwarding my own, already loaded, slice to a replica
            sr = strided_runs(sub, route.dst_box, sub, route.tensor.itemsize)
            copy_runs(sr, targets[(route.tensor.name, route.dst_box)], 0, buf, base)
    try:
        st = execute_routes(comm, plan, read, _memory_writer(targets), buffer_size, budget,
                            max_message, "load")
    finally:
        reader.close()
    if stats is not None:
        stats.update(per_rank=comm.allgather({"rank": comm.rank, "bytes_read": reader.bytes_read,
                                              "bytes_received": st.bytes_received,
                                              "bytes_sent": st.bytes_sent,
                                              "bytes_local": st.bytes_local}),
                     rounds=st.rounds, seconds=comm.allreduce_max(time.perf_counter() - t0),
                     unique_bytes=strategy.unique_bytes, files=len(inp.files))
    return out


def _check_world(strategy: Strategy, comm: Comm) -> None:
    if strategy.world_size != comm.size:
        raise UsageError(f"strategy has {strategy.world_size} ranks but the job has "
                         f"{comm.size}; launch with mpiexec -n {strategy.world_size}")


def plan_summary(plan: RoutePlan, size: int, sends_read_disk: bool,
                 local_dirs: list[int] | None = None) -> dict:
    """One rank's planned traffic, for --dry-run. ``sends_read_disk``: what the rank sends
    is read from its files (reshard) rather than forwarded from memory (load);
    ``local_dirs``: the rank reads the replica in these rank directories (node-local)."""
    send, recv = plan.totals(size)
    from_disk = plan.local + [r for rs in plan.sends.values() for r in rs] * sends_read_disk
    here = set(local_dirs or ())
    files = {next((f for f, d in zip(r.src.files, r.src.rank_dirs()) if d in here), r.src.files[0])
             for r in from_disk}
    return {"rank": plan.rank, "bytes_read": sum(r.nbytes for r in from_disk),
            "bytes_sent": sum(send), "bytes_received": sum(recv), "source_files": len(files)}


# ---- in-memory reshard ----------------------------------------------------------------
def reshard_state(local_state: dict[str, "np.ndarray"], src_strategy: Strategy,
                  dst_strategy: Strategy, comm=None, *, budget: int = DEFAULT_BUDGET,
                  max_message: int = DEFAULT_MAX_MESSAGE) -> dict[str, "np.ndarray"]:
    """Each rank passes the slices it holds under ``src_strategy`` and receives those it
    holds under ``dst_strategy``; no disk. Ranks beyond a strategy's world size hold
    nothing in it. A rank holding a slice locally copies it rather than receiving it."""
    import numpy as np
    comm = as_comm(comm)
    with comm.step("plan"):
        for s, what in ((src_strategy, "source"), (dst_strategy, "destination")):
            if s.world_size > comm.size:
                raise UsageError(f"{what} strategy has {s.world_size} ranks but the job only "
                                 f"{comm.size}")
        for t in dst_strategy.tensors:
            if t.name not in src_strategy:
                raise FormatError(f"tensor {t.name!r} is in the destination strategy but not "
                                  "in the source strategy")
            s = src_strategy.spec(t.name)
            if (s.shape, s.dtype) != (t.shape, t.dtype):
                raise FormatError(f"tensor {t.name!r} is {s.dtype} {list(s.shape)} in the source "
                                  f"strategy but {t.dtype} {list(t.shape)} in the destination")
        mine: dict[tuple[str, Box], np.ndarray] = {}
        for t, box in src_strategy.rank_boxes(comm.rank):
            a = local_state.get(t.name)
            if a is None:
                raise FormatError(f"rank {comm.rank}: local_state lacks tensor {t.name!r} "
                                  f"(its box {box})")
            a = np.asarray(a)
            if a.shape != box.sizes or a.dtype != numpy_dtype(t.dtype):
                raise FormatError(f"rank {comm.rank}: tensor {t.name!r} is {a.dtype} {list(a.shape)} "
                                  f"but the source strategy gives this rank {t.dtype} "
                                  f"{list(box.sizes)} at {box}")
            mine[(t.name, box)] = _as_bytes(np.ascontiguousarray(a).reshape(box.sizes))
        plan = plan_reshard_state(src_strategy, dst_strategy, comm.rank)
        out, targets = _allocate(dst_strategy, comm.rank)
    execute_routes(comm, plan, _region_reader(lambda r: ("mem", mine[(r.tensor.name, r.src.box)], 0)),
                   _memory_writer(targets), DEFAULT_BUFFER, budget, max_message, "reshard_state")
    return out


def plan_reshard_state(src: Strategy, dst: Strategy, rank: int) -> RoutePlan:
    """Rank ``rank``'s routes moving slices held under ``src`` to their holders under
    ``dst``. Pure. A slice the receiver already holds is copied locally."""
    source = strategy_source(src, lambda r: f"mem:{r}")
    destinations = destinations_touching(
        dst, ((t.name, b) for t, b in dst.rank_boxes(rank)),
        ((t.name, b) for t, b in src.rank_boxes(rank)))
    return plan_routes(rank, destinations, source,
                       prefer_receiver(lambda c, t: [int(f[4:]) for f in c.files]))


# ---- node-local reshard ---------------------------------------------------------------
def reshard_node_local(dist: str, out: str, strategy: Strategy, *, src_strategy=None,
                       dedup: bool = False, prefix: str | None = None, comm=None,
                       options: CopyOptions = CopyOptions(), budget: int = DEFAULT_BUDGET,
                       max_message: int = DEFAULT_MAX_MESSAGE) -> OpResult:
    """Reshard when each rank sees only its own node's files.

    ``dist`` and ``out`` may contain ``{rank}``, formatted with this rank's number, so
    every rank has its own directories. Each rank opens only files under the ``rank_<r>``
    directories present in its ``dist``; destination file ``d`` is written by job rank
    ``d % size`` under its ``out``. Every rank's ``dist`` holds a copy of manifest.json.
    """
    comm = as_comm(comm)
    t0 = time.perf_counter()
    my_in, my_out = dist.format(rank=comm.rank), out.format(rank=comm.rank)
    per_rank_out = my_out != out or comm.size == 1
    simulated = getattr(comm, "simulated", False)
    with comm.step("plan"):
        inp = open_source(my_in, src_strategy, comm, prefix, lazy=True)
        if inp.kind != "distributed" or (inp.manifest is None and not simulated):
            raise UsageError(f"{my_in}: --node-local needs a distributed checkpoint with its "
                             f"{MANIFEST} on every node")
        check_tensors_match(inp.source, strategy, my_in, "the destination strategy")
        prefix = prefix or (inp.manifest.prefix if inp.manifest else None) or "model"
        if simulated:  # the usual placement: rank directory d on job rank d % size
            local_dirs = [d for d in range(inp.strategy.world_size) if d % comm.size == comm.rank]
        else:
            local_dirs = sorted(rank_dirs(my_in))
    dir_holders: dict[int, list[int]] = {}
    if simulated:
        dir_holders = {d: [d % comm.size] for d in range(inp.strategy.world_size)}
    else:
        for j, dirs in enumerate(comm.allgather(local_dirs)):
            for d in dirs:
                dir_holders.setdefault(d, []).append(j)
    with comm.step("plan routes"):
        # node-local stores whole boxes: its routes deliver whole destination boxes
        assignment = plan_dedup(strategy, "whole") if dedup else None
        owner = lambda d: d % comm.size  # noqa: E731 - as in plan_node_local
        # file d by its number; a rank lays out only its own files, except rank 0 which
        # builds the manifest (it lists every file) once for every node's copy
        if options.dry_run or comm.rank != 0:
            files = {d: rank_file(strategy, prefix, d, assignment)
                     for d in range(comm.rank, strategy.world_size, comm.size)}
        else:
            files = dict(enumerate(rank_files(strategy, prefix, assignment)))
        my_files = [(i, f) for i, f in files.items() if owner(f.rank) == comm.rank]

        mine = [(e.name, e.box) for _, f in my_files for e in f.entries]
        plan = plan_node_local(inp.source, strategy, comm.rank, comm.size, dir_holders,
                               _stored_in(inp, local_dirs), mine,
                               assignment.owners() if assignment else None)
    if options.dry_run:
        summary = {**plan_summary(plan, comm.size, sends_read_disk=True, local_dirs=local_dirs),
                   "bytes_written": sum(f.data_bytes for _, f in my_files),
                   "plan_seconds": round(time.perf_counter() - t0, 3)}
        per_rank = comm.allgather(summary)
        return OpResult.from_rows("reshard", out, strategy.world_size, per_rank,
                                  time.perf_counter() - t0, comm.size, dry_run=True,
                                  extra={"transport": "node-local", "simulated": simulated})
    prepare_output_dir(comm, my_out, options.overwrite, (MANIFEST,), inputs=(my_in,),
                       mine=per_rank_out or comm.rank == 0)
    created: list[str] = []
    reader = ChunkReader(my_in, scratch_bytes=options.buffer_size)
    fds: dict[int, int] = {}
    try:
        with comm.step("create files"):
            targets: dict[tuple[str, Box], list[tuple[int, str, int]]] = {}
            for i, f in my_files:
                created.append(_create(os.path.join(my_out, f.path), f))
                fds[i] = _open_rw(created[-1])
                for e in f.entries:
                    targets.setdefault((e.name, e.box), []).append((fds[i], created[-1], e.begin))
        local_dir_set = set(local_dirs)

        def reader_for(route: Route):
            dirs = route.src.rank_dirs()
            replica = next(i for i, d in enumerate(dirs) if d in local_dir_set)
            return "file", reader, replica

        # with fsync, each write's writeback starts at once: the closing fsync finds
        # little left to do (as in write_files)
        writeback = start_writeback if options.fsync else (lambda fd, offset, n: None)

        # checksums taken in passing when a box's bytes are written in order (a whole
        # assembled box, or one route covering the box); the rest are read back later
        hashing = InOrderHashes()

        def write(route: Route, sub: Box, data: memoryview, base: int) -> None:
            sr = strided_runs(sub, sub, route.dst_box, route.tensor.itemsize)
            lo, hi = sr.dst_span()
            key = (route.tensor.name, route.dst_box)
            if route.region == route.dst_box:
                hashing.update(key, lo, data[base:base + sr.nbytes])
            else:
                hashing.spoil(key)
            for fd, path, begin in targets[key]:
                write_runs_to_file(fd, path, begin, sr, data, base)
                writeback(fd, begin + lo, hi - lo)

        def read_into(route: Route, arr: bytearray) -> None:  # straight into box layout
            _, src, replica = reader_for(route)
            src.read(route.src, route.tensor, strided_runs(route.region, route.src.box,
                                                           route.dst_box, route.tensor.itemsize),
                     arr, 0, replica)

        def write_box(key: tuple[str, Box], arr: bytearray) -> None:
            hashing.update(key, 0, arr)
            for fd, path, begin in targets[key]:
                pwrite_all(fd, memoryview(arr), begin, path)
                writeback(fd, begin, len(arr))

        read = _region_reader(reader_for)
        assembler = BoxAssembler(plan, budget, read_into, write, write_box, read,
                                 options.buffer_size)
        st = execute_routes(comm, assembler.plan, read, assembler.write, options.buffer_size,
                            budget, max_message, "reshard")
        st.bytes_local += assembler.bytes_local
        with comm.step("reshard: assembled boxes"):
            assembler.check_done()
        with comm.step("checksum"):
            sums = {}
            for i, f in my_files:
                path = os.path.join(my_out, partial_name(f.path))
                if options.fsync:
                    _fsync(fds[i], path)
                for ei, e in enumerate(f.entries):
                    sums[(i, ei)] = (hashing.digest((e.name, e.box), e.nbytes)
                                     or _hash_entry(path, e, options.buffer_size))
        gathered = comm.gather(sums)
        with comm.step("rename"):
            rename_partials(created, options.fsync)
        with comm.step("manifest"):  # rank 0 alone holds every checksum, once
            manifest = None
            if comm.rank == 0:
                all_sums = {k: v for s in gathered for k, v in s.items()}
                manifest = json_bytes(build_manifest(strategy, list(files.values()), all_sums,
                                                     dedup, prefix).to_dict())
        manifest = comm.bcast(manifest)
        with comm.step("commit"):
            if per_rank_out or comm.rank == 0:
                for r in range(strategy.world_size):
                    if owner(r) == comm.rank or not per_rank_out:
                        os.makedirs(os.path.join(my_out, f"rank_{r}"), exist_ok=True)
                write_strategy_yaml(strategy, Path(my_out) / "strategy.yaml")
                atomic_write_bytes(Path(my_out) / MANIFEST, manifest, options.fsync)
    except RankFailure:
        remove_files(created)
        raise
    finally:
        reader.close()
        for fd in fds.values():
            os.close(fd)
    per_rank = comm.allgather({"rank": comm.rank, "bytes_read": reader.bytes_read,
                               "bytes_sent": st.bytes_sent, "bytes_received": st.bytes_received,
                               "bytes_written": sum(f.data_bytes for _, f in my_files)})
    seconds = comm.allreduce_max(time.perf_counter() - t0)
    return OpResult.from_rows("reshard", out, strategy.world_size, per_rank, seconds, comm.size,
                              extra={"transport": "node-local", "dedup": dedup,
                                     "bytes_sent": sum(r["bytes_sent"] for r in per_rank),
                                     "rounds": st.rounds,
                                     "strategy_world_size": strategy.world_size})


def plan_node_local(source: SourceIndex, strategy: Strategy, rank: int, size: int,
                    dir_holders: dict[int, list[int]], provided: list[tuple[str, Box]],
                    mine: list[tuple[str, Box]], assignment: dict | None) -> RoutePlan:
    """Rank ``rank``'s routes for a node-local reshard. Pure.

    ``dir_holders``: source rank directory -> job ranks that have it on their node;
    ``provided``: (tensor, box) stored in this rank's directories (a superset is fine);
    ``mine``: the destination boxes in the files this rank writes; ``assignment``: the
    destination's de-duplication choice, or None (full). Destination file ``d`` is
    written by job rank ``d % size``; a region is read by a rank having it on its node,
    the writer itself whenever it can.
    """
    def receivers(name: str, box: Box, ranks: tuple[int, ...]) -> tuple[int, ...]:
        holders = ranks if assignment is None else (assignment[(name, box)],)
        return tuple(sorted({d % size for d in holders}))

    def holders_of(c: SourceChunk, t: TensorInfo) -> list[int]:
        holders = sorted({j for d in c.rank_dirs() for j in dir_holders.get(d, ())})
        if not holders:
            raise FormatError(f"tensor {t.name!r} chunk {c.box}: no rank has "
                              f"{' or '.join(c.files)} on its node")
        return holders

    destinations = destinations_touching(strategy, mine, provided, receivers)
    return plan_routes(rank, destinations, source, prefer_receiver(holders_of))


def _stored_in(inp, dirs: list[int]) -> list[tuple[str, Box]]:
    """(tensor, box) stored under the ``rank_<d>`` directories (a superset is fine: it
    only narrows which destinations planning examines). From the source's strategy when
    it has one, which costs O(boxes of those ranks) instead of a scan of every chunk."""
    if inp.strategy is not None and inp.strategy.world_size > max(dirs, default=-1):
        return [(t.name, b) for d in dirs for t, b in inp.strategy.rank_boxes(d)]
    here = set(dirs)
    return [(name, c.box) for name in inp.source.tensors for c in inp.source.chunks(name)
            if here.intersection(c.rank_dirs())]

