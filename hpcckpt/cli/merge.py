"""hpcckpt merge DIST OUT [--strategy S] [--max-shard-size 5GB] ..."""
from __future__ import annotations

import argparse

from ..layout.loader import load_strategy
from .common import (add_max_extra_size, add_run_options, add_step_option, at_step,
                     copy_options, examples, size_type)

HELP = "distributed checkpoint -> complete weights (HF or MindSpore layout)"
EXAMPLES = examples("""
hpcckpt merge dist/ hf_out/ --max-shard-size 5GB
hpcckpt merge dist/ hf_out/ --hf-files original_model/   # config, tokenizer from there
mpiexec -n 4 hpcckpt merge dist/ ms_out/ --layout ms --exclude-prefix adam_m. --exclude-prefix adam_v.
""")


def register(sub) -> None:
    p = sub.add_parser("merge", help=HELP, description=HELP, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dist", help="distributed checkpoint directory")
    p.add_argument("out", help="output directory")
    p.add_argument("--strategy", help="strategy (needed when DIST has no manifest.json)")
    p.add_argument("--max-shard-size", type=size_type(), default=None,
                   help="largest shard (default 5GB; --layout ms: 3GiB, as MindSpore)")
    p.add_argument("--exclude-prefix", action="append", default=[], metavar="P",
                   help="leave out tensors whose name starts with P (repeatable)")
    p.add_argument("--file-suffix", default="", metavar="SUF",
                   help="a MindSpore-written DIST (no manifest): the step to merge, by "
                        "MindSpore's rules ('1_100' = epoch 1 step 100); otherwise: insert "
                        "_SUF before .safetensors in shard names")
    add_step_option(p)
    p.add_argument("--layout", choices=("hf", "ms"), default="hf")
    p.add_argument("--hf-files", metavar="DIR",
                   help="write back the non-weight files (config, tokenizer, ...) of the model "
                        "directory DIR instead of those DIST carries")
    add_max_extra_size(p)
    add_run_options(p)
    p.set_defaults(run=run)


def run(args, comm):
    from ..ops.merge import merge  # on use: start-up is every rank's wall time
    dist = at_step(comm, args.dist, args.step)
    strategy = None
    if args.strategy:
        with comm.step("read strategy"):
            strategy = load_strategy(args.strategy, shapes_from=dist,
                                     file_suffix=args.file_suffix or None)
    return merge(dist, args.out, strategy=strategy, max_shard_size=args.max_shard_size,
                 exclude_prefixes=tuple(args.exclude_prefix), file_suffix=args.file_suffix,
                 layout=args.layout, comm=comm, options=copy_options(args),
                 hf_files_dir=args.hf_files, max_extra_size=args.max_extra_size)
