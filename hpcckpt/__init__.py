"""hpcckpt: distributed safetensors checkpoints over MPI.

Public API (SPEC 4)::

    import hpcckpt
    strategy = hpcckpt.load_strategy("strategy.yaml")
    hpcckpt.split("hf_model/", "dist/", strategy, comm=MPI.COMM_WORLD)
    hpcckpt.merge("dist/", "hf_out/", comm=MPI.COMM_WORLD)
    hpcckpt.reshard("dist/", "dist2/", other_strategy, comm=MPI.COMM_WORLD)
    state = hpcckpt.load("dist/", strategy, comm=MPI.COMM_WORLD)    # this rank's slices
    hpcckpt.load("dist/", strategy, comm=MPI.COMM_WORLD, out=state)  # into existing arrays
    state = hpcckpt.reshard_state(state, strategy, other_strategy, comm=MPI.COMM_WORLD)
    with hpcckpt.CheckpointManager("out/checkpoint", strategy, MPI.COMM_WORLD) as mgr:
        mgr.save(local_state, epoch=1, step=100)                    # training-style saves
    state = hpcckpt.load("out/checkpoint", strategy, MPI.COMM_WORLD, step=(1, 100))

Names are imported on first use, so a command (every rank of a job) imports only the
modules it needs: start-up is part of every command's wall time.
"""
from __future__ import annotations

import importlib

from .errors import (CheckpointIOError, FormatError, HpcckptError, LaunchError, RankFailure,
                     StrategyError, UsageError)

__version__ = "0.1.0"

_LAZY = {
    "Box": "layout", "Mesh": "layout", "Strategy": "layout", "TensorSpec": "layout",
    "load_strategy": "layout", "strategy_from_dict": "layout",
    "load": "ops.in_memory", "reshard_state": "ops.in_memory",
    "CheckpointManager": "ops.save",
    "merge": "ops.merge", "reshard": "ops.reshard", "split": "ops.split",
    "verify": "ops.verify",
}

__all__ = ["CheckpointIOError", "FormatError", "HpcckptError", "LaunchError", "RankFailure",
           "StrategyError", "UsageError", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hpcckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
