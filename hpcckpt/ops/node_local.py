"""``reshard --node-local``: a reshard where each rank sees only its own node's files.

plan (``planning.route_plans.plan_node_local``) -> coordinate -> execute: each rank reads
the regions stored on its node, slices travel over MPI (``ops.route_exec``), each
destination file is written by one rank, rank 0 builds the manifest once.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..comm.rounds import DEFAULT_BUDGET, DEFAULT_MAX_MESSAGE
from ..comm.wrapper import as_comm
from ..errors import RankFailure, UsageError
from ..formats.names import DEFAULT_PREFIX, MANIFEST, STRATEGY_FILE, rank_dir_name
from ..layout.box import Box
from ..layout.strategy import Strategy
from ..layout.yaml_io import write_strategy_yaml
from ..planning.dedup import plan_dedup
from ..planning.outputs import rank_file, rank_files
from ..planning.route_plans import plan_node_local, plan_summary
from ..planning.routes import Route
from ..planning.runs import strided_runs
from ..storage.atomic import atomic_write_bytes, json_bytes, partial_name
from ..storage.chunkio import ChunkReader, write_runs_to_file
from ..storage.fileio import pwrite_all, start_writeback
from ..storage.inputs import open_source, rank_dirs
from .common import build_manifest, check_tensors_match
from .filecopy import (CopyOptions, create_partial, fsync_fd, hash_entry, open_rw,
                       prepare_output_dir, remove_files, rename_partials)
from .result import OpResult
from .route_exec import BoxAssembler, InOrderHashes, execute_routes, region_reader
# the node-local reshard moves bytes through bytearrays and never loads numpy


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
        inp = open_source(my_in, src_strategy, comm, prefix, lazy=True, shared=False)
        if inp.kind != "distributed" or (inp.manifest is None and not simulated):
            raise UsageError(f"{my_in}: --node-local needs a distributed checkpoint with its "
                             f"{MANIFEST} on every node")
        check_tensors_match(inp.source, strategy, my_in, "the destination strategy")
        prefix = prefix or (inp.manifest.prefix if inp.manifest else None) or DEFAULT_PREFIX
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
    reader = ChunkReader(inp, scratch_bytes=options.buffer_size)
    fds: dict[int, int] = {}
    try:
        with comm.step("create files"):
            targets: dict[tuple[str, Box], list[tuple[int, str, int]]] = {}
            for i, f in my_files:
                created.append(create_partial(os.path.join(my_out, f.path), f))
                fds[i] = open_rw(created[-1])
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

        read = region_reader(reader_for)
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
                    fsync_fd(fds[i], path)
                for ei, e in enumerate(f.entries):
                    sums[(i, ei)] = (hashing.digest((e.name, e.box), e.nbytes)
                                     or hash_entry(path, e, options.buffer_size))
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
                        os.makedirs(os.path.join(my_out, rank_dir_name(r)), exist_ok=True)
                write_strategy_yaml(strategy, Path(my_out) / STRATEGY_FILE)
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


def _stored_in(inp, dirs: list[int]) -> list[tuple[str, Box]]:
    """(tensor, box) stored under the ``rank_<d>`` directories (a superset is fine: it
    only narrows which destinations planning examines). From the source's strategy when
    it has one, which costs O(boxes of those ranks) instead of a scan of every chunk."""
    if inp.strategy is not None and inp.strategy.world_size > max(dirs, default=-1):
        return [(t.name, b) for d in dirs for t, b in inp.strategy.rank_boxes(d)]
    here = set(dirs)
    return [(name, c.box) for name in inp.source.tensors for c in inp.source.chunks(name)
            if here.intersection(c.rank_dirs())]
