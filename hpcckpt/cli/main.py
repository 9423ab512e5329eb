"""The ``hpcckpt`` command: argparse root, launch check, one summary, one error line.

Known errors print one line on rank 0 and exit non-zero on every rank (traceback only
with --debug). An unexpected exception that escaped the collective protocol aborts the
MPI job rather than leaving other ranks waiting.
"""
from __future__ import annotations

import argparse
import sys
import traceback

from .. import __version__
from ..errors import HpcckptError, RankFailure
from . import inspect as inspect_cmd
from . import jobs as jobs_cmd
from . import load as load_cmd
from . import merge as merge_cmd
from . import reshard as reshard_cmd
from . import save as save_cmd
from . import split as split_cmd
from . import strategy as strategy_cmd
from .common import print_result

COMMANDS = (inspect_cmd, split_cmd, merge_cmd, reshard_cmd, load_cmd, save_cmd, strategy_cmd,
            jobs_cmd)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hpcckpt", description="Distributed safetensors checkpoints over MPI: split, merge, "
        "reshard, load and inspect. Run as one process or under mpiexec/srun.")
    p.add_argument("--version", action="version", version=f"hpcckpt {__version__}")
    p.add_argument("--debug", action="store_true", help="tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in COMMANDS:
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = f"hpcckpt {args.command}"
    simulate = getattr(args, "simulate_world", None)
    if simulate is not None and not args.dry_run:
        print(f"{name}: error: --simulate-world plans one rank of a job that is not running; "
              "it needs --dry-run", file=sys.stderr)
        return 2
    if simulate is not None:  # no MPI at all: one rank of an imaginary job
        from ..comm.simulated import SimulatedComm
        try:
            comm = SimulatedComm(args.simulate_rank, simulate)
        except HpcckptError as e:
            print(f"{name}: error: {e}", file=sys.stderr)
            return 2
    elif not getattr(args, "needs_mpi", True):  # e.g. `jobs render` on a login node: no MPI
        from ..comm.wrapper import Comm
        comm = Comm(None)
    else:
        from ..comm.wrapper import world_comm
        comm = world_comm()
    comm.debug = args.debug
    try:
        if simulate is None and getattr(args, "needs_mpi", True):
            from ..launch import check_launch
            with comm.step("launch check"):
                check_launch(comm.size)
        result = args.run(args, comm)
        if result is not None and (comm.rank == 0 or simulate is not None):
            print_result(result, getattr(args, "json", False))
        return result.extra.get("exit_status", 0) if result is not None else 0
    except RankFailure as e:
        if comm.rank == 0:
            print(f"{name}: error: {e}", file=sys.stderr)
            if len(e.failures) > 1 or args.debug:
                print(e.details(), file=sys.stderr)
        return 1
    except HpcckptError as e:  # raised identically on every rank outside a step
        if comm.rank == 0:
            print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    except Exception:  # a bug that escaped the protocol: never leave other ranks waiting
        traceback.print_exc()
        sys.stderr.flush()
        if comm.size > 1:
            comm.abort(3)
        return 3


if __name__ == "__main__":
    sys.exit(main())
