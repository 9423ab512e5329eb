"""merge: a distributed checkpoint (full or de-duplicated) -> complete weights."""
from __future__ import annotations

import json
from pathlib import Path

from ..comm.wrapper import Comm, as_comm
from ..errors import UsageError
from ..layout.strategy import Strategy
from ..planning.outputs import OutputFile, divide_writes, hf_files, hf_index
from ..storage.atomic import json_bytes
from ..formats.names import HF_INDEX, MS_META, MS_NAME_MAP, rank_dir_name
from ..storage.inputs import open_input
from ..formats.safetensors import build_header
from .filecopy import CopyOptions, write_files
from .result import OpResult


def merge(dist: str, out: str, *, strategy: Strategy | None = None,
          max_shard_size: int = 5_000_000_000, exclude_prefixes: tuple[str, ...] = (),
          file_suffix: str = "", layout: str = "hf", comm=None,
          options: CopyOptions = CopyOptions()) -> OpResult:
    """Write complete weights: HF shards + index, or MindSpore's part files + name map.

    The output bytes are divided evenly among the job's ranks; one tensor may be written
    by several ranks.
    """
    comm: Comm = as_comm(comm)
    if layout not in ("hf", "ms"):
        raise UsageError(f"--layout must be hf or ms, not {layout!r}")
    with comm.step("plan"):
        inp = open_input(dist, strategy, comm=comm)
        tensors = [t for t in inp.source.tensors.values()
                   if not any(t.name.startswith(p) for p in exclude_prefixes)]
        if not tensors:
            raise UsageError(f"{dist}: no tensor left to merge after --exclude-prefix")
        files = hf_files(tensors, max_shard_size, file_suffix, layout)
        pieces = divide_writes(files, comm.size)
    markers = (HF_INDEX, MS_NAME_MAP) + tuple(f.path for f in files)

    def records(checksums):
        return _complete_records(files, layout, inp.root)

    # complete weights carry no checksums: nothing to hash
    result = write_files(comm, inp.source, inp, out, files, pieces, records, "merge", options,
                         inputs=(str(dist),), markers=markers, marker_first=True,
                         checksums_needed=False)
    result.extra.update({"layout": layout, "tensors": len(tensors),
                         "shards": [f.path for f in files]})
    return result


def _complete_records(files: list[OutputFile], layout: str,
                      src_root: str) -> list[tuple[str, bytes]]:
    """The name map (with MindSpore's hyper parameters) or the HF index; a single HF
    shard has none (its rename is the commit)."""
    if layout == "ms":
        return [("hyper_param.safetensors", _hyper_params(src_root)),
                (MS_NAME_MAP, json_bytes({e.name: f.path for f in files for e in f.entries}))]
    if len(files) > 1:
        return [(HF_INDEX, json_bytes(hf_index(files)))]
    return []


def _hyper_params(src_root: str) -> bytes:
    """MindSpore keeps epoch/step beside the merged parts; take them from rank_0/meta.json."""
    meta_path = Path(src_root) / rank_dir_name(0) / MS_META
    epoch = step = 0
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            epoch, step = int(meta.get("last_epoch", 0)), int(meta.get("last_step", 0))
        except (ValueError, TypeError, json.JSONDecodeError):
            pass
    import numpy as np
    head, _ = build_header([("epoch_num", "I64", ()), ("step_num", "I64", ())], {"format": "ms"})
    return head + np.array([epoch, step], "<i8").tobytes()
