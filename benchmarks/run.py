#!/usr/bin/env python3
"""hpcckpt benchmark: workload W1, each operation timed against the `cat` floor.

    python benchmarks/run.py [--workdir /tmp/hpcckpt-bench] [--scale 1 2 4] [--reps 5]
                             [--ranks 2] [--ops merge split] [--json OUT] [--plot PNG]

W1 (per unit of --scale): 16 fp32 tensors of 4096x4096 named ``layers.{i}.w``; strategy
mesh pp2 x dp2 x tp2, even i split [tp, null], odd i [null, tp], the first half on stage
0 and the rest on stage 1 -> 1 GiB unique, 2 GiB on disk after the split (dp replicas).

See benchmarks/README.md for what is timed and how to read the table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
try:
    import hpcckpt
except ImportError:   # running from a checkout without an install
    sys.path.append(str(HERE.parent))
    import hpcckpt
from hpcckpt.layout import strategy_from_dict, write_strategy_yaml
from hpcckpt.formats.safetensors import build_header, read_header
from hpcckpt.launch import find_mpiexec as _find_mpiexec, nested_launch_env
from hpcckpt.errors import LaunchError

GiB = 1 << 30
MiB = 1 << 20
W1_TENSORS = 16
W1_SHAPE = (4096, 4096)
W1_DTYPE = "F32"
TARGET_RATIO = 1.25
TARGET_RSS_MIB = 300
RSS_WRAP = HERE / "rss_wrap.py"
MODES = ("fsync", "nofsync")   #: tool default (fsync) vs `cat && sync FILE`; --no-fsync vs `cat`


# ---- the workload ---------------------------------------------------------------------
def w1_names(scale: int) -> list[str]:
    return [f"layers.{i}.w" for i in range(W1_TENSORS * scale)]


def w1_strategy_doc(scale: int) -> dict:
    n = W1_TENSORS * scale
    tensors = {}
    for i, name in enumerate(w1_names(scale)):
        tensors[name] = {"shape": list(W1_SHAPE), "dtype": W1_DTYPE,
                         "split": ["tp", None] if i % 2 == 0 else [None, "tp"],
                         "stage": 0 if i < n // 2 else 1}
    return {"format": "hpcckpt.strategy/1", "mesh": {"pp": 2, "dp": 2, "tp": 2},
            "tensors": tensors}


def tp4_strategy_doc(scale: int) -> dict:
    return {"format": "hpcckpt.strategy/1", "mesh": {"tp": 4},
            "tensors": {name: {"shape": list(W1_SHAPE), "dtype": W1_DTYPE, "split": ["tp", None]}
                        for name in w1_names(scale)}}


def write_w1_complete(path: Path, scale: int) -> int:
    """One model.safetensors; distinct bytes per tensor (a random block XOR a per-tensor
    constant: cheap, and no two tensors share content). Returns the data bytes."""
    names = w1_names(scale)
    head, offsets = build_header([(n, W1_DTYPE, W1_SHAPE) for n in names], {"format": "pt"})
    base = np.random.default_rng(1234).integers(0, 1 << 32, math.prod(W1_SHAPE), np.uint32)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(head)
        for i, n in enumerate(names):
            assert f.tell() == offsets[n][0]
            f.write((base ^ np.uint32((i * 2654435761 + 1) & 0xFFFFFFFF)).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return offsets[names[-1]][1] - len(head)


def complete_is_valid(path: Path, scale: int) -> bool:
    try:
        h = read_header(path)
    except Exception:
        return False
    names = w1_names(scale)
    return (list(h.tensors) == names and h.file_size == h.data_start + len(names) *
            math.prod(W1_SHAPE) * 4
            and all(e.shape == W1_SHAPE and e.dtype == W1_DTYPE for e in h.tensors.values()))


# ---- running things -------------------------------------------------------------------
def find_mpiexec() -> str:
    try:
        return _find_mpiexec()
    except LaunchError as e:
        raise SystemExit(f"benchmark: {e}") from None


class BenchError(Exception):
    pass


def fsync_tree(path: Path) -> None:
    """Untimed: flush what a timed step left dirty so it does not slow the next one."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def set_cache(paths: list[Path], policy: str) -> None:
    """Untimed, before a timed run: ``warm`` reads the inputs into the page cache, ``cold``
    evicts them (posix_fadvise DONTNEED; they are clean), ``asis`` leaves the cache alone.
    Without this, whatever the kernel reclaimed in between makes some runs read the disk
    and others memory."""
    if policy == "asis":
        return
    files = []
    for p in paths:
        files += [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    buf = bytearray(16 << 20)
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            if policy == "warm":
                while os.readv(fd, [buf]) > 0:
                    pass
            else:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def prefault(nbytes: int) -> None:
    """Untimed, before a timed run: touch then free ``nbytes`` of memory.

    In a VM whose host backs guest memory lazily and takes back freed pages (balloon free
    page reporting, e.g. Firecracker or cloud VMs), the first touch of a page costs a
    host fault: writing 1 GiB into the page cache took 0.3 s or 8 s on the same machine
    depending on whether recently freed pages were at hand. Whichever run followed the
    deletion of a large file was favoured. Freeing fresh pages just before each run gives
    the tool and the floor the same start. A no-op cost on bare metal."""
    chunk = 256 << 20
    held = []
    for _ in range(0, nbytes, chunk):
        a = np.empty(chunk, np.uint8)
        a.fill(1)
        held.append(a)
    del held


def settle_disk(path: Path) -> None:
    """Untimed, just before a timed run: ``sync`` every filesystem, then wait (at most
    2 s) until the disk holding ``path`` has no request in flight. The previous run's
    outputs were deleted moments ago; ext4 commits that deletion at the next fsync and,
    mounted with ``discard``, then trims the freed extents in the background (0.14 s of
    device time per GiB here), so whichever command ran next paid for it. Settling first
    gives the tool and the floor the same start."""
    os.sync()
    dev = os.stat(path).st_dev
    inflight = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/inflight")
    time.sleep(0.05)   # trims are queued after the journal commit that sync forced
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            if sum(map(int, inflight.read_text().split())) == 0:
                return
        except (OSError, ValueError):   # not Linux, or no such block device (tmpfs, NFS)
            return
        time.sleep(0.01)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@dataclass
class Ctx:
    """Everything an operation needs for one scale."""

    args: argparse.Namespace
    scale: int
    root: Path                       #: WORKDIR/scale<S>
    mpiexec: str
    complete_dir: Path = None        #: setup: the W1 complete checkpoint (directory)
    complete_file: Path = None       #: its model.safetensors
    dist: Path = None                #: setup: the pp2dp2tp2 distributed checkpoint
    strategy: Path = None            #: pp2dp2tp2 strategy YAML
    tp4: Path = None                 #: the split target layout
    unique_bytes: int = 0
    outputs: dict[str, Path] = field(default_factory=dict)   #: op -> output of this round

    def __post_init__(self):
        self.complete_dir = self.root / "complete"
        self.complete_file = self.complete_dir / "model.safetensors"
        self.dist = self.root / "dist_pp2dp2tp2"
        self.strategy = self.root / "pp2dp2tp2.yaml"
        self.tp4 = self.root / "tp4.yaml"

    def launch(self, hpcckpt_args: list[str], rss_dir: Path) -> list[str]:
        return [self.mpiexec, "-n", str(self.args.ranks), sys.executable, str(RSS_WRAP),
                str(rss_dir)] + hpcckpt_args


# ---- the operations: a table, so more can be added (reshard, load, ...) -----------------
@dataclass(frozen=True)
class Op:
    """One timed operation.

    tool(ctx, out, fsync) -> hpcckpt arguments (``--json`` included) writing ``out``.
    floor(ctx, dst, fsync) -> shell command moving the op's unique bytes the cheapest way
    (``cat``), with the same durability policy; ``dst`` is a scratch path.
    tool_inputs(ctx) / floor_inputs(ctx) -> files or directories each one reads (warmed
    into, or evicted from, the page cache before each timed run; see --cache).
    unique(ctx) -> the bytes both must move (the "unique_GiB" column).
    """

    name: str
    what: str
    tool: Callable[[Ctx, Path, bool], list[str]]
    floor: Callable[[Ctx, Path, bool], str]
    tool_inputs: Callable[[Ctx], list[Path]]
    floor_inputs: Callable[[Ctx], list[Path]] = lambda ctx: [ctx.complete_file]
    unique: Callable[[Ctx], int] = lambda ctx: ctx.unique_bytes


def cat_floor(src: Callable[[Ctx], Path]) -> Callable[[Ctx, Path, bool], str]:
    def floor(ctx: Ctx, dst: Path, fsync: bool) -> str:
        s, d = shlex.quote(str(src(ctx))), shlex.quote(str(dst))
        return f"cat {s} > {d} && sync {d}" if fsync else f"cat {s} > {d}"
    return floor


def _nofsync(fsync: bool) -> list[str]:
    return [] if fsync else ["--no-fsync"]


def merge_tool(ctx: Ctx, out: Path, fsync: bool) -> list[str]:
    return ["merge", str(ctx.dist), str(out), "--json"] + _nofsync(fsync)


def split_input(ctx: Ctx) -> Path:
    """OUT1 (the merge output of this round) when merge ran, else the setup copy."""
    return ctx.outputs.get("merge", ctx.complete_dir)


def split_tool(ctx: Ctx, out: Path, fsync: bool) -> list[str]:
    return ["split", str(split_input(ctx)), str(out), "--strategy", str(ctx.tp4),
            "--json"] + _nofsync(fsync)


OPS: dict[str, Op] = {
    "merge": Op("merge", "hpcckpt merge DIST(pp2dp2tp2) OUT1", merge_tool,
                # the merged model's bytes: cat the setup's complete file (cat of the rank
                # files would copy the dp replicas too, 2x the bytes)
                cat_floor(lambda ctx: ctx.complete_file),
                tool_inputs=lambda ctx: [ctx.dist]),
    "split": Op("split", "hpcckpt split OUT1 OUT2 --strategy tp4.yaml", split_tool,
                cat_floor(lambda ctx: ctx.complete_file),
                tool_inputs=lambda ctx: [split_input(ctx)]),
}


# ---- setup --------------------------------------------------------------------------------
def setup(ctx: Ctx) -> None:
    ctx.root.mkdir(parents=True, exist_ok=True)
    ctx.complete_dir.mkdir(exist_ok=True)
    write_strategy_yaml(strategy_from_dict(w1_strategy_doc(ctx.scale), "W1 strategy"),
                        ctx.strategy)
    write_strategy_yaml(strategy_from_dict(tp4_strategy_doc(ctx.scale), "tp4 strategy"), ctx.tp4)
    n = W1_TENSORS * ctx.scale
    ctx.unique_bytes = n * math.prod(W1_SHAPE) * 4
    if complete_is_valid(ctx.complete_file, ctx.scale):
        print(f"  setup: reusing {ctx.complete_file}", flush=True)
    else:
        t0 = time.perf_counter()
        write_w1_complete(ctx.complete_file, ctx.scale)
        print(f"  setup: wrote {ctx.complete_file} ({n} x fp32 {W1_SHAPE[0]}x{W1_SHAPE[1]}, "
              f"{ctx.unique_bytes / GiB:.2f} GiB) in {time.perf_counter() - t0:.1f} s", flush=True)
    saved = ctx.dist / "strategy.yaml"
    if ((ctx.dist / "manifest.json").exists() and saved.exists()
            and saved.read_text() == ctx.strategy.read_text()
            and ctx.dist.stat().st_mtime >= ctx.complete_file.stat().st_mtime):
        print(f"  setup: reusing {ctx.dist}", flush=True)
        return
    remove(ctx.dist)
    cmd = [ctx.mpiexec, "-n", str(ctx.args.ranks), sys.executable, "-m", "hpcckpt", "split",
           str(ctx.complete_dir), str(ctx.dist), "--strategy", str(ctx.strategy), "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=nested_launch_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"setup split failed ({proc.returncode}): {shlex.join(cmd)}\n"
                         f"{proc.stdout}{proc.stderr}")
    fsync_tree(ctx.dist)
    stored = sum(p.stat().st_size for p in ctx.dist.glob("rank_*/*.safetensors"))
    print(f"  setup: split to {ctx.dist} ({stored / GiB:.2f} GiB on disk) in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)


# ---- measurements -------------------------------------------------------------------------
def prefault_bytes(ctx: Ctx, op: Op) -> int:
    """What a run may allocate: the bytes it writes (page cache) and the ranks' memory."""
    return op.unique(ctx) + (ctx.args.ranks + 1) * (256 << 20)


def time_floor(ctx: Ctx, op: Op, fsync: bool) -> float:
    dst = ctx.root / f"floor_{op.name}.bin"
    remove(dst)
    cmd = op.floor(ctx, dst, fsync)
    set_cache(op.floor_inputs(ctx), ctx.args.cache)
    if ctx.args.prefault:
        prefault(prefault_bytes(ctx, op))
    settle_disk(ctx.root)
    t0 = time.perf_counter()
    proc = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    remove(dst)
    if proc.returncode != 0:
        raise BenchError(f"floor failed ({proc.returncode}): {cmd}\n{proc.stderr}")
    return dt


def run_tool(cmd: list[str], rss_dir: Path, label: str, ranks: int) -> tuple[float, dict, dict]:
    """Run one launched tool command: (wall seconds, its --json summary, {rank: peak RSS MiB})."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=nested_launch_env(), capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(f"{label} failed ({proc.returncode}): {shlex.join(cmd)}\n"
                         f"{proc.stdout}{proc.stderr}")
    summary = {}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            summary = json.loads(line)
            break
    rss = {}
    for p in rss_dir.glob("rss_rank_*.txt"):
        rss[int(p.stem.rsplit("_", 1)[1])] = int(p.read_text()) / 1024   # KiB -> MiB
    remove(rss_dir)
    if len(rss) != ranks:
        print(f"    warning: peak RSS reported by {len(rss)} of {ranks} ranks", flush=True)
    return dt, summary, rss


def time_tool(ctx: Ctx, op: Op, fsync: bool) -> dict:
    out = ctx.root / f"out_{op.name}"
    remove(out)
    rss_dir = ctx.root / f"rss_{op.name}"
    remove(rss_dir)
    cmd = ctx.launch(op.tool(ctx, out, fsync), rss_dir)
    set_cache(op.tool_inputs(ctx), ctx.args.cache)
    if ctx.args.prefault:
        prefault(prefault_bytes(ctx, op))
    settle_disk(ctx.root)
    dt, summary, rss = run_tool(cmd, rss_dir, op.name, ctx.args.ranks)
    ctx.outputs[op.name] = out
    if out.exists():
        fsync_tree(out)   # untimed: --no-fsync leaves dirty pages behind
    return {"seconds": dt, "internal_seconds": summary.get("seconds"),
            "bytes_written": summary.get("bytes_written"), "bytes_read": summary.get("bytes_read"),
            "rss_mib": {str(k): round(v, 1) for k, v in sorted(rss.items())},
            "command": shlex.join(cmd)}


def time_launch(ctx: Ctx) -> float:
    """The fixed cost in every tool time: mpiexec + interpreter + imports + MPI init."""
    rss_dir = ctx.root / "rss_launch"
    cmd = ctx.launch(["inspect", str(ctx.tp4), "--json"], rss_dir)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=nested_launch_env(), capture_output=True, text=True)
    dt = time.perf_counter() - t0
    remove(rss_dir)
    if proc.returncode != 0:
        raise BenchError(f"launch probe failed: {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return dt


def run_scale(args, scale: int, mpiexec: str) -> tuple[list[dict], list[dict]]:
    ctx = Ctx(args, scale, Path(args.workdir) / f"scale{scale}", mpiexec)
    need = scale * W1_TENSORS * math.prod(W1_SHAPE) * 4 * 6.2   # complete+dist(2x)+OUT1+OUT2+floor
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    have = (sum(p.stat().st_size for p in ctx.root.rglob("*") if p.is_file())
            if ctx.root.exists() else 0)
    if free + have < need:
        raise BenchError(f"scale {scale}: needs about {need / GiB:.1f} GiB free under "
                         f"{args.workdir}, {free / GiB:.1f} GiB available")
    print(f"\n== scale {scale}: {scale * W1_TENSORS} tensors", flush=True)
    setup(ctx)
    raw: list[dict] = []
    launch_s = []
    try:
        for rep in range(args.reps):
            launch_s.append(time_launch(ctx))
            for mode in MODES:
                fsync = mode == "fsync"
                ctx.outputs.clear()
                for name in args.ops:
                    op = OPS[name]
                    # interleave, alternating which goes first to cancel drift
                    order = ("floor", "tool") if rep % 2 == 0 else ("tool", "floor")
                    rec = {"op": name, "scale": scale, "mode": mode, "rep": rep}
                    for which in order:
                        if which == "floor":
                            rec["floor_seconds"] = time_floor(ctx, op, fsync)
                        else:
                            rec.update(time_tool(ctx, op, fsync))
                    raw.append(rec)
                    rss = max(rec["rss_mib"].values(), default=float("nan"))
                    print(f"  rep {rep + 1}/{args.reps} {name:<6} {mode:<7} tool "
                          f"{rec['seconds']:6.2f} s (internal {rec['internal_seconds'] or 0:.2f})"
                          f"  floor {rec['floor_seconds']:6.2f} s  ratio "
                          f"{rec['seconds'] / rec['floor_seconds']:5.2f}  peak RSS "
                          f"{rss:6.1f} MiB", flush=True)
                for out in list(ctx.outputs.values()):   # outputs go between repetitions
                    remove(out)
                ctx.outputs.clear()
    finally:
        for out in list(ctx.outputs.values()):
            remove(out)
        if not args.keep:
            remove(ctx.root)
    rows = []
    for name in args.ops:
        for mode in MODES:
            recs = [r for r in raw if r["op"] == name and r["mode"] == mode]
            tool = statistics.median(r["seconds"] for r in recs)
            floor = statistics.median(r["floor_seconds"] for r in recs)
            internal = [r["internal_seconds"] for r in recs if r["internal_seconds"] is not None]
            rss = max((v for r in recs for v in r["rss_mib"].values()), default=float("nan"))
            ratio = tool / floor
            rows.append({"op": name, "scale": scale, "mode": mode,
                         "unique_gib": OPS[name].unique(ctx) / GiB, "reps": len(recs),
                         "tool_s": tool, "floor_s": floor, "ratio": ratio,
                         "internal_s": statistics.median(internal) if internal else None,
                         "internal_ratio": (statistics.median(internal) / floor
                                            if internal else None),
                         "launch_s": statistics.median(launch_s),
                         "tool_s_range": [min(r["seconds"] for r in recs),
                                          max(r["seconds"] for r in recs)],
                         "floor_s_range": [min(r["floor_seconds"] for r in recs),
                                           max(r["floor_seconds"] for r in recs)],
                         "peak_rss_mib": rss,
                         "ratio_ok": ratio <= TARGET_RATIO, "rss_ok": rss <= TARGET_RSS_MIB})
    return rows, raw


# ---- reporting ------------------------------------------------------------------------------
def floor_desc(mode: str) -> str:
    return "cat SRC > DST && sync DST" if mode == "fsync" else "cat SRC > DST"


def print_table(rows: list[dict]) -> None:
    head = (f"{'op':<6} {'scale':>5} {'sync':<8} {'unique_GiB':>10} {'tool_s(median)':>14} "
            f"{'floor_s(median)':>15} {'ratio':>6} {'target':>12} {'internal_s':>10} "
            f"{'int_ratio':>9} {'launch_s':>8} {'peak_rss_MiB':>12} {'target':>13}")
    print("\n" + head)
    print("-" * len(head))
    for r in rows:
        internal = f"{r['internal_s']:.2f}" if r["internal_s"] is not None else "-"
        iratio = f"{r['internal_ratio']:.2f}" if r["internal_ratio"] is not None else "-"
        print(f"{r['op']:<6} {r['scale']:>5} {r['mode']:<8} {r['unique_gib']:>10.2f} "
              f"{r['tool_s']:>14.2f} {r['floor_s']:>15.2f} {r['ratio']:>6.2f} "
              f"{'<=' + str(TARGET_RATIO) + (' ok' if r['ratio_ok'] else ' MISS'):>12} "
              f"{internal:>10} {iratio:>9} {r['launch_s']:>8.2f} {r['peak_rss_mib']:>12.1f} "
              f"{'<=' + str(TARGET_RSS_MIB) + (' ok' if r['rss_ok'] else ' MISS'):>13}")
    print("\nsync=fsync: hpcckpt default (fsyncs its outputs) vs floor `cat SRC > DST && sync DST`;"
          "\nsync=nofsync: hpcckpt --no-fsync vs floor `cat SRC > DST`."
          "\ntool_s is the wall time of the whole `mpiexec -n N ...` command (launch_s of it is"
          "\nmpiexec + Python + MPI start-up, measured with a no-op command); internal_s is the"
          "\ntool's own `seconds` (--json), int_ratio = internal_s / floor_s (start-up excluded)."
          "\nratio = tool_s / floor_s (the target applies to it); peak RSS = max over ranks and"
          "\nrepetitions of ru_maxrss.")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scales = sorted({r["scale"] for r in rows})
    series = sorted({(r["op"], r["mode"]) for r in rows}, key=lambda x: (x[0], x[1]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5),
                                   gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / max(1, len(series))
    for k, (op, mode) in enumerate(series):
        vals = [next((r["ratio"] for r in rows if r["scale"] == s and r["op"] == op
                      and r["mode"] == mode), float("nan")) for s in scales]
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(scales))]
        bars = ax1.bar(xs, vals, width, label=f"{op} ({mode})")
        ax1.bar_label(bars, fmt="%.2f", fontsize=7)
    ax1.axhline(TARGET_RATIO, color="red", linestyle="--", linewidth=1,
                label=f"target {TARGET_RATIO}x")
    ax1.axhline(1.0, color="grey", linewidth=0.8)
    ax1.set_xticks(range(len(scales)))
    ax1.set_xticklabels([f"scale {s}\n({s * W1_TENSORS} tensors, {s} GiB)" for s in scales])
    ax1.set_ylabel("tool time / cat floor (median)")
    ax1.set_title("W1: time relative to the cat floor")
    ax1.legend(fontsize=8)
    rss = [max((r["peak_rss_mib"] for r in rows if r["scale"] == s), default=float("nan"))
           for s in scales]
    bars = ax2.bar([f"scale {s}" for s in scales], rss, color="tab:green")
    ax2.bar_label(bars, fmt="%.0f", fontsize=8)
    ax2.axhline(TARGET_RSS_MIB, color="red", linestyle="--", linewidth=1,
                label=f"target {TARGET_RSS_MIB} MiB")
    ax2.set_ylabel("peak RSS per rank, MiB (max over ranks, ops)")
    ax2.set_title("peak RSS per rank by model size")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(mpiexec: str) -> dict:
    env = {"hostname": platform.node(), "python": sys.version.split()[0],
           "hpcckpt": hpcckpt.__version__, "mpiexec": mpiexec, "cpus": os.cpu_count(),
           "platform": platform.platform(), "loadavg_at_end": os.getloadavg()}
    try:
        env["mpi"] = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                                    timeout=20).stdout.strip().splitlines()[1].strip()
    except Exception:
        pass
    return env


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " See benchmarks/README.md.")
    p.add_argument("--workdir", default="/tmp/hpcckpt-bench",
                   help="scratch directory (default /tmp/hpcckpt-bench); one scale<S>/ at a time")
    p.add_argument("--scale", type=int, nargs="+", default=[1],
                   help="model size multipliers: 1 -> 16 tensors (1 GiB), 2 -> 32, 4 -> 64")
    p.add_argument("--reps", type=int, default=5, help="repetitions (medians are reported)")
    p.add_argument("--ranks", type=int, default=2, help="mpiexec -n (default 2)")
    p.add_argument("--ops", nargs="+", default=["merge", "split"], choices=list(OPS),
                   help="operations to time, in order (split reads merge's output if merge ran)")
    p.add_argument("--cache", choices=("warm", "cold", "asis"), default="warm",
                   help="page cache state of each run's inputs: warm (read just before, the "
                        "default), cold (evicted just before) or asis")
    p.add_argument("--no-prefault", dest="prefault", action="store_false",
                   help="do not touch and free fresh memory before each timed run (see "
                        "prefault() and the README; needed on VMs with lazily backed memory)")
    p.add_argument("--json", metavar="OUT", help="save the results (rows and every run) as JSON")
    p.add_argument("--plot", metavar="PNG", help="bar chart of ratio and peak RSS (matplotlib)")
    p.add_argument("--keep", action="store_true",
                   help="keep the setup files (complete + distributed checkpoint) for reuse")
    args = p.parse_args(argv)
    if args.reps < 1 or args.ranks < 1 or any(s < 1 for s in args.scale):
        p.error("--reps, --ranks and --scale must be positive")
    check_plot_option(p, args.plot)
    return args


def check_plot_option(p: argparse.ArgumentParser, plot: str | None) -> None:
    """--plot needs matplotlib: say so before minutes of setup, not after."""
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib: pip install -e '.[bench]'")


def main(argv=None) -> int:
    args = parse_args(argv)
    if shutil.which("sync") is None or shutil.which("cat") is None:
        sys.exit("benchmark: needs coreutils `cat` and `sync`")
    mpiexec = find_mpiexec()
    print(f"hpcckpt {hpcckpt.__version__} benchmark W1: ops {' '.join(args.ops)}, scales "
          f"{' '.join(map(str, args.scale))}, {args.reps} rep(s), mpiexec -n {args.ranks}, "
          f"inputs {args.cache} in the page cache, workdir {args.workdir}", flush=True)
    rows: list[dict] = []
    raw: list[dict] = []
    try:
        for scale in args.scale:
            r, w = run_scale(args, scale, mpiexec)
            rows += r
            raw += w
    except BenchError as e:
        print(f"\nbenchmark: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbenchmark: interrupted", file=sys.stderr)
        return 130
    finally:
        root = Path(args.workdir)
        if not args.keep and root.is_dir() and not any(root.iterdir()):
            root.rmdir()
    print_table(rows)
    if args.json:
        doc = {"workload": "W1", "config": {k: v for k, v in vars(args).items()},
               "targets": {"ratio": TARGET_RATIO, "peak_rss_mib": TARGET_RSS_MIB},
               "floors": {m: floor_desc(m) for m in MODES},
               "environment": environment(mpiexec), "rows": rows, "runs": raw}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nresults saved to {args.json}")
    if args.plot:
        plot(rows, args.plot)
        print(f"plot saved to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
