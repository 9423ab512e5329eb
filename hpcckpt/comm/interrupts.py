"""SIGTERM and SIGINT while a job writes: undo local work at once, fail in a step.

SLURM sends SIGTERM at a time limit and on ``scancel`` (then SIGKILL after a grace
period); ``mpiexec`` forwards SIGTERM and Ctrl-C to every rank. While ``guard`` is
active, the handler first runs the registered cleanups (removing this rank's temporary
files: that is local and cannot hang), then makes the job fail the collective way:
inside a ``Comm.step`` it raises ``Interrupted`` at once, so the step shares it with
every rank; between steps (where a rank may be in a collective the others are also
in) it only records the signal, and the next step raises it on entry.

Signal handlers run on the main thread, while a guarded job may run on another (an
asynchronous save's writer). So the step and deferral depths are per thread: the handler
raises only if the main thread itself is inside a step, never in training code that runs
while a background job is mid-step; each thread then fails its own job once, at its
next step.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

from ..errors import Interrupted

_cleanups: list[Callable[[], None]] = []
#: pending: the message of the signal received; signals: how many were received (so a
#: thread fails once per signal); main_guards: guards open on the main thread (the
#: outermost installs and restores the handlers)
_state = {"pending": None, "signals": 0, "main_guards": 0}
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _ThreadState(threading.local):
    depth = 0        #: Comm.steps this thread is inside
    defer = 0        #: deferred() blocks this thread is inside
    raised = 0       #: the signal (its number in _state["signals"]) this thread raised


_thread = _ThreadState()


@contextlib.contextmanager
def guard(cleanup: Callable[[], None]) -> Iterator[None]:
    """Run ``cleanup`` on SIGTERM/SIGINT while the block runs, then fail the job (see the
    module docstring). Handlers are installed by the outermost guard of the main thread
    and the previous ones restored after it; elsewhere the cleanup is only registered.
    A signal stays pending until no guarded job of any thread is open, so each one
    fails."""
    main = threading.current_thread() is threading.main_thread()
    outer = main and not _state["main_guards"]
    previous = {}
    if not _cleanups:   # no job open: an old signal's failure is over
        _state["pending"] = None
    if outer:
        for s in _SIGNALS:
            previous[s] = signal.signal(s, _handler)
    if main:
        _state["main_guards"] += 1
    _cleanups.append(cleanup)
    try:
        yield
    finally:
        _cleanups.remove(cleanup)
        if main:
            _state["main_guards"] -= 1
        if outer:
            for s, h in previous.items():
                signal.signal(s, h)
        if not _cleanups:
            _state["pending"] = None


def _handler(signum: int, frame) -> None:
    if _state["pending"] is not None:
        return  # a second signal: the cleanup already ran, the failure is on its way
    _state["pending"] = f"interrupted by {signal.Signals(signum).name}"
    _state["signals"] += 1
    for fn in reversed(_cleanups):
        try:
            fn()
        except Exception:  # noqa: BLE001 - best effort; the job is failing anyway
            pass
    if _thread.depth and not _thread.defer:   # the main thread's own step
        _raise()


def _raise() -> None:
    _thread.raised = _state["signals"]
    raise Interrupted(_state["pending"])


def step_entered() -> None:
    """Called by ``Comm.step`` on entry (inside its error sharing)."""
    _thread.depth += 1
    if _state["pending"] is not None and _thread.raised != _state["signals"]:
        _raise()


def step_left() -> None:
    _thread.depth -= 1


def pending() -> str | None:
    """The signal received, if any (for loops that poll between their collectives)."""
    return _state["pending"]


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block of collectives inside a step (an exchange loop): a signal is only
    recorded here; the block polls ``pending()`` and fails in its own protocol."""
    _thread.defer += 1
    try:
        yield
    finally:
        _thread.defer -= 1
