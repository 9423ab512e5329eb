"""What every operation reports: one summary, built from every rank's counters."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class OpResult:
    op: str
    output: str
    files: int
    bytes_written: int
    bytes_read: int
    seconds: float
    world_size: int
    per_rank: tuple[dict, ...] = ()   #: each rank's counters (bytes read/written/sent/received)
    dry_run: bool = False
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_rows(cls, op: str, output: str, files: int, per_rank, seconds: float,
                  world_size: int, dry_run: bool = False, extra: dict | None = None
                  ) -> "OpResult":
        """Totals summed from every rank's counters (``bytes_written`` may be absent)."""
        rows = tuple(per_rank)
        return cls(op, output, files, sum(r.get("bytes_written", 0) for r in rows),
                   sum(r["bytes_read"] for r in rows), seconds, world_size, rows, dry_run,
                   extra or {})

    @property
    def gbps(self) -> float:
        moved = max(self.bytes_written, self.bytes_read)
        return moved / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"op": self.op, "output": self.output, "files": self.files,
                "bytes_written": self.bytes_written, "bytes_read": self.bytes_read,
                "seconds": round(self.seconds, 6), "gb_per_s": round(self.gbps, 3),
                "world_size": self.world_size, "dry_run": self.dry_run,
                "per_rank": list(self.per_rank), **self.extra}
