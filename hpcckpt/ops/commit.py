"""The one write protocol: how every output file of hpcckpt comes to exist.

split, merge, reshard (both transports) and the save manager write through
``OutputCommit``; none of them creates, renames or removes an output file itself. The
bytes come from a read callback (a stored checkpoint, memory) or are pushed by the
caller as they arrive (the exchange between ranks).

Call order (every rank calls every method, in this order; each one is collective):

    with OutputCommit(comm, out, files, options=opts, op="split", inputs=(src,)) as job:
        job.create(indices)        # this rank's files, <file>.<job>.partial at full size
        job.fill(pieces, read)     # pull: tiles through the buffer, hashed in passing
        #   or job.write(...) / job.write_runs(...) inside the caller's steps (push)
        job.commit(records)        # fsync, checksums, rename once every rank is done,
                                   # then the records, the commit marker last

Entering takes the output directory: its owner (rank 0, or each rank when every rank
has its own OUT) refuses a symbolic link, an OUT overlapping an input, an OUT another
job is writing (``storage.lock``: a lock file inside OUT, held until the end), and a
non-empty OUT unless ``overwrite`` (whose first act removes the old commit markers);
then it creates OUT and every directory the files go in. Temporary names carry a
token drawn once per job, so a job only ever renames or removes its own files.

Leaving with an exception (any rank's failure, a full disk, SIGTERM or SIGINT) undoes
the job: every rank removes the temporary files it created, and the owner removes the
renamed files, the records and the directories the job created, and OUT itself if the
job created it. OUT is left as the job found it (empty after ``overwrite``, whose old
contents are gone by design). On a signal the local part runs at once, in the handler
(``comm.interrupts``), and the job then fails on every rank through ``Comm.step``.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import xxhash

from ..comm import interrupts
from ..comm.wrapper import Comm
from ..errors import CheckpointIOError, RankFailure, UsageError
from ..formats.names import CHECKSUM_PREFIX, checksum_of
from ..layout.box import Box
from ..planning.outputs import OutputEntry, OutputFile, WritePiece
from ..planning.runs import StridedRuns, tile_contiguous
from ..storage.atomic import (PARTIAL, atomic_write_bytes, fsync_dir, io_error, new_token,
                              partial_name)
from ..storage.chunkio import write_runs_to_file
from ..storage.lock import LOCK_NAME, OutputLock, holder_is_dead
from ..storage.fileio import DEFAULT_BUFFER, pread_into, pwrite_all, start_writeback
from .progress import Progress

#: a temporary file of some job (``partial_name``): ``<file>.<8 hex digits>.partial``
_LEFTOVER = re.compile(r".+\.[0-9a-f]{8}" + re.escape(PARTIAL))

#: test hook: seconds to sleep after each written tile, so tests can interrupt a run
#: (or start a second job) mid-write deterministically instead of racing the disk
DELAY_ENV = "HPCCKPT_TEST_WRITE_DELAY"

#: read(entry, tile, out): put the C-order bytes of ``tile`` (global coordinates, inside
#: ``entry.box``) of the entry's tensor into ``out`` (exactly tile.volume * itemsize bytes)
ReadFn = Callable[[OutputEntry, Box, memoryview], None]
#: records(checksums) on rank 0 -> [(path relative to OUT, bytes)], written in order,
#: each atomically; the last one is the commit marker. ``checksums`` maps
#: (file index, entry index) -> "xxh3_64:<hex>" of the entry's stored bytes.
RecordsFn = Callable[[dict[tuple[int, int], str]], list[tuple[str, bytes]]]


@dataclass(frozen=True)
class WriteOptions:
    """How a job writes. ``buffer_size``: bytes per copy tile (at least 1; a tile never
    splits an element, so a buffer below one element holds one element)."""

    buffer_size: int = DEFAULT_BUFFER
    fsync: bool = True
    dry_run: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if not isinstance(self.buffer_size, int) or self.buffer_size < 1:
            raise UsageError(f"buffer size must be at least 1 byte (got {self.buffer_size!r})")


class OutputCommit:
    """One job writing ``files`` under ``out``, from taking the directory to its commit.

    Args:
        comm: the job's ``Comm``; every rank constructs the object and calls every method.
        out: the output directory (this rank's own, when ``shared`` is False).
        files: the output files, laid out up front (``planning.outputs``); a list, or a
            mapping from file number to file when ranks know different subsets (the
            number is the key used in ``create``, ``write`` and the checksums).
        options: ``WriteOptions``.
        op: the job's name, for the lock file and messages ("hpcckpt split").
        inputs: paths OUT must not be, contain or lie inside.
        markers: old commit markers an ``overwrite`` removes before anything else.
        dirs: directories (relative to OUT) to create besides the files' own ones
            (e.g. ``rank_<r>/`` of ranks that store nothing).
        shared: OUT is one directory seen by every rank (rank 0 takes and commits it);
            False: each rank has its own OUT and takes and commits it itself.
        keep_existing: OUT may already hold other files, which are left alone (a save
            manager adding a step); the files written must not exist yet.
        checksums: hash every entry (False: complete weights, which record none).
        locked: the caller holds OUT's lock (``storage.lock``) for longer than this job
            (a save manager, for its lifetime): not taken again here.

    Example:
        files = rank_files(strategy, "model")
        pieces = divide_writes(files, comm.size)
        with OutputCommit(comm, "out", files, op="hpcckpt split", inputs=(src,)) as job:
            job.create(range(comm.rank, len(files), comm.size))
            job.fill(pieces, read)
            job.commit(lambda sums: [("strategy.yaml", yaml_bytes),
                                     ("manifest.json", manifest_bytes(sums))])
    """

    def __init__(self, comm: Comm, out: str, files: Sequence[OutputFile] | Mapping[int, OutputFile],
                 *, options: WriteOptions = WriteOptions(), op: str = "hpcckpt",
                 inputs: Iterable[str] = (), markers: Iterable[str] = (),
                 dirs: Iterable[str] = (), shared: bool = True, keep_existing: bool = False,
                 checksums: bool = True, locked: bool = False):
        self.comm, self.out, self.options, self.op = comm, str(out), options, op
        self.files: dict[int, OutputFile] = (dict(files) if isinstance(files, Mapping)
                                             else dict(enumerate(files)))
        self.inputs, self.markers = tuple(map(str, inputs)), tuple(markers)
        self.dirs, self.shared, self.keep_existing = tuple(dirs), shared, keep_existing
        self.hashing = checksums
        self.locked = locked   #: the caller holds OUT's lock for longer than this job
        self.owner = comm.rank == 0 or not shared   #: takes, commits and undoes OUT
        self.token = ""
        self.bytes_written = 0
        self.checksums: dict[tuple[int, int], str] = {}
        self._lock: OutputLock | None = None
        self._created_dirs: list[str] = []     # by the owner, in creation order
        self._temps: dict[int, str] = {}       # file number -> this rank's temporary file
        self._fds: dict[int, int] = {}
        self._hashers: dict[tuple[int, int], tuple[int, object]] = {}  # in-order hashing
        self._spoiled: set[tuple[int, int]] = set()
        self._touched: set[int] = set()
        self._pieces: list[list[WritePiece]] | None = None
        self._renamed = False
        self._records: list[str] = []          # final paths of records (being) written
        self._committed = False
        self._delay = float(os.environ.get(DELAY_ENV) or 0)
        self._guard = None

    # ---- lifecycle ------------------------------------------------------------------
    def __enter__(self) -> "OutputCommit":
        self._guard = interrupts.guard(self._on_signal)
        self._guard.__enter__()
        try:
            self.token = self.comm.bcast(new_token() if self.comm.rank == 0 else None)
            with self.comm.step("prepare output"):
                if self.owner:
                    self._take_output()
        except BaseException as e:
            self._finish(failed=True, collective=isinstance(e, RankFailure))
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # after a RankFailure every rank is here and may agree on the undo; any other
        # exception escaped the protocol on this rank alone (the CLI aborts the job)
        shared_failure = exc_type is None or issubclass(exc_type, RankFailure)
        self._finish(failed=exc_type is not None or not self._committed,
                     collective=shared_failure or self.comm.mpi is None)

    # ---- steps ----------------------------------------------------------------------
    def create(self, indices: Iterable[int]) -> None:
        """Create ``<file>.<token>.partial`` at full size, with its header, for each file
        number in ``indices`` (this rank's share; every file is created by one rank)."""
        with self.comm.step("create files"):
            for i in indices:
                self._create(i)

    def fill(self, pieces: Sequence[Sequence[WritePiece]], read: ReadFn,
             label: str | None = None) -> None:
        """Write this rank's pieces (``pieces[rank]``; ``pieces`` is the whole job's
        division, known to every rank) tile by tile from ``read``. A piece that is a
        whole entry is hashed as it passes; entries split across ranks are hashed by
        their lowest writing rank in ``commit``. Tiles hold at most ``buffer_size`` bytes
        but never less than one element."""
        self._pieces = [list(p) for p in pieces]
        mine = self._pieces[self.comm.rank] if self.comm.rank < len(self._pieces) else []
        total = sum(p.nbytes for p in mine)
        with self.comm.step("copy"):
            progress = Progress(total, label or f"{self.op} (rank 0)",
                                self.comm.rank == 0 and self.options.progress)
            largest = max((p.nbytes for p in mine), default=0)
            widest = max((self.files[p.file].entries[p.entry].itemsize for p in mine), default=1)
            buf = bytearray(max(min(self.options.buffer_size, largest), widest, 1))
            for p in mine:
                self._fill_piece(p, read, buf, progress)
            progress.close()

    def write(self, index: int, entry: int, offset: int, data) -> None:
        """Push bytes: ``data`` at byte ``offset`` of entry ``entry`` of file ``index``
        (created by this rank). Call inside a step of the caller. Bytes written front to
        back are hashed in passing; an entry written otherwise is read back in ``commit``."""
        e = self.files[index].entries[entry]
        data = memoryview(data).cast("B")
        self._hash((index, entry), offset, (data,))
        fd, path = self._fd(index)
        pwrite_all(fd, data, e.begin + offset, path)
        self._written(fd, e.begin + offset, len(data))

    def write_runs(self, index: int, entry: int, runs: StridedRuns, data, base: int = 0,
                   exclusive: bool = True) -> None:
        """Push strided bytes: ``runs`` (destination offsets relative to the entry's first
        byte) from ``data`` at ``base``, as ``chunkio.write_runs_to_file`` (``exclusive``:
        no other rank writes between these runs)."""
        e = self.files[index].entries[entry]
        lo, hi = runs.dst_span()
        if hi - lo == runs.nbytes:    # dense: the runs in order are the entry's bytes
            mv = memoryview(data)
            n = runs.length
            parts = ((mv[base + runs.src_start:base + runs.src_start + n],) if not runs.counts
                     else (mv[base + s:base + s + n] for s in runs.offsets()[0]))
            self._hash((index, entry), lo, parts)
        else:
            self._spoil((index, entry))
        fd, path = self._fd(index)
        write_runs_to_file(fd, path, e.begin, runs, data, base, exclusive=exclusive)
        self._written(fd, e.begin + lo, hi - lo)

    def add_checksum(self, index: int, entry: int, checksum: str) -> None:
        """Record a checksum the caller computed for an entry it wrote."""
        self.checksums[(index, entry)] = checksum

    def commit(self, records: RecordsFn, marker_first: bool = False) -> None:
        """Finish: fsync this rank's files, complete the checksums, rename every
        temporary file once every rank has written, write ``records(checksums)`` (rank 0
        computes them; every owner writes them into its OUT), the commit marker last.

        ``marker_first``: write the records before the renames (complete weights have
        no single marker: an index naming files that do not exist yet is not taken for
        complete, and the last rename completes the output)."""
        with self.comm.step("checksum"):
            self._close_files()
            if self.hashing:
                self._complete_checksums()
        gathered = self.comm.gather(self.checksums) if self.hashing else [{}]
        docs = None
        with self.comm.step("records"):
            if self.comm.rank == 0:
                sums = {k: v for part in gathered for k, v in part.items()}
                docs = records(sums)
        if not self.shared:
            docs = self.comm.bcast(docs)
        for name in (("commit", "rename") if marker_first else ("rename", "commit")):
            with self.comm.step(name):
                if name == "rename":
                    self._rename()
                elif self.owner:
                    self._write_records(docs)
        self._committed = True

    # ---- taking the output ----------------------------------------------------------
    def _take_output(self) -> None:
        out = Path(self.out)
        if out.is_symlink():
            raise UsageError(f"{self.out}: is a symbolic link (to {os.readlink(out)}); "
                             "give the directory itself")
        check_not_input(self.out, self.inputs)
        if out.exists() and not out.is_dir():
            raise UsageError(f"{self.out}: exists and is not a directory")
        self._mkdirs(out)
        if not self.locked:
            self._lock = OutputLock(self.out, self.op)
            self._lock.acquire()
        existing = [p for p in out.iterdir() if p.name != LOCK_NAME]
        if existing and not self.keep_existing and self._remove_leftovers(existing):
            existing = []
        if existing and self.keep_existing:
            self._check_free()
        elif existing:
            if not self.options.overwrite:
                raise UsageError(f"{self.out}: output directory is not empty "
                                 "(pass --overwrite to replace it)")
            for m in self.markers:   # first: the old output must never look complete
                (out / m).unlink(missing_ok=True)
            for p in existing:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
        wanted = {os.path.dirname(f.path) for f in self.files.values()} | set(self.dirs)
        for d in sorted(w for w in wanted if w):
            self._mkdirs(out / d)

    def _remove_leftovers(self, existing: list[Path]) -> bool:
        """Remove what a killed job left in OUT, if that is all OUT holds: the lock file
        it left names a process of this host that has ended, this job now holds the lock
        (so no other job is writing here: a writer holds it from before its first file
        until its last rename), and every file is a temporary ``<file>.<token>.partial``
        that no reader ever opens. Anything else (a user's file, a finished output, a
        holder on another host) still needs --overwrite.

        Returns:
            True if ``existing`` were such leftovers and are gone.
        """
        if self._lock is None or self._lock.fd is None:
            return False   # no locks on this filesystem: a live writer cannot be ruled out
        if not holder_is_dead(self._lock.stale_holder):
            return False
        files: list[Path] = []
        dirs: list[Path] = []
        todo = list(existing)
        while todo:
            p = todo.pop()
            if p.is_dir() and not p.is_symlink():
                dirs.append(p)
                todo.extend(p.iterdir())
            elif p.is_file() and not p.is_symlink() and _LEFTOVER.fullmatch(p.name):
                files.append(p)
            else:
                return False
        for p in files:
            p.unlink(missing_ok=True)
        for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
            d.rmdir()
        print(f"hpcckpt: {self.out}: removed {len(files)} temporary file(s) of an unfinished "
              f"job ({self._lock.stale_holder})", file=sys.stderr, flush=True)
        return True

    def _check_free(self) -> None:
        for f in self.files.values():
            if os.path.lexists(os.path.join(self.out, f.path)):
                raise UsageError(f"{os.path.join(self.out, f.path)}: exists already "
                                 "(a file this job would write)")

    def _mkdirs(self, path: Path) -> None:
        """Create ``path`` and missing parents (as ``os.makedirs``: nothing above the
        first existing one is looked at), remembering each one created here."""
        self._created_dirs.append(str(path))   # before mkdir: a signal may come between
        try:
            path.mkdir()
            return
        except FileExistsError:
            pass
        except FileNotFoundError:
            self._created_dirs.pop()
            self._mkdirs(path.parent)
            self._mkdirs(path)
            return
        except OSError as e:
            self._created_dirs.pop()
            raise io_error(path, "cannot create directory", e) from None
        self._created_dirs.pop()               # there already: not ours
        if not path.is_dir():
            raise UsageError(f"{path}: exists and is not a directory")

    # ---- files ----------------------------------------------------------------------
    def _path(self, index: int, temp: bool) -> str:
        final = os.path.join(self.out, self.files[index].path)
        return partial_name(final, self.token) if temp else final

    def _create(self, index: int) -> None:
        f = self.files[index]
        temp, path = self._path(index, temp=True), self._path(index, temp=False)
        self._temps[index] = temp            # before creating: a signal may come between
        try:
            fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            del self._temps[index]
            raise io_error(path, "cannot create", e) from None
        self._fds[index] = fd
        try:
            os.ftruncate(fd, f.size)
            pwrite_all(fd, memoryview(f.header), 0, path)
        except OSError as e:
            if isinstance(e, CheckpointIOError):
                raise
            raise io_error(path, f"cannot size to {f.size} bytes", e) from None

    def _fd(self, index: int) -> tuple[int, str]:
        """The open temporary file, and the name errors give it (the final one: the
        file the user asked for)."""
        fd = self._fds.get(index)
        path = self._path(index, temp=False)
        if fd is None:   # created by another rank (work shared within a file)
            try:
                fd = self._fds[index] = os.open(self._path(index, temp=True), os.O_RDWR)
            except OSError as e:
                raise io_error(path, "cannot open for writing", e) from None
        self._touched.add(index)
        return fd, path

    def _written(self, fd: int, offset: int, n: int) -> None:
        self.bytes_written += n
        if self.options.fsync:   # the disk works while the copy goes on
            start_writeback(fd, offset, n)
        if self._delay:
            time.sleep(self._delay)

    def _fill_piece(self, p: WritePiece, read: ReadFn, buf: bytearray,
                    progress: Progress) -> None:
        """Piece ``p`` tile by tile (a tile: contiguous in the file, at most the buffer)."""
        e = self.files[p.file].entries[p.entry]
        isz = e.itemsize
        fd, path = self._fd(p.file)
        strides = _elem_strides(e.box.sizes)
        key = (p.file, p.entry)
        for rel in tile_contiguous(p.box.shifted(e.box.offsets), e.box.sizes, isz, len(buf)):
            tile = Box(tuple(o + b for o, b in zip(rel.offsets, e.box.offsets)), rel.sizes)
            view = memoryview(buf)[:tile.volume * isz]
            read(e, tile, view)
            offset = sum(o * s for o, s in zip(rel.offsets, strides)) * isz
            if p.whole:
                self._hash(key, offset, (view,))
            pwrite_all(fd, view, e.begin + offset, path)
            self._written(fd, e.begin + offset, len(view))
            progress.update(len(view))

    def _hash(self, key: tuple[int, int], offset: int, parts) -> None:
        if not self.hashing or key in self._spoiled:
            return
        done, h = self._hashers.get(key, (0, None))
        if offset != done:
            self._spoil(key)
            return
        h = h or xxhash.xxh3_64()
        for part in parts:
            h.update(part)
            done += len(part)
        self._hashers[key] = (done, h)
        e = self.files[key[0]].entries[key[1]]
        if done == e.nbytes:
            self.checksums[key] = CHECKSUM_PREFIX + h.hexdigest()

    def _spoil(self, key: tuple[int, int]) -> None:
        self._spoiled.add(key)
        self._hashers.pop(key, None)

    def _close_files(self) -> None:
        fds, self._fds = self._fds, {}
        try:
            for i, fd in fds.items():
                if self.options.fsync:
                    try:
                        os.fsync(fd)
                    except OSError as e:
                        raise io_error(self._path(i, temp=False), "fsync failed", e) from None
        finally:
            for fd in fds.values():
                os.close(fd)

    def _complete_checksums(self) -> None:
        """Hash what was not hashed in passing, reading it back (after every rank wrote:
        this runs inside the step after the writes)."""
        if self._pieces is not None:   # pull: split entries, by their lowest writer
            owner: dict[tuple[int, int], int] = {}
            for r, ps in enumerate(self._pieces):
                for p in ps:
                    if not p.whole:
                        owner.setdefault((p.file, p.entry), r)
            todo = [k for k, r in owner.items() if r == self.comm.rank]
        else:                          # push: entries of the files this rank wrote
            todo = [(i, j) for i in sorted(self._touched | set(self._temps))
                    for j in range(len(self.files[i].entries)) if (i, j) not in self.checksums]
        for i, j in todo:
            self.checksums[(i, j)] = _hash_entry(self._path(i, temp=True),
                                                 self.files[i].entries[j], self.options.buffer_size)
        for i in self._temps:   # entries without bytes: by the file's creator
            for j, e in enumerate(self.files[i].entries):
                if e.nbytes == 0:
                    self.checksums[(i, j)] = checksum_of(b"")

    def _rename(self) -> None:
        dirs = dict.fromkeys(os.path.dirname(p) for p in self._temps.values())
        for i in list(self._temps):
            final = self._path(i, temp=False)
            try:
                os.replace(self._temps[i], final)
            except OSError as e:
                raise io_error(final, "cannot rename into place", e) from None
            del self._temps[i]
            self._renamed = True
        if self.options.fsync:
            for d in dirs:
                fsync_dir(d or ".")

    def _write_records(self, docs: list[tuple[str, bytes]]) -> None:
        for rel, data in docs:
            path = os.path.join(self.out, rel)
            self._mkdirs(Path(path).parent)   # carried model files keep their subdirectories
            self._records.append(path)   # before: a signal during the write removes it
            atomic_write_bytes(path, data, self.options.fsync)
        self._committed = True           # the marker is down: nothing is undone now

    # ---- undoing --------------------------------------------------------------------
    def _undo_local(self, renamed_anywhere: bool = False) -> None:
        """This rank's part of undoing a failed job: safe at any moment, in a signal
        handler too (no collective). Temporary files first; the owner then removes the
        renamed files, records and directories, unless the commit marker is down."""
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}
        for path in list(self._temps.values()):
            _unlink(path)
        self._temps.clear()
        if not self.owner or self._committed:
            return
        if renamed_anywhere or self._renamed or self._records:
            for f in self.files.values():
                _unlink(os.path.join(self.out, f.path))
        for path in reversed(self._records):
            _unlink(path)
        self._records.clear()

    def _on_signal(self) -> None:
        self._undo_local()
        if self.owner:
            self._remove_dirs()

    def _finish(self, failed: bool, collective: bool) -> None:
        try:
            if failed and not self._committed:
                self._undo_local()
                if self.shared and collective:
                    # once every rank has removed its temporary files and stopped
                    # renaming, the owner removes renamed files and the directories
                    renamed = self._renamed_anywhere()
                    if self.owner:
                        self._undo_local(renamed)
                if self.owner:
                    self._remove_dirs()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None
            if self._guard is not None:
                guard, self._guard = self._guard, None
                guard.__exit__(None, None, None)

    def _renamed_anywhere(self) -> bool:
        """Whether any rank renamed a file (a collective: after a RankFailure every rank
        is here, having removed its temporary files)."""
        try:
            return bool(self.comm.allreduce_sum(int(self._renamed)))
        except Exception:  # noqa: BLE001 - a broken communicator: the local undo ran
            return True

    def _remove_dirs(self) -> None:
        """The directories the job created, deepest first; one still holding another
        rank's file (a signal handler runs before the others are done) stays listed for
        the collective undo to retry."""
        left = []
        for d in reversed(self._created_dirs):
            if d == self.out and self._lock is not None:
                if left:
                    left.append(d)
                    continue
                self._lock.release()
                self._lock = None
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError:
                left.append(d)
        self._created_dirs = left[::-1]


def check_not_input(out: str, inputs: Iterable[str]) -> None:
    """OUT would be deleted (``overwrite``) or written into: it must not be or hold an
    input, nor lie inside an input directory."""
    o = Path(out).resolve()
    for i in inputs:
        src = Path(i).resolve()
        inside_out = src == o or o in src.parents
        if inside_out or (src.is_dir() and src in o.parents):
            raise UsageError(f"{out}: output directory overlaps the input {i}; "
                             "choose another output directory")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _elem_strides(sizes):
    out, acc = [], 1
    for s in reversed(sizes):
        out.append(acc)
        acc *= s
    return tuple(reversed(out))


def _hash_entry(path: str, e: OutputEntry, buffer_size: int) -> str:
    h = xxhash.xxh3_64()
    buf = bytearray(max(1, min(buffer_size, e.nbytes)))
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        raise io_error(path, "cannot open for reading", err) from None
    try:
        pos = e.begin
        while pos < e.end:
            n = min(len(buf), e.end - pos)
            pread_into(fd, memoryview(buf)[:n], pos, path)
            h.update(memoryview(buf)[:n])
            pos += n
    finally:
        os.close(fd)
    return CHECKSUM_PREFIX + h.hexdigest()
