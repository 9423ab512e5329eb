"""Pure route planners of the operations whose bytes travel between ranks.

Each gives one rank's ``RoutePlan`` (``planning.routes``): ``plan_load`` (every unique
byte read from disk once, forwarded to replicas), ``plan_reshard_state`` (slices in
memory to their new holders) and ``plan_node_local`` (a reshard where each rank sees
only its node's files); ``plan_summary`` is a plan's traffic for ``--dry-run``. Never
imports mpi4py: tested in one process for any world size.
"""
from __future__ import annotations

import zlib

from ..errors import FormatError
from ..layout.box import Box
from ..layout.strategy import Strategy
from ..layout.tensor import TensorInfo
from .routes import RoutePlan, destinations_touching, plan_routes, prefer_receiver
from .sources import SourceChunk, SourceIndex, strategy_source


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
        destinations.append((order[t.name], t.info, box, holders))
    return plan_routes(rank, destinations, source, lambda c, t, d, k: readers[(t.name, d)])


def plan_reshard_state(src: Strategy, dst: Strategy, rank: int) -> RoutePlan:
    """Rank ``rank``'s routes moving slices held under ``src`` to their holders under
    ``dst``. Pure. A slice the receiver already holds is copied locally."""
    source = strategy_source(src, lambda r: f"mem:{r}")
    destinations = destinations_touching(
        dst, ((t.name, b) for t, b in dst.rank_boxes(rank)),
        ((t.name, b) for t, b in src.rank_boxes(rank)))
    return plan_routes(rank, destinations, source,
                       prefer_receiver(lambda c, t: [int(f[4:]) for f in c.files]))


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

    known: dict[tuple[str, ...], list[int]] = {}   # a chunk's files -> their holders

    def holders_of(c: SourceChunk, t: TensorInfo) -> list[int]:
        holders = known.get(c.files)
        if holders is None:   # asked once per receiver of the chunk: worked out once
            holders = known[c.files] = sorted({j for d in c.rank_dirs()
                                               for j in dir_holders.get(d, ())})
        if not holders:
            raise FormatError(f"tensor {t.name!r} chunk {c.box}: no rank has "
                              f"{' or '.join(c.files)} on its node")
        return holders

    destinations = destinations_touching(strategy, mine, provided, receivers)
    return plan_routes(rank, destinations, source, prefer_receiver(holders_of))


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
