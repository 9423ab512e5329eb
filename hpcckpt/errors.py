"""One exception hierarchy for everything hpcckpt reports to a user.

Every message names what a user needs to find the problem: the file, the tensor,
the rank and, for byte-level problems, the byte range.
"""
from __future__ import annotations


class HpcckptError(Exception):
    """Base class: a known failure that the CLI prints as one line (no traceback)."""


class StrategyError(HpcckptError, ValueError):
    """A strategy (layout) is malformed or does not fit the tensors it describes."""


class FormatError(HpcckptError, ValueError):
    """A file on disk is malformed: bad header, offsets, dtype, shape or index."""


class CheckpointIOError(HpcckptError, OSError):
    """Reading or writing a file failed (missing file, short read, full disk...)."""


class LaunchError(HpcckptError, RuntimeError):
    """The job was launched wrongly (e.g. SLURM_NTASKS disagrees with the MPI world)."""


class UsageError(HpcckptError, ValueError):
    """Arguments that cannot work together."""


class Interrupted(HpcckptError):
    """SIGTERM or SIGINT arrived while a job was writing; what it created is removed."""


class RankFailure(HpcckptError, RuntimeError):
    """Raised identically on every rank when one or more ranks failed in a collective step.

    Attributes:
        step: the name of the step that failed (e.g. "plan", "copy").
        failures: ``{rank: "ExceptionType: message"}`` for every failing rank.
    """

    def __init__(self, step: str, failures: dict[int, str]):
        self.step = step
        self.failures = dict(sorted(failures.items()))
        first_rank, first_msg = next(iter(self.failures.items()))
        more = len(self.failures) - 1
        suffix = f" (and {more} more rank{'s' if more > 1 else ''})" if more else ""
        super().__init__(f"rank {first_rank}: {first_msg}{suffix}")

    def details(self) -> str:
        """Every failing rank's message, one per line."""
        return "\n".join(f"rank {r}: {m}" for r, m in self.failures.items())
