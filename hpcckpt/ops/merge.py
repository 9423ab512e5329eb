"""merge: a distributed checkpoint (full or de-duplicated) -> complete weights."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..comm.wrapper import Comm, as_comm
from ..errors import UsageError
from ..layout.strategy import Strategy
from ..formats.names import HF_INDEX, MS_HYPER_PARAMS, MS_META, MS_NAME_MAP, rank_dir_name
from ..formats.safetensors import build_header, open_regular
from ..planning.outputs import MS_PART_SIZE, divide_writes, hf_files, hf_index, ms_unified_files
from ..storage.atomic import json_bytes
from ..storage import model_files
from ..storage.inputs import ManifestReader, RankFilesReader, open_input
from ..storage.reader import CheckpointReader
from .filecopy import CopyOptions, write_files
from .result import OpResult


def merge(dist: str, out: str, *, strategy: Strategy | None = None,
          max_shard_size: int | None = None, exclude_prefixes: tuple[str, ...] = (),
          file_suffix: str = "", layout: str = "hf", comm=None,
          options: CopyOptions = CopyOptions(), hf_files_dir: str | None = None,
          max_extra_size: int = model_files.DEFAULT_MAX_BYTES) -> OpResult:
    """Write complete weights: HF shards + index, or MindSpore's part files + name map.

    The output bytes are divided evenly among the job's ranks; one tensor may be written
    by several ranks. ``max_shard_size``: default 5 GB (hf), about 3 GiB (ms, as MindSpore
    2.10's ``unified_safetensors``, whose layout ``ms`` reproduces: see
    ``planning.outputs.ms_unified_files``).

    The HF layout also writes back the model directory's non-weight files (config,
    tokenizer, ...) that the checkpoint carries, byte for byte, or those of the model
    directory ``hf_files_dir`` (for a checkpoint made without them).
    """
    comm: Comm = as_comm(comm)
    if layout not in ("hf", "ms"):
        raise UsageError(f"--layout must be hf or ms, not {layout!r}")
    with comm.step("plan"):
        src = dist
        if not isinstance(dist, CheckpointReader) and RankFilesReader.recognise(Path(dist)) \
                and not ManifestReader.recognise(Path(dist)):
            # a MindSpore-written checkpoint: --file-suffix picks the step to read (as
            # MindSpore's unified_safetensors), and output names stay plain
            if strategy is not None:
                src = RankFilesReader.open(Path(dist), strategy, file_suffix=file_suffix or None)
            file_suffix = ""
        inp = open_input(src, strategy, comm=comm)
        tensors = [t for t in inp.source.tensors.values()
                   if not any(t.name.startswith(p) for p in exclude_prefixes)]
        if not tensors:
            raise UsageError(f"{dist}: no tensor left to merge after --exclude-prefix")
        name_map: dict | None = None
        if layout == "ms":
            # MindSpore leaves accumulated gradients out of the parts (rank 0's go to
            # hyper_param.safetensors with the other tensors the strategy lacks)
            parts = [t for t in tensors if not t.name.startswith("accu_grads")]
            files, name_map = ms_unified_files(
                parts, max_shard_size or MS_PART_SIZE, _first_seen(inp.source))
            hyper = _hyper_params(inp, {t.name for t in parts}, exclude_prefixes)
        else:
            files = hf_files(tensors, max_shard_size or 5_000_000_000, file_suffix, layout)
        carried = []
        if layout == "hf" and comm.rank == 0:
            carried = (model_files.collect(hf_files_dir, max_extra_size) if hf_files_dir
                       else model_files.read_carried(inp.root, inp.manifest.model_files)
                       if inp.manifest is not None else [])
        pieces = divide_writes(files, comm.size)
    markers = (HF_INDEX, MS_NAME_MAP) + tuple(f.path for f in files)

    def records(checksums):
        if name_map is not None:
            return [(MS_HYPER_PARAMS, hyper),
                    (MS_NAME_MAP, json.dumps(name_map, indent=4).encode())]
        index = [(HF_INDEX, json_bytes(hf_index(files)))] if len(files) > 1 else []
        return model_files.records(carried) + index

    # complete weights carry no checksums: nothing to hash
    result = write_files(comm, inp.source, inp, out, files, pieces, records, "merge", options,
                         inputs=(str(dist),), markers=markers, marker_first=True,
                         checksums_needed=False)
    result.extra.update({"layout": layout, "tensors": len(tensors),
                         "shards": [f.path for f in files], "model_files": len(carried)})
    return result


def _first_seen(source):
    """Tensor name -> (lowest rank directory storing it, name): the order in which
    MindSpore, reading rank files in turn, meets the tensors."""
    def key(name: str):
        ranks = [r for c in source.chunks(name) for r in c.rank_dirs() if r is not None]
        return (min(ranks, default=-1), name)
    return key


def _hyper_params(inp, merged: set[str], exclude_prefixes: tuple[str, ...]) -> bytes:
    """``hyper_param.safetensors``: as MindSpore, rank 0's tensors that are not merged
    (``global_step``, ``epoch_num``, ...; not those left out by --exclude-prefix). A
    checkpoint whose rank 0 stores nothing else (hpcckpt's own) gets ``epoch_num`` and
    ``step_num`` from ``rank_0/meta.json`` (0 without one)."""
    from ..dtypes import library_order
    from ..formats.names import rank_dir_of
    from ..formats.safetensors import read_header
    from ..storage.fileio import pread_into
    rank0 = [f for f in inp.files if rank_dir_of(f) == 0]
    extra = []
    for rel in rank0:
        h = read_header(Path(inp.root) / rel)
        extra += [(e, h.path) for n, e in h.tensors.items() if n not in merged
                  and n not in {x.name for x, _ in extra}
                  and not any(n.startswith(p) for p in exclude_prefixes)]
    if not extra:
        epoch, step = _meta_epoch_step(inp.root)
        head, _ = build_header([("epoch_num", "I64", ()), ("step_num", "I64", ())],
                               {"format": "ms"})
        return head + epoch.to_bytes(8, "little", signed=True) + step.to_bytes(8, "little",
                                                                              signed=True)
    extra.sort(key=lambda x: library_order(x[0].name, x[0].dtype))
    head, _ = build_header(((e.name, e.dtype, e.shape) for e, _ in extra), {"format": "ms"})
    data = bytearray(sum(e.nbytes for e, _ in extra))
    pos = 0
    for e, path in extra:
        with os.fdopen(open_regular(path), "rb") as f:
            pread_into(f.fileno(), memoryview(data)[pos:pos + e.nbytes], e.begin, path)
        pos += e.nbytes
    return head + bytes(data)


def _meta_epoch_step(src_root: str) -> tuple[int, int]:
    """(last_epoch, last_step) of ``rank_0/meta.json``, (0, 0) without a usable one."""
    meta_path = Path(src_root) / rank_dir_name(0) / MS_META
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            return int(meta.get("last_epoch", 0)), int(meta.get("last_step", 0))
        except (ValueError, TypeError, json.JSONDecodeError, AttributeError):
            pass
    return 0, 0
