"""The reader interface: what a checkpoint source holds, and a way to read its bytes.

Every input the engine plans from or copies out of is a ``CheckpointReader``. Planning
sees only ``reader.source`` (a ``SourceIndex``: each tensor's global shape and dtype,
and per tensor the distinct stored boxes with the files holding a copy of each).
Execution sees only ``reader.read_region``: consecutive bytes of one stored chunk. A new
kind of source (MindSpore ``.ckpt``, HDF5, a training job's in-memory state) is
therefore one new class; planning and the ops do not change.

Writing a reader
----------------
1. Subclass ``CheckpointReader`` (or ``storage.inputs.SafetensorsReader`` when the bytes
   live in safetensors files, which gives ``read_region`` for free).
2. ``recognise(path)`` (classmethod): True when ``path`` is this kind of source. Cheap:
   stat a few names, never parse. Readers are tried in ``READERS`` order
   (``storage/inputs.py``); the first that recognises a path opens it.
3. ``metadata_names(path)`` (classmethod, optional): the small files ``open`` will read
   (index, manifest, name map, strategy), relative to ``path``. In an MPI job rank 0 reads
   them once and broadcasts their bytes (``open_input(..., comm=)``); ``open`` gets them
   through ``meta.read``, which falls back to the local filesystem for anything else.
4. ``open(path, strategy, lazy, meta)`` (classmethod): build the reader. Read metadata
   only through ``meta`` (``meta or MetaFiles()``: None means this process's filesystem).
   Set the attributes below. A source that records chunk checksums puts them in
   ``SourceChunk.checksums`` (one per file), and ``ChunkReader`` verifies a chunk it
   reads whole against them.
5. ``read_region(file, tensor, box, offset, views)``: fill ``views`` in order with the
   stored chunk's bytes from ``offset`` on. A chunk's bytes are its box's elements in
   row-major (C) order and the dtype's little-endian safetensors encoding, exactly what a
   safetensors file stores for that slice; ``offset`` counts from its first byte.
   Readers whose chunks live elsewhere (a ``.ckpt`` record, an HDF5 dataset, a numpy
   array) convert here. Raise ``FormatError``/``CheckpointIOError`` naming the file,
   tensor and byte range.
6. Register the class in ``READERS`` at its place in the recognition order, or call
   ``register_reader`` at run time (e.g. a reader defined by a test or a plug-in).

A reader built in memory (no path) is passed straight to the ops: ``open_input`` returns
any ``CheckpointReader`` it is given unchanged, so ``hpcckpt.merge(reader, out)`` works.
``tests/unit/test_readers.py`` has two small examples: a rank-sharded state held in
numpy arrays, and a ``.npz`` reader registered for paths.

The attributes every reader sets:

``kind``         "complete" (every tensor stored whole, once) or "distributed" (boxes
                 per rank, possibly replicated).
``root``         the directory ``files`` are relative to (a label for readers without
                 files; it appears in messages).
``source``       the ``SourceIndex``. Chunk ``files`` are opaque names to the planner,
                 except that distributed sources name each rank's file ``rank_<r>/...``
                 (node-local reshard places rank directory *r* on job rank *r* mod size).
``files``        every data file (or chunk container name), relative to ``root``.
``description``  one line for ``inspect``.
``manifest``     the ``ManifestIndex`` when the source has one, else None.
``strategy``     the layout the source was written under, when known, else None.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from ..errors import CheckpointIOError
from ..formats.safetensors import read_regular
from ..layout.box import Box
from ..layout.strategy import Strategy
from ..layout.tensor import TensorInfo
from ..planning.sources import SourceIndex


#: every metadata file this process read from disk, in order (the tests count them)
OPENED: list[str] = []


def read_file(path: str | Path) -> bytes | None:
    """A metadata file's bytes, or None when it does not exist; other errors name it."""
    path = str(path)
    try:
        data = read_regular(path)
        OPENED.append(path)
        return data
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise CheckpointIOError(f"{path}: cannot read: {e.strerror or e}") from None


class MetaFiles:
    """How a reader reads its small metadata files: from ``files`` (path -> bytes, or
    None for a file known to be absent) when given there, else straight from this
    process's filesystem."""

    def __init__(self, files: dict[str, bytes | None] | None = None):
        self.files = files or {}

    def read(self, path: str | Path) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        path = str(path)
        if path in self.files:
            return self.files[path]
        return read_file(path)


def shared_metadata(comm, path: Path, names: tuple[str, ...]) -> MetaFiles:
    """Metadata files read once per job: rank 0 reads ``path / name`` for each of
    ``names`` and broadcasts their bytes (``Comm.bcast_bytes``); every rank gets them
    through the returned ``MetaFiles``.

    At 1024 ranks every rank reading a 70 MiB manifest from a shared filesystem was 70
    GiB of metadata reads. Collective: every rank calls it with the same ``names``
    (from rank 0's recognition). A read error on rank 0 is raised on every rank.
    """
    sizes, error = None, None
    blob = b""
    if comm.rank == 0:
        try:
            got = [read_file(path / n) for n in names]
            sizes = [None if b is None else len(b) for b in got]
            blob = b"".join(b for b in got if b is not None)
        except CheckpointIOError as e:
            error = str(e)
    sizes, error = comm.bcast((sizes, error))
    if error is not None:
        raise CheckpointIOError(error)
    blob = comm.bcast_bytes(blob)
    files, pos = {}, 0
    for n, size in zip(names, sizes):
        if size is None:
            files[str(path / n)] = None
        else:
            files[str(path / n)] = bytes(blob[pos:pos + size])
            pos += size
    return MetaFiles(files)


class CheckpointReader(ABC):
    """A checkpoint source: what it holds (``source``) and its stored bytes
    (``read_region``). See the module docstring for the contract."""

    #: short name of the source kind, for messages and ``inspect``
    name: ClassVar[str] = "reader"

    kind: str
    root: str
    source: SourceIndex
    files: tuple[str, ...]
    description: str = ""
    manifest = None
    strategy: Strategy | None = None

    @classmethod
    def recognise(cls, path: Path) -> bool:
        """True when ``path`` is this kind of source (cheap: no parsing)."""
        return False

    @classmethod
    def metadata_names(cls, path: Path) -> tuple[str, ...]:
        """Small files under ``path`` that ``open`` reads, to be read once per job."""
        return ()

    @classmethod
    def open(cls, path: Path, strategy: Strategy | None = None, lazy: bool = False,
             meta: MetaFiles | None = None) -> "CheckpointReader":
        """Build the reader for ``path``. ``strategy``: the layout when the source does not
        record one. ``lazy``: chunks may be decoded and checked per tensor on first use."""
        raise NotImplementedError(f"{cls.__name__} is not opened from a path")

    @abstractmethod
    def read_region(self, file: str, tensor: TensorInfo, box: Box, offset: int,
                    views: list[memoryview]) -> None:
        """Fill ``views`` in order with bytes ``offset ..`` of the stored chunk ``box`` of
        ``tensor`` held by ``file`` (one of a ``SourceChunk``'s ``files``)."""

    def close(self) -> None:
        """Release open files; the reader stays usable (files reopen on demand)."""

    def __str__(self) -> str:   # messages name a source by its root, as they name a path
        return self.root

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_region(views: list[memoryview], offset: int, chunk_bytes: int) -> int:
    """Bytes asked for; raises AssertionError when the region runs past the chunk
    (a planning bug: reading on would copy another tensor's bytes)."""
    n = sum(map(len, views))
    if offset < 0 or offset + n > chunk_bytes:
        raise AssertionError(f"read of bytes {offset}-{offset + n} beyond a chunk of "
                             f"{chunk_bytes} bytes")
    return n
