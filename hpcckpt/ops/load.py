"""The ``load`` job: every rank loads its slices, reports traffic, optionally compares.

``hpcckpt.load`` (ops/in_memory.py) is what a training job calls; this wraps it as a
command: the per-rank plan for --dry-run, and bytes read from disk and received over
MPI per rank, plus an exact comparison with a reference checkpoint.
"""
from __future__ import annotations

import time

from ..comm.wrapper import Comm
from ..layout.strategy import Strategy
from ..storage.inputs import open_source
from .common import check_tensors_match
from .compare import compare_slices
from ..comm.rounds import DEFAULT_LOAD_BUDGET, DEFAULT_MAX_MESSAGE
from ..planning.route_plans import plan_load, plan_summary
from ..storage.chunkio import verify_totals
from .filecopy import DEFAULT_BUFFER
from .in_memory import check_world, load
from .result import OpResult


def load_job(path: str, strategy: Strategy, comm: Comm, *, against: str | None = None,
             src_strategy: Strategy | None = None, dry_run: bool = False,
             buffer_size: int = DEFAULT_BUFFER, budget: int = DEFAULT_LOAD_BUDGET,
             max_message: int = DEFAULT_MAX_MESSAGE) -> OpResult:
    t0 = time.perf_counter()
    if dry_run:
        check_world(strategy, comm)
        with comm.step("plan"):
            inp = open_source(path, src_strategy, comm, lazy=True)
            check_tensors_match(inp.source, strategy, str(path), "the strategy", allow_extra=True)
            row = {**plan_summary(plan_load(inp.source, strategy, comm.rank), comm.size,
                                  sends_read_disk=False),
                   "plan_seconds": round(time.perf_counter() - t0, 3)}
        per_rank = comm.allgather(row)
        return OpResult.from_rows("load", path, len(inp.files), per_rank,
                                  time.perf_counter() - t0, comm.size, dry_run=True,
                                  extra={"unique_bytes": strategy.unique_bytes,
                                         "simulated": getattr(comm, "simulated", False)})
    stats: dict = {}
    arrays = load(path, strategy, comm, budget=budget, max_message=max_message,
                  buffer_size=buffer_size, stats=stats, src_strategy=src_strategy)
    seconds = stats["seconds"]
    extra = {"unique_bytes": stats["unique_bytes"], "rounds": stats["rounds"],
             **verify_totals(stats["per_rank"]),
             "bytes_sent": sum(r["bytes_sent"] for r in stats["per_rank"])}
    if against is not None:
        with comm.step(f"compare with {against}"):
            compared = compare_slices(arrays, strategy, comm.rank, against, buffer_size)
        extra.update(against=against, identical=True,
                     bytes_compared=comm.allreduce_sum(compared))
    held = comm.allgather(sum(a.nbytes for a in arrays.values()))  # in rank order
    per_rank = [{**r, "bytes_held": h} for r, h in zip(stats["per_rank"], held)]
    return OpResult.from_rows("load", path, stats["files"], per_rank, seconds, comm.size,
                              extra=extra)
