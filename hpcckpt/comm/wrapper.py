"""The one communication wrapper.

``Comm`` works with an mpi4py communicator or, with ``None``, as a one-process stand-in
(so planning and tests run without MPI). ``Comm.step`` is the failure protocol: every
rank enters the step, and on leaving it the ranks exchange their outcome; if any rank
raised, every rank raises the same ``RankFailure`` naming the failing ranks. Nothing
waits forever in a collective because one rank threw.
"""
from __future__ import annotations

import contextlib
import traceback
from array import array
from itertools import accumulate
from typing import Any, Iterator, Sequence

from ..errors import HpcckptError, LaunchError, RankFailure
from . import interrupts

#: the tag of point-to-point messages (collectives never match them)
_IN_PLACE_TAG = 17


class Comm:
    def __init__(self, mpi_comm: Any = None):
        self.mpi = mpi_comm
        self.rank = 0 if mpi_comm is None else mpi_comm.Get_rank()
        self.size = 1 if mpi_comm is None else mpi_comm.Get_size()
        self.debug = False

    # ---- object collectives (small metadata only) ---------------------------
    def barrier(self) -> None:
        if self.mpi is not None:
            self.mpi.Barrier()

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj if self.mpi is None else self.mpi.bcast(obj, root=root)

    def bcast_bytes(self, data: bytes | bytearray | None, root: int = 0,
                    chunk: int = 1 << 30) -> bytes | bytearray:
        """``root``'s bytes on every rank, as raw buffers (``Bcast`` of uint8 views in
        pieces of at most ``chunk`` bytes: MPI counts are 32-bit), not a pickle."""
        if self.mpi is None:
            return data
        from mpi4py import MPI
        n = self.mpi.bcast(len(data) if self.rank == root else None, root=root)
        buf = bytearray(data) if self.rank == root else bytearray(n)
        view = memoryview(buf)
        for off in range(0, n, chunk):
            self.mpi.Bcast([view[off:off + chunk], MPI.BYTE], root=root)
        return buf

    def allgather(self, obj: Any) -> list:
        return [obj] if self.mpi is None else self.mpi.allgather(obj)

    def gather(self, obj: Any, root: int = 0) -> list | None:
        return [obj] if self.mpi is None else self.mpi.gather(obj, root=root)

    def allreduce_max(self, value: float) -> float:
        if self.mpi is None:
            return value
        from mpi4py import MPI
        return self.mpi.allreduce(value, op=MPI.MAX)

    def allreduce_sum(self, value: int) -> int:
        return value if self.mpi is None else self.mpi.allreduce(value)

    @contextlib.contextmanager
    def node(self) -> Iterator["Comm"]:
        """The ranks of this communicator on this rank's host (``COMM_TYPE_SHARED``), in
        rank order, freed on leaving; this Comm itself without MPI. Collective."""
        if self.mpi is None:
            yield self
            return
        from mpi4py import MPI
        sub = self.mpi.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            node = Comm(sub)
            node.debug = self.debug
            yield node
        finally:
            sub.Free()

    # ---- buffer collectives --------------------------------------------------
    def alltoall_int64(self, rows: list[list[int]]) -> list[list[int]]:
        """Row j (k integers, the same k on every rank) goes to rank j; returns the row
        each rank sent here, by rank."""
        if self.mpi is None:
            return [list(r) for r in rows]
        k = len(rows[0])
        send = array("q", [v for r in rows for v in r])
        recv = array("q", [0]) * len(send)
        self.mpi.Alltoall(send, recv)
        return [recv[j * k:(j + 1) * k].tolist() for j in range(self.size)]

    def alltoallv_bytes(self, sendbuf, sendcounts: list[int], recvbuf,
                        recvcounts: list[int], sends: Sequence[tuple[int, Any]] = (),
                        recvs: Sequence[tuple[int, Any]] = ()) -> None:
        """Exchange byte buffers; counts per peer (each below 2 GiB, totals too).

        ``sends`` / ``recvs``: (peer, byte buffer) messages besides, each one point-to-
        point message from or into the caller's own memory (no copy through the packed
        buffers); the n-th of ``recvs`` from a peer is filled by the n-th of that
        peer's ``sends`` here, so both lists hold a peer's messages in the same order
        and sizes on both sides. All are complete when this returns."""
        if self.mpi is None:
            n = sendcounts[0]
            memoryview(recvbuf)[:n] = memoryview(sendbuf)[:n]
            for (_, src), (_, dst) in zip(sends, recvs):
                memoryview(dst)[:] = memoryview(src)
            return
        from mpi4py import MPI
        reqs = [self.mpi.Irecv([buf, MPI.BYTE], peer, _IN_PLACE_TAG) for peer, buf in recvs]
        reqs += [self.mpi.Isend([buf, MPI.BYTE], peer, _IN_PLACE_TAG) for peer, buf in sends]
        sdis = [0, *accumulate(sendcounts)][:-1]
        rdis = [0, *accumulate(recvcounts)][:-1]
        self.mpi.Alltoallv([sendbuf, (list(sendcounts), sdis), MPI.BYTE],
                           [recvbuf, (list(recvcounts), rdis), MPI.BYTE])
        MPI.Request.Waitall(reqs)

    # ---- failure protocol ----------------------------------------------------
    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Run a block on every rank; if any rank raises, all raise the same RankFailure."""
        error: str | None = None
        try:
            interrupts.step_entered()   # a signal received between steps fails here
            yield
        except RankFailure:
            raise  # already shared by a nested collective step
        except BaseException as e:  # noqa: BLE001 - shared, then re-raised on every rank
            error = describe(e, self.debug)
            if self.mpi is None:
                if isinstance(e, HpcckptError) or not isinstance(e, Exception):
                    raise
                raise RankFailure(name, {0: error}) from e
        finally:
            interrupts.step_left()
        self.check(name, error)

    def check(self, name: str, error: str | None) -> None:
        """Share one rank's outcome; raise RankFailure everywhere if any rank failed."""
        errors = self.allgather(error)
        failed = {r: m for r, m in enumerate(errors) if m is not None}
        if failed:
            raise RankFailure(name, failed)

    def abort(self, code: int = 1) -> None:
        if self.mpi is not None:
            self.mpi.Abort(code)


def describe(e: BaseException, debug: bool = False) -> str:
    """One line for known errors; type and message (plus traceback with debug) otherwise."""
    if isinstance(e, HpcckptError):
        return str(e)
    text = f"{type(e).__name__}: {e}"
    if debug:
        text += "\n" + "".join(traceback.format_exception(e))
    return text


def world_comm() -> Comm:
    """COMM_WORLD when mpi4py is available, else the one-process stand-in.

    Raises:
        LaunchError: mpi4py is installed but finds no MPI library to load (installed
            without the ``mpich`` extra, and no site MPI on the library path)."""
    try:
        from mpi4py import MPI
    except ImportError:
        return Comm(None)
    except RuntimeError as e:  # mpi4py's wheel dlopens libmpi when MPI is first imported
        why = "; ".join(str(e).splitlines()[1:]) or str(e)
        raise LaunchError(
            f"mpi4py cannot load an MPI library ({why}): install the embedded MPICH with "
            "pip install 'hpcckpt[mpich]', or make the site's MPI loadable (module load, "
            "or MPI4PY_LIBMPI=/path/to/libmpi.so); see the README's Dependencies") from None
    return Comm(MPI.COMM_WORLD)


def as_comm(comm: Any) -> Comm:
    """Accept a Comm, an mpi4py communicator, or None (one process)."""
    if comm is None or isinstance(comm, Comm):
        return comm or Comm(None)
    return Comm(comm)
