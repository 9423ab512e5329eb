"""convert: legacy checkpoints (MindSpore ``.ckpt``, Keras/HF HDF5) -> safetensors.

``.ckpt`` output is what ``ms.ckpt_to_safetensors`` writes: a file ``x.ckpt`` becomes
``OUT/x.safetensors`` (every ``.ckpt`` in the name replaced, as MindSpore does), a
directory's ``rank*/`` subdirectories keep their names under OUT, tensors are laid out
in the ``safetensors`` library's order (largest dtype first, then by name) with
metadata ``{"format": "ms"}`` (none when the file holds no tensor). HDF5 ``x.h5`` /
``x.hdf5`` becomes ``OUT/x.safetensors`` in the same order, metadata ``{"format": "tf"}``
(Keras legacy, ``tf_model.h5``) or ``{"format": "keras"}`` (Keras 3).

Protocol: plan (every rank lists the inputs; each parses its share of the files, CRC
checked, and the tensor lists are allgathered, so every output file is laid out up
front on every rank) -> ``ops.commit.OutputCommit``: the output bytes are divided among
the ranks (a large tensor may be shared), each tile read from its source through the
bounded buffer (``.ckpt``: positioned reads of the value contents; HDF5: a hyperslab
read by h5py), renamed when every rank has finished; any failure undoes the job.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..comm.wrapper import Comm, as_comm
from ..dtypes import library_order
from ..errors import FormatError
from ..layout.box import Box
from ..planning.outputs import OutputEntry, OutputFile, divide_writes, make_file
from ..storage.legacy import LegacyTensor, import_h5py, read_ckpt, read_hdf5
from ..storage.fileio import FileHandles, pread_into
from .commit import OutputCommit, WriteOptions
from .result import OpResult

H5_SUFFIXES = (".h5", ".hdf5")


@dataclass(frozen=True)
class ConvertJob:
    """One input file and the safetensors file it becomes (relative to OUT)."""

    src: str
    out: str
    kind: str        #: "ckpt" or "hdf5"
    size: int


def plan_convert(src: str | Path) -> list[ConvertJob]:
    """Every file to convert. A ``.ckpt``/``.h5``/``.hdf5`` file, or a directory with
    ``rank*/`` subdirectories of ``.ckpt`` files (``ms.ckpt_to_safetensors``'s layout)."""
    src = Path(src)
    if src.is_file():
        return [_job(src, src.name)]
    if not src.is_dir():
        raise FormatError(f"{src}: no such file or directory")
    jobs = []
    for d in sorted(p for p in src.iterdir() if p.is_dir() and p.name.startswith("rank")):
        for f in sorted(d.iterdir()):
            if f.name.endswith(".ckpt") and f.is_file():
                jobs.append(_job(f, f"{d.name}/{f.name}"))
    if not jobs:
        raise FormatError(f"{src}: no rank*/ directories with .ckpt files (give a .ckpt, .h5 "
                          "or .hdf5 file, or a directory of rank_<r>/ .ckpt files)")
    return jobs


def _job(path: Path, rel: str) -> ConvertJob:
    if path.name.endswith(".ckpt"):
        return ConvertJob(str(path), rel.replace(".ckpt", ".safetensors"), "ckpt",
                          path.stat().st_size)
    if path.suffix in H5_SUFFIXES:
        return ConvertJob(str(path), rel[: -len(path.suffix)] + ".safetensors", "hdf5",
                          path.stat().st_size)
    raise FormatError(f"{path}: not a .ckpt, .h5 or .hdf5 file")


def divide_jobs(jobs: list[ConvertJob], world: int) -> list[list[int]]:
    """Job indices per rank: largest file first to the rank with the fewest bytes."""
    load = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(jobs)), key=lambda i: (-jobs[i].size, i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[r].append(i)
        load[r] += jobs[i].size
    return [sorted(x) for x in out]


def parse_job(job: ConvertJob) -> tuple[list[LegacyTensor], dict[str, str]]:
    """A job's tensors in the order the output stores them, and the output metadata."""
    if job.kind == "ckpt":
        tensors, meta = read_ckpt(job.src), {"format": "ms"}
    else:
        tensors, layout = read_hdf5(job.src)
        meta = {"format": "tf" if layout == "keras-legacy" else "keras"}
    return sorted(tensors, key=lambda t: library_order(t.name, t.dtype)), meta


def convert(src: str, out: str, *, comm=None, options: WriteOptions = WriteOptions()) -> OpResult:
    """Convert legacy checkpoint files to safetensors, dividing the work among ranks.

    Args:
        src: a ``.ckpt``, ``.h5`` or ``.hdf5`` file, or a directory of ``rank*/`` ``.ckpt`` files.
        out: output directory (created; non-empty only with ``options.overwrite``).
        comm: an mpi4py communicator, a Comm, or None (one process).
        options: buffer size (the memory bound per rank), fsync, dry run, overwrite.

    Returns:
        The summary (files, bytes read and written, seconds).

    Example:
        >>> convert("ckpt/", "st/", comm=MPI.COMM_WORLD)  # doctest: +SKIP
    """
    comm: Comm = as_comm(comm)
    t0 = time.perf_counter()
    with comm.step("plan"):
        jobs = plan_convert(src)
        mine = divide_jobs(jobs, comm.size)[comm.rank]
        parsed = {i: parse_job(jobs[i]) for i in mine}
    gathered: dict[int, tuple[list[LegacyTensor], dict]] = {}
    for part in comm.allgather(parsed):
        gathered.update(part)
    files: list[OutputFile] = []
    sources: dict[int, tuple[int, LegacyTensor]] = {}   # id(entry) -> (job, tensor)
    for i, job in enumerate(jobs):
        tensors, meta = gathered[i]
        f = make_file(job.out, ((t.name, t.dtype, Box.full(t.shape), t.shape) for t in tensors),
                      meta if tensors else None)
        files.append(f)
        for e, t in zip(f.entries, tensors):
            sources[id(e)] = (i, t)
    pieces = divide_writes(files, comm.size)
    mine_bytes = sum(p.nbytes for p in pieces[comm.rank])
    if options.dry_run:
        rows = comm.allgather({"rank": comm.rank, "bytes_read": mine_bytes,
                               "bytes_written": mine_bytes})
        return OpResult.from_rows("convert", out, len(files), rows, time.perf_counter() - t0,
                                  comm.size, dry_run=True)
    reader = _LegacyReader(jobs, sources)
    try:
        with OutputCommit(comm, out, files, options=options, op="hpcckpt convert",
                          inputs=(str(src),), checksums=False) as job:
            job.create(range(comm.rank, len(files), comm.size))
            job.fill(pieces, reader.read)
            job.commit(lambda sums: [])   # no index: the renames complete the output
    finally:
        reader.close()
    rows = comm.allgather({"rank": comm.rank, "bytes_read": reader.bytes_read,
                           "bytes_written": mine_bytes})
    seconds = comm.allreduce_max(time.perf_counter() - t0)
    return OpResult.from_rows("convert", out, len(files), rows, seconds, comm.size,
                              extra={"inputs": [j.src for j in jobs]})


class _LegacyReader:
    """The ``ReadFn`` of a convert job: a tile's bytes from its ``.ckpt`` or HDF5 source."""

    def __init__(self, jobs: list[ConvertJob], sources: dict[int, tuple[int, LegacyTensor]]):
        self.jobs, self.sources = jobs, sources
        self.handles = FileHandles()
        self.h5: dict[int, object] = {}
        self.bytes_read = 0

    def read(self, e: OutputEntry, tile: Box, out: memoryview) -> None:
        i, t = self.sources[id(e)]
        job = self.jobs[i]
        if job.kind == "ckpt":
            strides, acc = [], 1
            for size in reversed(t.shape):
                strides.append(acc)
                acc *= size
            start = sum(o * s for o, s in zip(tile.offsets, reversed(strides))) * e.itemsize
            self._ckpt(job.src, t, start, out)
        else:
            self._hdf5(i, t, tile, out)
        self.bytes_read += len(out)

    def _ckpt(self, path: str, t: LegacyTensor, start: int, out: memoryview) -> None:
        """Bytes ``[start, start + len(out))`` of the tensor, across its split values."""
        fd = self.handles.get(path)
        pos, done = 0, 0
        for offset, length in t.pieces:
            lo, hi = max(start + done, pos), min(start + len(out), pos + length)
            if lo < hi:
                pread_into(fd, out[done:done + hi - lo], offset + lo - pos, path)
                done += hi - lo
            pos += length
            if done == len(out):
                return
        raise FormatError(f"{path}: tensor {t.name!r} ends before byte {start + len(out)}")

    def _hdf5(self, i: int, t: LegacyTensor, tile: Box, out: memoryview) -> None:
        import numpy as np

        from ..dtypes import numpy_dtype
        f = self.h5.get(i)
        if f is None:
            f = self.h5[i] = import_h5py().File(self.jobs[i].src, "r")
        arr = np.frombuffer(out, numpy_dtype(t.dtype).newbyteorder("<")).reshape(tile.sizes)
        sel = tuple(slice(o, o + n) for o, n in zip(tile.offsets, tile.sizes))
        f[t.source].read_direct(arr, source_sel=sel if sel else None)

    def close(self) -> None:
        self.handles.close()
        for f in self.h5.values():
            f.close()
