"""hpcckpt: distributed safetensors checkpoints over MPI.

Public API (SPEC 4)::

    import hpcckpt
    strategy = hpcckpt.load_strategy("strategy.yaml")
    hpcckpt.split("hf_model/", "dist/", strategy, comm=MPI.COMM_WORLD)
    hpcckpt.merge("dist/", "hf_out/", comm=MPI.COMM_WORLD)
    hpcckpt.reshard("dist/", "dist2/", other_strategy, comm=MPI.COMM_WORLD)
    state = hpcckpt.load("dist/", strategy, comm=MPI.COMM_WORLD)    # this rank's slices
    state = hpcckpt.reshard_state(state, strategy, other_strategy, comm=MPI.COMM_WORLD)
"""
__version__ = "0.1.0"

from .errors import (CheckpointIOError, FormatError, HpcckptError, LaunchError, RankFailure,
                     StrategyError, UsageError)
from .layout import Box, Mesh, Strategy, TensorSpec, load_strategy, strategy_from_dict
from .ops.exchange import load, reshard_state
from .ops.merge import merge
from .ops.reshard import reshard
from .ops.split import split

__all__ = ["Box", "CheckpointIOError", "FormatError", "HpcckptError", "LaunchError", "Mesh",
           "RankFailure", "Strategy", "StrategyError", "TensorSpec", "UsageError",
           "load", "load_strategy", "merge", "reshard", "reshard_state", "split", "strategy_from_dict"]
