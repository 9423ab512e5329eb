#!/usr/bin/env python3
"""hpcckpt verify against the `cat` floor (W1), and --quick of a 1024-rank 70B manifest.

    python benchmarks/verify_bench.py [--workdir /tmp/hpcckpt-bench] [--reps 3] [--ranks 2]
                                      [--cache warm cold] [--only w1|scale]

W1 (see run.py): the pp2 x dp2 x tp2 distributed checkpoint, 2 GiB on disk (every dp
replica stored). ``verify --deep`` reads every stored byte once (the ranks dividing the
byte stream) and hashes it; the floor is ``cat`` of the same rank files to /dev/null in
the same run. ``warm``: the files are read into the page cache before each timed run;
``cold``: evicted before each run (``posix_fadvise(DONTNEED)``, the files are clean), so
both read the disk. The ratio is floor seconds / tool seconds (speed relative to the
floor; the target is >= 0.8). Peak RSS per rank comes from ``rss_wrap.py``.

Scale: plan_scale.py's 1024-rank source checkpoint of a 70B-style model (dp16 pp8 tp8,
2,892 tensors, 370,176 chunks, a 70 MiB manifest) with its rank files present as sparse
files (real headers, holes for data), timed as ``mpiexec -n N hpcckpt verify --quick``
(wall time of the whole command; target <= 2 s).
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import plan_scale  # noqa: E402
import run  # noqa: E402
from hpcckpt.launch import nested_launch_env  # noqa: E402

GiB = 1 << 30


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=nested_launch_env(), capture_output=True, text=True)
    return time.perf_counter() - t0, p


def w1(args, mpiexec: str) -> list[dict]:
    ns = argparse.Namespace(ranks=args.ranks, cache="warm", prefault=True, reps=args.reps,
                            keep=True, ops=[], workdir=args.workdir)
    ctx = run.Ctx(ns, 1, Path(args.workdir) / "scale1", mpiexec)
    run.setup(ctx)
    files = sorted(ctx.dist.glob("rank_*/*.safetensors"))
    stored = sum(f.stat().st_size for f in files)
    floor_cmd = "cat " + " ".join(shlex.quote(str(f)) for f in files) + " > /dev/null"
    rows = []
    for cache in args.cache:
        recs = []
        for rep in range(args.reps):
            rec = {}
            for which in (("floor", "tool") if rep % 2 == 0 else ("tool", "floor")):
                run.set_cache([ctx.dist], cache)
                run.settle_disk(ctx.root)
                if which == "floor":
                    rec["floor"], p = timed(["sh", "-c", floor_cmd])
                    assert p.returncode == 0, p.stderr
                else:
                    rss_dir = ctx.root / "rss_verify"
                    cmd = ctx.launch(["verify", str(ctx.dist), "--json"], rss_dir)
                    dt, summary, rss = run.run_tool(cmd, rss_dir, "verify", args.ranks)
                    assert summary.get("ok") is True, summary
                    rec.update(tool=dt, internal=summary["seconds"],
                               checked=summary["bytes_checked"], rss=max(rss.values()),
                               cmd=shlex.join(cmd))
            recs.append(rec)
            print(f"  {cache} rep {rep + 1}: verify {rec['tool']:.2f} s (internal "
                  f"{rec['internal']:.2f}), floor {rec['floor']:.2f} s, speed ratio "
                  f"{rec['floor'] / rec['tool']:.2f}, peak RSS {rec['rss']:.0f} MiB", flush=True)
        tool = statistics.median(r["tool"] for r in recs)
        floor = statistics.median(r["floor"] for r in recs)
        rows.append({"cache": cache, "stored_gib": stored / GiB, "tool_s": tool,
                     "floor_s": floor, "speed_ratio": floor / tool,
                     "internal_s": statistics.median(r["internal"] for r in recs),
                     "checked_gib": recs[0]["checked"] / GiB,
                     "peak_rss_mib": max(r["rss"] for r in recs), "reps": len(recs),
                     "command": recs[0]["cmd"]})
    return rows


def write_sparse_rank_files(strategy, root: Path) -> int:
    """Every rank file of ``strategy`` as split lays it out: real header, data a hole."""
    from hpcckpt.planning.outputs import rank_files
    total = 0
    for f in rank_files(strategy, "model", None):
        p = root / f.path
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as fh:
            fh.write(f.header)
            fh.truncate(f.size)
        total += f.size
    return total


def scale(args, mpiexec: str) -> list[dict]:
    import hpcckpt
    work = Path(args.workdir) / "verify_scale"
    src = work / "source"
    s = hpcckpt.strategy_from_dict(plan_scale.strategy_dict(plan_scale.SOURCE_MESH))
    if not (src / "manifest.json").exists():
        plan_scale.write_source_manifest(s, str(src))
        size = write_sparse_rank_files(s, src)
        print(f"  scale: {s.world_size} rank files ({size / 2**40:.1f} TiB apparent, sparse), "
              f"manifest {(src / 'manifest.json').stat().st_size / 2**20:.0f} MiB", flush=True)
    rows = []
    for n in args.scale_ranks:
        times = []
        for _ in range(args.reps):
            cmd = [mpiexec, "-n", str(n), sys.executable, "-m", "hpcckpt", "verify", str(src),
                   "--quick", "--json"]
            dt, p = timed(cmd)
            doc = json.loads(p.stdout.splitlines()[-1])
            times.append(dt)
            print(f"  scale quick -n {n}: {dt:.2f} s (internal {doc['seconds']:.2f} s), "
                  f"{len(doc['problems'])} problem(s)", flush=True)
        rows.append({"ranks": n, "seconds": statistics.median(times),
                     "problems": len(doc["problems"]), "command": shlex.join(cmd)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/hpcckpt-bench")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--scale-ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cache", nargs="+", choices=("warm", "cold"), default=["warm", "cold"])
    ap.add_argument("--only", choices=("w1", "scale"))
    ap.add_argument("--json", metavar="OUT", help="save the rows as JSON")
    args = ap.parse_args(argv)
    mpiexec = run.find_mpiexec()
    out = {}
    if args.only in (None, "w1"):
        out["w1"] = w1(args, mpiexec)
        print("\n| cache | stored GiB | verify s | floor s | speed ratio (>= 0.8) | internal s "
              "| peak RSS/rank MiB (<= 100) |\n|---|---|---|---|---|---|---|")
        for r in out["w1"]:
            print(f"| {r['cache']} | {r['stored_gib']:.2f} | {r['tool_s']:.2f} | "
                  f"{r['floor_s']:.2f} | **{r['speed_ratio']:.2f}** | {r['internal_s']:.2f} | "
                  f"{r['peak_rss_mib']:.0f} |")
    if args.only in (None, "scale"):
        out["scale"] = scale(args, mpiexec)
        print("\n| ranks | verify --quick s (<= 2) | problems |\n|---|---|---|")
        for r in out["scale"]:
            print(f"| {r['ranks']} | **{r['seconds']:.2f}** | {r['problems']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
