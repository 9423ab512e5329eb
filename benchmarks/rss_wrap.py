"""Run one hpcckpt command in this process and record this rank's peak RSS.

    mpiexec -n 2 python benchmarks/rss_wrap.py RSS_DIR merge dist/ out/ --json

Runs ``hpcckpt.cli.main.main(ARGS)`` in-process (the same code path as
``python -m hpcckpt ARGS``), then writes ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
(KiB on Linux) to ``RSS_DIR/rss_rank_<rank>.txt``; the rank comes from the launcher's
environment (PMI_RANK for MPICH/Hydra and Intel MPI, OMPI_COMM_WORLD_RANK, PMIX_RANK,
SLURM_PROCID; 0 when run alone). The exit status is hpcckpt's.
"""
from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")


def launcher_rank() -> int:
    for var in _RANK_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def write_peak_rss(out_dir: str) -> None:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, f"rss_rank_{launcher_rank()}.txt")
    tmp = f"{final}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{kib}\n")
    os.replace(tmp, final)


def main() -> int:
    if len(sys.argv) < 3:
        print("usage: rss_wrap.py RSS_DIR HPCCKPT_ARGS...", file=sys.stderr)
        return 2
    out_dir, argv = sys.argv[1], sys.argv[2:]
    try:
        from hpcckpt.cli.main import main as hpcckpt_main
    except ImportError:   # running from a checkout without an install
        sys.path.append(str(Path(__file__).resolve().parent.parent))
        from hpcckpt.cli.main import main as hpcckpt_main
    rc = 1
    try:
        rc = hpcckpt_main(argv)
    except SystemExit as e:   # argparse errors and --help
        rc = e.code if isinstance(e.code, int) else 1
    finally:
        write_peak_rss(out_dir)
    return rc


if __name__ == "__main__":
    sys.exit(main())
