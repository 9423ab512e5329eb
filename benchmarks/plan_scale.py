"""Planning at scale: one rank's part of a 1024 -> 1024 reshard of a 70B-style layout.

    python benchmarks/plan_scale.py [--ranks 0 511 1023] [--workdir DIR] [--with-manifest]

Writes the two strategies, then for each transport (shared filesystem, node-local) and
for load, runs ``hpcckpt ... --dry-run --simulate-world 1024 --simulate-rank R`` as its
own process (no MPI, no checkpoint on disk: the source is what split writes for the
source strategy) and reports that rank's planning time and the process's peak RSS,
next to the RSS of a process that only parses the two strategies.

``--with-manifest`` also writes the source checkpoint's manifest.json and strategy.yaml
(no data files; 370,176 stored chunks: 4 MiB in manifest format 2, 70 MiB in format 1)
and plans against them, as a real job does: the planning time then includes reading
the manifest. It also times what a real writer of a shared-filesystem reshard adds,
laying out every destination file. "plan CPU s" is the process's CPU time beyond a
process that only imports hpcckpt and parses both strategies: on a shared machine the
wall time swings with other processes' load, CPU time much less.

Llama-2-70B shapes: hidden 8192, MLP 28672, 64 query heads and 8 KV heads of 128,
vocabulary 32000, 80 layers. Every parameter (bf16) has three fp32 optimizer states
(master copy, Adam's exp_avg and exp_avg_sq), so 723 parameters become 2,892 tensors.

Source: dp16 x pp8 x tp8, optimizer states ZeRO-split over dp, layers 10 per stage.
Destination: pp16 x tp4 x dp16 (another mesh order, 5 layers per stage), ZeRO over dp.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HIDDEN, MLP, KV, VOCAB, LAYERS = 8192, 28672, 1024, 32000, 80
STATES = ("master", "exp_avg", "exp_avg_sq")


def parameters() -> list[tuple[str, list[int], int | None, str | None, int]]:
    """(name, shape, layer or None, tp-split kind, split dim) for every parameter."""
    out = [("model.embed_tokens.weight", [VOCAB, HIDDEN], None, "tp", 0)]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", [HIDDEN, HIDDEN], i, "tp", 0),
                (p + "self_attn.k_proj.weight", [KV, HIDDEN], i, "tp", 0),
                (p + "self_attn.v_proj.weight", [KV, HIDDEN], i, "tp", 0),
                (p + "self_attn.o_proj.weight", [HIDDEN, HIDDEN], i, "tp", 1),
                (p + "mlp.gate_proj.weight", [MLP, HIDDEN], i, "tp", 0),
                (p + "mlp.up_proj.weight", [MLP, HIDDEN], i, "tp", 0),
                (p + "mlp.down_proj.weight", [HIDDEN, MLP], i, "tp", 1),
                (p + "input_layernorm.weight", [HIDDEN], i, None, 0),
                (p + "post_attention_layernorm.weight", [HIDDEN], i, None, 0)]
    out += [("model.norm.weight", [HIDDEN], LAYERS - 1, None, 0),
            ("lm_head.weight", [VOCAB, HIDDEN], LAYERS - 1, "tp", 0)]
    return out


def strategy_dict(mesh: dict[str, int]) -> dict:
    pp = mesh.get("pp", 1)
    per_stage = -(-LAYERS // pp)
    tensors = {}
    for name, shape, layer, kind, dim in parameters():
        split = [None] * len(shape)
        if kind:
            split[dim] = "tp"
        stage = 0 if layer is None else layer // per_stage
        base = {"shape": shape, "split": split, "stage": stage}
        tensors[name] = {**base, "dtype": "BF16"}
        for s in STATES:
            tensors[f"optimizer.{s}.{name}"] = {**base, "dtype": "F32", "zero": "dp"}
    return {"format": "hpcckpt.strategy/1", "mesh": mesh, "tensors": tensors}


#: the child's own peak RSS in KiB: VmHWM belongs to the process image, while ru_maxrss
#: survives exec and would report this (parent) process's peak, e.g. while it wrote the
#: 70 MiB manifest
PEAK_RSS_KIB = ("next((int(l.split()[1]) for l in open('/proc/self/status') if "
                "l.startswith('VmHWM')), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")

#: the child's user + system CPU seconds: on a shared machine wall time swings with the
#: load of other processes, CPU time much less
CPU_SECONDS = "sum(resource.getrusage(resource.RUSAGE_SELF)[:2])"

SOURCE_MESH = {"dp": 16, "pp": 8, "tp": 8}
DEST_MESH = {"pp": 16, "tp": 4, "dp": 16}


def write_source_manifest(strategy, root: str) -> str:
    """What split writes for ``strategy``, minus the data files."""
    from pathlib import Path

    from hpcckpt.ops.common import build_manifest
    from hpcckpt.planning.outputs import rank_files
    from hpcckpt.storage.atomic import atomic_write_bytes, atomic_write_json
    from hpcckpt.layout.yaml_io import strategy_file_bytes
    os.makedirs(root, exist_ok=True)
    files = rank_files(strategy, "model", None)
    sums = {(fi, ei): "xxh3_64:0000000000000000" for fi, f in enumerate(files)
            for ei in range(len(f.entries))}
    atomic_write_bytes(Path(root) / "strategy.yaml", strategy_file_bytes(strategy))
    atomic_write_json(Path(root) / "manifest.json",
                      build_manifest(strategy, files, sums, False, "model").to_dict(), False)
    return root


def time_layout(strategy) -> float:
    import time

    from hpcckpt.planning.outputs import rank_files
    t0 = time.perf_counter()
    rank_files(strategy, "model", None)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[0, 511, 1023])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--with-manifest", action="store_true",
                    help="plan against a written manifest.json (see above)")
    args = ap.parse_args(argv)
    import hpcckpt
    from hpcckpt.layout.yaml_io import write_strategy_yaml
    work = args.workdir or tempfile.mkdtemp(prefix="hpcckpt-plan-scale.")
    os.makedirs(work, exist_ok=True)
    src, dst = os.path.join(work, "src.yaml"), os.path.join(work, "dst.yaml")
    s_src = hpcckpt.strategy_from_dict(strategy_dict(SOURCE_MESH))
    s_dst = hpcckpt.strategy_from_dict(strategy_dict(DEST_MESH))
    write_strategy_yaml(s_src, src)
    write_strategy_yaml(s_dst, dst)
    print(f"source {s_src.mesh}, destination {s_dst.mesh}: {len(s_src.tensors)} tensors, "
          f"{s_src.unique_bytes / 2**30:.0f} GiB unique, {s_src.world_size} ranks")
    missing = os.path.join(work, "not-on-this-machine")
    if args.with_manifest:
        missing = write_source_manifest(s_src, os.path.join(work, "source"))
        print(f"source manifest: {os.path.getsize(os.path.join(missing, 'manifest.json')) / 2**20:.0f}"
              f" MiB; laying out every destination file (a real shared-fs writer): "
              f"{time_layout(s_dst):.1f} s")
    modes = {"reshard shared-fs": ["reshard", missing, os.path.join(work, "out"), "--strategy",
                                   dst, "--src-strategy", src],
             "reshard node-local": ["reshard", missing, os.path.join(work, "out"), "--strategy",
                                    dst, "--src-strategy", src, "--node-local"],
             "load": ["load", missing, "--strategy", dst, "--src-strategy", src]}
    # baseline: a process that imports hpcckpt and parses both strategies
    code = ("import resource, hpcckpt; [hpcckpt.load_strategy(p) for p in %r]; "
            "print(%s, %s)" % ([src, dst], PEAK_RSS_KIB, CPU_SECONDS))
    base, base_cpu = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                    text=True).stdout.split()
    base, base_cpu = int(base) / 1024, float(base_cpu)
    print(f"baseline (import + parse both strategies): peak RSS {base:.0f} MiB, "
          f"CPU {base_cpu:.2f} s\n")
    print("| mode | rank | plan s | plan CPU s | peak RSS MiB | read | sent | received "
          "| files opened |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, cmd in modes.items():
        times = []
        for r in args.ranks:
            code = ("import resource, sys, runpy; sys.argv = ['hpcckpt'] + %r; "
                    "from hpcckpt.cli.main import main; rc = main(sys.argv[1:]); "
                    "print('RSS', %s, %s)"
                    % (cmd + ["--dry-run", "--json", "--simulate-world", "1024",
                              "--simulate-rank", str(r)], PEAK_RSS_KIB, CPU_SECONDS))
            out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                 text=True).stdout.splitlines()
            res = json.loads(out[0])
            rss = int(out[1].split()[1]) / 1024
            cpu = float(out[1].split()[2]) - base_cpu   # the process's CPU beyond the baseline
            row = res["per_rank"][0]
            times.append(row["plan_seconds"])
            print(f"| {mode} | {r} | {row['plan_seconds']:.2f} | {cpu:.2f} | {rss:.0f} | "
                  f"{row['bytes_read'] / 2**30:.2f} GiB | {row.get('bytes_sent', 0) / 2**30:.2f} GiB"
                  f" | {row.get('bytes_received', 0) / 2**30:.2f} GiB | {row['source_files']} |")
        print(f"<!-- {mode}: median plan {statistics.median(times):.2f} s -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
