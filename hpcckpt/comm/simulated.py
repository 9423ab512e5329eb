"""One rank of a job that does not exist, for dry runs at scale.

``hpcckpt reshard ... --dry-run --simulate-world 1024 --simulate-rank 17`` plans rank
17's part of a 1024-rank job in this single process, without MPI: it shows what one
rank of a real job computes and holds while planning. Collectives see only this rank,
so summaries report this rank alone.
"""
from __future__ import annotations

from ..errors import UsageError
from .wrapper import Comm


class SimulatedComm(Comm):
    simulated = True

    def __init__(self, rank: int, size: int):
        super().__init__(None)
        if size < 1 or not 0 <= rank < size:
            raise UsageError(f"--simulate-rank {rank} is not a rank of a {size}-rank job")
        self.rank, self.size = rank, size

    def alltoall_int64(self, send):
        raise UsageError("a simulated job cannot move data (use --dry-run)")

    alltoallv_bytes = alltoall_int64
