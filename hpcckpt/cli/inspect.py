"""hpcckpt inspect PATH"""
from __future__ import annotations

import argparse
import json

from ..layout.loader import load_strategy
from ..units import format_bytes
from .common import add_output_options, add_step_option, at_step, examples

HELP = "describe a checkpoint (any kind) or a strategy"
EXAMPLES = examples("""
hpcckpt inspect dist/
hpcckpt inspect model.safetensors --tensors
hpcckpt inspect strategy.yaml --json
""")


def register(sub) -> None:
    p = sub.add_parser("inspect", help=HELP, description=HELP, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path")
    p.add_argument("--strategy", help="strategy for a distributed checkpoint without manifest")
    add_step_option(p)
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    add_output_options(p, reads_only=True)
    p.set_defaults(run=run)


def run(args, comm):
    from ..ops.inspect import describe_path  # on use: start-up is every rank's wall time
    path = at_step(comm, args.path, args.step)
    with comm.step("inspect"):
        strategy = load_strategy(args.strategy, shapes_from=path) if args.strategy else None
        info = describe_path(path, strategy, args.tensors) if comm.rank == 0 else None
    if comm.rank == 0:
        print(json.dumps(info) if args.json else render(info))
    # exit status 1 on every rank when the checkpoint is not complete (its report says why)
    if comm.bcast(comm.rank == 0 and info.get("complete") is False):
        raise SystemExit(1)
    return None


def render(info: dict) -> str:
    lines = []
    for k, v in info.items():
        if k == "tensor_list":
            continue
        if isinstance(v, int) and not isinstance(v, bool) and "bytes" in k:
            v = f"{format_bytes(v)} ({v} bytes)"
        lines.append(f"{k:>18}: {v}")
    for t in info.get("tensor_list", ()):
        lines.append(f"  {t['name']}  {t['dtype']} {t['shape']}  chunks={t['chunks']}")
    return "\n".join(lines)
