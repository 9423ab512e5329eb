"""Metadata read once per job (issue 9 item 8): in a shared-filesystem merge, reshard and
load, rank 0 alone opens manifest.json and strategy.yaml and broadcasts their bytes;
every rank plans from the same bytes; node-local, once per host where its ranks open the
very same files. Holds at any world size (1 process included)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

import hpcckpt
from hpcckpt.comm.wrapper import Comm
from hpcckpt.formats.safetensors import build_header
from hpcckpt.ops.filecopy import CopyOptions
from hpcckpt.storage import reader

from helpers import allgather, barrier, collective, rank_size

pytestmark = pytest.mark.mpi

OPTS = CopyOptions(fsync=False, progress=False)
SHAPES = {"w": (12, 10), "b": (10,), "s": ()}


def strategy(mesh: dict, split_w) -> hpcckpt.Strategy:
    return hpcckpt.strategy_from_dict({
        "format": "hpcckpt.strategy/1", "mesh": mesh,
        "tensors": {"w": {"shape": [12, 10], "dtype": "F32", "split": split_w},
                    "b": {"shape": [10], "dtype": "F32"},
                    "s": {"shape": [], "dtype": "F32"}}})


def full() -> dict[str, np.ndarray]:
    return {n: np.arange(int(np.prod(s)), dtype=np.float32).reshape(s) * 0.5
            for n, s in SHAPES.items()}


def opened(comm, before: int) -> list[list[str]]:
    """Per rank, the metadata files this rank read from disk since ``before``."""
    names = [p.rsplit("/", 1)[-1] for p in reader.OPENED[before:]]
    return allgather(comm, names)


def write_dist(comm, tmp):
    """tmp/dist: the model split for dp2 x tp2 (rank 0 writes the model file)."""
    if rank_size(comm)[0] == 0:
        head, _ = build_header([(n, "F32", s) for n, s in SHAPES.items()])
        with open(tmp / "model.safetensors", "wb") as f:
            f.write(head + b"".join(a.tobytes() for a in full().values()))
    barrier(comm)
    hpcckpt.split(str(tmp / "model.safetensors"), str(tmp / "dist"),
                  strategy({"dp": 2, "tp": 2}, ["tp", None]), comm=comm, options=OPTS)
    return tmp / "dist"


@pytest.mark.timeout(120)
def test_manifest_and_strategy_opened_once_per_job(comm, shared_tmp):
    rank, size = rank_size(comm)
    write_dist(comm, shared_tmp)
    once = [["manifest.json", "strategy.yaml"]] + [[]] * (size - 1)

    n = len(reader.OPENED)
    hpcckpt.merge(str(shared_tmp / "dist"), str(shared_tmp / "hf"), comm=comm, options=OPTS)
    got = opened(comm, n)
    collective(comm, lambda: _equal(got, once, "merge"))

    n = len(reader.OPENED)
    hpcckpt.reshard(str(shared_tmp / "dist"), str(shared_tmp / "re"),
                    strategy({"tp": 3}, [None, "tp"]), comm=comm, options=OPTS)
    got = opened(comm, n)
    collective(comm, lambda: _equal(got, once, "reshard"))

    n = len(reader.OPENED)
    mine = hpcckpt.load(str(shared_tmp / "re"), strategy({"dp": size}, None), comm=comm)
    got = opened(comm, n)
    collective(comm, lambda: _equal(got, once, "load"))
    want = full()
    collective(comm, lambda: [_equal(mine[k].tobytes(), want[k].tobytes(), k) for k in want])


def _equal(got, want, what):
    assert got == want, (what, got, want)


@pytest.mark.timeout(60)
def test_bcast_bytes_in_pieces(comm):
    rank, _ = rank_size(comm)
    data = bytes(range(256)) * 41 + b"end"
    got = Comm(comm).bcast_bytes(data if rank == 0 else None, chunk=1000)
    collective(comm, lambda: _equal(bytes(got), data, "bcast_bytes"))
    empty = Comm(comm).bcast_bytes(b"" if rank == 0 else None)
    collective(comm, lambda: _equal(bytes(empty), b"", "empty"))


@pytest.mark.timeout(120)
def test_node_local_metadata_read_once_per_host(comm, shared_tmp):
    """Node-local reshard: where the ranks of a host (here every rank) open the very same
    files, through their own paths, one of them reads manifest.json and strategy.yaml
    and broadcasts them on the host; where each rank has its own copy, each reads its
    own; a rank whose copy lacks its manifest fails the job with its own error."""
    rank, size = rank_size(comm)
    dist = write_dist(comm, shared_tmp)
    dst = strategy({"tp": 3}, [None, "tp"])
    both = ["manifest.json", "strategy.yaml"]

    def node_local(inp: str, out: str) -> list[list[str]]:
        n = len(reader.OPENED)
        hpcckpt.reshard(str(shared_tmp / inp), str(shared_tmp / out), dst, node_local=True,
                        comm=comm, options=OPTS)
        return opened(comm, n)

    # every rank's path is a link to the same directory: read once on the host
    (shared_tmp / f"link{rank}").symlink_to(dist)
    barrier(comm)
    got = node_local("link{rank}", "out{rank}")
    collective(comm, lambda: _equal(got, [both] + [[]] * (size - 1), "same files"))

    # a copy each (other inodes): each rank reads its own
    shutil.copytree(dist, shared_tmp / f"copy{rank}")
    barrier(comm)
    got = node_local("copy{rank}", "again{rank}")
    collective(comm, lambda: _equal(got, [both] * size, "own copies"))

    # the last rank's copy has lost its manifest: it alone fails, and every rank with it
    last = shared_tmp / f"copy{size - 1}"
    if rank == size - 1:
        (last / "manifest.json").unlink()
    barrier(comm)
    with pytest.raises(hpcckpt.HpcckptError) as ei:
        node_local("copy{rank}", "third{rank}")
    failures = getattr(ei.value, "failures", {size - 1: str(ei.value)})
    collective(comm, lambda: _equal((list(failures), "no manifest.json" in failures[size - 1]),
                                    ([size - 1], True), "missing manifest"))
