"""Executing a route plan: local routes through a bounded buffer, the rest in bounded
rounds of Alltoallv (``comm.rounds``), with the read and write steps given as callbacks.

Also here: ``BoxAssembler`` (write-combining of destination boxes that arrive over MPI).
A provider reads each region it sends exactly once. (Checksums of what is written are
the commit path's: ``ops.commit``.)
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Callable, Mapping

from ..comm.rounds import exchange_streams
from ..comm.wrapper import Comm
from ..errors import FormatError
from ..layout.box import Box
from ..planning.routes import Route, RoutePlan
from ..planning.runs import flat_range_to_boxes, strided_runs
from ..storage.chunkio import copy_runs

if TYPE_CHECKING:
    import numpy as np


#: read(route, sub_box, out, out_base): C-order bytes of sub_box (inside route.region)
#: into a writable byte buffer (bytearray, memoryview or uint8 array)
ReadFn = Callable[[Route, Box, "memoryview", int], None]
#: write(route, sub_box, data, base): C-order bytes of sub_box into every local target
WriteFn = Callable[[Route, Box, "memoryview", int], None]
#: routes travelling in place are at least this long: shorter ones are packed into the
#: exchange buffers, since one message each would cost more than copying them twice
IN_PLACE_MIN = 256 << 10


@dataclass
class RouteStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_local: int = 0
    rounds: int = 0


def execute_routes(comm: Comm, plan: RoutePlan, read: ReadFn, write: WriteFn, buffer_size: int,
                   budget: int, max_message: int, step: str = "exchange",
                   in_place: Mapping[tuple[str, Box], "np.ndarray"] | None = None) -> RouteStats:
    """``in_place``: this rank's copy of each destination box (flat bytes), by (tensor,
    box), when a provider sends from its own copy of the box (load's replicas): a route
    that is one contiguous span of its box, of at least ``IN_PLACE_MIN`` bytes, then
    travels from the provider's copy straight into the receiver's, never through the
    exchange buffers (``read`` and ``write`` do not see it)."""
    stats = RouteStats()
    with comm.step(f"{step}: local copies"):
        # no bigger than the largest local route, and freed before the exchange
        buf = bytearray(max(16, min(buffer_size, max((r.nbytes for r in plan.local),
                                                      default=0))))
        for route in plan.local:
            stats.bytes_local += copy_route(route, read, write, buf)
        del buf
        sends = {k: _Stream(rs, in_place) for k, rs in plan.sends.items()}
        recvs = {j: _Stream(rs, in_place) for j, rs in plan.recvs.items()}
    send_tot, recv_tot = plan.totals(comm.size)

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

    def segments(peer: int, off: int, n: int, sending: bool) -> list:
        return (sends if sending else recvs)[peer].segments(off, n)

    counters = exchange_streams(comm, send_tot, recv_tot, fill, drain, align, budget,
                                max_message, step=step,
                                in_place=segments if in_place is not None else None)
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
    bounded whatever the order of arrival. A box whose every route is one contiguous
    span of it (a row block of a row block) needs no assembling: its pieces are written
    straight from the receive buffer. Assembly buffers are reused (boxes of one tensor
    have one size): a fresh 16 MiB bytearray costs its zeroing and 4096 page faults.
    """

    def __init__(self, plan: RoutePlan, cap: int, read_into: Callable[[Route, bytearray], None],
                 write_piece: WriteFn, write_box: Callable[[tuple[str, Box], bytearray], None],
                 read: ReadFn, buffer_size: int):
        self.cap, self.read, self.buffer_size = cap, read, buffer_size
        self.read_into, self.write_piece, self.write_box = read_into, write_piece, write_box
        self.missing: dict[tuple[str, Box], int] = {}   # received bytes still to come
        strided = {(r.tensor.name, r.dst_box) for rs in (*plan.recvs.values(), plan.local)
                   for r in rs if _span_in_box(r) is None}
        for routes in plan.recvs.values():
            for r in routes:
                key = (r.tensor.name, r.dst_box)
                if key in strided and r.dst_box.volume * r.tensor.itemsize <= cap:
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
        self.free: dict[int, list[bytearray]] = {}   # written boxes' buffers, by size
        self.free_bytes = 0
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
            if self.staged_bytes + self.free_bytes + len(arr) <= self.cap:
                self.free.setdefault(len(arr), []).append(arr)
                self.free_bytes += len(arr)

    def _open(self, key: tuple[str, Box], route: Route) -> bytearray | None:
        local = self.deferred.pop(key, [])
        nbytes = route.dst_box.volume * route.tensor.itemsize
        if self.staged_bytes + nbytes > self.cap:  # full: this box goes piece by piece
            buf = bytearray(max(16, min(self.buffer_size, max((r.nbytes for r in local),
                                                              default=0))))
            for r in local:
                self.bytes_local += copy_route(r, self.read, self.write_piece, buf)
            return None
        pool = self.free.get(nbytes)
        if pool:   # every byte of it is overwritten before the box is written
            arr = pool.pop()
            self.free_bytes -= nbytes
        else:
            if self.staged_bytes + self.free_bytes + nbytes > self.cap:
                self.free.clear()   # buffers of another size: held and free stay <= cap
                self.free_bytes = 0
            arr = bytearray(nbytes)
        self.staged[key] = arr
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


def _in_place_units(routes: list[Route], starts: list[int], boxes: Mapping) -> list:
    """Units of a stream for ``_Stream``: a box's consecutive routes that cover it whole
    are one unit, the box's bytes in C order (both ends hold the box); any other route
    is a unit of its own, in place when its region is one contiguous span of its box.
    Only units of at least ``IN_PLACE_MIN`` bytes travel in place."""
    units: list[tuple[int, memoryview | None]] = []
    i = 0
    while i < len(routes):
        key = (routes[i].tensor.name, routes[i].dst_box)
        j = i + 1
        while j < len(routes) and (routes[j].tensor.name, routes[j].dst_box) == key:
            j += 1
        # routes of one box never overlap: as many bytes as the box is the whole box
        if starts[j] - starts[i] == key[1].volume * routes[i].tensor.itemsize >= IN_PLACE_MIN:
            units.append((starts[i], memoryview(boxes[key])))
        else:
            for r, start in zip(routes[i:j], starts[i:j]):
                units.append((start, _in_place_view(r, boxes)))
        i = j
    return units


def _in_place_view(route: Route, boxes: Mapping) -> memoryview | None:
    """The route's bytes in this rank's copy of its destination box, if they are one
    contiguous span long enough to be worth a message of their own."""
    lo = _span_in_box(route) if route.nbytes >= IN_PLACE_MIN else None
    if lo is None:
        return None
    return memoryview(boxes[(route.tensor.name, route.dst_box)])[lo:lo + route.nbytes]


def _span_in_box(route: Route) -> int | None:
    """Where the route's region starts in its destination box's bytes, if it is one
    contiguous span of them."""
    sr = strided_runs(route.region, route.dst_box, route.dst_box, route.tensor.itemsize)
    return None if sr.counts else sr.dst_start


class _Stream:
    """The routes between one pair of ranks, as one byte stream; with ``in_place`` (see
    ``execute_routes``), cut into units that travel in place or staged."""

    def __init__(self, routes: list[Route], in_place: Mapping | None = None):
        self.routes = routes
        self.starts = [0, *accumulate(r.nbytes for r in routes)]
        #: (stream start, view of this rank's copy or None) of each unit, in order
        self.units = [] if in_place is None else _in_place_units(routes, self.starts, in_place)
        self.unit_starts = [u[0] for u in self.units]

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

    def segments(self, off: int, n: int) -> list[tuple[int, memoryview | None]]:
        """Stream bytes [off, off + n) as ``comm.rounds`` segments: a view for each unit
        travelling in place, None for a stretch of staged ones. Cut at unit boundaries
        only, so both ends, and a shorter window, cut alike."""
        segs: list[tuple[int, memoryview | None]] = []
        i = bisect.bisect_right(self.unit_starts, off) - 1
        end = off + n
        while off < end:
            u0, view = self.units[i]
            u1 = self.units[i + 1][0] if i + 1 < len(self.units) else self.starts[-1]
            hi = min(end, u1)
            if view is not None:
                segs.append((hi - off, view[off - u0:hi - u0]))
            elif segs and segs[-1][1] is None:
                segs[-1] = (segs[-1][0] + hi - off, None)
            else:
                segs.append((hi - off, None))
            off = hi
            i += 1
        return segs

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


def region_reader(reader_for: Callable[[Route], tuple]) -> ReadFn:
    """Build a ReadFn from a function giving (kind, source, replica) per route."""
    def read(route: Route, sub: Box, out: memoryview, base: int) -> None:
        kind, src, replica = reader_for(route)
        sr = strided_runs(sub, route.src.box, sub, route.tensor.itemsize)
        if kind == "file":
            src.read(route.src, route.tensor, sr, out, base, replica)
        else:
            copy_runs(sr, src, 0, out, base)
    return read


def memory_writer(targets: dict[tuple[str, Box], "np.ndarray"]) -> WriteFn:
    def write(route: Route, sub: Box, data: memoryview, base: int) -> None:
        arr = targets[(route.tensor.name, route.dst_box)]
        copy_runs(strided_runs(sub, sub, route.dst_box, route.tensor.itemsize), data, base, arr, 0)
    return write
