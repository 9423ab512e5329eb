"""hpcckpt save OUT --strategy S [--from COMPLETE | --synthetic] [--steps N] [--save-steps K]
[--compute-seconds T] [--dedup] [--async] [--keep-max K]"""
from __future__ import annotations

import argparse
import statistics

from ..layout.loader import load_strategy
from ..units import format_bytes
from .common import add_dedup_option, add_max_extra_size, add_output_options, examples

HELP = "training-style saves (a CheckpointManager) of real or synthetic state under a strategy"
EXAMPLES = examples("""
mpiexec -n 4 hpcckpt save out/checkpoint --strategy dp2_tp2.yaml --synthetic --steps 10 --save-steps 5
mpiexec -n 4 hpcckpt save out/checkpoint --strategy s.yaml --from hf_model/ --dedup --async --compute-seconds 2
""")
EPILOG = EXAMPLES + """

Re-run on the same OUT, training resumes from its latest committed step. On SIGUSR1 or
SIGTERM (SLURM's --signal, scancel) the current step is saved on every rank and the
command exits with status 75 (EX_TEMPFAIL) so a job script can requeue."""


def register(sub) -> None:
    p = sub.add_parser("save", help=HELP, description=HELP + ". Every rank writes its own file "
                       "per saved step; a step is committed by its record, written last.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="training directory (e.g. output/checkpoint)")
    p.add_argument("--strategy", required=True, help="the layout of the state (world size = job)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--from", dest="source", metavar="COMPLETE",
                     help="weights to save (any checkpoint hpcckpt reads)")
    src.add_argument("--synthetic", action="store_true",
                     help="pseudo-random state of the strategy's shapes (the default)")
    p.add_argument("--steps", type=int, default=1, metavar="N", help="training steps (default 1)")
    p.add_argument("--save-steps", type=int, default=1, metavar="K",
                   help="save every K steps (default 1)")
    p.add_argument("--compute-seconds", type=float, default=0.0, metavar="T",
                   help="pretend compute per step, so asynchronous saves overlap it")
    add_dedup_option(p)
    p.add_argument("--async", dest="async_save", action="store_true",
                   help="save() returns once bytes are staged; a thread writes them")
    p.add_argument("--keep-max", type=int, default=5, metavar="K",
                   help="committed steps kept (default 5; 0 keeps all)")
    p.add_argument("--prefix", default="CKP", help="file name prefix (default CKP)")
    add_max_extra_size(p)
    add_output_options(p)
    p.add_argument("--no-fsync", action="store_true",
                   help="skip fsync before commit (faster, not crash-safe)")
    p.set_defaults(run=run)


def run(args, comm):
    from ..ops.save import save_job  # on use: start-up is every rank's wall time
    with comm.step("read strategy"):
        strategy = load_strategy(args.strategy)
    if args.dry_run:
        from ..ops.save import save_plan
        return save_plan(args.out, strategy, comm, dedup=args.dedup or False, prefix=args.prefix)
    result = save_job(args.out, strategy, comm, source=args.source, steps=args.steps,
                      save_steps=args.save_steps, compute_seconds=args.compute_seconds,
                      dedup=args.dedup or False, async_save=args.async_save,
                      keep_max=args.keep_max, prefix=args.prefix, fsync=not args.no_fsync,
                      max_extra_size=args.max_extra_size)
    if comm.rank == 0 and not args.json:
        print(summary(result))
    return result


def summary(result) -> str:
    """The save-specific lines printed before the common summary line."""
    x = result.extra
    lines = []
    if x["resumed_from"]:
        lines.append(f"resumed from committed step {x['resumed_from']}")
    if x["saves"]:
        stall = x["stall_seconds"]
        lines.append(f"{x['saves']} save(s) of {format_bytes(result.bytes_written / x['saves'])}: "
                     f"stall per save median {statistics.median(stall):.3f} s, max "
                     f"{max(stall):.3f} s; save median {statistics.median(x['save_seconds']):.3f} s")
        bw = [r["write_gb_per_s"] for r in result.per_rank]
        lines.append("write GB/s per rank: " + " ".join(f"{v:.2f}" for v in bw)
                     + f"; staging {format_bytes(max(r['staging_bytes'] for r in result.per_rank))}"
                     " per rank")
    lines.append(f"latest committed step: {x['latest']}")
    if x["preempted"]:
        lines.append("preempted: step saved, stopping (exit status 75: requeue)")
    return "\n".join(lines)
