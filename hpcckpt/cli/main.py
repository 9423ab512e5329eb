"""The ``hpcckpt`` command: argparse root, launch check, one summary, one error report.

Known errors are reported once, by rank 0, naming every failing rank (``--json``: also
as ``{"error": ..., "ranks": [...]}`` on stdout), and every rank exits non-zero
(traceback only with --debug). An unexpected exception that escaped the collective
protocol aborts the MPI job rather than leaving other ranks waiting.

A new command is a module ``hpcckpt/cli/<cmd>.py`` with ``register(sub)``, added to
``COMMANDS`` below; see ``cli/common.py`` for the options every command shares. A run
imports and registers only the command it names (start-up is every rank's wall time:
the ten parsers take ~30 ms to build); ``hpcckpt --help`` and usage errors before the
command build them all.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback

from .. import __version__
from ..errors import HpcckptError, RankFailure
from .common import print_result

#: the command names, each the module ``hpcckpt/cli/<name>.py``, in ``--help`` order
COMMANDS = ("inspect", "split", "merge", "reshard", "load", "save", "strategy", "jobs",
            "convert", "verify")

#: 128 + SIGPIPE: what a shell reports for a tool whose reader went away (`| head`)
EXIT_BROKEN_PIPE = 141
#: set by MPI launchers (Hydra, Open MPI, PMIx, srun): who this process is before MPI starts
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_NTASKS")


def _launch_env(names: tuple[str, ...], default: int) -> int:
    for var in names:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return default


def one_node(env) -> bool:
    """Whether the launcher says every rank of the job is on this node (False when it
    does not say): Hydra and Open MPI give the local and the world size, srun the node
    count; a process started without a launcher is a job of one."""
    pairs = (("MPI_LOCALNRANKS", "PMI_SIZE"),
             ("OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_SIZE"))
    for local, world in pairs:
        if world in env:
            return env.get(local) == env[world]
    if "SLURM_PROCID" in env:
        return env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES")) == "1"
    return not any(v in env for v in _RANK_VARS + _SIZE_VARS)


class Parser(argparse.ArgumentParser):
    """argparse with hpcckpt's error report: the usage of the (sub)command that failed,
    a message in the user's terms, printed by rank 0 only, JSON too with --json."""

    json_errors = False  # set per run by build_parser

    def error(self, message: str):
        message = self._missing_subcommand(message) or message
        if _launch_env(_RANK_VARS, 0) == 0:  # every rank parses the same argv: say it once
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
            if self.json_errors:
                print(json.dumps({"error": message,
                                  "ranks": list(range(_launch_env(_SIZE_VARS, 1)))}))
        sys.exit(2)

    def _missing_subcommand(self, message: str) -> str | None:
        """argparse names a missing subcommand by its dest ("strategy_cmd"); say instead
        which words may follow what the user typed."""
        prefix = "the following arguments are required: "
        if not message.startswith(prefix):
            return None
        missing = message[len(prefix):].split(", ")
        for action in self._actions:
            if (isinstance(action, argparse._SubParsersAction)
                    and (action.metavar or action.dest) in missing):
                return (f"`{self.prog}` needs one of: {', '.join(action.choices)} "
                        f"(see `{self.prog} --help`)")
        return None


def named_command(argv: list[str]) -> str | None:
    """The command ``argv`` runs, when it names one before anything but ``--debug``
    (any other root option, e.g. ``--help``, needs every command's parser)."""
    for arg in argv:
        if arg != "--debug":
            return arg if arg in COMMANDS else None
    return None


def build_parser(json_errors: bool = False, command: str | None = None
                 ) -> argparse.ArgumentParser:
    """The root parser with every command, or with ``command`` only."""
    parser_class = type("Parser", (Parser,), {"json_errors": json_errors})
    p = parser_class(
        prog="hpcckpt", description="Distributed safetensors checkpoints over MPI: split, merge, "
        "reshard, load and inspect. Run as one process or under mpiexec/srun.")
    p.add_argument("--version", action="version", version=f"hpcckpt {__version__}")
    p.add_argument("--debug", action="store_true", help="tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS if command is None else (command,):
        importlib.import_module(f".{name}", __package__).register(sub)
    for leaf in _subparsers(p):  # --debug is also accepted after the command
        if "--debug" not in leaf._option_string_actions:
            leaf.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                              help="tracebacks for errors")
    return p


def _subparsers(p: argparse.ArgumentParser):
    """Every parser below ``p`` (commands and their actions)."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to one parser
                yield child
                yield from _subparsers(child)


def chosen_parser(p: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The innermost (sub)command parser the arguments selected, e.g. ``strategy show``."""
    while True:
        action = next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)),
                      None)
        name = None if action is None else getattr(args, action.dest, None)
        if name not in getattr(action, "choices", {}):
            return p
        p = action.choices[name]


def main(argv: list[str] | None = None) -> int:
    # hpcckpt makes no BLAS call, but numpy's OpenBLAS starts a thread per core when numpy
    # is imported, and they spin: with a rank per core that took a fifth of a 2-rank
    # load's start-up (and on a 64-core node, 64 threads per rank). Before numpy's import.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if one_node(os.environ):
        # UCX (the PyPI MPICH's network layer) patches mmap/munmap when its library loads,
        # for its registration cache: 40 ms of every rank's start-up. Ranks on one node talk
        # through MPICH's shared memory, never UCX's network, so the hooks serve nothing.
        os.environ.setdefault("UCX_MEM_EVENTS", "no")
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(json_errors="--json" in argv, command=named_command(argv))
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand's parser, with its usage line
        chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    name = f"hpcckpt {args.command}"
    as_json = getattr(args, "json", False)
    simulate = getattr(args, "simulate_world", None)
    if simulate is not None and not args.dry_run:
        chosen_parser(parser, args).error("--simulate-world plans one rank of a job that is "
                                          "not running; it needs --dry-run")
    if simulate is not None:  # no MPI at all: one rank of an imaginary job
        from ..comm.simulated import SimulatedComm
        try:
            comm = SimulatedComm(args.simulate_rank, simulate)
        except HpcckptError as e:
            chosen_parser(parser, args).error(str(e))
    elif not getattr(args, "needs_mpi", True):  # e.g. `jobs render` on a login node: no MPI
        from ..comm.wrapper import Comm
        comm = Comm(None)
    else:
        from ..comm.wrapper import world_comm
        try:
            comm = world_comm()
        except HpcckptError as e:  # no MPI to ask who we are: every process says it
            print(f"{name}: error: {e}", file=sys.stderr)
            if as_json:
                print(json.dumps({"error": str(e), "ranks": [_launch_env(_RANK_VARS, 0)]}))
            return 1
    comm.debug = args.debug
    try:
        if simulate is None and getattr(args, "needs_mpi", True):
            from ..launch import check_launch
            with comm.step("launch check"):
                check_launch(comm.size)
        result = args.run(args, comm)
        if result is not None and (comm.rank == 0 or simulate is not None):
            print_result(result, as_json)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return result.extra.get("exit_status", 0) if result is not None else 0
    except BrokenPipeError:
        return _reader_went_away()
    except RankFailure as e:
        text = f"{e}\n{e.details()}" if args.debug and len(e.failures) > 1 else str(e)
        return _report(name, comm, text, sorted(e.failures), as_json, simulate)
    except HpcckptError as e:  # raised identically on every rank outside a step
        ranks = [comm.rank] if simulate is not None else list(range(comm.size))
        return _report(name, comm, str(e), ranks, as_json, simulate)
    except Exception:  # a bug that escaped the protocol: never leave other ranks waiting
        traceback.print_exc()
        sys.stderr.flush()
        if comm.size > 1 and simulate is None:
            comm.abort(3)
        return 3


def _report(name: str, comm, text: str, ranks: list[int], as_json: bool, simulate) -> int:
    """One report for the whole job: rank 0 prints it (a simulated rank prints its own)."""
    if comm.rank == 0 or simulate is not None:
        try:
            print(f"{name}: error: {text}", file=sys.stderr)
            if as_json:
                print(json.dumps({"error": text, "ranks": ranks}), flush=True)
        except BrokenPipeError:
            _reader_went_away()
    return 1


def _reader_went_away() -> int:
    """The reader of our stdout closed it (``hpcckpt inspect ... | head``): stop quietly,
    as ``cat`` would, instead of a traceback; later flushes go to /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
