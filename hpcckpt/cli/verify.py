"""hpcckpt verify PATH [--strategy S] [--step E_S] [--against OTHER] [--quick|--deep] [--finite]
               [--shard I/N]

Exit status: 0 nothing found, 1 problems found, 2 unusable input or usage (argparse
also exits 2). Every rank exits with the same status.
"""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import HpcckptError, RankFailure
from ..units import format_bytes, parse_size
from .common import add_output_options, examples

HELP = "prove a checkpoint complete and uncorrupted, every rank checking its share"
EXAMPLES = examples("""
mpiexec -n 8 hpcckpt verify dist/                       # deep: every byte, every checksum
hpcckpt verify dist/ --quick                            # sizes, headers, coverage; no data read
mpiexec -n 4 hpcckpt verify ckpt_dir/ --step 1_1000     # a training directory's step
mpiexec -n 4 hpcckpt verify dist/ --against hf_model/ --atol 1e-3 --json
mpiexec -n 8 hpcckpt verify dist/ --shard 2/16          # one job of an array of 16
""")
EXIT_OK, EXIT_PROBLEMS, EXIT_UNUSABLE = 0, 1, 2


def register(sub) -> None:
    p = sub.add_parser("verify", help=HELP, description=HELP + ". Exit status: 0 clean, "
                       "1 problems found, 2 unusable input or usage.", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="any checkpoint: distributed (full or de-duplicated), a "
                                "training directory, complete weights (HF, MindSpore merged)")
    p.add_argument("--strategy", help="layout of a distributed checkpoint without manifest "
                                      "(MindSpore-written)")
    p.add_argument("--step", metavar="EPOCH_STEP",
                   help="a training directory's step (default: the latest committed)")
    p.add_argument("--against", metavar="OTHER",
                   help="compare every element with another checkpoint (any kind and layout)")
    p.add_argument("--against-strategy", metavar="S", help="layout of OTHER without manifest")
    p.add_argument("--atol", type=float, help="absolute tolerance of --against (default: exact)")
    p.add_argument("--rtol", type=float, help="relative tolerance of --against (default: exact)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true",
                   help="files, sizes, headers and coverage only; no tensor byte is read")
    g.add_argument("--deep", action="store_true",
                   help="also read every stored byte: checksums, replicas (the default)")
    p.add_argument("--finite", action="store_true", help="also scan floating tensors for NaN/Inf")
    p.add_argument("--shard", metavar="I/N",
                   help="read only shard I of N (from 0) of the stored bytes, for a job array "
                        "(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN); shard 0 also reports "
                        "the per-checkpoint checks (commit record, headers, coverage)")
    p.add_argument("--buffer-size", type=parse_size, metavar="SIZE",
                   help="read buffer per rank (default 256 KiB, 8 MiB with --finite or "
                        "--against)")
    add_output_options(p, reads_only=True)
    p.set_defaults(run=run, prints_itself=True)


def run(args, comm):
    """Print the report on rank 0 and end every rank with the verdict's exit status
    (``SystemExit``: the root's 0/1 convention has no room for "problems found")."""
    from ..layout.loader import load_strategy
    from ..ops.verify import verify   # on use: start-up is every rank's wall time
    from ..planning.checkwork import Shard
    try:
        shard = None
        if args.shard is not None:
            from ..errors import UsageError
            try:
                shard = Shard.parse(args.shard)
            except ValueError as e:
                raise UsageError(str(e)) from None
        if args.quick and (args.finite or args.against):
            from ..errors import UsageError
            raise UsageError("--quick reads no tensor byte: it cannot be combined with "
                             "--finite or --against")
        with comm.step("read strategy"):
            # a MindSpore strategy file takes its shapes from the checkpoint it describes
            strategy = load_strategy(args.strategy, shapes_from=args.path) \
                if args.strategy else None
            other = load_strategy(args.against_strategy, shapes_from=args.against) \
                if args.against_strategy else None
        report = verify(args.path, comm, strategy=strategy, step=args.step,
                        deep=not args.quick, finite=args.finite, against=args.against,
                        against_strategy=other, atol=args.atol, rtol=args.rtol,
                        buffer_size=args.buffer_size, shard=shard)
    except HpcckptError as e:
        if comm.rank == 0:
            msg = str(e)
            if isinstance(e, RankFailure) and len(set(e.failures.values())) == 1 and \
                    len(e.failures) == comm.size:   # every rank found the same: say it once
                msg = next(iter(e.failures.values()))
            if args.json:
                print(json.dumps({"op": "verify", "path": args.path, "ok": False,
                                  "error": msg, "exit": EXIT_UNUSABLE}))
            print(f"hpcckpt verify: error: {msg}", file=sys.stderr)
            if isinstance(e, RankFailure) and len(set(e.failures.values())) > 1:
                print(e.details(), file=sys.stderr)
        sys.stdout.flush()
        raise SystemExit(EXIT_UNUSABLE)
    if comm.rank == 0:
        print(json.dumps(report.to_dict()) if args.json else render(report))
    sys.stdout.flush()
    raise SystemExit(EXIT_OK if report.ok else EXIT_PROBLEMS)


def render(report) -> str:
    """The per-rank table, then the problems, then the verdict (last line)."""
    lines = [f"verify {report.mode}: {report.path} ({report.kind}, "
             f"{report.extra.get('files_total', 0)} file(s)) on {report.world_size} rank(s)"
             + (f", shard {report.extra['shard']}" if "shard" in report.extra else ""),
             f"  {'rank':>4} {'files':>6} {'checked':>12} {'seconds':>8} {'GB/s':>6} "
             f"{'problems':>8}"]
    for r in report.per_rank:
        lines.append(f"  {r['rank']:>4} {r['files']:>6} {format_bytes(r['bytes_checked']):>12} "
                     f"{r['seconds']:>8.2f} {r['gb_per_s']:>6.2f} {r['problems']:>8}")
    for p in report.problems:
        lines.append("  " + p.line())
    gbps = report.bytes_checked / report.seconds / 1e9 if report.seconds > 0 else 0.0
    what = (f"{format_bytes(report.bytes_checked)} read" if report.mode == "deep"
            else "metadata only")
    if report.ok:
        lines.append(f"OK: nothing wrong found ({what} in {report.seconds:.2f} s, "
                     f"{gbps:.2f} GB/s)")
    else:
        lines.append(f"FAILED: {len(report.problems)} problem(s) ({what} in "
                     f"{report.seconds:.2f} s)")
    return "\n".join(lines)
