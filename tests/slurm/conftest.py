"""The SLURM stage (tests/run_all.py --only slurm): tests on a real slurmctld + slurmd.

These modules are collected only when HPCCKPT_SLURM_TESTS=1 (the stage sets it), so a
plain `pytest tests` never installs packages or starts daemons. Each module gets its own
cluster (``cluster.Cluster``), started before its first test and stopped after its last.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from cluster import Cluster, Unavailable

if os.environ.get("HPCCKPT_SLURM_TESTS") != "1":
    collect_ignore_glob = ["test_*.py"]


def start_cluster(nodes: int):
    """Yield a running cluster of ``nodes`` nodes; stop it (and remove its state unless
    HPCCKPT_SLURM_KEEP=1) after."""
    # not under pytest's 0700 tmp tree: munged (user munge) must reach its socket directory
    root = Path(tempfile.mkdtemp(prefix=f"hpcckpt-slurm{nodes}-", dir="/tmp"))
    root.chmod(0o755)
    c = Cluster(root, nodes, log=lambda m: print(f"[slurm fixture] {m}", flush=True))
    try:
        c.start()
    except Unavailable as e:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"SLURM unavailable: {e}")
    except BaseException:
        c.stop()
        raise
    try:
        yield c
    finally:
        c.stop()
        if os.environ.get("HPCCKPT_SLURM_KEEP") != "1":
            shutil.rmtree(root, ignore_errors=True)
