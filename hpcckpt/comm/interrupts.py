"""SIGTERM and SIGINT while a job writes: undo local work at once, fail in a step.

SLURM sends SIGTERM at a time limit and on ``scancel`` (then SIGKILL after a grace
period); ``mpiexec`` forwards SIGTERM and Ctrl-C to every rank. While ``guard`` is
active, the handler first runs the registered cleanups (removing this rank's temporary
files: that is local and cannot hang), then makes the job fail the collective way:
inside a ``Comm.step`` it raises ``Interrupted`` at once, so the step shares it with
every rank; between steps (where a rank may be in a collective the others are also
in) it only records the signal, and the next step raises it on entry.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

from ..errors import Interrupted

_cleanups: list[Callable[[], None]] = []
_state = {"depth": 0, "defer": 0, "pending": None, "raised": False}
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def guard(cleanup: Callable[[], None]) -> Iterator[None]:
    """Run ``cleanup`` on SIGTERM/SIGINT while the block runs, then fail the job (see the
    module docstring). Handlers are installed by the outermost guard of the main thread
    and the previous ones restored after it; elsewhere the cleanup is only registered."""
    main = threading.current_thread() is threading.main_thread()
    outer = main and not _cleanups
    previous = {}
    if outer:
        _state.update(pending=None, raised=False)
        for s in _SIGNALS:
            previous[s] = signal.signal(s, _handler)
    _cleanups.append(cleanup)
    try:
        yield
    finally:
        _cleanups.remove(cleanup)
        if outer:
            for s, h in previous.items():
                signal.signal(s, h)
            _state.update(pending=None, raised=False)


def _handler(signum: int, frame) -> None:
    if _state["pending"] is not None:
        return  # a second signal: the cleanup already ran, the failure is on its way
    _state["pending"] = f"interrupted by {signal.Signals(signum).name}"
    for fn in reversed(_cleanups):
        try:
            fn()
        except Exception:  # noqa: BLE001 - best effort; the job is failing anyway
            pass
    if _state["depth"] and not _state["defer"]:
        _raise()


def _raise() -> None:
    _state["raised"] = True
    raise Interrupted(_state["pending"])


def step_entered() -> None:
    """Called by ``Comm.step`` on entry (inside its error sharing)."""
    _state["depth"] += 1
    if _state["pending"] is not None and not _state["raised"]:
        _raise()


def step_left() -> None:
    _state["depth"] -= 1


def pending() -> str | None:
    """The signal received, if any (for loops that poll between their collectives)."""
    return _state["pending"]


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block of collectives inside a step (an exchange loop): a signal is only
    recorded here; the block polls ``pending()`` and fails in its own protocol."""
    _state["defer"] += 1
    try:
        yield
    finally:
        _state["defer"] -= 1
