"""Training-style saves: ``CheckpointManager`` (SPEC 4) writing training directories
(SPEC 2.2, ``storage/training.py``).

Every rank writes its own file of each saved step from memory; the step is committed
by a record written last. One save, all steps collective (``Comm.step``: any rank's
failure is every rank's failure):

1. stage     check ``local_state`` against the strategy; async: copy this rank's
             share into the manager's staging buffer (reused across saves)
2. write     ``rank_<r>/<file>.partial`` at full size, header, data by positioned
             writes straight from memory, xxh3-64 of every entry as it passes, fsync
3. rename    every rank renames its file (and fsyncs its directory)
4. commit    rank 0 writes ``commits/<seq>-<epoch>_<step>.json`` atomically (the
             commit), then replaces ``latest``
5. meta      every rank replaces its ``rank_<r>/meta.json``
6. rotate    rank 0 removes the records of steps beyond ``keep_max`` (un-committing
             them), then every rank removes those steps' files

A crash anywhere leaves the previous committed step whole; the next manager opened on
the directory removes whatever no record names (``storage.training.leftovers``).
With ``async_save`` steps 2-6 run on a background thread over a duplicated
communicator, so its collectives never meet the training job's.
"""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import xxhash

from ..comm.wrapper import Comm, as_comm
from ..errors import FormatError, RankFailure, UsageError
from ..formats.names import HF_INDEX, MODEL_FILES_DIR, STRATEGY_FILE, rank_dir_name
from ..layout.box import Box
from ..layout.strategy import Strategy
from ..layout.yaml_io import strategy_file_bytes, strategy_to_yaml
from ..planning.dedup import DedupPlan, dedup_mode, plan_dedup
from ..planning.outputs import OutputFile, hf_files, hf_index, rank_file
from ..planning.runs import StridedRuns, strided_runs
from ..storage import model_files
from ..storage import training as tdir
from ..storage.atomic import PARTIAL, atomic_write_bytes, json_bytes
from ..storage.chunkio import copy_runs
from ..storage.inputs import rank_dirs
from ..storage.lock import OutputLock
from .common import build_manifest
from .commit import OutputCommit, WriteOptions

try:   # compiled from hpcckpt/_ntcopy.c at install; optional (see stage_copy)
    from .. import _ntcopy
except ImportError:
    _ntcopy = None

#: the exit status of ``hpcckpt save`` when it stopped because of a preemption signal
#: (after committing the step): EX_TEMPFAIL, "try again later" - a job script requeues
EXIT_PREEMPTED = 75
_FAULT = "HPCCKPT_FAULT"   #: tests: "PHASE@RANK[:STEP]" kills that rank (SIGKILL) there


def _fault(phase: str, rank: int, step: int) -> None:
    """Crash-test hook: ``HPCCKPT_FAULT=write@1:3`` kills rank 1 (SIGKILL) in the write
    phase of step 3 (``write@1``: of any step)."""
    want = os.environ.get(_FAULT)
    if want and want in (f"{phase}@{rank}", f"{phase}@{rank}:{step}"):
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class _Segment:
    """One entry of this rank's file and where its bytes are now."""

    index: int           #: entry index in the file
    data: memoryview     #: contiguous bytes of the stored box (C order)


@dataclass(frozen=True)
class _Source:
    """Where entry ``index`` of this rank's file lies in the rank's slice of its tensor:
    ``nbytes`` from byte ``start`` (the whole box, or a slab of it), or strided ``runs``
    (a slab of a column-split box); ``begin``: its offset in the tree's staging bytes."""

    index: int
    name: str
    begin: int
    nbytes: int
    start: int
    runs: StridedRuns | None


def _sources(layout: OutputFile, strategy: Strategy, rank: int) -> tuple[_Source, ...]:
    """Every stored entry's ``_Source``: the layout is fixed, so planned once per manager."""
    held = {t.name: (t, box) for t, box in strategy.rank_boxes(rank)}
    out = []
    for j, e in enumerate(layout.entries):
        if e.nbytes:
            t, box = held[e.name]
            sr = strided_runs(e.box, box, e.box, t.itemsize)
            out.append(_Source(j, e.name, e.begin - len(layout.header), e.nbytes,
                               sr.src_start, sr if sr.counts else None))
    return tuple(out)


class _Tree:
    """One training directory being written: the main one, or the network-only one."""

    def __init__(self, directory: str, strategy: Strategy, prefix: str, plan: DedupPlan | None,
                 rank: int, carried: list[model_files.ModelFile] = ()):
        self.directory = str(directory)
        self.carried = list(carried)   #: rank 0: the model directory's non-weight files
        self.strategy = strategy
        self.prefix = prefix
        self.plan = plan
        self.rank = rank
        self.suffix = 0
        self.records: list[tdir.StepRecord] = []
        self.strategy_file = STRATEGY_FILE
        self.lock: OutputLock | None = None   #: rank 0, from open() to release()
        # this rank's file layout; only its name changes from step to step
        self.layout = rank_file(strategy, prefix, rank, plan, path="")
        self.sources = _sources(self.layout, strategy, rank)

    def path_of(self, epoch: int, step: int) -> str:
        return tdir.step_file_name(self.prefix, self.suffix, self.rank, epoch, step)

    def committed(self, epoch: int, step: int) -> bool:
        return any((r.epoch, r.step, r.prefix, r.suffix) == (epoch, step, self.prefix, self.suffix)
                   for r in self.records)

    # ---- opening: adopt the directory, clean what no record names -------------------
    def open(self, comm: Comm, fsync: bool) -> None:
        root = Path(self.directory)
        with comm.step(f"open {root}"):
            if comm.rank == 0:
                root.mkdir(parents=True, exist_ok=True)
                # one manager per directory: another one's cleanup would remove this
                # one's uncommitted files, its rotation this one's steps
                self.lock = OutputLock(str(root), "hpcckpt save")
                self.lock.acquire()
                (root / tdir.RECORDS).mkdir(exist_ok=True)
                records = tdir.list_records(root)
                self.strategy_file = _adopt_strategy(root, self.strategy, fsync)
                _carry_model_files(root, self.carried, fsync)
                dirs = list(rank_dirs(root))
                info = (records, self.strategy_file, dirs)
            else:
                info = None
        records, self.strategy_file, dirs = comm.bcast(info)
        self.records = records
        referenced = {f for r in records for f in r.files}
        with comm.step(f"clean up {root}"):
            for d in dirs:
                if d % comm.size == comm.rank:
                    tdir.remove_paths(tdir.leftovers(root, d, referenced), fsync)
            os.makedirs(root / rank_dir_name(self.rank), exist_ok=True)
            mine = os.listdir(root / rank_dir_name(self.rank))
            suffix = tdir.prefix_suffix(mine, self.prefix, self.rank)
            if comm.rank == 0 and records:
                latest = tdir.read_latest(root)
                if latest is None or latest.get("record") != records[-1].path:
                    tdir.write_latest(root, records[-1], fsync)   # repair after a crash
        self.suffix = int(comm.allreduce_max(suffix))

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ---- one step ----------------------------------------------------------------------
    def write_step(self, comm: Comm, segments: list[_Segment], epoch: int, step: int,
                   keep_max: int, extra: dict | None, fsync: bool) -> dict:
        """Steps 2-6 of the module docstring, the file protocol being ``OutputCommit``'s
        (temporary names, fsync, rename when every rank is done, the record last, undo
        on failure). Returns this rank's counters."""
        t0 = time.perf_counter()
        f = replace(self.layout, path=self.path_of(epoch, step))
        final = os.path.join(self.directory, f.path)
        opts = WriteOptions(fsync=fsync, progress=False)
        try:
            with OutputCommit(comm, self.directory, {self.rank: f}, options=opts,
                              op="hpcckpt save", keep_existing=True, locked=True) as job:
                job.create([self.rank])
                with comm.step("write"):
                    for sg in segments:
                        job.write(self.rank, sg.index, 0, sg.data)
                    _fault("write", comm.rank, step)   # written, not renamed
                layouts = comm.gather(f)
                doc = {}

                def records(checksums):
                    doc.update(self._record(layouts, checksums, epoch, step, extra))
                    return _Records([(doc["path"], json_bytes(doc["doc"]))], comm.rank, step)
                job.commit(records)
        except BaseException:   # RankFailure; in one process the error itself
            remove_files([final])   # renamed, but its step was not committed: a leftover
            raise
        rec = comm.bcast(doc.get("record"))
        self.records.append(rec)
        with comm.step("latest"):
            if comm.rank == 0:
                tdir.write_latest(self.directory, rec, fsync)
        with comm.step("meta"):
            tdir.write_meta(self.directory, self.rank, epoch, step, f.path, fsync)
        old = tdir.to_rotate(self.records, self.prefix, keep_max)
        if old:
            with comm.step("rotate"):
                if comm.rank == 0:
                    tdir.remove_paths([os.path.join(self.directory, r.path) for r in old], fsync)
            _fault("rotate", comm.rank, step)
            gone = {r.path for r in old}
            self.records = [r for r in self.records if r.path not in gone]
            with comm.step("rotate files"):
                mine = [os.path.join(self.directory, p) for r in old for p in r.files
                        if p.startswith(rank_dir_name(self.rank) + "/")]
                tdir.remove_paths(mine, fsync)
        return {"rank": comm.rank, "bytes_written": f.data_bytes,
                "write_seconds": time.perf_counter() - t0}

    def _record(self, layouts: list[OutputFile], checksums: dict, epoch: int, step: int,
                extra: dict | None) -> dict:
        """Rank 0: the step's commit record (a manifest plus the "commit" fields)."""
        sums = {(i, j): checksums[(r, j)] for i, r in enumerate(f.rank for f in layouts)
                for j in range(len(layouts[i].entries))}
        manifest = build_manifest(self.strategy, layouts, sums, self.plan is not None,
                                  self.prefix, self.carried)
        seq = (self.records[-1].sequence if self.records else 0) + 1
        doc = manifest.to_dict()
        doc["strategy"] = self.strategy_file
        doc["commit"] = {"sequence": seq, "epoch": epoch, "step": step, "prefix": self.prefix,
                         "suffix": self.suffix, "time": time.time(), "extra": extra or {}}
        rel = tdir.record_name(seq, epoch, step)
        rec = tdir.StepRecord(seq, epoch, step, self.prefix, self.suffix, rel,
                              tuple(f.path for f in layouts))
        return {"path": rel, "doc": doc, "record": rec}


class _Records(list):
    """The records ``OutputCommit`` writes after the renames; iterating them is the
    moment between the last rename and the commit record (crash-test hook)."""

    def __init__(self, items, rank: int, step: int):
        super().__init__(items)
        self.rank, self.step = rank, step

    def __iter__(self):
        _fault("renamed", self.rank, self.step)
        return super().__iter__()


INTEGRATED = "integrated"   #: complete weights of each step: integrated/<prefix>-<epoch>_<step>/


def integrated_name(prefix: str, suffix: int, epoch: int, step: int) -> str:
    """``integrated/{prefix}[_{suffix}]-{epoch}_{step}``: a step's complete weights,
    relative to the training directory."""
    return f"{INTEGRATED}/{prefix}{f'_{suffix}' if suffix else ''}-{epoch}_{step}"


class _Integrated:
    """A step's complete weights (HF shards + index, as ``merge`` writes them), written
    by every rank from its own slices: the balanced de-duplication plan chooses the one
    replica that writes each box or slab, and each rank writes its share with strided
    positioned writes into shards created by their owner ranks (file i by rank i mod
    size). Nothing is gathered. Written before the main tree's commit record, so a
    step is committed only with its complete weights; a directory no record names
    (uncommitted, or rotated out) is removed (``clean``)."""

    def __init__(self, main: _Tree, rank: int, max_shard_size: int):
        self.main = main
        self.strategy = main.strategy
        # which replica writes each element: one writer per box or slab
        self.layout = rank_file(main.strategy, main.prefix, rank,
                                plan_dedup(main.strategy, "balanced"), path="")
        self.sources = _sources(self.layout, main.strategy, rank)
        self.files = hf_files([t.info for t in main.strategy.tensors], max_shard_size)
        self.where = {e.name: (i, j) for i, f in enumerate(self.files)
                      for j, e in enumerate(f.entries)}

    def committed(self, epoch: int, step: int) -> bool:
        return self.main.committed(epoch, step)

    def path_of(self, epoch: int, step: int) -> str:
        return os.path.join(self.main.directory,
                            integrated_name(self.main.prefix, self.main.suffix, epoch, step))

    def write_step(self, comm: Comm, segments: list[_Segment], epoch: int, step: int,
                   keep_max: int, extra: dict | None, fsync: bool) -> dict:  # noqa: ARG002
        t0 = time.perf_counter()
        opts = WriteOptions(fsync=fsync, progress=False)
        with OutputCommit(comm, self.path_of(epoch, step), self.files, options=opts,
                          op="hpcckpt save (integrated)", checksums=False) as job:
            job.create(range(comm.rank, len(self.files), comm.size))
            with comm.step("write integrated"):
                for sg in segments:
                    e = self.layout.entries[sg.index]
                    i, j = self.where[e.name]
                    runs = strided_runs(e.box, e.box, Box.full(e.global_shape), e.itemsize)
                    # other ranks' boxes lie between these runs: no read-modify-write
                    job.write_runs(i, j, runs, sg.data, exclusive=False)
                _fault("integrated", comm.rank, step)
            index = ([(HF_INDEX, json_bytes(hf_index(self.files)))] if len(self.files) > 1
                     else [])
            job.commit(lambda sums: index, marker_first=True)
        return {"rank": comm.rank, "bytes_written": self.layout.data_bytes,
                "write_seconds": time.perf_counter() - t0}

    def clean(self, comm: Comm, fsync: bool) -> None:
        """Rank 0 removes every ``integrated/`` directory no committed record names."""
        with comm.step("clean integrated"):
            if comm.rank == 0:
                root = Path(self.main.directory) / INTEGRATED
                keep = {integrated_name(r.prefix, r.suffix, r.epoch, r.step).split("/", 1)[1]
                        for r in self.main.records}
                gone = [p for p in (sorted(root.iterdir()) if root.is_dir() else [])
                        if p.name not in keep]
                for p in gone:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                if gone and fsync:
                    from ..storage.atomic import fsync_dir
                    fsync_dir(root)


def _adopt_strategy(root: Path, strategy: Strategy, fsync: bool) -> str:
    """The strategy file of this run: ``strategy.yaml``, or ``strategy-<hash>.yaml`` when
    an earlier run in the directory wrote a different layout there (an earlier release
    wrote the same layout as block YAML: that file is this run's too)."""
    text = strategy_file_bytes(strategy)
    for name in (STRATEGY_FILE, f"strategy-{xxhash.xxh3_64_hexdigest(text)}.yaml"):
        p = root / name
        if not p.exists():
            atomic_write_bytes(p, text, fsync)
            return name
        held = p.read_bytes()
        if held == text or held == strategy_to_yaml(strategy).encode():
            return name
    raise FormatError(f"{root}: strategy-{xxhash.xxh3_64_hexdigest(text)}.yaml exists with "
                      "other contents")


def _carry_model_files(root: Path, carried: list[model_files.ModelFile], fsync: bool) -> None:
    """Write the model directory's non-weight files under ``root/model_files/`` once (every
    step's record lists them; a resumed run finds them there). A file an earlier run
    carried with other contents is refused: the committed steps' records name its bytes.
    A temporary file a killed run left there is removed (the caller holds the lock)."""
    for tmp in (root / MODEL_FILES_DIR).rglob(f"*{PARTIAL}"):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
    for f in carried:
        path = root / MODEL_FILES_DIR / f.path
        if path.is_file() and not path.is_symlink():
            old = model_files.ModelFile(f.path, path.read_bytes())
            if old.checksum == f.checksum and old.size == f.size:
                continue
            raise UsageError(f"{path}: carried by an earlier run with other contents "
                             f"({old.size} bytes, {old.checksum}; the model directory's is "
                             f"{f.size} bytes, {f.checksum}); use a new training directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, f.data, fsync)


def remove_files(paths: Iterable[str]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except OSError:
            pass


def _byte_view(obj: Any) -> tuple[memoryview, tuple | None, int | None]:
    """A flat C-contiguous byte view of an array-like, with its shape and item size
    (None for a plain buffer such as ``bytes``, whose length alone is checked). numpy
    arrays, anything with the buffer protocol, torch CPU tensors through ``.numpy()``."""
    if hasattr(obj, "__array__"):
        import numpy as np
        if not isinstance(obj, np.ndarray) and hasattr(obj, "numpy"):
            obj = obj.numpy()
        a = np.asarray(obj)
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)
        return memoryview(a.reshape(-1).view(np.uint8)), a.shape, a.dtype.itemsize
    m = memoryview(obj)
    if not m.c_contiguous:
        raise FormatError("not C-contiguous")
    return m.cast("B"), None, None


class CheckpointManager:
    """Saves during training, as MindSpore Transformers does, the HPC way.

    Every rank passes its own slices; each rank writes one file per saved step from
    memory; a step is committed when its record is written (after every rank's file is
    complete and renamed). Old steps rotate out after each commit; replicas can be
    de-duplicated with bytes per rank balanced; saves can run in the background. Every
    call is collective: call it on every rank, in the same order.

    Args:
        directory: the training directory (``output/checkpoint``); created if needed.
        strategy: the layout ``local_state`` follows (world size = the communicator's).
        comm: mpi4py communicator, ``hpcckpt`` Comm, or None (one process).
        prefix: file name prefix (``{prefix}_rank_<r>-{epoch}_{step}.safetensors``); a
            prefix already used in the directory gets MindSpore's ``_<n>`` suffix.
        keep_max: committed steps of this prefix kept; older ones are removed after each
            commit (0 or None: keep all).
        save_steps: ``save`` writes only when ``step % save_steps == 0``.
        dedup: False (every replica writes its box), True/"balanced" (each distinct box
            once, bytes per rank balanced), "whole" (each box once, whole).
        async_save: ``save`` returns once this rank's bytes are staged in memory the
            manager owns; a background thread writes and commits them.
        network_only: also write the model parameters alone into
            ``directory/../checkpoint_network``: a predicate ``name -> bool`` or name
            prefixes to keep.
        integrated: also write each saved step's complete weights (HF shards + index)
            into ``directory/integrated/{prefix}-{epoch}_{step}/``, every rank writing
            its de-duplicated share of its own slices in place; part of the step's
            commit and rotated with it.
        max_shard_size: data bytes per shard of the integrated weights (default 5 GB).
        fsync: make every step durable before committing it (default True).
        hf_dir: a Hugging Face model directory whose non-weight files (config,
            tokenizer, ...) are carried: rank 0 copies them once into
            ``directory/model_files/`` and every step's record lists them (size,
            checksum), so ``hpcckpt merge --step`` writes them back.
        max_extra_size: the largest such file carried (larger ones are refused).

    Example:
        >>> mgr = CheckpointManager("out/checkpoint", strategy, MPI.COMM_WORLD,
        ...                         prefix="llama", keep_max=3, save_steps=100, dedup=True)
        >>> for step in range(1, 1001):
        ...     train_one_step()
        ...     mgr.save(local_state, epoch=1, step=step)   # writes every 100 steps
        >>> mgr.close()
    """

    def __init__(self, directory: str | os.PathLike, strategy: Strategy, comm=None, *,
                 prefix: str = "CKP", keep_max: int | None = 5, save_steps: int = 1,
                 dedup: bool | str = False, async_save: bool = False,
                 network_only: Callable[[str], bool] | Iterable[str] | None = None,
                 integrated: bool = False, max_shard_size: int = 5_000_000_000,
                 fsync: bool = True, hf_dir: str | os.PathLike | None = None,
                 max_extra_size: int = model_files.DEFAULT_MAX_BYTES):
        self.comm = as_comm(comm)
        self.directory = str(directory)
        self.strategy = strategy
        self.save_steps = int(save_steps)
        self.keep_max = keep_max
        self.fsync = fsync
        self.async_save = bool(async_save)
        self.preempted = False
        self.stats: list[dict] = []
        self._signalled = False
        self._handler_installed = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._staging: bytearray | None = None
        self._closed = False
        comm = self.comm
        if strategy.world_size != comm.size:
            raise UsageError(f"strategy has {strategy.world_size} ranks but the job has "
                             f"{comm.size}; launch with mpiexec -n {strategy.world_size}")
        if self.save_steps < 1:
            raise UsageError(f"save_steps must be at least 1, not {save_steps}")
        if integrated and (not isinstance(max_shard_size, int) or max_shard_size < 1):
            raise UsageError(f"max_shard_size must be a positive number of bytes, "
                             f"not {max_shard_size!r}")
        if not prefix or "/" in prefix or prefix != prefix.strip():
            raise UsageError(f"prefix {prefix!r}: must be a non-empty file name part")
        mode = dedup_mode(dedup)
        with comm.step("plan"):
            plan = plan_dedup(strategy, mode) if mode else None
            carried = []
            if hf_dir is not None and comm.rank == 0:
                if not Path(hf_dir).is_dir():
                    raise UsageError(f"hf_dir {hf_dir}: not a directory (give the model "
                                     "directory whose config and tokenizer files to carry)")
                carried = model_files.collect(hf_dir, max_extra_size)
            self._main = _Tree(self.directory, strategy, prefix, plan, comm.rank, carried)
            self._network: _Tree | None = None
            if network_only is not None:
                keep = _name_filter(network_only)
                sub = Strategy(strategy.mesh, tuple(t for t in strategy.tensors if keep(t.name)))
                net_dir = os.path.join(os.path.dirname(os.path.abspath(self.directory)),
                                       "checkpoint_network")
                self._network = _Tree(net_dir, sub, prefix,
                                      plan_dedup(sub, mode) if mode else None, comm.rank,
                                      carried)
            self._integrated = (_Integrated(self._main, comm.rank, max_shard_size)
                                if integrated else None)
        self._trees = [t for t in (self._main, self._network, self._integrated)
                       if t is not None]
        try:
            for tree in (self._main, self._network):
                if tree is not None:
                    tree.open(comm, fsync)
            if self._integrated is not None:
                self._integrated.clean(comm, fsync)
        except BaseException:
            self._release_locks()
            raise
        self._io = comm
        if self.async_save:
            self._io = _duplicate(comm)
            # allocated (and its pages touched) now, not in the first save() it would stall
            self._staging = bytearray(sum(t.layout.data_bytes for t in self._trees))

    # ---- public API ----------------------------------------------------------------
    def save(self, local_state: Mapping[str, Any], epoch: int, step: int,
             extra: dict | None = None) -> bool:
        """Save this step if ``step % save_steps == 0`` (or a preemption signal arrived
        on any rank since the last call). Collective.

        Args:
            local_state: ``{tensor name: this rank's slice}`` for every tensor the
                strategy gives this rank (numpy arrays, or anything with the buffer
                protocol, shaped as the rank's box).
            epoch, step: the training position (file names, records, ``meta.json``).
            extra: a JSON-serialisable dict stored in the step's commit record.
        Returns:
            True if this call started (async) or completed a save.
        Raises:
            RankFailure: on every rank, if any rank failed in this save, or in the
                previous asynchronous one.
        """
        self._check_open()
        signalled = self._agree_on_signal()
        if self.preempted:
            return False
        if not signalled and step % self.save_steps:
            return False
        self.wait()   # at most one save in flight; raises its failure on every rank
        if all(t.committed(epoch, step) for t in self._trees):
            return False
        t0 = time.perf_counter()
        with self.comm.step("stage"):
            _fault("stage", self.comm.rank, step)
            segments = self._segments(self._views(local_state), stage=self.async_save)
        stall = time.perf_counter() - t0
        args = (segments, epoch, step, extra, t0, stall)
        if self.async_save and not signalled:
            self._thread = threading.Thread(target=self._run, args=args, name="hpcckpt-save",
                                            daemon=True)
            self._thread.start()
        elif self._handler_installed:
            # OutputCommit turns SIGTERM/SIGINT into an undo, but only on the main thread:
            # writing on a helper thread keeps the preemption handler in charge, so a
            # SIGTERM arriving during this save lets it finish and saves again next call
            self._thread = threading.Thread(target=self._run, args=args, name="hpcckpt-save")
            self._thread.start()
            self.wait()
        else:
            self._run(*args)
            self._raise_pending()
        if signalled:
            self.preempted = True
        return True

    def wait(self) -> None:
        """Wait for the save in flight, if any; raise its failure (on every rank)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_pending()

    def close(self) -> None:
        """Finish the save in flight and release the manager's resources (collective)."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._staging = None
            self._release_locks()
            if self._io is not self.comm and self._io.mpi is not None:
                self._io.mpi.Free()

    def _release_locks(self) -> None:
        for tree in (self._main, self._network):
            if tree is not None:
                tree.release()

    def latest(self) -> tuple[int, int] | None:
        """(epoch, step) of the newest committed step in the directory, or None."""
        recs = self._main.records
        return (recs[-1].epoch, recs[-1].step) if recs else None

    @property
    def staging_bytes(self) -> int:
        """Host memory held for asynchronous saves (this rank's share of one step)."""
        return len(self._staging) if self._staging is not None else 0

    def install_signal_handler(self, signals=(signal.SIGUSR1, signal.SIGTERM)) -> None:
        """On any of ``signals`` (on any rank), the next ``save()`` call saves its step on
        every rank, whatever ``save_steps`` says, waits for the commit and sets
        ``preempted``; later calls do nothing. The training loop then exits (and the job
        requeues). Main thread only (Python's rule for signal handlers).
        """
        def handler(signum, frame):  # noqa: ARG001 - signal handler signature
            self._signalled = True
        for s in signals:
            signal.signal(s, handler)
        self._handler_installed = True

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals -----------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("CheckpointManager is closed")

    def _agree_on_signal(self) -> bool:
        """Ranks agree (one small allreduce per call) whether any rank was signalled."""
        if not self._handler_installed:
            return False
        return bool(self.comm.allreduce_max(1 if self._signalled else 0))

    def _views(self, local_state: Mapping[str, Any]) -> dict[str, memoryview]:
        """This rank's slices as flat bytes, each checked against the strategy (once per
        save: every tree reads these views)."""
        rank = self.comm.rank
        extra = [n for n in local_state if n not in self.strategy]
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise FormatError(f"rank {rank}: local_state has tensor {extra[0]!r}{more} "
                              "that the strategy does not describe")
        return {t.name: _check_slice(rank, t, box, local_state)
                for t, box in self.strategy.rank_boxes(rank)}

    def _segments(self, views: Mapping[str, memoryview], stage: bool) -> list[list[_Segment]]:
        """Where each tree's entries are: views of the caller's slices (a slab of a
        column-split box gathered into its own buffer), or (``stage``) copies in the
        manager's staging buffer: one ``stage_copy`` per contiguous entry, which releases
        the GIL, so the job's other threads run on while it stages."""
        import numpy as np
        if stage:
            need = sum(t.layout.data_bytes for t in self._trees)
            if self._staging is None or len(self._staging) != need:
                self._staging = bytearray(need)
            staging = np.frombuffer(self._staging, np.uint8)
        out, base = [], 0
        for tree in self._trees:
            segments = []
            for src in tree.sources:
                view = views[src.name]
                if stage:
                    dst = staging[base + src.begin:base + src.begin + src.nbytes]
                    if src.runs is None:
                        stage_copy(dst, view[src.start:src.start + src.nbytes])
                    else:
                        copy_runs(src.runs, view, 0, memoryview(dst), 0)
                    data = memoryview(dst)
                elif src.runs is None:   # the box, or a slab of it: no copy
                    data = view[src.start:src.start + src.nbytes]
                else:
                    buf = bytearray(src.nbytes)
                    copy_runs(src.runs, view, 0, buf, 0)
                    data = memoryview(buf)
                segments.append(_Segment(src.index, data))
            out.append(segments)
            base += tree.layout.data_bytes
        return out

    def _run(self, segments, epoch, step, extra, t0, stall) -> None:
        """Steps 2-6 for every tree, on the I/O communicator; failures are kept for
        ``wait``/``save``/``close`` (identical on every rank: they come from steps)."""
        # the integrated weights first: the main tree's record then commits them too
        order = sorted(zip(self._trees, segments), key=lambda p: p[0] is not self._integrated)
        try:
            try:
                rows = [tree.write_step(self._io, segs, epoch, step, self.keep_max, extra,
                                        self.fsync) for tree, segs in order]
            except RankFailure:   # every rank is here: remove complete but uncommitted weights
                if self._integrated is not None:
                    self._integrated.clean(self._io, self.fsync)
                raise
            except BaseException:
                if self._integrated is not None and self._io.mpi is None:
                    self._integrated.clean(self._io, self.fsync)
                raise
            if self._integrated is not None:   # the steps rotation un-committed
                self._integrated.clean(self._io, self.fsync)
            self.stats.append({"epoch": epoch, "step": step, "stall_seconds": stall,
                               "seconds": time.perf_counter() - t0,
                               "bytes_written": sum(r["bytes_written"] for r in rows),
                               "write_seconds": sum(r["write_seconds"] for r in rows)})
        except BaseException as e:  # noqa: BLE001 - re-raised by wait() on the main thread
            self._error = e

    def _raise_pending(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise e


def stage_copy(dst, src) -> None:
    """``src``'s bytes into ``dst`` (the staging buffer), contiguous and of one length.

    With non-temporal stores (``hpcckpt._ntcopy``, when it was compiled): the buffer is
    read back by the writer thread only after it has left the CPU cache, and cached
    stores read each destination line first. A rank's 512 MiB: 0.07 s against 0.11 s
    for numpy's copy (glibc's ``memcpy`` switches to such stores only above 3/4 of the
    L3, larger than a tensor). Releases the GIL either way."""
    if _ntcopy is not None:
        _ntcopy.copy(dst, src)
    else:
        import numpy as np
        np.copyto(dst, np.frombuffer(src, np.uint8))


def _check_slice(rank: int, t, box: Box, local_state: Mapping[str, Any]) -> memoryview:
    """``t``'s slice in ``local_state`` as flat bytes, checked against ``box``."""
    a = local_state.get(t.name)
    if a is None:
        raise FormatError(f"rank {rank}: local_state lacks tensor {t.name!r} (its box {box})")
    try:
        view, shape, isz = _byte_view(a)
    except (TypeError, ValueError, FormatError) as e:
        raise FormatError(f"rank {rank}: tensor {t.name!r}: not an array or buffer "
                          f"({type(a).__name__}: {e})") from None
    want = box.volume * t.itemsize
    if (shape is not None and tuple(shape) != box.sizes and not (box.sizes == () and
                                                                 tuple(shape) in ((), (1,)))) \
            or (isz is not None and isz != t.itemsize) or len(view) != want:
        got = (f"{list(shape)} of {isz}-byte items ({len(view)} bytes)" if shape is not None
               else f"a buffer of {len(view)} bytes")
        raise FormatError(f"rank {rank}: tensor {t.name!r} is {got} but the strategy gives "
                          f"this rank {t.dtype} {list(box.sizes)} at {box} ({want} bytes)")
    return view


def _name_filter(spec) -> Callable[[str], bool]:
    if callable(spec):
        return spec
    if isinstance(spec, str):
        spec = (spec,)
    prefixes = tuple(spec)
    return lambda name: name.startswith(prefixes)


def _duplicate(comm: Comm) -> Comm:
    """A communicator of the same ranks for the background thread (collective)."""
    if comm.mpi is None:
        return Comm(None)
    from mpi4py import MPI
    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        raise UsageError("async_save needs MPI initialised with MPI_THREAD_MULTIPLE "
                         f"(this MPI provides level {MPI.Query_thread()})")
    io = Comm(comm.mpi.Dup())
    io.debug = comm.debug
    return io



# ---- the ``hpcckpt save`` job: training-style saves of real or synthetic state ----------
def synthetic_slice(name: str, dtype: str, shape: tuple[int, ...], box: Box,
                    step: int = 0) -> Any:
    """``box`` of a pseudo-random tensor that depends only on its name, dtype and shape
    (so every strategy's slices of it agree, and a test can rebuild any of them), with
    its first byte set to ``step % 256`` (what "training" changed). Rows are drawn in
    blocks of about 1 MiB, so a slice costs its own rows, not the whole tensor."""
    import math
    import zlib

    import numpy as np

    from ..dtypes import itemsize, numpy_dtype
    isz = itemsize(dtype)
    seed = zlib.crc32(f"{name}|{dtype}|{list(shape)}".encode())
    row = math.prod(shape[1:]) * isz if shape else isz
    rows = shape[0] if shape else 1
    a, b = (box.offsets[0], box.offsets[0] + box.sizes[0]) if shape else (0, 1)
    dt = numpy_dtype(dtype)
    out = np.empty(box.sizes if shape else (), dt)
    # the box's columns of each block go straight into ``out``: a column-split slice
    # holds only its own columns, never its rows whole (64 MiB for a W1 tensor)
    cols = tuple(slice(o, o + n) for o, n in zip(box.offsets[1:], box.sizes[1:]))
    per = max(1, (1 << 20) // max(row, 1))
    for k in range(a // per, -(-b // per) if b > a else a // per):
        lo, hi = k * per, min(rows, (k + 1) * per)
        block = np.random.default_rng([seed, k]).bytes((hi - lo) * row)
        s, e = max(lo, a), min(hi, b)
        if not shape:
            out[...] = np.frombuffer(block, dt)[0]
            continue
        got = np.frombuffer(block, dt, count=(e - s) * math.prod(shape[1:]),
                            offset=(s - lo) * row).reshape((e - s, *shape[1:]))
        out[s - a:e - a] = got[(slice(None), *cols)]
    if out.size and not any(box.offsets) and math.prod(shape):
        out.reshape(-1).view(np.uint8)[0] = step % 256
    return out


def synthetic_state(strategy: Strategy, rank: int, step: int = 0) -> dict[str, Any]:
    """This rank's slices of the synthetic tensors (``synthetic_slice``)."""
    return {t.name: synthetic_slice(t.name, t.dtype, t.shape, box, step)
            for t, box in strategy.rank_boxes(rank)}


def _pretend_training(state: Mapping[str, Any], held: Mapping[str, Box], step: int) -> None:
    """What a training step changes, cheaply: the first byte of every tensor (written
    by the ranks whose slice holds it, replicas alike)."""
    for name, a in state.items():
        box = held[name]
        view, _, _ = _byte_view(a)
        if len(view) and not any(box.offsets):
            view[0] = step % 256


def save_job(out: str, strategy: Strategy, comm=None, *, source: str | None = None,
             steps: int = 1, save_steps: int = 1, compute_seconds: float = 0.0,
             dedup: bool | str = False, async_save: bool = False, keep_max: int | None = 5,
             prefix: str = "CKP", epoch: int = 1, fsync: bool = True,
             handle_signals: bool = True,
             max_extra_size: int = model_files.DEFAULT_MAX_BYTES) -> "OpResult":
    """Run ``steps`` pretend training steps, saving every ``save_steps`` into ``out``.

    The state is ``source``'s weights loaded under ``strategy`` (any checkpoint), or
    synthetic bytes. When ``out`` already holds a committed step, training resumes from
    it: its state is loaded and steps continue after it. A preemption signal (SIGUSR1,
    SIGTERM) saves the current step and stops; the result then says ``preempted`` and
    carries ``exit_status`` ``EXIT_PREEMPTED``. A Hugging Face model directory as
    ``source`` also gives its non-weight files (``CheckpointManager``'s ``hf_dir``).
    """
    from .in_memory import load
    from .result import OpResult
    comm = as_comm(comm)
    t0 = time.perf_counter()
    with comm.step("check"):
        resume = tdir.find_record(out) if tdir.list_records(out) else None
    start, resumed = 1, None
    if resume is not None:
        state = load(out, strategy, comm)
        start, resumed = resume.step + 1, resume.label
        epoch = resume.epoch
    elif source is not None:
        state = load(source, strategy, comm)
    else:
        with comm.step("synthetic state"):
            state = synthetic_state(strategy, comm.rank)
    held = {t.name: box for t, box in strategy.rank_boxes(comm.rank)}
    saved = 0
    with CheckpointManager(out, strategy, comm, prefix=prefix, keep_max=keep_max,
                           save_steps=save_steps, dedup=dedup, async_save=async_save,
                           fsync=fsync, hf_dir=_hf_model_dir(source),
                           max_extra_size=max_extra_size) as mgr:
        if handle_signals:
            mgr.install_signal_handler()
        t_loop = time.perf_counter()
        for step in range(start, steps + 1):
            if compute_seconds:
                time.sleep(compute_seconds)
            _pretend_training(state, held, step)
            saved += mgr.save(state, epoch, step)
            if mgr.preempted:
                break
        mgr.wait()
        loop = time.perf_counter() - t_loop
        staging = mgr.staging_bytes
        stats = list(mgr.stats)
        preempted = mgr.preempted
        latest = mgr.latest()
        carried = len(mgr._main.carried)
    written = sum(s["bytes_written"] for s in stats)
    write_s = sum(s["write_seconds"] for s in stats)
    rows = comm.allgather({"rank": comm.rank, "bytes_read": 0, "bytes_written": written,
                           "write_seconds": round(write_s, 6), "staging_bytes": staging,
                           "write_gb_per_s": round(written / write_s / 1e9, 3) if write_s else 0})
    stalls = [max(x) for x in zip(*comm.allgather([s["stall_seconds"] for s in stats]))]
    per_save = [max(x) for x in zip(*comm.allgather([s["seconds"] for s in stats]))]
    extra = {"saves": len(stats), "steps": steps, "resumed_from": resumed,
             "latest": f"{latest[0]}_{latest[1]}" if latest else None,
             "dedup": dedup_mode(dedup) or False, "async": async_save,
             "stall_seconds": [round(x, 6) for x in stalls],
             "save_seconds": [round(x, 6) for x in per_save],
             "loop_seconds": round(comm.allreduce_max(loop), 6),
             "compute_seconds": compute_seconds, "preempted": preempted,
             "exit_status": EXIT_PREEMPTED if preempted else 0, "model_files": carried}
    files = len(stats) * strategy.world_size
    return OpResult.from_rows("save", out, files, rows,
                              comm.allreduce_max(time.perf_counter() - t0), comm.size,
                              extra=extra)


def _hf_model_dir(source: str | None) -> Path | None:
    """``source``'s model directory when it is Hugging Face weights (a directory of
    complete safetensors files or an index); a distributed checkpoint or a single file
    carries nothing."""
    from ..storage.inputs import READERS, HFIndexReader, SafetensorsDirReader
    root = model_files.model_dir_of(source) if source is not None else None
    if root is None:
        return None
    cls = next((c for c in READERS if c.recognise(root)), None)
    return root if cls in (HFIndexReader, SafetensorsDirReader) else None


def save_plan(out: str, strategy: Strategy, comm=None, *, dedup: bool | str = False,
              prefix: str = "CKP") -> "OpResult":
    """``hpcckpt save --dry-run``: the bytes each rank would write per save; nothing written."""
    from .result import OpResult
    comm = as_comm(comm)
    if strategy.world_size != comm.size:
        raise UsageError(f"strategy has {strategy.world_size} ranks but the job has "
                         f"{comm.size}; launch with mpiexec -n {strategy.world_size}")
    mode = dedup_mode(dedup)
    with comm.step("plan"):
        f = rank_file(strategy, prefix, comm.rank, plan_dedup(strategy, mode) if mode else None,
                      path="")
    rows = comm.allgather({"rank": comm.rank, "bytes_read": 0, "bytes_written": f.data_bytes})
    return OpResult.from_rows("save", out, strategy.world_size, rows, 0.0, comm.size,
                              dry_run=True, extra={"dedup": mode or False})
