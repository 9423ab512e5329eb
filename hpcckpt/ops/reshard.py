"""reshard: a distributed checkpoint under one strategy -> a distributed checkpoint under another.

No complete copy is written or held. On a shared filesystem each writer reads exactly
the byte ranges it needs (``write_files``). With ``node_local`` ranks only open files
under their own directories and slices travel over MPI (``ops.exchange``).
"""
from __future__ import annotations

from ..comm.wrapper import Comm, as_comm
from ..layout.strategy import Strategy
from ..planning.assign import dedup_assignment
from ..planning.outputs import divide_writes, rank_files
from ..storage.inputs import open_input
from ..storage.manifest import MANIFEST
from .common import check_tensors_match, commit_distributed
from .filecopy import CopyOptions, prepare_output_dir, write_files
from .result import OpResult


def reshard(dist: str, out: str, strategy: Strategy, *, src_strategy: Strategy | None = None,
            dedup: bool = False, prefix: str | None = None, node_local: bool = False,
            comm=None, options: CopyOptions = CopyOptions(), **exchange_opts) -> OpResult:
    comm: Comm = as_comm(comm)
    if node_local:
        from .exchange import reshard_node_local
        return reshard_node_local(dist, out, strategy, src_strategy=src_strategy, dedup=dedup,
                                  prefix=prefix, comm=comm, options=options, **exchange_opts)
    with comm.step("plan"):
        inp = open_input(dist, src_strategy)
        check_tensors_match(inp.source, strategy, str(dist), "the destination strategy")
        prefix = prefix or (inp.manifest.prefix if inp.manifest and inp.manifest.prefix else "model")
        files = rank_files(strategy, prefix, dedup_assignment(strategy) if dedup else None)
        pieces = divide_writes(files, comm.size)
    if not options.dry_run:
        prepare_output_dir(comm, out, options.overwrite, (MANIFEST,), inputs=(str(dist),))

    def commit(checksums):
        commit_distributed(out, strategy, files, checksums, dedup, prefix, options.fsync)

    result = write_files(comm, inp.source, inp.root, out, files, pieces, commit, "reshard", options)
    result.extra.update({"strategy_world_size": strategy.world_size, "dedup": dedup,
                         "transport": "shared-fs"})
    return result
