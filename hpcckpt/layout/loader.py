"""``load_strategy``: one entry point for every strategy kind a command accepts.

hpcckpt YAML is read here. MindSpore strategy files (protobuf ``.ckpt`` or JSON, or a
directory of per-stage files; SPEC 1.2) are recognised so the user gets a precise
message; their reader is a later piece of work and plugs in here.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointIOError, StrategyError
from ..formats.names import STRATEGY_FILE
from .strategy import Strategy
from .yaml_io import read_strategy_yaml


def load_strategy(path: str | Path) -> Strategy:
    """Read a strategy file (or a checkpoint directory holding ``strategy.yaml``)."""
    path = Path(path)
    if path.is_dir():
        if (path / STRATEGY_FILE).is_file():
            return read_strategy_yaml(path / STRATEGY_FILE)
        if any(path.glob("*.safetensors")) or any(path.glob("rank_*/*.safetensors")):
            raise StrategyError(f"{path}: is a checkpoint (safetensors files), not a strategy; "
                                "give a strategy YAML file, or a distributed checkpoint "
                                f"directory holding {STRATEGY_FILE}")
        if any(path.glob("*.ckpt")) or any(path.glob("*.json")):
            raise StrategyError(f"{path}: MindSpore strategy directories are not supported yet; "
                                "give an hpcckpt strategy YAML file")
        raise CheckpointIOError(f"{path}: directory has no {STRATEGY_FILE}")
    if not path.exists():
        raise CheckpointIOError(f"{path}: strategy file not found")
    if path.suffix in (".ckpt", ".json"):
        raise StrategyError(f"{path}: MindSpore strategy files are not supported yet; "
                            "give an hpcckpt strategy YAML file")
    return read_strategy_yaml(path)
