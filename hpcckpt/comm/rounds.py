"""Byte streams between ranks, exchanged in rounds of bounded memory.

Every ordered pair of ranks (sender j, receiver k) has one logical byte stream whose
total length both sides know from planning. Each round:

1. every receiver offers each active sender a share of its budget (Alltoall), and every
   rank reports its status (work left, or -1 after an error);
2. every sender accepts what fits in its own budget, cut to element boundaries by the
   ``align`` callback (Alltoall), so both sides agree on the counts;
3. one Alltoallv on uint8 buffers moves the bytes.

No single message exceeds ``max_message`` bytes (kept below 2 GiB, MPI's int count
limit), and no rank holds more than ``budget`` bytes of send and receive buffers
together (half each). An
error on any rank is seen by every rank in the next round's status and ends the loop
everywhere with the same RankFailure.

Bytes the caller already holds in place (``in_place``: a destination array that is
also where the sender keeps them) skip the buffers: in step 3 they travel as
point-to-point messages straight from the sender's memory into the receiver's, beside
the Alltoallv. They still count against the round's budget, so rounds are the same
whichever way the bytes travel.
"""
from __future__ import annotations

from typing import Callable, Sequence

from ..errors import RankFailure
from . import interrupts
from .wrapper import Comm, describe

MAX_MPI_MESSAGE = (1 << 31) - 1
#: send + receive buffers per rank per round: with the copy buffer and the reader's
#: scratch (4 MiB each) a node-local reshard of W1 peaks at 115 MiB per rank
DEFAULT_BUDGET = 64 << 20
#: load's default: it keeps every slice it holds, and its peak RSS is meant to stay
#: within 100 MiB of those (interpreter and libraries take about 50)
DEFAULT_LOAD_BUDGET = 32 << 20
DEFAULT_MAX_MESSAGE = 1 << 30

#: fill(receiver, stream_offset, out_view) writes the next bytes of my stream to receiver
Fill = Callable[[int, int, memoryview], None]
#: drain(sender, stream_offset, in_view) consumes the next bytes of the stream from sender
Drain = Callable[[int, int, memoryview], None]
#: align(receiver, stream_offset, max_bytes) -> bytes <= max_bytes ending on an element
Align = Callable[[int, int, int], int]
#: in_place(peer, stream_offset, n, sending) -> [(length, view or None), ...]: the stream
#: bytes [offset, offset + n) cut in order into segments. A view is the caller's own
#: memory holding (sending) or receiving those bytes, moved as one message of its own;
#: None, bytes staged through fill / drain. Both ends cut a stream at the same places
#: (a shorter window cuts the same segments short), and it must not fail where a peer
#: cannot see it: it is called where an error still ends the round cleanly.
InPlace = Callable[[int, int, int, bool], list]
Segments = list[tuple[int, "memoryview | None"]]


def exchange_streams(comm: Comm, send_totals: Sequence[int], recv_totals: Sequence[int],
                     fill: Fill, drain: Drain, align: Align, budget: int,
                     max_message: int = DEFAULT_MAX_MESSAGE, step: str = "exchange",
                     in_place: InPlace | None = None) -> dict:
    """Move every stream to completion. Returns counters: rounds, bytes_sent, bytes_received.

    Plain Python integers and bytearrays: the bookkeeping is O(size) per round, and the
    bytes move through the buffers without numpy (see hpcckpt.dtypes). A SIGTERM or
    SIGINT received meanwhile ends the rounds like any error (``comm.interrupts``): no
    rank leaves them while the others are still in a collective."""
    with interrupts.deferred():
        return _exchange(comm, send_totals, recv_totals, fill, drain, align, budget,
                         max_message, step, in_place or _all_staged)


def _exchange(comm, send_totals, recv_totals, fill, drain, align, budget, max_message, step,
              in_place):
    size = comm.size
    budget = max(64, min(int(budget) // 2, MAX_MPI_MESSAGE))  # per direction
    max_message = max(16, min(int(max_message), MAX_MPI_MESSAGE))
    sent = [0] * size
    recvd = [0] * size
    send_totals = [int(n) for n in send_totals]
    recv_totals = [int(n) for n in recv_totals]
    sendbuf = bytearray()
    recvbuf = bytearray()
    error: str | None = None
    rounds = 0
    while True:
        if error is None and interrupts.pending():
            error = interrupts.pending()
        # 1. offers (as receiver) + status
        want = [t - r for t, r in zip(recv_totals, recvd)]
        offers = [0] * size
        segs_in: dict[int, Segments] = {}
        if error is None:
            active = [k for k in range(size) if want[k] > 0]
            if active:
                share = max(16, budget // len(active))
                for k in active:
                    offers[k] = min(want[k], share, max_message)
                try:   # here an error still ends the round before anything moves
                    segs_in = {k: in_place(k, recvd[k], offers[k], False) for k in active}
                except BaseException as e:  # noqa: BLE001 - reported by the status
                    error = describe(e)
        status = (-1 if error is not None
                  else sum(t - s for t, s in zip(send_totals, sent)) + sum(want))
        got = comm.alltoall_int64([[offers[k], status] for k in range(size)])
        statuses = [row[1] for row in got]
        if any(st < 0 for st in statuses):
            break
        if not any(statuses):
            break
        rounds += 1
        # 2. accept (as sender), within my budget, on element boundaries
        counts_out = [0] * size
        segs_out: dict[int, Segments] = {}
        room = budget
        for k in range(size):
            offer = min(got[k][0], send_totals[k] - sent[k], room)
            if offer > 0 and error is None:
                try:
                    n = align(k, sent[k], offer)
                    segs_out[k] = in_place(k, sent[k], n, True)
                except BaseException as e:  # noqa: BLE001 - reported next round
                    error, n = describe(e), 0
                counts_out[k] = n
                room -= n
        counts_in = [row[0] for row in comm.alltoall_int64([[n] for n in counts_out])]
        segs_in = {j: _cut(segs_in[j], n) for j, n in enumerate(counts_in) if n}
        # 3. move the bytes: staged ones packed in the buffers, the others in place
        staged_out = [_staged(segs_out.get(k, ())) for k in range(size)]
        staged_in = [_staged(segs_in.get(j, ())) for j in range(size)]
        if len(sendbuf) < sum(staged_out):
            sendbuf = bytearray(sum(staged_out))
        if len(recvbuf) < sum(staged_in):
            recvbuf = bytearray(sum(staged_in))
        error = _staged_through(segs_out, sent, sendbuf, fill, error)
        sends = [(k, view) for k, segs in segs_out.items() for _, view in segs if view is not None]
        recvs = [(j, view) for j, segs in segs_in.items() for _, view in segs if view is not None]
        comm.alltoallv_bytes(sendbuf, staged_out, recvbuf, staged_in, sends, recvs)
        error = _staged_through(segs_in, recvd, recvbuf, drain, error)
        sent = [a + b for a, b in zip(sent, counts_out)]
        recvd = [a + b for a, b in zip(recvd, counts_in)]
    comm.check(step, error)
    failed = {r: "failed (see that rank's error)" for r, st in enumerate(statuses) if st < 0}
    if failed:  # pragma: no cover - check() above raises first with the real messages
        raise RankFailure(step, failed)
    return {"rounds": rounds, "bytes_sent": sum(sent) - sent[comm.rank],
            "bytes_received": sum(recvd) - recvd[comm.rank]}


def _all_staged(peer: int, off: int, n: int, sending: bool) -> Segments:
    return [(n, None)]


def _cut(segs: Segments, n: int) -> Segments:
    """The segments of the first ``n`` bytes."""
    out = []
    for length, view in segs:
        if n <= 0:
            break
        take = min(length, n)
        out.append((take, view if view is None or take == length else view[:take]))
        n -= take
    return out


def _staged_through(segs_by_peer: dict[int, Segments], done: list[int], buf: bytearray,
                    move: Fill | Drain, error: str | None) -> str | None:
    """``move`` (fill or drain) each staged segment, packed in ``buf`` in peer order;
    returns the first error (after one, nothing more is moved)."""
    pos = 0
    for peer, segs in segs_by_peer.items():
        off = done[peer]
        for length, view in segs:
            if view is None:
                if error is None:
                    try:
                        move(peer, off, memoryview(buf)[pos:pos + length])
                    except BaseException as e:  # noqa: BLE001 - reported next round
                        error = describe(e)
                pos += length
            off += length
    return error


def _staged(segs) -> int:
    return sum(length for length, view in segs if view is None)
