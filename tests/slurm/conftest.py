"""The SLURM stage (tests/run_all.py --only slurm): tests on a real slurmctld + slurmd.

These modules are collected only when HPCCKPT_SLURM_TESTS=1 (the stage sets it), so a
plain `pytest tests` never installs packages or starts daemons. Each module gets its own
cluster (``cluster.start_cluster``), started before its first test and stopped after its last.
"""
from __future__ import annotations

import os

if os.environ.get("HPCCKPT_SLURM_TESTS") != "1":
    collect_ignore_glob = ["test_*.py"]
