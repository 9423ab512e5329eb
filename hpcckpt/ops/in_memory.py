"""The public in-memory API: ``load`` (this rank's slices of a checkpoint) and
``reshard_state`` (slices held under one strategy -> slices under another, no disk).

plan (``planning.route_plans``) -> coordinate -> execute (``ops.route_exec``). numpy is
imported by these functions only, when they build arrays.
"""
from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Mapping

from ..comm.rounds import DEFAULT_BUDGET, DEFAULT_LOAD_BUDGET, DEFAULT_MAX_MESSAGE
from ..comm.wrapper import Comm, as_comm
from ..dtypes import numpy_dtype
from ..errors import FormatError, UsageError
from ..layout.box import Box
from ..layout.strategy import Strategy
from ..planning.route_plans import plan_load, plan_reshard_state
from ..planning.routes import Route, RoutePlan
from ..planning.runs import strided_runs
from ..storage.chunkio import ChunkReader, copy_runs
from ..storage.inputs import open_input
from ..storage.training import step_path
from .common import check_tensors_match
from .filecopy import DEFAULT_BUFFER
from .route_exec import execute_routes, memory_writer, region_reader

if TYPE_CHECKING:
    import numpy as np


def _as_bytes(a: "np.ndarray") -> "np.ndarray":
    import numpy as np
    return a.reshape(-1).view(np.uint8)


def _allocate(strategy: Strategy, rank: int):
    """Arrays for the rank's boxes: ``{name: array}`` and their byte views by (name, box)."""
    import numpy as np
    out: dict[str, np.ndarray] = {}
    targets: dict[tuple[str, Box], np.ndarray] = {}
    for t, box in strategy.rank_boxes(rank):
        out[t.name] = np.empty(box.sizes, numpy_dtype(t.dtype))
        targets[(t.name, box)] = _as_bytes(out[t.name])
    return out, targets


def _caller_targets(out: Mapping, strategy: Strategy, rank: int) -> dict:
    """Flat byte views of the caller's arrays, by (name, box), each checked against the
    box the strategy gives this rank: filled in place, never copied."""
    targets = {}
    for t, box in strategy.rank_boxes(rank):
        a = out.get(t.name)
        if a is None:
            if box.volume == 0:
                continue
            raise UsageError(f"rank {rank}: out lacks tensor {t.name!r} (its box {box})")
        targets[(t.name, box)] = _byte_view(a, t, box, rank)
    return targets


def _byte_view(a, t, box: Box, rank: int):
    """A flat uint8 view of ``a``: a numpy array, or any buffer (bytearray, array.array,
    a CPU tensor's buffer) whose items have the tensor's size."""
    where = f"rank {rank}: out[{t.name!r}]"
    wanted = f"the strategy gives this rank {t.dtype} {list(box.sizes)} at {box}"
    np = sys.modules.get("numpy")   # a caller passing numpy arrays has imported it
    if np is not None and isinstance(a, np.ndarray):
        if a.shape != box.sizes or a.dtype != numpy_dtype(t.dtype):
            raise UsageError(f"{where} is {a.dtype} {list(a.shape)} but {wanted}")
        if not (a.flags.c_contiguous and a.flags.writeable):
            raise UsageError(f"{where} is not a writable C-contiguous array")
        return a.reshape(-1).view(np.uint8)
    try:
        m = memoryview(a)
    except TypeError:
        raise UsageError(f"{where} is a {type(a).__name__}, neither a numpy array nor a "
                         "buffer") from None
    if tuple(m.shape) != box.sizes or m.itemsize != t.itemsize:
        raise UsageError(f"{where} is a buffer of {m.itemsize}-byte items {list(m.shape)} "
                         f"but {wanted}")
    if m.readonly or not m.c_contiguous:
        raise UsageError(f"{where} is not a writable C-contiguous buffer")
    return m.cast("B") if m.ndim != 1 or m.format != "B" else m


def load(path: str, strategy: Strategy, comm=None, *, out: Mapping | None = None,
         budget: int = DEFAULT_LOAD_BUDGET, max_message: int = DEFAULT_MAX_MESSAGE,
         buffer_size: int = DEFAULT_BUFFER, stats: dict | None = None,
         src_strategy: Strategy | None = None,
         step: tuple[int, int] | str | None = None) -> dict:
    """This rank's slices of every tensor under ``strategy``, from any checkpoint.

    Complete HF weights or a distributed checkpoint of any strategy, full or
    de-duplicated (recognised from the files). Each distinct destination box is read
    from disk once, by one of the ranks holding it; its replicas receive it over MPI.

    Args:
        path: checkpoint directory or file.
        strategy: the layout the caller wants; its world size must equal the job's.
        comm: mpi4py communicator or None (one process).
        out: optional ``{name: array}`` to fill in place, as PyTorch DCP's load does:
            for every tensor this rank holds (a tensor with an empty box may be
            absent), a C-contiguous writable numpy array of the box's shape and dtype,
            or any buffer (``bytearray``, ``array.array``, ``memoryview`` of a CPU
            tensor) of that shape with items of the dtype's size. Checked on every
            rank before any byte is read; a mismatch is a UsageError naming the rank,
            the tensor and the box. the source's layout, only for a distributed checkpoint without a
            manifest (MindSpore's); otherwise everything is read from the files.
        step: for a training directory (``CheckpointManager``), the committed step to
            load, ``(epoch, step)`` or ``"EPOCH_STEP"``; default the latest committed.
        stats: if given, filled with ``per_rank`` counters (bytes_read from disk,
            bytes_received and bytes_sent over MPI), ``rounds``, ``seconds`` and
            ``unique_bytes``.
    Returns:
        ``out`` when given, filled; else ``{name: array}`` for every tensor this rank
        holds (numpy, dtype from the file; bf16/fp8 as ml_dtypes, imported only then).

    Example::

        state = {n: np.empty(b.sizes, np.float32) for n, b in my_boxes}
        hpcckpt.load("dist/", strategy, MPI.COMM_WORLD, out=state)
    """
    comm = as_comm(comm)
    t0 = time.perf_counter()
    check_world(strategy, comm)  # the same verdict on every rank: no step needed
    with comm.step("plan"):
        inp = open_input(step_path(path, step), src_strategy, lazy=True, comm=comm)
        check_tensors_match(inp.source, strategy, str(path), "the strategy", allow_extra=True)
        plan = plan_load(inp.source, strategy, comm.rank)
        if out is None:
            out, targets = _allocate(strategy, comm.rank)
        else:
            targets = _caller_targets(out, strategy, comm.rank)
    reader = ChunkReader(inp, scratch_bytes=buffer_size)

    def forward(route: Route, sub: Box, buf: memoryview, base: int) -> None:
        # my own slice, already read from disk, to a replica
        sr = strided_runs(sub, route.dst_box, sub, route.tensor.itemsize)
        copy_runs(sr, targets[(route.tensor.name, route.dst_box)], 0, buf, base)
    try:
        with comm.step("load: read"):
            for r in plan.local:   # from disk straight into place: no buffer, no copy
                reader.read(r.src, r.tensor, strided_runs(r.region, r.src.box, r.dst_box,
                                                          r.tensor.itemsize),
                            targets[(r.tensor.name, r.dst_box)])
        # a box forwarded whole (a replica's) goes from the reader's array to the
        # replica's by MPI, with no copy through the exchange buffers
        st = execute_routes(comm, RoutePlan(plan.rank, plan.sends, plan.recvs, []), forward,
                            memory_writer(targets), buffer_size, budget, max_message, "load",
                            in_place=targets)
        st.bytes_local = sum(r.nbytes for r in plan.local)
    finally:
        reader.close()
    if stats is not None:
        stats.update(per_rank=comm.allgather({"rank": comm.rank, "bytes_read": reader.bytes_read,
                                              "bytes_received": st.bytes_received,
                                              "bytes_sent": st.bytes_sent,
                                              "bytes_local": st.bytes_local,
                                              **reader.verify_counts()}),
                     rounds=st.rounds, seconds=comm.allreduce_max(time.perf_counter() - t0),
                     unique_bytes=strategy.unique_bytes, files=len(inp.files))
    return out


def check_world(strategy: Strategy, comm: Comm) -> None:
    if strategy.world_size != comm.size:
        raise UsageError(f"strategy has {strategy.world_size} ranks but the job has "
                         f"{comm.size}; launch with mpiexec -n {strategy.world_size}")


def reshard_state(local_state: dict[str, "np.ndarray"], src_strategy: Strategy,
                  dst_strategy: Strategy, comm=None, *, budget: int = DEFAULT_BUDGET,
                  max_message: int = DEFAULT_MAX_MESSAGE) -> dict[str, "np.ndarray"]:
    """Each rank passes the slices it holds under ``src_strategy`` and receives those it
    holds under ``dst_strategy``; no disk. Ranks beyond a strategy's world size hold
    nothing in it. A rank holding a slice locally copies it rather than receiving it."""
    import numpy as np
    comm = as_comm(comm)
    with comm.step("plan"):
        for s, what in ((src_strategy, "source"), (dst_strategy, "destination")):
            if s.world_size > comm.size:
                raise UsageError(f"{what} strategy has {s.world_size} ranks but the job only "
                                 f"{comm.size}")
        for t in dst_strategy.tensors:
            if t.name not in src_strategy:
                raise FormatError(f"tensor {t.name!r} is in the destination strategy but not "
                                  "in the source strategy")
            s = src_strategy.spec(t.name)
            if (s.shape, s.dtype) != (t.shape, t.dtype):
                raise FormatError(f"tensor {t.name!r} is {s.dtype} {list(s.shape)} in the source "
                                  f"strategy but {t.dtype} {list(t.shape)} in the destination")
        mine: dict[tuple[str, Box], np.ndarray] = {}
        for t, box in src_strategy.rank_boxes(comm.rank):
            a = local_state.get(t.name)
            if a is None:
                raise FormatError(f"rank {comm.rank}: local_state lacks tensor {t.name!r} "
                                  f"(its box {box})")
            a = np.asarray(a)
            if a.shape != box.sizes or a.dtype != numpy_dtype(t.dtype):
                raise FormatError(f"rank {comm.rank}: tensor {t.name!r} is {a.dtype} {list(a.shape)} "
                                  f"but the source strategy gives this rank {t.dtype} "
                                  f"{list(box.sizes)} at {box}")
            mine[(t.name, box)] = _as_bytes(np.ascontiguousarray(a).reshape(box.sizes))
        plan = plan_reshard_state(src_strategy, dst_strategy, comm.rank)
        out, targets = _allocate(dst_strategy, comm.rank)
    execute_routes(comm, plan, region_reader(lambda r: ("mem", mine[(r.tensor.name, r.src.box)], 0)),
                   memory_writer(targets), DEFAULT_BUFFER, budget, max_message, "reshard_state")
    return out
