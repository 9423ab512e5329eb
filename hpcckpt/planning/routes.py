"""Routes: which rank provides which region to which rank, for exchanges over MPI.

Pure. A route moves ``region`` of one tensor from a stored source chunk (at its
provider) to a destination box (at its receiver). Both ends enumerate the same routes
in the same canonical order, so the bytes of all routes from rank j to rank k form one
stream whose layout both sides know without telling each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from ..layout.box import Box
from ..layout.tensor import TensorInfo
from .sources import SourceChunk, SourceIndex


@dataclass(frozen=True, slots=True)
class Route:
    tensor: TensorInfo
    order: int            #: position of the tensor in the destination order (sort key)
    region: Box           #: what moves, global coordinates
    src: SourceChunk      #: where it is stored at the provider
    dst_box: Box          #: the destination box it lands in at the receiver
    provider: int
    receiver: int

    @property
    def nbytes(self) -> int:
        return self.region.volume * self.tensor.itemsize

    def sort_key(self):
        return (self.order, self.dst_box.offsets, self.region.offsets)


@dataclass(frozen=True)
class RoutePlan:
    """One rank's view: what it sends, receives and copies locally."""

    rank: int
    sends: dict[int, list[Route]]   #: receiver -> routes, in stream order
    recvs: dict[int, list[Route]]   #: provider -> routes, in stream order
    local: list[Route]              #: provider == receiver == rank

    def totals(self, size: int) -> tuple[list[int], list[int]]:
        send = [sum(r.nbytes for r in self.sends.get(k, ())) for k in range(size)]
        recv = [sum(r.nbytes for r in self.recvs.get(j, ())) for j in range(size)]
        return send, recv

    @property
    def bytes_read(self) -> int:
        """Bytes this rank reads from its sources (local copies plus what it sends);
        load reads only the local part and forwards the rest from memory."""
        return (sum(r.nbytes for r in self.local)
                + sum(r.nbytes for rs in self.sends.values() for r in rs))


#: choose(chunk, tensor, dst_box, receiver) -> provider rank
Chooser = Callable[[SourceChunk, TensorInfo, Box, int], int]


def plan_routes(rank: int, destinations: Iterable[tuple[int, TensorInfo, Box, tuple[int, ...]]],
                source: SourceIndex, choose: Chooser) -> RoutePlan:
    """Routes touching ``rank``.

    ``destinations``: (order, tensor, destination box, receiving ranks) for every distinct
    destination box in the job; each receiving rank needs the whole box once.
    """
    sends: dict[int, list[Route]] = {}
    recvs: dict[int, list[Route]] = {}
    local: list[Route] = []
    for order, t, dbox, receivers in destinations:
        for chunk, region in source.overlapping(t.name, dbox):
            for k in receivers:
                p = choose(chunk, t, dbox, k)
                if p != rank and k != rank:
                    continue
                route = Route(t, order, region, chunk, dbox, p, k)
                if p == k:
                    local.append(route)
                elif p == rank:
                    sends.setdefault(k, []).append(route)
                else:
                    recvs.setdefault(p, []).append(route)
    for lst in (*sends.values(), *recvs.values(), local):
        lst.sort(key=Route.sort_key)
    return RoutePlan(rank, sends, recvs, local)


def prefer_receiver(holders_of: Callable[[SourceChunk, TensorInfo], list[int]]) -> Chooser:
    """A chooser: the receiver itself when it holds the chunk (a local copy, nothing
    sent), else one holder picked by the receiver's rank, so the receivers of a
    replicated chunk spread over its holders."""
    def choose(c: SourceChunk, t: TensorInfo, d: Box, k: int) -> int:
        holders = holders_of(c, t)
        return k if k in holders else holders[k % len(holders)]
    return choose


#: receivers(tensor name, destination box, ranks holding it in the strategy) -> ranks
Receivers = Callable[[str, Box, tuple[int, ...]], tuple[int, ...]]


def destinations_touching(strategy, mine: Iterable[tuple[str, Box]],
                          provided: Iterable[tuple[str, Box]], receivers: Receivers | None = None
                          ) -> list[tuple[int, TensorInfo, Box, tuple[int, ...]]]:
    """The destination boxes whose routes can involve one rank, for ``plan_routes``.

    ``mine``: the (tensor, box) this rank receives; ``provided``: the stored regions it
    may be chosen to provide. Only those tensors' destination chunks are examined, so
    one rank of a 1024-rank job never enumerates the whole job.
    """
    want: dict[str, dict[Box, tuple[int, ...]]] = {}   # tensor -> its boxes -> holders
    for name, box in mine:
        for d, ranks in strategy.chunks(name, box):
            if d == box:
                want.setdefault(name, {})[d] = ranks
    for name, box in provided:
        for d, ranks in strategy.chunks(name, box):
            want.setdefault(name, {})[d] = ranks
    out = []
    for i, t in enumerate(strategy.tensors):
        if t.name not in want:
            continue
        info = t.info
        # in the strategy's chunk order (by first holder), as every rank enumerates them
        for box, ranks in sorted(want[t.name].items(), key=lambda x: x[1][0]):
            out.append((i, info, box, receivers(t.name, box, ranks) if receivers else ranks))
    return out
