"""hpcckpt load PATH --strategy S [--against REF]"""
from __future__ import annotations

import argparse

from ..comm.rounds import DEFAULT_LOAD_BUDGET
from ..errors import UsageError
from ..layout.loader import load_strategy
from .common import add_exchange_options, add_step_option, at_step, add_run_options, add_simulate_options, examples

HELP = "load this job's slices under a strategy from any checkpoint; report traffic per rank"
EXAMPLES = examples("""
mpiexec -n 8 hpcckpt load dist/ --strategy dp2_tp4.yaml
mpiexec -n 8 hpcckpt load hf_model/ --strategy dp2_tp4.yaml --against dist/ --json
""")


def register(sub) -> None:
    p = sub.add_parser("load", help=HELP, description=HELP + ". Each unique byte is read from "
                       "disk once, by one rank holding it; its replicas receive it over MPI.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="any checkpoint: complete weights or distributed (full or "
                                "de-duplicated, any strategy)")
    p.add_argument("--strategy", required=True, help="the layout to load into (world size = job)")
    p.add_argument("--src-strategy", help="source strategy (when PATH has no manifest.json)")
    add_step_option(p)
    p.add_argument("--against", metavar="REF",
                   help="compare every loaded byte with checkpoint REF; differences are an error")
    add_run_options(p, writes=False)
    add_exchange_options(p, DEFAULT_LOAD_BUDGET)
    add_simulate_options(p)
    p.set_defaults(run=run)


def run(args, comm):
    from ..ops.load import load_job  # on use: start-up is every rank's wall time
    with comm.step("read strategy"):
        # a MindSpore strategy takes its tensor shapes from the checkpoint
        # (the destination's from the source strategy, when given)
        src = load_strategy(args.src_strategy, shapes_from=args.path) if args.src_strategy else None
        strategy = load_strategy(args.strategy, shapes_from=src or args.path)
    if args.dry_run and strategy.world_size != comm.size:  # the same verdict on every rank
        n = strategy.world_size
        raise UsageError(f"{args.strategy}: strategy has {n} ranks but the job has {comm.size}; "
                         f"launch with mpiexec -n {n}, or plan one of its ranks in this "
                         f"process with --dry-run --simulate-world {n} --simulate-rank R")
    path = at_step(comm, args.path, args.step)
    return load_job(path, strategy, comm, against=args.against, src_strategy=src,
                    dry_run=args.dry_run, buffer_size=args.buffer_size,
                    budget=args.exchange_budget, max_message=args.max_message)
