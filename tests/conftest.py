"""Fixtures shared by serial and MPI test runs (see tests/run_all.py for the stages).

- ``comm``: ``MPI.COMM_WORLD`` when running under MPI, else ``None``.
- ``shared_tmp``: a temporary directory with the same path on every rank
  (``tmp_path`` in serial runs).  Set HPCCKPT_TEST_SHARED_TMP to a directory on a
  shared filesystem when the ranks run on several nodes.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

_TESTS_DIR = Path(__file__).resolve().parent
if str(_TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(_TESTS_DIR))  # `from helpers import ...` in every test module

# Set by the launchers of an MPI job (MPICH/Hydra, Open MPI, PMIx, SLURM srun).
_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


def _world():
    """MPI.COMM_WORLD if this process is part of an MPI run, else None.

    MPI is only initialised when there is a sign of an MPI launch (or mpi4py.MPI
    was already imported), so purely serial runs never start MPI.
    """
    explicit = bool(os.environ.get("HPCCKPT_TEST_MPI_SIZE"))
    launched = any(v in os.environ for v in _LAUNCHER_VARS)
    if not (explicit or launched or "mpi4py.MPI" in sys.modules):
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    world = MPI.COMM_WORLD
    if explicit or world.Get_size() > 1:
        return world
    return None


@pytest.fixture(scope="session")
def comm():
    return _world()


@pytest.fixture
def shared_tmp(request, comm, tmp_path_factory):
    if comm is None:
        yield request.getfixturevalue("tmp_path")
        return
    path = None
    if comm.Get_rank() == 0:
        base = os.environ.get("HPCCKPT_TEST_SHARED_TMP")
        if not base:
            try:
                base = str(tmp_path_factory.getbasetemp().parent)
            except Exception:
                base = tempfile.gettempdir()
        os.makedirs(base, exist_ok=True)
        path = tempfile.mkdtemp(prefix="hpcckpt-shared-", dir=base)
    path = comm.bcast(path, root=0)
    try:
        yield Path(path)
    finally:
        comm.Barrier()
        if comm.Get_rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
