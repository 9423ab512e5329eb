"""The non-weight files of a Hugging Face model directory, carried with the weights.

A model directory is more than its weights: ``config.json``, ``generation_config.json``,
tokenizer files, chat templates, README/LICENSE and small subdirectories (e.g.
sentence-transformers' ``1_Pooling/``) are what make ``from_pretrained`` work. ``split``
keeps them in the distributed checkpoint under ``model_files/`` and lists each in the
manifest with its size and checksum; ``reshard`` carries them on (checked); ``merge``
(HF layout) writes them back byte for byte at their relative paths.

They are small, so they travel whole: rank 0 reads them in the plan step (a file too
large fails the job before anything is written) and the commit writes them as records,
before the marker. What counts as a weight (and so is not carried): a ``.safetensors``
file at the top of the directory and the weight index. Hidden entries (``.git/``,
``.cache/``, the output lock) are not carried either.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import FormatError, UsageError, quote
from ..formats.names import CHECKSUM_PREFIX, HF_INDEX, MODEL_FILES_DIR, checksum_of
from ..formats.safetensors import read_regular
from ..units import format_bytes

DEFAULT_MAX_BYTES = 64 << 20   #: larger non-weight files are refused unless asked
MAX_FILES = 4096               #: a model directory with more is not a model directory


@dataclass(frozen=True)
class ModelFile:
    """One carried file: its path relative to the model directory and its bytes."""

    path: str      #: '/'-separated, relative, no '..'
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def checksum(self) -> str:
        return checksum_of(self.data)


def model_dir_of(complete: str | Path) -> Path | None:
    """The model directory whose files ``split`` carries: COMPLETE itself, or the
    directory of the index it names; a single weight file carries nothing."""
    p = Path(complete)
    if p.is_dir():
        return p
    if p.name == HF_INDEX:
        return p.parent
    return None


def is_weight(rel: str) -> bool:
    """Weights travel as tensors, not as files: a top-level ``.safetensors`` file or a
    weight index."""
    return "/" not in rel and (rel.endswith(".safetensors") or rel.endswith(".index.json"))


def collect(root: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> list[ModelFile]:
    """Every non-weight file below ``root``, sorted by path, read whole.

    Raises:
        UsageError: a file larger than ``max_bytes`` (naming it and the option), a
            symbolic link to a directory, or more than ``MAX_FILES`` files.
    """
    root = Path(root)
    found: list[ModelFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                raise UsageError(f"{os.path.join(dirpath, d)}: a symbolic link to a directory "
                                 "in the model directory; copy it in or remove it")
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = PurePosixPath(Path(full).relative_to(root)).as_posix()
            if name.startswith(".") or is_weight(rel):
                continue
            size = os.path.getsize(full)
            if size > max_bytes:
                raise UsageError(
                    f"{full}: a non-weight file of {format_bytes(size)} is larger than "
                    f"--max-extra-size {format_bytes(max_bytes)}; pass a larger "
                    "--max-extra-size to carry it, or move it out of the model directory")
            if len(found) == MAX_FILES:
                raise UsageError(f"{root}: more than {MAX_FILES} non-weight files; "
                                 "is this a model directory?")
            try:
                found.append(ModelFile(rel, read_regular(full)))
            except OSError as e:   # a FIFO would have blocked the open forever
                raise UsageError(f"{full}: cannot carry it: {e.strerror or e}; remove it from "
                                 "the model directory") from None
    return found


def check_path(rel, where: str) -> str:
    """A carried file's path as a manifest lists it: relative, inside the directory."""
    bad = (not isinstance(rel, str) or not rel or "\0" in rel or "\\" in rel
           or rel.startswith("/") or any(c in ("", ".", "..") for c in rel.split("/")))
    if bad:
        raise FormatError(f"{where}: model file name {quote(rel)} would leave the directory "
                          "(names are relative paths without '..')")
    if is_weight(rel):
        raise FormatError(f"{where}: model file name {quote(rel)} is a weight file's name")
    return rel


def parse_entries(doc, where: str) -> dict[str, tuple[int, str]]:
    """The manifest's ``model_files``: ``{path: {"size": n, "checksum": c}}``."""
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: 'model_files' must map file names to their size and "
                          f"checksum, got {quote(doc)}")
    out = {}
    for rel, e in doc.items():
        check_path(rel, where)
        size = e.get("size") if isinstance(e, dict) else None
        sig = e.get("checksum") if isinstance(e, dict) else None
        if (not isinstance(size, int) or isinstance(size, bool) or size < 0
                or not isinstance(sig, str) or not sig.startswith(CHECKSUM_PREFIX)):
            raise FormatError(f"{where}: model file {rel!r}: expected {{\"size\": bytes, "
                              f"\"checksum\": \"{CHECKSUM_PREFIX}...\"}}, got {quote(e)}")
        out[rel] = (size, sig)
    return out


def manifest_entries(files: list[ModelFile]) -> dict:
    return {f.path: {"size": f.size, "checksum": f.checksum} for f in files}


def read_carried(dist: str | Path, entries: dict[str, tuple[int, str]]) -> list[ModelFile]:
    """The files a distributed checkpoint carries, each checked against its manifest
    entry (a changed or truncated file fails, naming it)."""
    files = []
    for rel, (size, sig) in entries.items():
        path = Path(dist) / MODEL_FILES_DIR / rel
        try:
            data = read_regular(path)
        except OSError as e:
            raise FormatError(f"{path}: carried model file cannot be read: "
                              f"{e.strerror or e}") from None
        f = ModelFile(rel, data)
        if (f.size, f.checksum) != (size, sig):
            raise FormatError(f"{path}: carried model file is {f.size} bytes with checksum "
                              f"{f.checksum}; the manifest records {size} bytes, {sig}")
        files.append(f)
    return files


def records(files: list[ModelFile], under: str = "") -> list[tuple[str, bytes]]:
    """Commit records writing ``files`` (below ``under`` in the output)."""
    return [(f"{under}/{f.path}" if under else f.path, f.data) for f in files]


def config_summary(files: list[ModelFile] | None = None, root: Path | None = None) -> dict | None:
    """Model type, dtype and tied embeddings from ``config.json`` (carried, or in
    ``root``), or None without one."""
    data = None
    if files is not None:
        data = next((f.data for f in files if f.path == "config.json"), None)
        where = f"{MODEL_FILES_DIR}/config.json"
    if data is None and root is not None and (root / "config.json").is_file():
        data, where = (root / "config.json").read_bytes(), str(root / "config.json")
    if data is None:
        return None
    try:
        cfg = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{where}: not valid JSON: {type(e).__name__}") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{where}: not a JSON object")
    return {"model_type": cfg.get("model_type"),
            "dtype": cfg.get("torch_dtype", cfg.get("dtype")),
            # transformers ties input and output embeddings unless the config says not
            "tie_word_embeddings": cfg.get("tie_word_embeddings", True)}
