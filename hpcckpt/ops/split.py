"""split: complete weights -> a distributed checkpoint under a strategy."""
from __future__ import annotations

from ..comm.wrapper import Comm, as_comm
from ..layout.strategy import Strategy
from ..planning.dedup import dedup_mode, plan_dedup
from ..planning.outputs import divide_writes, rank_files
from ..storage import model_files
from ..storage.inputs import open_input
from ..formats.names import DEFAULT_PREFIX, MANIFEST
from .common import check_tensors_match, distributed_records, rank_dirs_of
from .filecopy import CopyOptions, write_files
from .result import OpResult


def split(complete: str, out: str, strategy: Strategy, *, dedup: bool | str = False,
          prefix: str = DEFAULT_PREFIX, comm=None, options: CopyOptions = CopyOptions(),
          max_extra_size: int = model_files.DEFAULT_MAX_BYTES) -> OpResult:
    """Write ``OUT/rank_<r>/{prefix}_rank_<r>.safetensors`` + strategy.yaml + manifest.json.

    Any job size works with any strategy world size: the job's ranks share the writing.
    ``dedup``: True or "balanced" (each distinct box once, bytes per rank balanced),
    "whole" (each box once, whole; what MindSpore's loader reads), False (every replica).
    Given a model directory, its non-weight files (config, tokenizer, ...) are carried
    under ``OUT/model_files/`` (``storage.model_files``); one larger than
    ``max_extra_size`` bytes is refused.
    """
    comm: Comm = as_comm(comm)
    mode = dedup_mode(dedup)
    with comm.step("plan"):
        inp = open_input(complete, comm=comm)
        check_tensors_match(inp.source, strategy, str(complete), "the strategy")
        files = rank_files(strategy, prefix, plan_dedup(strategy, mode) if mode else None)
        pieces = divide_writes(files, comm.size)
        root = model_files.model_dir_of(complete)
        carried = model_files.collect(root, max_extra_size) if root and comm.rank == 0 else []

    def records(checksums):
        return distributed_records(strategy, files, checksums, bool(mode), prefix, carried)

    result = write_files(comm, inp.source, inp, out, files, pieces, records, "split", options,
                         inputs=(str(complete),), markers=(MANIFEST,),
                         dirs=rank_dirs_of(strategy))
    result.extra.update({"strategy_world_size": strategy.world_size, "dedup": bool(mode),
                         "model_files": len(carried)})
    return result
