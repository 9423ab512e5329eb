"""SIGTERM while a background job (an asynchronous save's writer) is inside a step:
``comm.interrupts`` undoes it and fails it at its own next step, and never raises in
the main thread unless the main thread itself is inside a step (training code runs
there meanwhile). One process, real signals, no MPI."""
from __future__ import annotations

import os
import signal
import threading

import pytest

from hpcckpt.comm.wrapper import Comm
from hpcckpt.errors import Interrupted

pytestmark = pytest.mark.timeout(60)


def _background_step(entered: threading.Event, go: threading.Event, outcome: list):
    """A writer thread: a guarded job, inside a step until ``go``, then a second step."""
    from hpcckpt.comm import interrupts
    comm = Comm(None)

    def run():
        try:
            with interrupts.guard(lambda: outcome.append("writer cleanup")):
                with comm.step("write"):
                    entered.set()
                    go.wait(10)
                with comm.step("rename"):
                    outcome.append("renamed")
        except Interrupted as e:
            outcome.append(f"writer failed: {e}")
    return threading.Thread(target=run)


def test_signal_during_background_step_raises_only_in_the_main_threads_own_step():
    from hpcckpt.comm import interrupts
    entered, go, outcome = threading.Event(), threading.Event(), []
    writer = _background_step(entered, go, outcome)
    writer.start()
    assert entered.wait(10)
    comm = Comm(None)
    before = signal.getsignal(signal.SIGTERM)
    try:
        # the main thread runs its own guarded job (the handler is installed) and is
        # between its steps - "training code" - when the signal arrives
        with pytest.raises(Interrupted):
            with interrupts.guard(lambda: outcome.append("main cleanup")):
                os.kill(os.getpid(), signal.SIGTERM)   # handled here, on the main thread
                outcome.append("main went on")          # no raise outside a step
                with comm.step("commit"):               # the main job fails at its step
                    outcome.append("main committed")
    finally:
        go.set()
        writer.join(10)
    assert outcome[:3] == ["main cleanup", "writer cleanup", "main went on"]
    # the writer's files were removed: it fails at its next step, once
    assert outcome[3:] == ["writer failed: interrupted by SIGTERM"]
    assert signal.getsignal(signal.SIGTERM) is before


def test_background_guard_does_not_stop_the_main_thread_installing_its_handler():
    from hpcckpt.comm import interrupts
    entered, go, outcome = threading.Event(), threading.Event(), []
    writer = _background_step(entered, go, outcome)
    writer.start()
    assert entered.wait(10)
    before = signal.getsignal(signal.SIGTERM)
    try:
        with interrupts.guard(lambda: None):
            assert signal.getsignal(signal.SIGTERM) is interrupts._handler
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        go.set()
        writer.join(10)
    assert outcome == ["renamed"]   # no signal: the writer's job goes on untouched
