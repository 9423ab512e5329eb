"""Pieces shared by the distributed-output operations (split, reshard)."""
from __future__ import annotations

from ..errors import FormatError
from ..formats.names import MANIFEST, MODEL_FILES_DIR, STRATEGY_FILE, rank_dir_name
from ..layout.strategy import Strategy
from ..layout.yaml_io import strategy_file_bytes
from ..planning.outputs import OutputFile
from ..planning.sources import SourceIndex
from ..storage import model_files
from ..storage.atomic import json_bytes
from ..storage.model_files import ModelFile
from ..storage.manifest import Manifest, ManifestChunk, ManifestTensor


def check_tensors_match(source: SourceIndex, strategy: Strategy, source_desc: str,
                        strategy_desc: str, allow_extra: bool = False) -> None:
    """Every strategy tensor is in the source with the same shape and dtype; unless
    ``allow_extra``, the source holds no tensor the strategy lacks."""
    for t in strategy.tensors:
        s = source.tensors.get(t.name)
        if s is None:
            raise FormatError(f"tensor {t.name!r} is in {strategy_desc} but not in {source_desc}")
        if s.shape != t.shape or s.dtype != t.dtype:
            raise FormatError(f"tensor {t.name!r} is {s.dtype} {list(s.shape)} in {source_desc} but "
                              f"{t.dtype} {list(t.shape)} in {strategy_desc}")
    extra = [] if allow_extra else [n for n in source.tensors if n not in strategy]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise FormatError(f"tensor {extra[0]!r}{more} is in {source_desc} but not in {strategy_desc}")


def build_manifest(strategy: Strategy, files: list[OutputFile], checksums: dict[tuple[int, int], str],
                   dedup: bool, prefix: str, carried: list[ModelFile] = ()) -> Manifest:
    chunks: dict[str, list[ManifestChunk]] = {t.name: [] for t in strategy.tensors}
    for fi, f in enumerate(files):
        for ei, e in enumerate(f.entries):
            chunks[e.name].append(ManifestChunk(e.box, f.path, checksums[(fi, ei)]))
    tensors = tuple(ManifestTensor(t.name, t.shape, t.dtype, tuple(chunks[t.name]))
                    for t in strategy.tensors)
    return Manifest(strategy.world_size, "dedup" if dedup else "full", tensors,
                    tuple(f.path for f in files), STRATEGY_FILE, prefix,
                    tuple(f.size for f in files), strategy,
                    model_files.manifest_entries(list(carried)))


def rank_dirs_of(strategy: Strategy) -> list[str]:
    """Every rank's directory: ranks holding nothing still get theirs."""
    return [rank_dir_name(r) for r in range(strategy.world_size)]


def distributed_records(strategy: Strategy, files: list[OutputFile],
                        checksums: dict[tuple[int, int], str], dedup: bool,
                        prefix: str, carried: list[ModelFile] = ()) -> list[tuple[str, bytes]]:
    """The records of a distributed checkpoint, in commit order: the carried model
    files, the strategy, then the manifest (its presence means complete)."""
    manifest = build_manifest(strategy, files, checksums, dedup, prefix, carried)
    return [*model_files.records(list(carried), MODEL_FILES_DIR),
            (STRATEGY_FILE, strategy_file_bytes(strategy)),
            (MANIFEST, json_bytes(manifest.to_dict()))]
