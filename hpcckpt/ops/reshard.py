"""reshard: a distributed checkpoint under one strategy -> a distributed checkpoint under another.

No complete copy is written or held. On a shared filesystem each writer reads exactly
the byte ranges it needs (``write_files``). With ``node_local`` ranks only open files
under their own directories and slices travel over MPI (``ops.node_local``).
"""
from __future__ import annotations

import time

from ..comm.wrapper import Comm, as_comm
from ..layout.strategy import Strategy
from ..planning.dedup import dedup_mode, plan_dedup
from ..planning.outputs import OutputFile, divide_writes, rank_file, rank_files
from ..planning.sources import SourceIndex
from ..storage import model_files
from ..storage.inputs import open_source
from ..formats.names import DEFAULT_PREFIX, MANIFEST
from .common import check_tensors_match, distributed_records, rank_dirs_of
from .filecopy import CopyOptions, write_files
from .result import OpResult


def reshard(dist: str, out: str, strategy: Strategy, *, src_strategy: Strategy | None = None,
            dedup: bool | str = False, prefix: str | None = None, node_local: bool = False,
            comm=None, options: CopyOptions = CopyOptions(), **exchange_opts) -> OpResult:
    comm: Comm = as_comm(comm)
    if node_local:
        from .node_local import reshard_node_local
        return reshard_node_local(dist, out, strategy, src_strategy=src_strategy, dedup=dedup,
                                  prefix=prefix, comm=comm, options=options, **exchange_opts)
    t0 = time.perf_counter()
    mode = dedup_mode(dedup)
    with comm.step("plan"):
        inp = open_source(dist, src_strategy, comm, prefix, lazy=True)
        check_tensors_match(inp.source, strategy, str(dist), "the destination strategy")
        prefix = prefix or (inp.manifest.prefix if inp.manifest and inp.manifest.prefix
                            else DEFAULT_PREFIX)
        assignment = plan_dedup(strategy, mode) if mode else None
        if getattr(comm, "simulated", False) and strategy.world_size == comm.size:
            # rank r writes file r (divide_writes): plan that file alone
            return _simulated_plan(inp.source, rank_file(strategy, prefix, comm.rank, assignment),
                                   out, strategy, comm, t0)
        files = rank_files(strategy, prefix, assignment)
        pieces = divide_writes(files, comm.size)
        for p in pieces[comm.rank]:
            inp.source.chunks(files[p.file].entries[p.entry].name)  # decoded and checked now
        # the model directory's non-weight files go along, checked against the manifest
        carried = (model_files.read_carried(inp.root, inp.manifest.model_files)
                   if comm.rank == 0 and inp.manifest is not None else [])

    def records(checksums):
        return distributed_records(strategy, files, checksums, bool(mode), prefix, carried)

    result = write_files(comm, inp.source, inp, out, files, pieces, records, "reshard",
                         options, inputs=(str(dist),), markers=(MANIFEST,),
                         dirs=rank_dirs_of(strategy))
    result.extra.update({"strategy_world_size": strategy.world_size, "dedup": bool(mode),
                         "transport": "shared-fs", "model_files": len(carried)})
    return result


def _simulated_plan(source: SourceIndex, mine: OutputFile, out: str, strategy: Strategy,
                    comm: Comm, t0: float) -> OpResult:
    """One rank's shared-filesystem plan: the source chunks its file needs, read once."""
    files: set[str] = set()
    for e in mine.entries:
        for chunk, _ in source.overlapping(e.name, e.box):
            files.add(chunk.files[0])
    seconds = time.perf_counter() - t0
    row = {"rank": comm.rank, "bytes_read": mine.data_bytes, "bytes_written": mine.data_bytes,
           "source_files": len(files), "plan_seconds": round(seconds, 3)}
    return OpResult.from_rows("reshard", out, strategy.world_size, (row,), seconds, comm.size,
                              dry_run=True, extra={"transport": "shared-fs", "simulated": True})
