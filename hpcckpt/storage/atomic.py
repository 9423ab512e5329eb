"""Atomic writes: temp name, fsync, rename. A half-written output never looks complete."""
from __future__ import annotations

import json
import os
from pathlib import Path

PARTIAL = ".partial"


def partial_name(path: str) -> str:
    return path + PARTIAL


def fsync_dir(path: str | Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> None:
    path = str(path)
    tmp = partial_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            from ..errors import CheckpointIOError
            raise CheckpointIOError(f"{path}: cannot write: {e.strerror or e}") from None
        raise
    if fsync:
        fsync_dir(os.path.dirname(path) or ".")


def json_bytes(doc: object) -> bytes:
    """How hpcckpt writes JSON files (manifests, indexes)."""
    return (json.dumps(doc, indent=1) + "\n").encode()


def atomic_write_json(path: str | Path, doc: object, fsync: bool = True) -> None:
    atomic_write_bytes(path, json_bytes(doc), fsync)
