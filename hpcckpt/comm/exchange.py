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
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import RankFailure
from .wrapper import Comm, describe

MAX_MPI_MESSAGE = (1 << 31) - 1

#: fill(receiver, stream_offset, out_view) writes the next bytes of my stream to receiver
Fill = Callable[[int, int, memoryview], None]
#: drain(sender, stream_offset, in_view) consumes the next bytes of the stream from sender
Drain = Callable[[int, int, memoryview], None]
#: align(receiver, stream_offset, max_bytes) -> bytes <= max_bytes ending on an element
Align = Callable[[int, int, int], int]


def exchange_streams(comm: Comm, send_totals: np.ndarray, recv_totals: np.ndarray,
                     fill: Fill, drain: Drain, align: Align, budget: int,
                     max_message: int = 1 << 30, step: str = "exchange") -> dict:
    """Move every stream to completion. Returns counters: rounds, bytes_sent, bytes_received."""
    size = comm.size
    budget = max(64, min(int(budget) // 2, MAX_MPI_MESSAGE))  # per direction
    max_message = max(16, min(int(max_message), MAX_MPI_MESSAGE))
    sent = np.zeros(size, np.int64)
    recvd = np.zeros(size, np.int64)
    send_totals = np.asarray(send_totals, np.int64)
    recv_totals = np.asarray(recv_totals, np.int64)
    sendbuf = np.empty(0, np.uint8)
    recvbuf = np.empty(0, np.uint8)
    error: str | None = None
    rounds = 0
    while True:
        # 1. offers (as receiver) + status
        want = recv_totals - recvd
        offers = np.zeros(size, np.int64)
        if error is None:
            active = np.flatnonzero(want > 0)
            if len(active):
                share = max(16, budget // len(active))
                offers[active] = np.minimum(np.minimum(want[active], share), max_message)
        status = -1 if error is not None else int((send_totals - sent).sum() + want.sum())
        msg = np.empty((size, 2), np.int64)
        msg[:, 0] = offers
        msg[:, 1] = status
        got = comm.alltoall_int64(msg)
        statuses = got[:, 1]
        if (statuses < 0).any():
            break
        if not statuses.any():
            break
        rounds += 1
        # 2. accept (as sender), within my budget, on element boundaries
        accept = np.zeros((size, 1), np.int64)
        room = budget
        for k in range(size):
            offer = int(min(got[k, 0], send_totals[k] - sent[k], room))
            if offer > 0 and error is None:
                try:
                    n = align(k, int(sent[k]), offer)
                except BaseException as e:  # noqa: BLE001 - reported next round
                    error, n = describe(e), 0
                accept[k, 0] = n
                room -= n
        counts_in = comm.alltoall_int64(accept)[:, 0]
        counts_out = accept[:, 0]
        # 3. move the bytes
        nout, nin = int(counts_out.sum()), int(counts_in.sum())
        if len(sendbuf) < nout:
            sendbuf = np.empty(nout, np.uint8)
        if len(recvbuf) < nin:
            recvbuf = np.empty(nin, np.uint8)
        pos = 0
        for k in np.flatnonzero(counts_out):
            n = int(counts_out[k])
            if error is None:
                try:
                    fill(int(k), int(sent[k]), memoryview(sendbuf)[pos:pos + n])
                except BaseException as e:  # noqa: BLE001 - reported next round
                    error = describe(e)
            sent[k] += n
            pos += n
        comm.alltoallv_bytes(sendbuf, counts_out, recvbuf, counts_in)
        pos = 0
        for j in np.flatnonzero(counts_in):
            n = int(counts_in[j])
            if error is None:
                try:
                    drain(int(j), int(recvd[j]), memoryview(recvbuf)[pos:pos + n])
                except BaseException as e:  # noqa: BLE001 - reported next round
                    error = describe(e)
            recvd[j] += n
            pos += n
    comm.check(step, error)
    failed = {r: "failed (see that rank's error)" for r in np.flatnonzero(statuses < 0)}
    if failed:  # pragma: no cover - check() above raises first with the real messages
        raise RankFailure(step, failed)
    return {"rounds": rounds, "bytes_sent": int(sent.sum() - sent[comm.rank]),
            "bytes_received": int(recvd.sum() - recvd[comm.rank])}
