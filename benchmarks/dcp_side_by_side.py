#!/usr/bin/env python3
"""hpcckpt's de-duplicated training save beside PyTorch DCP's save of the same state.

    python benchmarks/dcp_side_by_side.py --torch-python /path/to/venv/bin/python
                                          [--reps 3] [--workdir /tmp/hpcckpt-bench-dcp]

Optional (issue 10): PyTorch is not a dependency of hpcckpt; give the Python of an
environment that has it (``python -m venv T && T/bin/pip install torch numpy``; this
machine has a CPU wheel of torch 2.13.0 on disk). Both tools run under the same
``mpiexec -n 4`` (hpcckpt's Hydra; the PyTorch ranks read their rank from its
environment and meet through a ``file://`` rendezvous, gloo backend, CPU).

W1's state under dp2*tp2 (benchmarks/save.py): 16 fp32 tensors of 4096x4096, even ones
split on dim 0 over tp, odd ones on dim 1, replicated over dp: 512 MiB per rank, 1 GiB
unique. Per rep and tool, two saves of the whole state, each timed inside the job (max
over ranks; fsync on for both: DCP's ``FileSystemWriter`` syncs files by default):

- hpcckpt  ``hpcckpt save --synthetic --dedup --steps 2`` (each box stored once,
           bytes per rank balanced)
- DCP      ``torch.distributed.checkpoint.save`` of ``DTensor``s placed
           ``[Replicate(), Shard(d)]`` on a ("dp", "tp") CPU device mesh, default
           planner (replicas written once) and writer

The table gives median seconds per save, bytes on disk per save and peak RSS per rank.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_TENSORS, SHAPE = 16, (4096, 4096)
MESH = {"dp": 2, "tp": 2}
MiB = 1 << 20


# ---- the PyTorch side (runs under --torch-python, one process per rank) -----------------
def dcp_worker(out: Path, rendezvous: Path, steps: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    rank, world = int(os.environ["PMI_RANK"]), int(os.environ["PMI_SIZE"])
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)
    mesh = init_device_mesh("cpu", tuple(MESH.values()), mesh_dim_names=tuple(MESH))
    tp = MESH["tp"]
    torch.manual_seed(rank)
    state = {}
    for i in range(N_TENSORS):
        dim = i % 2
        shape = list(SHAPE)
        shape[dim] //= tp
        local = torch.rand(shape, dtype=torch.float32)
        state[f"layers.{i}.w"] = DTensor.from_local(local, mesh, [Replicate(), Shard(dim)],
                                                    run_check=False)
    seconds = []
    for step in range(1, steps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        dcp.save(state, checkpoint_id=str(out / f"step_{step}"))
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        seconds.append(round(dt.item(), 6))
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024],
                       dtype=torch.float64)
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    if rank == 0:
        stored = sum(f.stat().st_size for f in (out / "step_1").iterdir() if f.is_file())
        print(json.dumps({"save_seconds": seconds, "bytes_per_save": stored,
                          "peak_rss_mib": round(rss.item()), "torch": torch.__version__}))
    dist.destroy_process_group()


# ---- the driver (runs under hpcckpt's Python) ------------------------------------------
def run_dcp(args, mpiexec: str, root: Path) -> dict:
    out, rendezvous = root / "dcp", root / "dcp.rendezvous"
    for p in (out, rendezvous):
        subprocess.run(["rm", "-rf", str(p)], check=True)
    out.mkdir(parents=True)
    cmd = [mpiexec, "-n", str(math.prod(MESH.values())), args.torch_python, __file__,
           "--dcp-worker", str(out), str(rendezvous), "--steps", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if p.returncode != 0:
        raise SystemExit(f"DCP run failed ({shlex.join(cmd)}):\n{p.stdout}{p.stderr}")
    doc = json.loads(p.stdout.strip().splitlines()[-1])
    subprocess.run(["rm", "-rf", str(out), str(rendezvous)], check=True)
    return {**doc, "command": shlex.join(cmd)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--torch-python", help="a Python with torch installed")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/hpcckpt-bench-dcp")
    ap.add_argument("--dcp-worker", nargs=2, metavar=("OUT", "RENDEZVOUS"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dcp_worker:
        dcp_worker(Path(args.dcp_worker[0]), Path(args.dcp_worker[1]), args.steps)
        return 0
    if not args.torch_python:
        ap.error("--torch-python is required")

    sys.path.insert(0, str(HERE))
    import yaml
    from run import find_mpiexec
    from save import run_save, strategy_doc
    mpiexec = find_mpiexec()
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    strategy = root / "strategy.yaml"
    strategy.write_text(yaml.safe_dump(strategy_doc(MESH), sort_keys=False))
    unique = N_TENSORS * math.prod(SHAPE) * 4
    ours, theirs = [], []
    for rep in range(args.reps):
        h = run_save(root, mpiexec, math.prod(MESH.values()), strategy,
                     ["--steps", "2", "--dedup"], unique)
        d = run_dcp(args, mpiexec, root)
        ours.append(h)
        theirs.append(d)
        print(f"  rep {rep + 1}: hpcckpt {h['summary']['save_seconds']} s, "
              f"DCP {d['save_seconds']} s", flush=True)
    rows = [("hpcckpt save --dedup", [s for h in ours for s in h["summary"]["save_seconds"]],
             ours[0]["bytes_per_save"], max(max(h["rss_mib"].values()) for h in ours),
             ours[0]["command"]),
            (f"torch {theirs[0]['torch']} dcp.save",
             [s for d in theirs for s in d["save_seconds"]], theirs[0]["bytes_per_save"],
             max(d["peak_rss_mib"] for d in theirs), theirs[0]["command"])]
    base = statistics.median(rows[0][1])
    print("\n| W1 dp2·tp2, `mpiexec -n 4` | seconds per save (median) | vs hpcckpt | "
          "bytes per save | peak RSS per rank |")
    print("|---|---:|---:|---:|---:|")
    for name, secs, nbytes, rss, _ in rows:
        med = statistics.median(secs)
        print(f"| {name} | {med:.2f} | {med / base:.2f}× | {nbytes / MiB:.0f} MiB | "
              f"{rss:.0f} MiB |")
    for name, *_, cmd in rows:
        print(f"{name}: {cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
