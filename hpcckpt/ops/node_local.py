"""``reshard --node-local``: a reshard where each rank sees only its own node's files.

plan (``planning.route_plans.plan_node_local``) -> coordinate -> execute: each rank reads
the regions stored on its node, slices travel over MPI (``ops.route_exec``), each
destination file is written by one rank, rank 0 builds the manifest once.
"""
from __future__ import annotations

import time

from ..comm.rounds import DEFAULT_BUDGET, DEFAULT_MAX_MESSAGE
from ..comm.wrapper import as_comm
from ..errors import UsageError
from ..formats.names import DEFAULT_PREFIX, MANIFEST, rank_dir_name
from ..layout.box import Box
from ..layout.strategy import Strategy
from ..planning.dedup import plan_dedup
from ..planning.outputs import rank_file, rank_files
from ..planning.route_plans import plan_node_local, plan_summary
from ..planning.routes import Route
from ..planning.runs import strided_runs
from ..storage import model_files
from ..storage.chunkio import ChunkReader, verify_totals
from ..storage.inputs import open_source, rank_dirs
from .commit import OutputCommit
from .common import check_tensors_match, distributed_records
from .filecopy import CopyOptions
from .result import OpResult
from .route_exec import BoxAssembler, execute_routes, region_reader
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
        # the model directory's non-weight files go along: rank 0 reads and checks its
        # own node's copy, the records carry them into every OUT beside its manifest
        carried = (model_files.read_carried(inp.root, inp.manifest.model_files)
                   if comm.rank == 0 and inp.manifest is not None else [])
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
    reader = ChunkReader(inp, scratch_bytes=options.buffer_size)
    # the records (model files, strategy, manifest) list every file: rank 0 alone laid
    # them all out; OutputCommit broadcasts them to every OUT owner
    records = (lambda sums: distributed_records(strategy, list(files.values()), sums, dedup,
                                                prefix, carried))
    dirs = [rank_dir_name(r) for r in range(strategy.world_size)
            if owner(r) == comm.rank or not per_rank_out]
    try:
        with OutputCommit(comm, my_out, dict(my_files), options=options, op="hpcckpt reshard",
                          inputs=(my_in,), markers=(MANIFEST,), dirs=dirs,
                          shared=not per_rank_out) as job:
            job.create(i for i, _ in my_files)
            targets: dict[tuple[str, Box], list[tuple[int, int]]] = {}
            for i, f in my_files:
                for ei, e in enumerate(f.entries):
                    targets.setdefault((e.name, e.box), []).append((i, ei))
            local_dir_set = set(local_dirs)

            def reader_for(route: Route):
                dirs = route.src.rank_dirs()
                replica = next(i for i, d in enumerate(dirs) if d in local_dir_set)
                return "file", reader, replica

            # the commit path hashes what is written front to back in passing (a whole
            # assembled box, or routes covering a box in order) and reads back the rest
            def write(route: Route, sub: Box, data: memoryview, base: int) -> None:
                sr = strided_runs(sub, sub, route.dst_box, route.tensor.itemsize)
                for i, ei in targets[(route.tensor.name, route.dst_box)]:
                    job.write_runs(i, ei, sr, data, base)

            def read_into(route: Route, arr: bytearray) -> None:  # straight into box layout
                _, src, replica = reader_for(route)
                src.read(route.src, route.tensor,
                         strided_runs(route.region, route.src.box, route.dst_box,
                                      route.tensor.itemsize), arr, 0, replica)

            def write_box(key: tuple[str, Box], arr: bytearray) -> None:
                for i, ei in targets[key]:
                    job.write(i, ei, 0, arr)

            read = region_reader(reader_for)
            assembler = BoxAssembler(plan, budget, read_into, write, write_box, read,
                                     options.buffer_size)
            st = execute_routes(comm, assembler.plan, read, assembler.write, options.buffer_size,
                                budget, max_message, "reshard")
            st.bytes_local += assembler.bytes_local
            with comm.step("reshard: assembled boxes"):
                assembler.check_done()
            job.commit(records)
    finally:
        reader.close()
    per_rank = comm.allgather({"rank": comm.rank, "bytes_read": reader.bytes_read,
                               "bytes_sent": st.bytes_sent, "bytes_received": st.bytes_received,
                               "bytes_written": sum(f.data_bytes for _, f in my_files),
                               **reader.verify_counts()})
    seconds = comm.allreduce_max(time.perf_counter() - t0)
    return OpResult.from_rows("reshard", out, strategy.world_size, per_rank, seconds, comm.size,
                              extra={"transport": "node-local", "dedup": dedup,
                                     "model_files": len(carried),
                                     "bytes_sent": sum(r["bytes_sent"] for r in per_rank),
                                     "rounds": st.rounds,
                                     "strategy_world_size": strategy.world_size,
                                     **verify_totals(per_rank)})


def _stored_in(inp, dirs: list[int]) -> list[tuple[str, Box]]:
    """(tensor, box) stored under the ``rank_<d>`` directories (a superset is fine: it
    only narrows which destinations planning examines). From the source's strategy when
    it has one, which costs O(boxes of those ranks) instead of a scan of every chunk."""
    if inp.strategy is not None and inp.strategy.world_size > max(dirs, default=-1):
        return [(t.name, b) for d in dirs for t, b in inp.strategy.rank_boxes(d)]
    here = set(dirs)
    return [(name, c.box) for name in inp.source.tensors for c in inp.source.chunks(name)
            if here.intersection(c.rank_dirs())]
