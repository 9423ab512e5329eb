"""``load_strategy``: one entry point for every strategy kind a command accepts.

hpcckpt YAML (SPEC 1.1), and MindSpore strategy files (SPEC 1.2): protobuf ``.ckpt`` or
JSON, per stage or merged, or a directory of per-stage files. A MindSpore file carries
no tensor shapes or dtypes, so it is bound to a checkpoint's tensors (``shapes_from``:
the checkpoint the command reads, complete or distributed, MindSpore-written included).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointIOError, StrategyError
from ..formats.names import STRATEGY_FILE
from .strategy import Strategy
from .yaml_io import read_strategy_yaml


def load_strategy(path: str | Path, shapes_from: "str | Path | Strategy | None" = None,
                  file_suffix: str | None = None) -> Strategy:
    """Read a strategy file (or a checkpoint directory holding ``strategy.yaml``).

    Args:
        path: hpcckpt YAML, a MindSpore strategy file (``.ckpt``/``.json``) or a directory
            of per-stage MindSpore files, or a checkpoint directory with ``strategy.yaml``.
        shapes_from: for MindSpore files, the checkpoint whose tensors give shapes and
            dtypes (complete weights, an hpcckpt or a MindSpore-written distributed one),
            or a Strategy already bound to it (a destination layout takes its shapes from
            the source's: a MindSpore-written checkpoint's slices are the source's).
        file_suffix: with a MindSpore-written ``shapes_from``, which step's files to read
            (MindSpore's ``file_suffix`` rules).

    Returns:
        The validated Strategy.

    Example:
        >>> s = load_strategy("strategy/", shapes_from="output/checkpoint")  # doctest: +SKIP
    """
    path = Path(path)
    if path.is_dir() and not (path / STRATEGY_FILE).is_file() and (
            any(path.glob("*.safetensors")) or any(path.glob("rank_*/*.safetensors"))):
        raise StrategyError(f"{path}: is a checkpoint (safetensors files), not a strategy; "
                            "give a strategy YAML file, or a distributed checkpoint "
                            f"directory holding {STRATEGY_FILE}")
    if not path.exists():
        raise CheckpointIOError(f"{path}: strategy file not found")
    if path.is_dir() and (path / STRATEGY_FILE).is_file():
        return read_strategy_yaml(path / STRATEGY_FILE)
    from .mindspore import is_ms_strategy_path, read_ms_strategy
    if is_ms_strategy_path(path):
        ms = read_ms_strategy(path)
        if shapes_from is None:
            raise StrategyError(f"{path}: a MindSpore strategy has no tensor shapes; this "
                                "command needs a checkpoint to take them from")
        if isinstance(shapes_from, Strategy):
            return ms.bind({t.name: (t.shape, t.dtype) for t in shapes_from.tensors})
        from ..storage.ms_dist import checkpoint_tensors
        return ms.bind(checkpoint_tensors(shapes_from, ms, file_suffix))
    if path.is_dir():
        raise CheckpointIOError(f"{path}: directory has no {STRATEGY_FILE}")
    return read_strategy_yaml(path)
