"""``manifest.json``: the record of a complete distributed checkpoint (SPEC 2.2).

Written last and atomically; its presence means "complete". Lists, for every tensor,
its global shape, dtype and every stored chunk with file and checksum.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointIOError, FormatError
from ..layout.box import Box

FORMAT = "hpcckpt.manifest/1"
MANIFEST = "manifest.json"


@dataclass(frozen=True, slots=True)
class ManifestChunk:
    box: Box
    file: str           #: relative to the checkpoint root
    checksum: str       #: "xxh3_64:<16 hex digits>" of the chunk's stored bytes

    def to_dict(self) -> dict:
        return {**self.box.to_dict(), "file": self.file, "checksum": self.checksum}


@dataclass(frozen=True, slots=True)
class ManifestTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[ManifestChunk, ...]


@dataclass(frozen=True)
class Manifest:
    world_size: int
    redundancy: str                 #: "full" (every rank's boxes) or "dedup" (each box once)
    tensors: tuple[ManifestTensor, ...]
    files: tuple[str, ...]          #: every rank file, including ones holding no tensor
    strategy: str = "strategy.yaml"
    prefix: str = ""

    def to_dict(self) -> dict:
        return {"format": FORMAT, "world_size": self.world_size, "redundancy": self.redundancy,
                "strategy": self.strategy, "prefix": self.prefix, "files": list(self.files),
                "tensors": {t.name: {"shape": list(t.shape), "dtype": t.dtype,
                                     "chunks": [c.to_dict() for c in t.chunks]}
                            for t in self.tensors}}

    @staticmethod
    def from_dict(doc: dict, where: str) -> "Manifest":
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise FormatError(f"{where}: not an hpcckpt manifest (format "
                              f"{doc.get('format') if isinstance(doc, dict) else None!r}, "
                              f"expected {FORMAT!r})")
        try:
            tensors = tuple(
                ManifestTensor(name, tuple(t["shape"]), t["dtype"], tuple(
                    ManifestChunk(Box.from_dict(c), c["file"], c["checksum"]) for c in t["chunks"]))
                for name, t in doc["tensors"].items())
            return Manifest(int(doc["world_size"]), doc["redundancy"], tensors,
                            tuple(doc.get("files", ())), doc.get("strategy", "strategy.yaml"),
                            doc.get("prefix", ""))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FormatError(f"{where}: malformed manifest: {type(e).__name__}: {e}") from None


def read_manifest(root: str | Path) -> Manifest:
    path = Path(root) / MANIFEST
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointIOError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON: {e}") from None
    return Manifest.from_dict(doc, str(path))
