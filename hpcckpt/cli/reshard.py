"""hpcckpt reshard DIST OUT --strategy DST [--src-strategy SRC] [--dedup [balanced|whole]] [--node-local]"""
from __future__ import annotations

import argparse

from ..layout.loader import load_strategy
from .common import (add_dedup_option, add_exchange_options, add_run_options, add_simulate_options,
                     add_step_option, at_step, copy_options, examples)

HELP = "distributed checkpoint -> distributed checkpoint under another strategy"
EXAMPLES = examples("""
mpiexec -n 8 hpcckpt reshard dist/ dist_tp4/ --strategy tp4.yaml
mpiexec -n 4 hpcckpt reshard '/local/node{rank}/ckpt' '/local/node{rank}/out' --strategy s.yaml --node-local
hpcckpt reshard dist/ out/ --strategy dst.yaml --src-strategy src.yaml --dry-run --simulate-world 1024 --simulate-rank 17
""")


def register(sub) -> None:
    p = sub.add_parser("reshard", help=HELP, description=HELP, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dist", help="distributed checkpoint directory ({rank} = this rank, node-local)")
    p.add_argument("out", help="output directory ({rank} = this rank, node-local)")
    p.add_argument("--strategy", required=True, help="destination strategy")
    p.add_argument("--src-strategy", help="source strategy (when DIST has no manifest.json)")
    add_dedup_option(p)
    add_step_option(p)
    p.add_argument("--prefix", default=None, help="file name prefix (default: the source's)")
    p.add_argument("--node-local", action="store_true",
                   help="no shared filesystem: ranks open only their own rank directories; "
                        "slices travel over MPI")
    add_run_options(p)
    add_exchange_options(p)
    add_simulate_options(p)
    p.set_defaults(run=run)


def run(args, comm):
    from ..ops.reshard import reshard  # on use: start-up is every rank's wall time
    with comm.step("read strategy"):
        # a MindSpore strategy takes its tensor shapes from the source checkpoint
        # (the destination's from the source strategy, when given: a MindSpore-written
        # checkpoint's slices are the source layout's)
        dist = at_step(comm, args.dist, args.step).format(rank=comm.rank)
        src = (load_strategy(args.src_strategy.format(rank=comm.rank), shapes_from=dist)
               if args.src_strategy else None)
        dst = load_strategy(args.strategy.format(rank=comm.rank), shapes_from=src or dist)
    extra = {}
    if args.node_local:
        extra = {"budget": args.exchange_budget, "max_message": args.max_message}
    return reshard(dist, args.out, dst, src_strategy=src, dedup=args.dedup or False,
                   prefix=args.prefix, node_local=args.node_local, comm=comm,
                   options=copy_options(args), **extra)
