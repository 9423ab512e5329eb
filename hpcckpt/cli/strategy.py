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
    register_mindspore(ssub)


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


# ---- MindSpore strategy files: strategy merge / strategy convert ----------------------
MERGE_HELP = "merge per-stage MindSpore strategy files into one (merge_pipeline_strategys)"
CONVERT_HELP = "convert a strategy: MindSpore -> hpcckpt YAML, or YAML -> MindSpore .ckpt/.json"
MS_EXAMPLES = examples("""
hpcckpt strategy merge strategy_dir/ merged.ckpt       # stages renamed "{stage}-{name}"
hpcckpt strategy convert merged.ckpt s.yaml --shapes-from output/checkpoint
hpcckpt strategy convert s.yaml strategy.ckpt           # protobuf MindSpore reads (.json: JSON)
""")


def register_mindspore(ssub) -> None:
    merge = ssub.add_parser("merge", help=MERGE_HELP, description=MERGE_HELP,
                            epilog=MS_EXAMPLES,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    merge.add_argument("dir", help="directory of per-stage .ckpt (or .json) strategy files")
    merge.add_argument("out", help="merged strategy file to write")
    add_output_options(merge)
    merge.set_defaults(run=run_merge)
    conv = ssub.add_parser("convert", help=CONVERT_HELP, description=CONVERT_HELP,
                           epilog=MS_EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    conv.add_argument("src", help="MindSpore strategy file or directory, or hpcckpt YAML")
    conv.add_argument("out", help="output: .yaml/.yml, or MindSpore .ckpt (protobuf) / .json")
    conv.add_argument("--shapes-from", metavar="CKPT",
                      help="checkpoint giving tensor shapes and dtypes (MindSpore input)")
    conv.add_argument("--file-suffix", metavar="SUF",
                      help="with a MindSpore-written --shapes-from, the step to read")
    add_output_options(conv)
    conv.set_defaults(run=run_convert)


def run_merge(args, comm):
    from ..layout.mindspore import merge_stage_files
    with comm.step("strategy merge"):
        files = (merge_stage_files(args.dir, args.out, dry_run=args.dry_run)
                 if comm.rank == 0 else [])
    if comm.rank == 0:
        info = {"op": "strategy merge", "output": args.out, "dry_run": args.dry_run,
                "stages": [{"stage": f.stage, "file": f.path, "parameters": len(f.layouts)}
                           for f in files]}
        if args.json:
            print(json.dumps(info))
        else:
            print(f"strategy merge{' (dry run, nothing written)' if args.dry_run else ''}: "
                  f"{len(files)} stage(s) -> {args.out} "
                  f"({sum(len(f.layouts) for f in files)} parameter layouts)")
    return None


def run_convert(args, comm):
    from pathlib import Path

    from ..errors import UsageError
    from ..layout.mindspore import strategy_to_ms
    from ..storage.atomic import atomic_write_bytes
    out = Path(args.out)
    with comm.step("strategy convert"):
        if out.suffix not in (".yaml", ".yml", ".ckpt", ".json"):
            raise UsageError(f"{out}: output must end in .yaml/.yml (hpcckpt) or .ckpt/.json "
                             "(MindSpore)")
        s = load_strategy(args.src, shapes_from=args.shapes_from, file_suffix=args.file_suffix)
        if comm.rank == 0:
            if out.suffix in (".yaml", ".yml"):
                data = strategy_to_yaml(s).encode()
            else:
                data = strategy_to_ms(s, "json" if out.suffix == ".json" else "protobuf")
            if not args.dry_run:
                atomic_write_bytes(out, data)
    if comm.rank == 0:
        info = {"op": "strategy convert", "output": str(out), "dry_run": args.dry_run,
                "tensors": len(s.tensors),
                "mesh": s.mesh.to_dict()}
        print(json.dumps(info) if args.json else
              f"strategy convert{' (dry run, nothing written)' if args.dry_run else ''}: "
              f"{len(s.tensors)} tensors on mesh {s.mesh} -> {out}")
    return None
