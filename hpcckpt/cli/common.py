"""Options and output shared by every command.

Conventions for a command module ``hpcckpt/cli/<cmd>.py`` (registered by adding it to
``COMMANDS`` in ``cli/main.py``):

- ``register(sub)`` adds its parser with ``sub.add_parser(...)`` and sets ``run``:
  ``p.set_defaults(run=run)``; ``run(args, comm)`` returns an ``OpResult`` (printed by
  main on rank 0) or ``None`` after printing its own output on rank 0.
- Every command takes ``--json`` and ``--dry-run`` (SPEC 3): commands that copy bytes
  call ``add_run_options`` (adds ``--buffer-size``, and ``--overwrite``/``--no-fsync``
  when they write); read-only commands call ``add_output_options(p, reads_only=True)``.
  ``tests/cli/test_cli.py::test_every_command_takes_json_and_dry_run`` checks it.
- Byte sizes are parsed with ``size_type`` (the user's text in the error, optional floor).
- Errors: raise an ``HpcckptError`` inside ``comm.step(name)``; main prints it once
  (rank 0, naming the failing ranks) and, with ``--json``, as JSON on stdout too.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Callable

from ..comm.rounds import DEFAULT_BUDGET, DEFAULT_MAX_MESSAGE
from ..errors import UsageError
from ..storage.fileio import DEFAULT_BUFFER
from ..units import format_bytes, parse_size

if TYPE_CHECKING:
    from ..ops.filecopy import CopyOptions
    from ..ops.result import OpResult

#: Below these an exchange degenerates into millions of tiny MPI calls (a 0.65 s load
#: took minutes with 1-byte messages); the API keeps its own small limits for tests.
MIN_EXCHANGE_BUDGET = 1 << 20
MIN_MAX_MESSAGE = 64 << 10


def size_type(minimum: int = 0, why: str = "") -> Callable[[str], int]:
    """argparse ``type=`` for byte sizes: the user's own text in the error, and a floor.

    Example: ``p.add_argument("--max-message", type=size_type(MIN_MAX_MESSAGE, "..."))``
    turns ``--max-message 1`` into ``argument --max-message: 1 is below the floor of
    64.00 KiB (...)``."""
    def size(text: str) -> int:
        try:
            n = parse_size(text)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if n < minimum:
            reason = f" ({why})" if why else ""
            raise argparse.ArgumentTypeError(
                f"{text} is below the floor of {format_bytes(minimum)}{reason}")
        return n
    return size


def add_output_options(p: argparse.ArgumentParser, reads_only: bool = False):
    """``--json`` and ``--dry-run``, which every command takes (SPEC 3)."""
    g = p.add_argument_group("run options")
    g.add_argument("--json", action="store_true", help="print a machine-readable summary")
    g.add_argument("--dry-run", action="store_true",
                   help="accepted by every command; this one only reads, so it prints "
                        "the same as without it" if reads_only else
                   "print the plan (bytes read and written per rank) without writing")
    return g


def add_max_extra_size(p: argparse.ArgumentParser) -> None:
    """``--max-extra-size``: the largest non-weight model file (config, tokenizer, ...)
    carried with the weights (``storage.model_files``)."""
    p.add_argument("--max-extra-size", type=size_type(), default=64 << 20, metavar="SIZE",
                   help="largest non-weight model file carried along (default 64MiB)")


def add_run_options(p: argparse.ArgumentParser, writes: bool = True) -> None:
    g = add_output_options(p)
    g.add_argument("--buffer-size", type=size_type(), default=DEFAULT_BUFFER, metavar="SIZE",
                   help=f"copy buffer per rank (default {format_bytes(DEFAULT_BUFFER)}); bounds memory")
    if writes:
        g.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
        g.add_argument("--no-fsync", action="store_true",
                       help="skip fsync before commit (faster, not crash-safe)")


def add_dedup_option(p: argparse.ArgumentParser) -> None:
    """``--dedup [balanced|whole]``: each distinct box stored once (planning/dedup.py)."""
    p.add_argument("--dedup", nargs="?", const="balanced", default=None,
                   choices=("balanced", "whole"), metavar="MODE",
                   help="store each distinct box once: 'balanced' (default; large replicated "
                   "boxes divided among their replicas, bytes per rank even) or 'whole' "
                   "(whole boxes, as MindSpore's loader reads)")


def add_step_option(p: argparse.ArgumentParser) -> None:
    """``--step EPOCH_STEP``: which committed step of a training directory to read."""
    p.add_argument("--step", metavar="EPOCH_STEP", default=None,
                   help="a training directory's committed step, e.g. 1_200 (default: the "
                   "latest committed)")


def at_step(comm, path: str, step: str | None) -> str:
    """The path to open for ``--step`` (the step's commit record), else ``path``; rank 0
    looks it up and tells the others."""
    if step is None:
        return path
    from ..storage.training import step_path
    with comm.step("find step"):
        found = step_path(path, step) if comm.rank == 0 else None
    return comm.bcast(found)


def add_exchange_options(p: argparse.ArgumentParser, budget: int = DEFAULT_BUDGET) -> None:
    """Options of commands whose bytes travel between ranks over MPI."""
    g = p.add_argument_group("exchange options")
    g.add_argument("--exchange-budget", default=budget, metavar="SIZE",
                   type=size_type(MIN_EXCHANGE_BUDGET, "smaller budgets make many tiny rounds"),
                   help="send + receive buffers per rank per exchange round "
                   f"(default {format_bytes(budget)}, at least "
                   f"{format_bytes(MIN_EXCHANGE_BUDGET)})")
    g.add_argument("--max-message", default=DEFAULT_MAX_MESSAGE, metavar="SIZE",
                   type=size_type(MIN_MAX_MESSAGE, "smaller messages make many tiny MPI calls"),
                   help="largest single MPI message (kept below 2 GiB; default "
                   f"{format_bytes(DEFAULT_MAX_MESSAGE)}, at least "
                   f"{format_bytes(MIN_MAX_MESSAGE)})")


def add_simulate_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("planning at scale (with --dry-run, no MPI)")
    g.add_argument("--simulate-world", type=int, metavar="N",
                   help="plan as one rank of an N-rank job, in this one process")
    g.add_argument("--simulate-rank", type=int, default=0, metavar="R",
                   help="the rank to plan (default 0)")


def copy_options(args) -> CopyOptions:
    from ..ops import filecopy  # on use: start-up is every rank's wall time
    return filecopy.CopyOptions(buffer_size=args.buffer_size,
                                fsync=not getattr(args, "no_fsync", False),
                                dry_run=args.dry_run, overwrite=getattr(args, "overwrite", False),
                                progress=not args.json)


def examples(text: str) -> str:
    return "examples:\n" + "\n".join("  " + line for line in text.strip().splitlines())


def print_result(result: OpResult, as_json: bool, out=sys.stdout) -> None:
    """Rank 0 only: one summary line, or the per-rank plan for --dry-run."""
    if as_json:
        print(json.dumps(result.to_dict()), file=out)
        return
    if result.dry_run:
        if result.op == "load":
            print(f"load plan (dry run, nothing read): {format_bytes(result.bytes_read)} to read "
                  f"from disk ({format_bytes(result.extra['unique_bytes'])} unique) on "
                  f"{result.world_size} rank(s)", file=out)
        else:
            print(f"{result.op} plan (dry run, nothing written): {result.files} file(s), "
                  f"{format_bytes(result.bytes_written)} to write on {result.world_size} "
                  "rank(s)", file=out)
        keys = [k for k in result.per_rank[0] if k != "rank"] if result.per_rank else []
        print("  rank " + "".join(f"{k:>18}" for k in keys), file=out)
        for r in result.per_rank:
            print(f"  {r['rank']:>4} " + "".join(f"{_fmt(k, r[k]):>18}" for k in keys), file=out)
        return
    if result.op == "load":
        x = result.extra
        received = sum(r["bytes_received"] for r in result.per_rank)
        print(f"load: {format_bytes(result.bytes_read)} read from disk ({format_bytes(x['unique_bytes'])}"
              f" unique), {format_bytes(received)} received over MPI in {x['rounds']} round(s), "
              f"{result.seconds:.2f} s ({result.gbps:.2f} GB/s) on {result.world_size} rank(s) "
              f"<- {result.output}", file=out)
        if "against" in x:
            print(f"identical to {x['against']}: {format_bytes(x['bytes_compared'])} compared",
                  file=out)
        return
    extra = ""
    for key in ("bytes_sent", "rounds"):
        if key in result.extra:
            v = result.extra[key]
            extra += f", {format_bytes(v) if key.startswith('bytes') else v} {key.replace('bytes_', '')}"
    print(f"{result.op}: {result.files} file(s), {format_bytes(result.bytes_written)} written, "
          f"{format_bytes(result.bytes_read)} read{extra} in {result.seconds:.2f} s "
          f"({result.gbps:.2f} GB/s) on {result.world_size} rank(s) -> {result.output}", file=out)


def _fmt(key: str, v) -> str:
    return format_bytes(v) if key.startswith("bytes") and isinstance(v, int) else str(v)
