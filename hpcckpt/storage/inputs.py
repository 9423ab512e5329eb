"""Recognise an input checkpoint and describe what it stores (a SourceIndex).

Kinds (SPEC 2): complete weights (HF directory with index, a directory with
``model.safetensors``, a single ``.safetensors`` file, MindSpore's merged layout with
``param_name_map.json``), and distributed checkpoints (``rank_<r>/`` directories with a
``manifest.json``; without one, only given a strategy).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import CheckpointIOError, FormatError, UsageError
from ..formats.names import (DEFAULT_PREFIX, HF_INDEX, HF_SHARD, MANIFEST, MS_NAME_MAP, RANK_DIR,
                             rank_dir_name, rank_file_name)
from ..formats.safetensors import SafetensorsHeader, read_header
from ..layout.box import Box
from ..layout.strategy import Strategy
from ..layout.tensor import TensorInfo
from ..planning.sources import (SourceChunk, SourceIndex, check_tensor_chunks, group_chunks,
                                strategy_source)
from . import training
from .fileio import safe_join
from .manifest import ManifestIndex, read_manifest


@dataclass(frozen=True)
class InputCheckpoint:
    """A recognised input. ``root`` is the directory file paths are relative to."""

    kind: str                      #: "complete" or "distributed"
    root: str
    source: SourceIndex
    files: tuple[str, ...]         #: every data file, relative to root
    manifest: ManifestIndex | None = None
    strategy: Strategy | None = None
    description: str = ""


def rank_dirs(root: str | Path) -> dict[int, Path]:
    root = Path(root)
    out = {}
    if root.is_dir():
        for p in root.iterdir():
            m = RANK_DIR.match(p.name)
            if m and p.is_dir():
                out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def open_input(path: str | Path, strategy: Strategy | None = None,
               lazy: bool = False) -> InputCheckpoint:
    """Recognise ``path``. Complete inputs read every header (there are few files);
    distributed inputs with a manifest read none (the manifest says everything).
    ``lazy``: a manifest's tensors are decoded and checked when planning first asks for
    them (for callers that touch only their own tensors, before anything is written)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointIOError(f"{path}: no such file or directory")
    if path.is_file() and training.is_record_path(path):   # one step of a training directory
        return _training_step(path.parent.parent, path.parent.name + "/" + path.name,
                              strategy, lazy)
    if training.is_training_dir(path):
        return _training_step(path, training.find_record(path).path, strategy, lazy)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise FormatError(f"{path}: not a .safetensors file")
        return _complete(path.parent, [path.name], f"single file {path.name}")
    if (path / MANIFEST).exists():
        return _distributed_from_manifest(path, strategy, lazy)
    if rank_dirs(path):
        if strategy is None:
            raise FormatError(f"{path}: distributed checkpoint has no {MANIFEST} (an unfinished "
                              "write, or written by another tool); pass --strategy to read it")
        return _distributed_from_strategy(path, strategy)
    if (path / HF_INDEX).exists():
        idx_path = path / HF_INDEX
        try:
            idx = json.loads(idx_path.read_text())
            weight_map = idx["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, KeyError, AssertionError, TypeError) as e:
            raise FormatError(f"{idx_path}: not a valid index ({type(e).__name__}: {e})") from None
        files = list(dict.fromkeys(weight_map.values()))
        for f in files:
            safe_join(path, f, str(idx_path))
        return _complete(path, files, f"HF index with {len(files)} shard(s)", weight_map, idx_path)
    if (path / MS_NAME_MAP).exists():
        try:
            name_map = json.loads((path / MS_NAME_MAP).read_text())
        except json.JSONDecodeError as e:
            raise FormatError(f"{path / MS_NAME_MAP}: not valid JSON: {e}") from None
        files = list(dict.fromkeys(name_map.values()))
        for f in files:
            safe_join(path, f, str(path / MS_NAME_MAP))
        return _complete(path, files, "MindSpore merged layout", name_map, path / MS_NAME_MAP)
    files = sorted(p.name for p in path.glob("*.safetensors") if not p.name.endswith(".partial"))
    shards = [f for f in files if HF_SHARD.match(f)]
    if shards:
        raise FormatError(f"{path}: sharded weights ({shards[0]} ...) without {HF_INDEX}: "
                          "an unfinished merge or an incomplete copy")
    if not files:
        raise FormatError(f"{path}: no safetensors checkpoint here (no {HF_INDEX}, {MANIFEST}, "
                          "rank_<r>/ directories or .safetensors files)")
    return _complete(path, files, f"{len(files)} safetensors file(s)")


def _complete(root: Path, files: list[str], desc: str, weight_map: dict | None = None,
              index_path: Path | None = None) -> InputCheckpoint:
    tensors: dict[str, TensorInfo] = {}
    entries = []
    for f in files:
        h = read_header(root / f)
        for name, e in h.tensors.items():
            if weight_map is not None and weight_map.get(name) != f:
                continue  # the index is authoritative about where a tensor lives
            if name in tensors:
                raise FormatError(f"{root}: tensor {name!r} is stored twice ({f} and another file)")
            tensors[name] = TensorInfo(name, e.shape, e.dtype)
            entries.append((name, Box.full(e.shape), f))
    if weight_map is not None:
        missing = [n for n in weight_map if n not in tensors]
        if missing:
            raise FormatError(f"{index_path}: tensor {missing[0]!r} is mapped to "
                              f"{weight_map[missing[0]]} but that file does not hold it")
    source = SourceIndex(tensors.values(), group_chunks(entries))
    return InputCheckpoint("complete", str(root), source, tuple(files), description=desc)


def _training_step(root: Path, record: str, strategy: Strategy | None,
                   lazy: bool) -> InputCheckpoint:
    """One committed step of a training directory: its record is its manifest."""
    inp = _distributed_from_manifest(root, strategy, lazy, record)
    return replace(inp, description=f"training directory, step {Path(record).stem.split('-', 1)[1]}"
                   f" ({record}); " + inp.description)


def _distributed_from_manifest(root: Path, strategy: Strategy | None,
                               lazy: bool = False, name: str = MANIFEST) -> InputCheckpoint:
    """Chunks come from the manifest (``name``), decoded and checked (paths inside
    ``root``, inside the tensor, no overlap, complete) per tensor on first use; unless
    ``lazy``, every tensor is decoded and checked now."""
    m = read_manifest(root, name)
    where = str(root / name)
    tensors = {name: TensorInfo(name, shape, dtype) for name, (shape, dtype) in m.shapes.items()}
    checked: set[str] = set()

    def chunks(name: str) -> list[SourceChunk]:
        entries = []
        for (box, f), checksum in zip(m.chunks(name), m.checksums(name)):
            if f not in checked:  # a path check per file, not per chunk (1024 ranks:
                safe_join(root, f, where)  # ~1,000 files but ~370,000 chunks)
                checked.add(f)
            entries.append((name, box, f, checksum))
        got = group_chunks(entries).get(name, [])
        check_tensor_chunks(where, tensors[name], got)
        return got

    source = SourceIndex(tensors.values(), chunks, redundancy=m.redundancy)
    if not lazy:
        for name in tensors:
            source.chunks(name)
    if strategy is None and (root / m.strategy).exists():  # 0.4 s at 1024 ranks: only if needed
        from ..layout.loader import load_strategy
        strategy = load_strategy(root / m.strategy)
    return InputCheckpoint("distributed", str(root), source, m.files, m, strategy,
                           f"distributed, {m.world_size} ranks, redundancy {m.redundancy}")


def _distributed_from_strategy(root: Path, strategy: Strategy) -> InputCheckpoint:
    """No manifest (e.g. MindSpore output): rank r's only/latest file holds its boxes;
    headers say which tensors each file really stores (de-duplicated saves)."""
    dirs = rank_dirs(root)
    files: dict[int, str] = {}
    headers: dict[int, SafetensorsHeader] = {}
    for r in range(strategy.world_size):
        if r not in dirs:
            raise FormatError(f"{root}: rank_{r}/ is missing (strategy has "
                              f"{strategy.world_size} ranks)")
        cands = sorted(p for p in dirs[r].glob("*.safetensors"))
        if not cands:
            raise FormatError(f"{dirs[r]}: no .safetensors file for rank {r}")
        latest = max(cands, key=lambda p: (p.stat().st_mtime, p.name))
        files[r] = f"{rank_dir_name(r)}/{latest.name}"
        headers[r] = read_header(latest)
    source = strategy_source(strategy, files.__getitem__,
                             holds=lambda r, name: name in headers[r].tensors)
    source.check_complete(str(root))
    redundancy = "dedup" if any(h.metadata.get("remove_redundancy") == "True"
                                for h in headers.values()) else "full"
    source.redundancy = redundancy
    return InputCheckpoint("distributed", str(root), source, tuple(files.values()), None, strategy,
                           f"distributed without manifest, {strategy.world_size} ranks")


def open_source(path: str | Path, strategy: Strategy | None, comm, prefix: str | None = None,
                lazy: bool = False) -> InputCheckpoint:
    """``open_input``, except that a dry run simulating a job (``comm.simulated``) may
    plan a checkpoint that is not on this machine: when ``path`` does not exist it is
    taken to be what ``hpcckpt split`` writes for ``strategy`` (full, one file per rank),
    and no file is opened."""
    if not getattr(comm, "simulated", False) or Path(path).exists():
        return open_input(path, strategy, lazy=lazy)
    if strategy is None:
        raise UsageError(f"{path}: does not exist; a simulated dry run of a checkpoint that is "
                         "not here needs --src-strategy")
    name = prefix or DEFAULT_PREFIX
    source = strategy_source(strategy, lambda r: rank_file_name(name, r))
    return InputCheckpoint("distributed", str(path), source, (), None, strategy,
                           f"simulated, {strategy.world_size} ranks")
