"""Atomic writes: temp name, fsync, rename. A half-written output never looks complete.

Temporary names are unique to their writer (``<file>.<token>.partial``): a job only
ever renames or removes files it created itself, even if another job writes into the
same directory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import CheckpointIOError

PARTIAL = ".partial"


def new_token() -> str:
    """A fresh name part for one job's temporary files (8 hex digits, random). From
    ``os.urandom``: ``secrets`` would load OpenSSL, 5 MiB per rank."""
    return os.urandom(4).hex()


def partial_name(path: str, token: str | None = None) -> str:
    """The temporary name of ``path`` for the writer holding ``token``."""
    return f"{path}.{token}{PARTIAL}" if token else path + PARTIAL


def io_error(path: str | Path, what: str, e: OSError) -> CheckpointIOError:
    """The one-line error for a failed write: the file, what was being done, the cause."""
    return CheckpointIOError(f"{path}: {what}: {e.strerror or e}")


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
    """Write ``path`` whole or not at all: a temporary file of this process, fsynced,
    renamed over ``path``. On any failure (full disk, a signal) the temporary file is
    removed and the error names ``path``."""
    path = str(path)
    tmp = partial_name(path, f"{os.getpid()}-{new_token()}")
    fd = None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
        os.close(fd)
        fd = None
        os.replace(tmp, path)
    except BaseException as e:
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, CheckpointIOError):
            raise io_error(path, "cannot write", e) from None
        raise
    if fsync:
        fsync_dir(os.path.dirname(path) or ".")


def json_bytes(doc: object) -> bytes:
    """How hpcckpt writes JSON files (manifests, indexes)."""
    return (json.dumps(doc, indent=1) + "\n").encode()


def atomic_write_json(path: str | Path, doc: object, fsync: bool = True) -> None:
    atomic_write_bytes(path, json_bytes(doc), fsync)
