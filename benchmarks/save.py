#!/usr/bin/env python3
"""Training-style saves (``hpcckpt save``) of W1's state against the ``cat`` floor.

    python benchmarks/save.py [--workdir /tmp/hpcckpt-bench-save] [--reps 3]
                              [--meshes dp2tp2 pp2dp2tp2] [--json OUT] [--plot PNG]

W1: 16 fp32 tensors of 4096x4096 (``layers.{i}.w``), even ones split [tp, null], odd ones
[null, tp] (and, with a pp axis, the first half on stage 0). Under dp2*tp2 (mpiexec -n 4)
every rank holds 512 MiB: 2 GiB of slices, 1 GiB unique. Each rep runs, in this order:

- floor   ``cat SRC > DST && sync DST`` of the bytes one save writes (2 GiB full, 1 GiB
          de-duplicated), SRC in the page cache, the disk settled first
- sync    ``hpcckpt save --synthetic --steps 2`` (full, then --dedup): the time of each
          save inside the tool (max over ranks: stage, write, fsync, rename, record)
- async   ``--async --steps 3 --compute-seconds C`` (C: 1.3x the sync save): the time
          save() blocks (staging), against the sync save time

Targets (issue 10): sync <= 1.25x the floor, full and de-duplicated; de-duplicated bytes
written = unique bytes exactly, balance max/mean <= 1.05; async stall <= 15% of the sync
save; peak RSS <= state + staging + 100 MiB per rank. Medians over reps (and saves).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import (MiB, RSS_WRAP, BenchError, find_mpiexec, prefault, remove,  # noqa: E402
                 run_tool, set_cache, settle_disk)

import yaml  # noqa: E402

from hpcckpt.storage.inputs import open_input  # noqa: E402

MESHES = {"dp2tp2": {"dp": 2, "tp": 2}, "pp2dp2tp2": {"pp": 2, "dp": 2, "tp": 2}}
N_TENSORS, SHAPE = 16, (4096, 4096)
TARGET_SYNC, TARGET_STALL, TARGET_BALANCE, RSS_SLACK_MIB = 1.25, 0.15, 1.05, 100


def strategy_doc(mesh: dict) -> dict:
    tensors = {}
    for i in range(N_TENSORS):
        t = {"shape": list(SHAPE), "dtype": "F32",
             "split": ["tp", None] if i % 2 == 0 else [None, "tp"]}
        if "pp" in mesh:
            t["stage"] = 0 if i < N_TENSORS // 2 else 1
        tensors[f"layers.{i}.w"] = t
    return {"format": "hpcckpt.strategy/1", "mesh": mesh, "tensors": tensors}


def floor_seconds(root: Path, nbytes: int, prefault_bytes: int) -> float:
    src, dst = root / "floor_src.bin", root / "floor_dst.bin"
    if not src.exists() or src.stat().st_size != nbytes:
        with open(src, "wb") as f:
            block = os.urandom(64 * MiB)
            for _ in range(nbytes // len(block)):
                f.write(block)
    remove(dst)
    set_cache([src], "warm")
    prefault(prefault_bytes)
    settle_disk(root)
    t0 = time.perf_counter()
    os.system(f"cat {shlex.quote(str(src))} > {shlex.quote(str(dst))} && sync {shlex.quote(str(dst))}")
    dt = time.perf_counter() - t0
    remove(dst)
    return dt


def run_save(root: Path, mpiexec: str, ranks: int, strategy: Path, extra: list[str],
             prefault_bytes: int) -> dict:
    out = root / "checkpoint"
    remove(out)
    rss_dir = root / "rss"
    remove(rss_dir)
    cmd = [mpiexec, "-n", str(ranks), sys.executable, str(RSS_WRAP), str(rss_dir), "save",
           str(out), "--strategy", str(strategy), "--synthetic", "--keep-max", "0", "--json",
           *extra]
    prefault(prefault_bytes)
    settle_disk(root)
    wall, summary, rss = run_tool(cmd, rss_dir, "save", ranks)
    per_file: dict[str, int] = {}
    with open_input(out) as src:   # the latest committed step, as every reader sees it
        for name, t in src.source.tensors.items():
            for c in src.source.chunks(name):
                for f in c.files:
                    per_file[f] = per_file.get(f, 0) + c.box.volume * t.itemsize
        stored = [per_file.get(f, 0) for f in src.files]
    remove(out)
    return {"wall": wall, "summary": summary, "rss_mib": rss, "command": shlex.join(cmd),
            "balance": max(stored) * len(stored) / sum(stored), "bytes_per_save": sum(stored)}


def bench_mesh(args, mesh_name: str, mpiexec: str) -> dict:
    mesh = MESHES[mesh_name]
    ranks = math.prod(mesh.values())
    root = Path(args.workdir) / mesh_name
    root.mkdir(parents=True, exist_ok=True)
    strategy = root / "strategy.yaml"
    strategy.write_text(yaml.safe_dump(strategy_doc(mesh), sort_keys=False))
    unique = N_TENSORS * math.prod(SHAPE) * 4
    state_mib = unique * (2 if "dp" in mesh else 1) / ranks / MiB   # slices per rank
    rows = {}
    for label, extra, nbytes in (("full", [], unique * 2), ("dedup", ["--dedup"], unique)):
        floors, saves, walls, balance, rss, written = [], [], [], [], [], []
        for rep in range(args.reps):
            floors.append(floor_seconds(root, nbytes, nbytes))
            r = run_save(root, mpiexec, ranks, strategy, ["--steps", "2", *extra], nbytes)
            saves += r["summary"]["save_seconds"]
            walls.append(r["wall"])
            balance.append(r["balance"])
            rss.append(max(r["rss_mib"].values()))
            written.append(r["bytes_per_save"])
            print(f"  {mesh_name} {label} rep {rep}: floor {floors[-1]:.2f} s, saves "
                  f"{r['summary']['save_seconds']} s, balance {r['balance']:.3f}, "
                  f"peak RSS {rss[-1]:.0f} MiB", flush=True)
        sync_med = statistics.median(saves)
        row = {"floor_s": statistics.median(floors), "save_s": sync_med,
               "ratio": sync_med / statistics.median(floors), "balance": max(balance),
               "bytes_per_save": written[0], "bytes_exact": all(w == nbytes for w in written),
               "peak_rss_mib": max(rss), "rss_bound_mib": state_mib + RSS_SLACK_MIB,
               "command": r["command"]}
        # async: the same saves behind pretend compute
        stalls, arss = [], []
        compute = round(1.3 * sync_med, 2)
        for rep in range(args.reps):
            r = run_save(root, mpiexec, ranks, strategy,
                         ["--steps", "3", "--async", "--compute-seconds", str(compute), *extra],
                         nbytes)
            stalls += r["summary"]["stall_seconds"]
            arss.append(max(r["rss_mib"].values()))
            staging = max(x["staging_bytes"] for x in r["summary"]["per_rank"]) / MiB
            print(f"  {mesh_name} {label} async rep {rep}: stall {r['summary']['stall_seconds']} s"
                  f" (compute {compute} s), staging {staging:.0f} MiB, peak RSS {arss[-1]:.0f} MiB",
                  flush=True)
        row.update(async_stall_s=statistics.median(stalls),
                   stall_fraction=statistics.median(stalls) / sync_med,
                   async_peak_rss_mib=max(arss), staging_mib=staging,
                   async_rss_bound_mib=state_mib + staging + RSS_SLACK_MIB,
                   async_command=r["command"])
        rows[label] = row
    return {"mesh": mesh_name, "ranks": ranks, "unique_bytes": unique, "rows": rows}


def print_table(results: list[dict]) -> None:
    print("\n| mesh | mode | floor s | sync save s | ratio (<= 1.25) | bytes/save | balance (<= 1.05)"
          " | async stall s | stall/sync (<= 0.15) | peak RSS MiB sync / async (bound) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for res in results:
        for label, r in res["rows"].items():
            print(f"| {res['mesh']} (-n {res['ranks']}) | {label} | {r['floor_s']:.2f} | "
                  f"{r['save_s']:.2f} | **{r['ratio']:.2f}** | {r['bytes_per_save'] / MiB:.0f} MiB"
                  f"{' (= unique)' if label == 'dedup' and r['bytes_exact'] else ''} | "
                  f"{r['balance']:.3f} | {r['async_stall_s']:.3f} | **{r['stall_fraction']:.3f}** | "
                  f"{r['peak_rss_mib']:.0f} ({r['rss_bound_mib']:.0f}) / "
                  f"{r['async_peak_rss_mib']:.0f} ({r['async_rss_bound_mib']:.0f}) |")


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels, floor, sync, stall = [], [], [], []
    for res in results:
        for label, r in res["rows"].items():
            labels.append(f"{res['mesh']}\n{label}")
            floor.append(r["floor_s"])
            sync.append(r["save_s"])
            stall.append(r["async_stall_s"])
    x = range(len(labels))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    w = 0.27
    ax.bar([i - w for i in x], floor, w, label="floor (cat + sync)")
    ax.bar(list(x), sync, w, label="sync save")
    ax.bar([i + w for i in x], stall, w, label="async: save() blocks")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("seconds per save")
    ax.set_title("W1 training saves (medians)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/hpcckpt-bench-save")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--meshes", nargs="+", default=["dp2tp2"], choices=sorted(MESHES))
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write a bar chart (PNG) here")
    args = p.parse_args(argv)
    mpiexec = find_mpiexec()
    results = []
    try:
        for m in args.meshes:
            results.append(bench_mesh(args, m, mpiexec))
    except BenchError as e:
        print(f"benchmark: {e}", file=sys.stderr)
        return 1
    finally:
        for m in args.meshes:
            remove(Path(args.workdir) / m / "floor_src.bin")
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
