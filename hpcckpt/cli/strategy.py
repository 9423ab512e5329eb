"""hpcckpt strategy show S [--tensor NAME]"""
from __future__ import annotations

import argparse
import json

from ..layout.loader import load_strategy
from ..layout.yaml_io import strategy_to_yaml
from ..ops.inspect import describe_strategy
from ..units import format_bytes
from .common import add_output_options, examples

HELP = "show a strategy: every rank's boxes for a tensor, or a summary"
EXAMPLES = examples("""
hpcckpt strategy show strategy.yaml
hpcckpt strategy show strategy.yaml --tensor model.layers.0.mlp.down_proj.weight
hpcckpt strategy show strategy.yaml --yaml      # normalised YAML
""")


def register(sub) -> None:
    p = sub.add_parser("strategy", help="work with strategies",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    ssub = p.add_subparsers(dest="strategy_cmd", required=True)
    show = ssub.add_parser("show", help=HELP, description=HELP, epilog=EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("strategy")
    show.add_argument("--tensor", help="print every rank's box of this tensor")
    show.add_argument("--yaml", action="store_true", help="print the normalised YAML")
    add_output_options(show, reads_only=True)
    show.set_defaults(run=run_show)


def run_show(args, comm):
    with comm.step("strategy show"):
        s = load_strategy(args.strategy)
        if args.tensor is not None and args.tensor not in s:
            from ..errors import UsageError
            raise UsageError(f"{args.strategy}: no tensor {args.tensor!r}")
    if comm.rank != 0:
        return None
    if args.yaml:
        print(strategy_to_yaml(s), end="")
    elif args.tensor is not None:
        t = s.spec(args.tensor)
        rows = [{"rank": r, "box": None if (b := s.box_of(t.name, r)) is None else b.to_dict()}
                for r in range(s.world_size)]
        if args.json:
            print(json.dumps({"tensor": t.name, "shape": list(t.shape), "dtype": t.dtype,
                              "ranks": rows}))
        else:
            print(f"{t.name}: {t.dtype} {list(t.shape)} on mesh {s.mesh}")
            for r in range(s.world_size):
                b = s.box_of(t.name, r)
                coords = " ".join(f"{k}={v}" for k, v in s.mesh.coords(r).items())
                if b is None:
                    print(f"  rank {r:>4} ({coords}): -")
                else:
                    print(f"  rank {r:>4} ({coords}): {b}  {format_bytes(b.volume * t.itemsize)}"
                          f"  replicas {list(s.replicas(t.name, r))}")
    else:
        info = describe_strategy(s)
        if args.json:
            print(json.dumps(info))
        else:
            print(f"mesh {s.mesh} = {s.world_size} ranks, {len(s.tensors)} tensors, "
                  f"{format_bytes(info['unique_bytes'])} unique, "
                  f"{format_bytes(info['rank_bytes_min'])}..{format_bytes(info['rank_bytes_max'])} "
                  "per rank")
    return None
