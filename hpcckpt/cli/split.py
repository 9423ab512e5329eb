"""hpcckpt split COMPLETE OUT --strategy S [--dedup [balanced|whole]] [--prefix P]"""
from __future__ import annotations

from ..layout.loader import load_strategy
from .common import add_dedup_option, add_max_extra_size, add_run_options, copy_options, examples

HELP = "complete weights -> distributed checkpoint under a strategy"
EXAMPLES = examples("""
hpcckpt split hf_model/ dist/ --strategy strategy.yaml
mpiexec -n 8 hpcckpt split model.safetensors dist/ --strategy s.yaml --dedup --prefix llama
""")


def register(sub) -> None:
    p = sub.add_parser("split", help=HELP, description=HELP, epilog=EXAMPLES,
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("complete", help="HF directory (with index), model.safetensors, or a file")
    p.add_argument("out", help="output directory")
    p.add_argument("--strategy", required=True, help="strategy YAML")
    add_dedup_option(p)
    p.add_argument("--prefix", default="model", help="file name prefix (default: model)")
    add_max_extra_size(p)
    add_run_options(p)
    p.set_defaults(run=run)


def run(args, comm):
    from ..ops.split import split  # on use: start-up is every rank's wall time
    with comm.step("read strategy"):
        strategy = load_strategy(args.strategy, shapes_from=args.complete)
    return split(args.complete, args.out, strategy, dedup=args.dedup or False, prefix=args.prefix,
                 comm=comm, options=copy_options(args), max_extra_size=args.max_extra_size)
