"""One exception hierarchy for everything hpcckpt reports to a user.

Every message names what a user needs to find the problem: the file, the tensor,
the rank and, for byte-level problems, the byte range.
"""
from __future__ import annotations

import reprlib

_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxlist, _QUOTE.maxtuple, _QUOTE.maxdict = 2, 6, 6, 4
_QUOTE.maxstring, _QUOTE.maxother, _QUOTE.maxlong = 60, 60, 40


def quote(value: object, limit: int = 80) -> str:
    """``repr(value)`` for a message, at most ``limit`` characters.

    Messages quote what a user wrote; a YAML alias bomb or a deeply nested JSON value
    must not be expanded in full (a plain ``repr`` of one ran out of memory), so nesting,
    long lists and long strings are cut with ``...``.
    """
    try:
        text = _QUOTE.repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deeply>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


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

    Its message names every failing rank, grouped by message:
    ``ranks 0-2, 5: <message>``, or ``rank 1: <a>; rank 2: <b>`` (see ``format_failures``).

    Attributes:
        step: the name of the step that failed (e.g. "plan", "copy").
        failures: ``{rank: "ExceptionType: message"}`` for every failing rank.
    """

    def __init__(self, step: str, failures: dict[int, str]):
        self.step = step
        self.failures = dict(sorted(failures.items()))
        super().__init__(format_failures(self.failures))

    def details(self) -> str:
        """Every failing rank's message, one per line."""
        return "\n".join(f"rank {r}: {m}" for r, m in self.failures.items())


#: distinct messages spelled out in one report; the rest are counted
MAX_MESSAGES = 3


def format_failures(failures: dict[int, str]) -> str:
    """One line naming every failing rank, each distinct message once.

    Example:
        >>> format_failures({0: "x: not found", 1: "x: not found", 2: "x: not found"})
        'ranks 0-2: x: not found'
        >>> format_failures({1: "a", 4: "b"})
        'rank 1: a; rank 4: b'
    """
    groups: dict[str, list[int]] = {}
    for rank, message in sorted(failures.items()):
        groups.setdefault(message, []).append(rank)
    items = list(groups.items())
    parts = [f"{rank_list(ranks)}: {message}" for message, ranks in items[:MAX_MESSAGES]]
    rest = sorted(r for _, ranks in items[MAX_MESSAGES:] for r in ranks)
    if rest:
        parts.append(f"{rank_list(rest)} failed with {len(items) - MAX_MESSAGES} other "
                     "message(s) (--debug prints every rank's)")
    return "; ".join(parts)


def rank_list(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"ranks 0-2, 5"``; ``[3]`` -> ``"rank 3"`` (ranks sorted)."""
    spans: list[list[int]] = []
    for r in ranks:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" if b > a + 1 else f"{a}, {b}"
                     for a, b in spans)
    return f"rank{'s' if len(ranks) > 1 else ''} {text}"
