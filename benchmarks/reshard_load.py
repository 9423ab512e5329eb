#!/usr/bin/env python3
"""hpcckpt benchmark (issue 3): reshard and load of workload W1 over MPI, against `cat`.

    python benchmarks/reshard_load.py [--scale 1] [--reps 3] [--workdir DIR]
                                      [--only reshard|load] [--modes fsync nofsync]
                                      [--check] [--json OUT] [--plot PNG] [--keep]

Setup (untimed, shared with benchmarks/run.py): W1 complete (1 GiB per unit of --scale),
split to DIST under pp2 x dp2 x tp2 (2 GiB on disk), tp4.yaml (every tensor [tp, null]
over tp 4). Then --reps times, each case interleaved with its `cat` floor:

  reshard shared-fs   mpiexec -n 2 hpcckpt reshard DIST OUT --strategy tp4.yaml --json
  reshard node-local  mpiexec -n 2 hpcckpt reshard 'W/node{rank}/ckpt' 'W/node{rank}/out'
                          --strategy tp4.yaml --node-local --json
                      (node{j}/ckpt holds rank_<r> for r % 2 == j, manifest.json,
                      strategy.yaml: job rank j can only see its own directories)
  load dp2 / tp2      mpiexec -n 2 hpcckpt load DIST --strategy {dp2,tp2}.yaml --json
                      (until the `load` CLI exists: this file's API driver, same output)

Floors: reshard writes the unique bytes once (tp4 has no replicas): `cat complete >
DST && sync DST` (fsync) or `cat complete > DST` (nofsync), as in run.py. load only
reads, into memory it keeps: N processes (N = --ranks, started together) each read
their 1/N share of the complete file's bytes with one `preadv` into one fresh buffer
(benchmarks/read_floor.py; Python start-up included, as the tool's is).

Checked every run (not only with --check): MPI bytes sent by node-local reshard ==
the bytes whose owner changes (computed here from the two strategies and the placement
rule); bytes read summed over ranks == unique bytes (load, and shared-fs reshard); bytes
sent by load == (replicas - 1) x box bytes. --check also verifies, untimed, that both
reshard outputs and the loaded slices are bit-exact against the complete file.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402  (benchmarks/run.py: workload, setup, floors, cache, prefault)
from run import (GiB, MiB, BenchError, Ctx, Op, W1_DTYPE, W1_SHAPE, W1_TENSORS,  # noqa: E402
                 cat_floor, find_mpiexec, fsync_tree, prefault, remove, set_cache,
                 run_tool, settle_disk, setup, time_floor, time_launch, w1_names)

import hpcckpt  # noqa: E402  (run.py has put the checkout on sys.path if needed)
from hpcckpt.layout import strategy_from_dict, write_strategy_yaml  # noqa: E402

TARGET_RATIO = 1.5            #: issue 3: reshard <= 1.5x the floor
TARGET_RSS_MIB = run.TARGET_RSS_MIB   #: 300 MiB per rank
TARGET_LOAD_RSS_MIB = 100     #: issue 9: load's peak RSS <= the slices it holds + 100 MiB
THIS = Path(__file__).resolve()
LOAD_DRIVER_FLAG = "--_load-driver"
READ_FLOOR = HERE / "read_floor.py"


# ---- strategies -----------------------------------------------------------------------
def load_strategy_docs(scale: int) -> dict[str, dict]:
    """2-rank destination layouts for load: dp2 (every tensor replicated on both ranks)
    and tp2 (every tensor [tp, null]: odd W1 tensors are stored column-split, so each
    rank gathers two column halves)."""
    names = w1_names(scale)
    spec = lambda split: {n: {"shape": list(W1_SHAPE), "dtype": W1_DTYPE, "split": split}  # noqa: E731
                          for n in names}
    return {"dp2": {"format": "hpcckpt.strategy/1", "mesh": {"dp": 2},
                    "tensors": spec([None, None])},
            "tp2": {"format": "hpcckpt.strategy/1", "mesh": {"tp": 2},
                    "tensors": spec(["tp", None])}}


def nbytes(t, box) -> int:
    return box.volume * t.itemsize


def expected_node_local_moves(src, dst, nranks: int) -> dict:
    """Bytes that must travel over MPI in a node-local reshard, from first principles.

    Placement: source rank dir r is on job rank r % nranks; destination file d is written
    by job rank d % nranks. A destination box needed on writer w (once, however many of
    its files hold it) is cut by the source boxes; a piece must move iff no source rank
    holding that source box is on w. Uses only Strategy.rank_boxes and Box.intersect.
    """
    src_boxes: dict[str, dict] = {}          # name -> {box: job ranks holding a copy}
    for r in range(src.world_size):
        for t, box in src.rank_boxes(r):
            if not box.is_empty():
                src_boxes.setdefault(t.name, {}).setdefault(box, set()).add(r % nranks)
    needs = set()                            # (name, dst box, writer job rank)
    for d in range(dst.world_size):
        for t, box in dst.rank_boxes(d):
            if not box.is_empty():
                needs.add((t.name, box, d % nranks))
    moved, local, per_writer = 0, 0, [0] * nranks
    for name, box, w in sorted(needs, key=lambda x: (x[0], x[1].offsets, x[2])):
        t = dst.spec(name)
        for sbox, holders in src_boxes[name].items():
            part = box.intersect(sbox)
            if part is None:
                continue
            n = nbytes(t, part)
            if w in holders:
                local += n
            else:
                moved += n
                per_writer[w] += n
    return {"bytes_moved": moved, "bytes_local": local, "received_per_rank": per_writer}


def expected_load_sends(strategy) -> int:
    """Load reads each distinct box once; every other rank holding it receives it."""
    holders: dict[tuple[str, object], int] = {}
    for r in range(strategy.world_size):
        for t, box in strategy.rank_boxes(r):
            holders[(t.name, box)] = holders.get((t.name, box), 0) + 1
    return sum((k - 1) * nbytes(strategy.spec(n), b) for (n, b), k in holders.items())


# ---- setup ------------------------------------------------------------------------------
@dataclass
class Setup:
    ctx: Ctx
    nodes: Path                       #: W: node{j}/ckpt, node{j}/out
    load_strategies: dict[str, Path]
    src: object = None                #: the W1 strategy (hpcckpt.Strategy)
    tp4: object = None
    expected_nl: dict = None

    def node(self, j: int) -> Path:
        return self.nodes / f"node{j}"


def make_node_local_copy(ctx: Ctx, nodes: Path, nranks: int) -> None:
    """node{j}/ckpt = rank_<r> (r % nranks == j) + manifest.json + strategy.yaml, copied
    (not linked) so each job rank has its own files, as on separate node disks."""
    stamp = nodes / "source_manifest.json"
    manifest = (ctx.dist / "manifest.json").read_text()
    if stamp.exists() and stamp.read_text() == manifest and all(
            (nodes / f"node{j}" / "ckpt" / "manifest.json").exists() for j in range(nranks)):
        print(f"  setup: reusing {nodes}", flush=True)
        return
    remove(nodes)
    t0 = time.perf_counter()
    for j in range(nranks):
        ck = nodes / f"node{j}" / "ckpt"
        ck.mkdir(parents=True)
        for f in ("manifest.json", "strategy.yaml"):
            shutil.copy2(ctx.dist / f, ck / f)
        for d in sorted(ctx.dist.glob("rank_*")):
            if int(d.name.split("_")[1]) % nranks == j:
                shutil.copytree(d, ck / d.name)
        fsync_tree(ck)
    stamp.write_text(manifest)
    size = sum(p.stat().st_size for p in nodes.rglob("*.safetensors"))
    print(f"  setup: node-local copy {nodes}/node{{0..{nranks - 1}}}/ckpt ({size / GiB:.2f} GiB) "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)


def do_setup(args, scale: int, mpiexec: str) -> Setup:
    ctx = Ctx(args, scale, Path(args.workdir) / f"scale{scale}", mpiexec)
    unique = scale * W1_TENSORS * math.prod(W1_SHAPE) * 4
    # complete 1x + dist 2x + node copies 2x + one output 1x + floor 1x (+ margin)
    need = unique * 7.5
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    have = (sum(p.stat().st_size for p in ctx.root.rglob("*") if p.is_file())
            if ctx.root.exists() else 0)
    free = shutil.disk_usage(args.workdir).free
    if free + have < need:
        raise BenchError(f"scale {scale}: needs about {need / GiB:.1f} GiB free under "
                         f"{args.workdir}, {free / GiB:.1f} GiB available")
    print(f"\n== scale {scale}: {scale * W1_TENSORS} tensors, {unique / GiB:.2f} GiB unique",
          flush=True)
    setup(ctx)   # run.py: complete W1, DIST (pp2dp2tp2) via `hpcckpt split`, tp4.yaml
    s = Setup(ctx, ctx.root / "nodes", {})
    for name, doc in load_strategy_docs(scale).items():
        p = ctx.root / f"{name}.yaml"
        write_strategy_yaml(strategy_from_dict(doc, f"{name} strategy"), p)
        s.load_strategies[name] = p
    s.src = hpcckpt.load_strategy(str(ctx.strategy))
    s.tp4 = hpcckpt.load_strategy(str(ctx.tp4))
    s.expected_nl = expected_node_local_moves(s.src, s.tp4, args.ranks)
    if "reshard" in args.only:
        make_node_local_copy(ctx, s.nodes, args.ranks)
    return s


# ---- the cases ----------------------------------------------------------------------------
def _nofsync(fsync: bool) -> list[str]:
    return [] if fsync else ["--no-fsync"]


@dataclass(frozen=True)
class Case:
    """One timed case. ``op`` is a run.Op: its floor/floor_inputs/unique are run.py's
    (time_floor is reused as is); ``argv(S, fsync)`` gives the hpcckpt arguments,
    ``launcher`` the in-process wrapper (rss_wrap.py, or this file's load driver),
    ``outputs(S)`` what to delete after a run, ``held(S, rank)`` the bytes a rank must
    keep in memory by design (load's returned slices)."""

    key: str
    label: str
    group: str
    modes: tuple[str, ...]
    op: Op
    argv: Callable[[Setup, bool], list[str]]
    inputs: Callable[[Setup], list[Path]]
    outputs: Callable[[Setup], list[Path]]
    launcher: Callable[[], Path] = lambda: run.RSS_WRAP
    strategy: Callable[[Setup], object] = lambda s: s.tp4
    held: Callable[[Setup, int], int] = lambda s, r: 0


def load_launcher(args) -> Path:
    """`hpcckpt load` when the CLI has it (--load-via auto/cli), else this file's driver of
    hpcckpt.load() (same arguments, same JSON)."""
    via = args.load_via
    if via == "auto":
        via = "cli" if cli_has_load() else "api"
    return run.RSS_WRAP if via == "cli" else THIS


def cli_has_load() -> bool:
    from hpcckpt.cli.main import build_parser
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return "load" in sub.choices


def read_floor(ctx: Ctx, dst: Path, fsync: bool) -> str:
    """N workers started together, each reading its share of the unique bytes."""
    n = ctx.args.ranks
    worker = shlex.join([sys.executable, str(READ_FLOOR), str(ctx.complete_file)])
    return " ".join(f"{worker} {i} {n} &" for i in range(n)) + " wait"


def make_cases(args) -> list[Case]:
    floor = cat_floor(lambda ctx: ctx.complete_file)
    unique = lambda ctx: ctx.unique_bytes  # noqa: E731
    cases = []
    if "reshard" in args.only:
        sfs_out = lambda s: s.ctx.root / "out_reshard_sfs"  # noqa: E731
        cases.append(Case(
            "reshard-sfs", "reshard shared-fs", "reshard", tuple(args.modes),
            Op("reshard-sfs", "hpcckpt reshard DIST OUT --strategy tp4.yaml", None, floor,
               lambda ctx: [ctx.dist], unique=unique),
            argv=lambda s, fsync: ["reshard", str(s.ctx.dist), str(sfs_out(s)), "--strategy",
                                   str(s.ctx.tp4), "--json"] + _nofsync(fsync),
            inputs=lambda s: [s.ctx.dist], outputs=lambda s: [sfs_out(s)]))
        cases.append(Case(
            "reshard-nl", "reshard node-local", "reshard", tuple(args.modes),
            Op("reshard-nl", "hpcckpt reshard node{rank}/ckpt node{rank}/out --node-local",
               None, floor, lambda ctx: [ctx.dist], unique=unique),
            argv=lambda s, fsync: ["reshard", str(s.nodes / "node{rank}" / "ckpt"),
                                   str(s.nodes / "node{rank}" / "out"), "--strategy",
                                   str(s.ctx.tp4), "--node-local", "--json"] + _nofsync(fsync),
            inputs=lambda s: [s.node(j) / "ckpt" for j in range(args.ranks)],
            outputs=lambda s: [s.node(j) / "out" for j in range(args.ranks)]))
    if "load" in args.only:
        for name in ("dp2", "tp2"):
            cases.append(Case(
                f"load-{name}", f"load {name}", "load", ("read",),
                Op(f"load-{name}", f"hpcckpt load DIST --strategy {name}.yaml", None,
                   read_floor, lambda ctx: [ctx.dist], unique=unique),
                argv=lambda s, fsync, name=name: ["load", str(s.ctx.dist), "--strategy",
                                                  str(s.load_strategies[name]), "--json"],
                inputs=lambda s: [s.ctx.dist], outputs=lambda s: [],
                launcher=lambda: load_launcher(args),
                strategy=lambda s, name=name: hpcckpt.load_strategy(str(s.load_strategies[name])),
                held=lambda s, r, name=name: hpcckpt.load_strategy(
                    str(s.load_strategies[name])).rank_bytes(r)))
    return cases


# ---- running -------------------------------------------------------------------------------
def launch_cmd(s: Setup, case: Case, fsync: bool, rss_dir: Path, extra=()) -> list[str]:
    a = s.ctx.args
    wrapper = case.launcher()
    pre = [LOAD_DRIVER_FLAG] if wrapper == THIS else []
    if a.exchange_budget and case.key != "reshard-sfs":   # MPI transports only
        extra = ["--exchange-budget", a.exchange_budget, *extra]
    return ([s.ctx.mpiexec, "-n", str(a.ranks), sys.executable, str(wrapper)] + pre
            + [str(rss_dir)] + case.argv(s, fsync) + list(extra))


def run_case(s: Setup, case: Case, fsync: bool, timed: bool = True, extra=()) -> dict:
    """Like run.time_tool, but keeps the whole --json summary (per_rank bytes sent/received)
    and supports outputs spread over node directories."""
    ctx = s.ctx
    for out in case.outputs(s):
        remove(out)
    rss_dir = ctx.root / f"rss_{case.key}"
    remove(rss_dir)
    cmd = launch_cmd(s, case, fsync, rss_dir, extra)
    if timed:
        set_cache(case.inputs(s), ctx.args.cache)
        if ctx.args.prefault:
            held = sum(case.held(s, r) for r in range(ctx.args.ranks))
            prefault(max(case.op.unique(ctx), held) + (ctx.args.ranks + 1) * (256 << 20))
        settle_disk(ctx.root)
    dt, summary, rss = run_tool(cmd, rss_dir, case.label, ctx.args.ranks)
    if timed:
        for out in case.outputs(s):
            if out.exists():
                fsync_tree(out)     # untimed: --no-fsync leaves dirty pages
    return {"seconds": dt, "internal_seconds": summary.get("seconds"), "summary": summary,
            "rss_mib": {str(k): round(v, 1) for k, v in sorted(rss.items())},
            "command": shlex.join(cmd)}


def bytes_figures(s: Setup, case: Case, summary: dict) -> dict:
    """Measured vs expected byte counts of one run."""
    per = sorted(summary.get("per_rank", []), key=lambda r: r["rank"])
    read = [r.get("bytes_read") for r in per]
    sent = [r.get("bytes_sent") for r in per]
    unique = s.ctx.unique_bytes
    f = {"read_per_rank": read, "read_total": sum(x or 0 for x in read), "unique": unique,
         "sent_per_rank": sent, "received_per_rank": [r.get("bytes_received") for r in per]}
    f["read_ok"] = f["read_total"] == unique
    if case.key == "reshard-nl":
        f["sent_total"] = summary.get("bytes_sent", sum(x or 0 for x in sent))
        f["sent_expected"] = s.expected_nl["bytes_moved"]
        f["received_expected_per_rank"] = s.expected_nl["received_per_rank"]
        f["sent_ok"] = (f["sent_total"] == f["sent_expected"]
                        and f["received_per_rank"] == f["received_expected_per_rank"])
        # node-local reads what it copies locally plus what it sends: also == unique
    elif case.key == "reshard-sfs":
        f["sent_total"] = sum(x or 0 for x in sent)      # no MPI data transfer: 0
        f["sent_expected"] = 0
        f["sent_ok"] = f["sent_total"] == 0
    else:
        f["sent_total"] = sum(x or 0 for x in sent)
        f["sent_expected"] = expected_load_sends(case.strategy(s))
        f["sent_ok"] = f["sent_total"] == f["sent_expected"]
    return f


# ---- bit-exactness (--check, untimed) -------------------------------------------------------
def _ref_slice(ref, name: str, box) -> np.ndarray:
    sl = tuple(slice(o, o + n) for o, n in zip(box.offsets, box.sizes))
    return ref.get_slice(name)[sl]


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:   # W1 bits include NaN patterns
    return (a.shape == b.shape and a.dtype == b.dtype and
            np.array_equal(np.ascontiguousarray(a).view(np.uint8),
                           np.ascontiguousarray(b).view(np.uint8)))


def verify_reshard_output(roots: list[Path], dst, complete: Path, nranks: int | None) -> dict:
    """Every destination file d exists once (under root d % nranks when node-local), holds
    exactly dst.rank_boxes(d), and each tensor's bytes equal the complete file's slice."""
    from safetensors import safe_open
    seen: dict[int, Path] = {}
    problems: list[str] = []
    checked = 0
    with safe_open(str(complete), "numpy") as ref:
        for j, root in enumerate(roots):
            if not (root / "manifest.json").exists():
                problems.append(f"{root}: no manifest.json")
            for f in sorted(root.glob("rank_*/*.safetensors")):
                d = int(f.parent.name.split("_")[1])
                if d in seen:
                    problems.append(f"rank {d} file twice: {seen[d]} and {f}")
                seen[d] = f
                if nranks is not None and d % nranks != j:
                    problems.append(f"{f}: file of rank {d} on node {j}, expected node {d % nranks}")
                want = {t.name: b for t, b in dst.rank_boxes(d)}
                with safe_open(str(f), "numpy") as g:
                    keys = set(g.keys())
                    if keys != set(want):
                        problems.append(f"{f}: tensors {sorted(keys ^ set(want))[:3]} differ")
                    for name in sorted(keys & set(want)):
                        checked += 1
                        if not _same_bytes(g.get_tensor(name), _ref_slice(ref, name, want[name])):
                            problems.append(f"{f}: {name} {want[name]} differs")
    missing = sorted(set(range(dst.world_size)) - set(seen))
    if missing:
        problems.append(f"no file for destination ranks {missing}")
    return {"tensors_checked": checked, "files": len(seen), "problems": problems,
            "ok": not problems}


def run_checks(s: Setup, cases: list[Case]) -> list[dict]:
    """Untimed: run each case once and compare its result with the complete file."""
    results = []
    for case in cases:
        t0 = time.perf_counter()
        if case.group == "reshard":
            rec = run_case(s, case, True, timed=False)
            roots = case.outputs(s)
            v = verify_reshard_output(roots, s.tp4, s.ctx.complete_file,
                                      s.ctx.args.ranks if case.key == "reshard-nl" else None)
            for out in roots:
                remove(out)
        else:
            # both the API driver and (per issue 3) `hpcckpt load` take --against REF
            rec = run_case(s, case, True, timed=False,
                           extra=["--against", str(s.ctx.complete_file)])
            # a difference is an error (non-zero exit, BenchError); the JSON says
            # identical: true and how many bytes were compared
            summ = rec["summary"]
            held = sum(case.strategy(s).rank_bytes(r) for r in range(s.ctx.args.ranks))
            v = {"ok": summ.get("identical") is True and summ.get("bytes_compared") == held,
                 "against": summ.get("against"), "bytes_compared": summ.get("bytes_compared")}
        v["case"] = case.label
        v["bytes"] = bytes_figures(s, case, rec["summary"])
        what = (f"{v['tensors_checked']} tensors in {v['files']} files"
                if "tensors_checked" in v else f"{_mib(v['bytes_compared'])} MiB compared")
        print(f"  check {case.label:<20} {'OK' if v['ok'] else 'FAILED'}  ({what}, "
              f"{time.perf_counter() - t0:.1f} s)"
              + "".join(f"\n      {p}" for p in v.get("problems", [])[:10]), flush=True)
        results.append(v)
    return results


# ---- the load driver (stand-in for `hpcckpt load` until the CLI exists) --------------------
def load_driver(argv: list[str]) -> int:
    """``reshard_load.py --_load-driver RSS_DIR load PATH --strategy S [--json] [--against REF]``

    Runs hpcckpt.load() under mpiexec and prints on rank 0 the OpResult-style dict the
    `load` CLI will print; records peak RSS like rss_wrap.py."""
    import rss_wrap
    rss_dir, argv = argv[0], argv[1:]
    p = argparse.ArgumentParser(prog="reshard_load.py --_load-driver RSS_DIR")
    p.add_argument("command", choices=["load"])
    p.add_argument("path")
    p.add_argument("--strategy", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("--against")
    p.add_argument("--exchange-budget")
    a = p.parse_args(argv)
    try:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        strategy = hpcckpt.load_strategy(a.strategy)
        stats: dict = {}
        kw = {}
        if a.exchange_budget:
            from hpcckpt.units import parse_size
            kw["budget"] = parse_size(a.exchange_budget)
        state = hpcckpt.load(a.path, strategy, comm, stats=stats, **kw)
        doc = {"op": "load", "output": a.path,
               "bytes_read": sum(r["bytes_read"] for r in stats["per_rank"]),
               "per_rank": stats["per_rank"], "unique_bytes": stats["unique_bytes"],
               "rounds": stats["rounds"], "seconds": stats["seconds"],
               "world_size": comm.Get_size(), "via": "hpcckpt.load (benchmark driver)"}
        doc["per_rank"] = [{**r, "bytes_held": h} for r, h in zip(
            doc["per_rank"], comm.allgather(sum(x.nbytes for x in state.values())))]
        rc = 0
        if a.against:   # like `hpcckpt load --against`: a complete W1 file here
            from safetensors import safe_open
            bad, n = [], 0
            with safe_open(a.against if a.against.endswith(".safetensors")
                           else str(Path(a.against) / "model.safetensors"), "numpy") as ref:
                for t, box in strategy.rank_boxes(comm.Get_rank()):
                    n += state[t.name].nbytes
                    if not _same_bytes(state[t.name], _ref_slice(ref, t.name, box)):
                        bad.append(t.name)
            counts = comm.allgather((n, bad))
            doc.update(against=a.against, identical=not any(c[1] for c in counts),
                       bytes_compared=sum(c[0] for c in counts))
            if not doc["identical"]:
                rc = 1
                if comm.Get_rank() == 0:
                    print(f"load: differs from {a.against}: "
                          f"{[b for c in counts for b in c[1]][:5]}", file=sys.stderr)
        del state
        if comm.Get_rank() == 0:
            print(json.dumps(doc) if a.json else doc, flush=True)
        return rc
    finally:
        rss_wrap.write_peak_rss(rss_dir)


# ---- the benchmark --------------------------------------------------------------------------
def run_reps(s: Setup, cases: list[Case], args) -> tuple[list[dict], list[float]]:
    raw, launch_s = [], []
    ctx = s.ctx
    for rep in range(args.reps):
        launch_s.append(time_launch(ctx))
        for case in cases:
            for mode in case.modes:
                fsync = mode != "nofsync"
                order = ("floor", "tool") if rep % 2 == 0 else ("tool", "floor")
                rec = {"case": case.key, "label": case.label, "mode": mode, "rep": rep,
                       "scale": ctx.scale}
                for which in order:
                    if which == "floor":
                        rec["floor_seconds"] = time_floor(ctx, case.op, fsync)
                    else:
                        rec.update(run_case(s, case, fsync))
                for out in case.outputs(s):
                    remove(out)
                rec["bytes"] = bytes_figures(s, case, rec["summary"])
                raw.append(rec)
                rss = max(rec["rss_mib"].values(), default=float("nan"))
                b = rec["bytes"]
                print(f"  rep {rep + 1}/{args.reps} {case.label:<19} {mode:<7} tool "
                      f"{rec['seconds']:6.2f} s (internal {rec['internal_seconds'] or 0:.2f})  "
                      f"floor {rec['floor_seconds']:6.2f} s  ratio "
                      f"{rec['seconds'] / rec['floor_seconds']:5.2f}  peak RSS "
                      f"{'/'.join(f'{v:.0f}' for v in rec['rss_mib'].values())} MiB  sent "
                      f"{b['sent_total'] / MiB:.0f}/{b['sent_expected'] / MiB:.0f} MiB "
                      f"{'ok' if b['sent_ok'] else 'MISMATCH'}  read "
                      f"{b['read_total'] / MiB:.0f}/{b['unique'] / MiB:.0f} MiB "
                      f"{'ok' if b['read_ok'] else 'MISMATCH'}  (max {rss:.0f})", flush=True)
    return raw, launch_s


def summarize(s: Setup, cases: list[Case], raw: list[dict], launch_s: list[float]) -> list[dict]:
    rows = []
    n = s.ctx.args.ranks
    for case in cases:
        for mode in case.modes:
            recs = [r for r in raw if r["case"] == case.key and r["mode"] == mode]
            if not recs:
                continue
            tool = statistics.median(r["seconds"] for r in recs)
            floor = statistics.median(r["floor_seconds"] for r in recs)
            internal = [r["internal_seconds"] for r in recs if r["internal_seconds"] is not None]
            rss = [max(r["rss_mib"].get(str(k), float("nan")) for r in recs) for k in range(n)]
            held = [case.held(s, k) / MiB for k in range(n)]
            last = recs[-1]["bytes"]
            rows.append({
                "case": case.key, "label": case.label, "group": case.group, "mode": mode,
                "scale": s.ctx.scale, "reps": len(recs), "unique_gib": s.ctx.unique_bytes / GiB,
                "tool_s": tool, "floor_s": floor, "ratio": tool / floor,
                "internal_s": statistics.median(internal) if internal else None,
                "internal_ratio": statistics.median(internal) / floor if internal else None,
                "launch_s": statistics.median(launch_s) if launch_s else None,
                "tool_s_range": [min(r["seconds"] for r in recs), max(r["seconds"] for r in recs)],
                "floor_s_range": [min(r["floor_seconds"] for r in recs),
                                  max(r["floor_seconds"] for r in recs)],
                "peak_rss_mib_per_rank": rss, "held_mib_per_rank": held,
                "rss_over_held_mib_per_rank": [r - h for r, h in zip(rss, held)],
                "bytes": last,
                "bytes_consistent_over_reps": all(r["bytes"] == last for r in recs),
                "ratio_ok": tool / floor <= TARGET_RATIO,
                "rss_ok": max(r - h for r, h in zip(rss, held)) <= (
                    TARGET_LOAD_RSS_MIB if case.group == "load" else TARGET_RSS_MIB)})
    return rows


def _mib(x) -> str:
    return "-" if x is None else f"{x / MiB:.0f}"


def print_table(rows: list[dict]) -> None:
    print(f"\n{'case':<19} {'sync':<7} {'tool_s':>7} {'floor_s':>7} {'ratio':>6} "
          f"{'int_s':>6} {'int_rat':>7} {'launch':>6}  {'peak RSS MiB/rank':<18} "
          f"{'MPI sent MiB (exp)':<20} {'read MiB/rank (sum=unique?)':<28}")
    print("-" * 140)
    for r in rows:
        b = r["bytes"]
        rss = "/".join(f"{v:.0f}" for v in r["peak_rss_mib_per_rank"])
        if r["group"] == "load":
            rss += " (" + "/".join(f"{v:.0f}" for v in r["rss_over_held_mib_per_rank"]) + ")"
        print(f"{r['label']:<19} {r['mode']:<7} {r['tool_s']:>7.2f} {r['floor_s']:>7.2f} "
              f"{r['ratio']:>6.2f} {r['internal_s'] or float('nan'):>6.2f} "
              f"{r['internal_ratio'] or float('nan'):>7.2f} {r['launch_s'] or float('nan'):>6.2f}  "
              f"{rss:<18} "
              f"{_mib(b['sent_total']) + ' (' + _mib(b['sent_expected']) + ') ' + ('ok' if b['sent_ok'] else 'MISMATCH'):<20} "
              f"{'/'.join(_mib(x) for x in b['read_per_rank']) + ' sum ' + _mib(b['read_total']) + (' ok' if b['read_ok'] else ' MISMATCH'):<28}")
    print(f"\nratio = tool_s / floor_s (wall time of the whole mpiexec command; target "
          f"<= {TARGET_RATIO}; floor: cat (+ sync) for reshard, {READ_FLOOR.name} for load);"
          "\nint_rat = the tool's own --json seconds / floor_s;"
          "\nlaunch = mpiexec + Python + MPI start-up (no-op command). Peak RSS is per rank, "
          "max over reps; for load, (RSS - the rank's returned slices) in parentheses.")


def markdown_table(rows: list[dict]) -> str:
    out = ["| operation (W1, `mpiexec -n 2`) | sync | tool s | floor s | ratio "
           f"(target ≤ {TARGET_RATIO}) | internal s / floor | peak RSS per rank, MiB "
           f"(target ≤ {TARGET_RSS_MIB}) | MPI bytes sent (expected) | bytes read per rank "
           "(sum vs unique) |",
           "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        b = r["bytes"]
        rss = " / ".join(f"{v:.0f}" for v in r["peak_rss_mib_per_rank"])
        if r["group"] == "load":
            rss += " (" + " / ".join(f"{v:.0f}" for v in r["rss_over_held_mib_per_rank"]) + \
                " over the slices held)"
        ir = f"{r['internal_ratio']:.2f}" if r["internal_ratio"] is not None else "-"
        out.append(
            f"| {r['label']} | {r['mode']} | {r['tool_s']:.2f} | {r['floor_s']:.2f} | "
            f"{r['ratio']:.2f} | {ir} | {rss} | {_mib(b['sent_total'])} MiB "
            f"({_mib(b['sent_expected'])} MiB{', equal' if b['sent_ok'] else ', MISMATCH'}) | "
            f"{' / '.join(_mib(x) for x in b['read_per_rank'])} MiB (sum {_mib(b['read_total'])}"
            f" vs {_mib(b['unique'])}{', equal' if b['read_ok'] else ', MISMATCH'}) |")
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(dict.fromkeys(r["label"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    colors = {"fsync": "tab:blue", "nofsync": "tab:orange", "read": "tab:green"}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len([m for m in modes if m != "read"]) or 1)
    seen = set()
    for i, label in enumerate(labels):
        rs = [r for r in rows if r["label"] == label]
        for k, r in enumerate(rs):
            x = i + (k - (len(rs) - 1) / 2) * width
            lab = None if r["mode"] in seen else f"{r['mode']} (wall, incl. launch)"
            seen.add(r["mode"])
            bar = ax.bar([x], [r["ratio"]], width * 0.95, color=colors.get(r["mode"], "grey"),
                         label=lab)
            ax.bar_label(bar, fmt="%.2f", fontsize=8)
            if r["internal_ratio"] is not None:
                ax.plot([x - width * 0.4, x + width * 0.4], [r["internal_ratio"]] * 2, color="black",
                        linewidth=2, label=None if "int" in seen else "tool's own seconds / floor")
                seen.add("int")
    ax.axhline(TARGET_RATIO, color="red", linestyle="--", linewidth=1,
               label=f"target {TARGET_RATIO}x (reshard)")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    if max((r["ratio"] for r in rows), default=1) > 8:
        ax.set_yscale("log")
        ax.set_ylim(0.3, None)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    ax.set_ylabel("time / floor (median)")
    sc = rows[0]["scale"] if rows else 1
    ax.set_title(f"W1 scale {sc} ({sc} GiB unique), mpiexec -n 2: reshard pp2dp2tp2 -> tp4, "
                 "load", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/hpcckpt-bench",
                   help="scratch directory (default /tmp/hpcckpt-bench)")
    p.add_argument("--scale", type=int, default=1, help="W1 size multiplier (1 -> 1 GiB unique)")
    p.add_argument("--reps", type=int, default=3,
                   help="repetitions (medians reported); 0 with --check: only the checks")
    p.add_argument("--ranks", type=int, default=2, help="mpiexec -n (default 2)")
    p.add_argument("--only", choices=("reshard", "load"), action="append",
                   help="only these cases (repeatable; default both)")
    p.add_argument("--modes", nargs="+", choices=run.MODES, default=list(run.MODES),
                   help="reshard sync modes (default: fsync nofsync, as in run.py)")
    p.add_argument("--load-via", choices=("auto", "cli", "api"), default="auto",
                   help="`hpcckpt load` (cli), this file's hpcckpt.load() driver (api), or "
                        "the CLI when it has a load command (auto, the default)")
    p.add_argument("--exchange-budget", metavar="SIZE",
                   help="pass --exchange-budget SIZE to node-local reshard and load (default: "
                        "the tool's own, 64MiB)")
    p.add_argument("--cache", choices=("warm", "cold", "asis"), default="warm",
                   help="page cache state of each run's inputs (see run.py)")
    p.add_argument("--no-prefault", dest="prefault", action="store_false",
                   help="do not touch and free fresh memory before each timed run")
    p.add_argument("--check", action="store_true",
                   help="untimed: verify reshard outputs and loaded slices bit-exact")
    p.add_argument("--json", metavar="OUT", help="save rows and every run as JSON")
    p.add_argument("--plot", metavar="PNG", help="bar chart of ratio to the floor")
    p.add_argument("--keep", action="store_true", help="keep the setup files for reuse")
    a = p.parse_args(argv)
    a.only = a.only or ["reshard", "load"]
    if a.reps < 0 or a.ranks < 1 or a.scale < 1 or (a.reps == 0 and not a.check):
        p.error("--reps, --ranks, --scale must be positive (--reps 0 only with --check)")
    run.check_plot_option(p, a.plot)
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    mpiexec = find_mpiexec()
    cases = make_cases(args)
    lv = load_launcher(args)
    print(f"hpcckpt {hpcckpt.__version__} ({Path(hpcckpt.__file__).parent}) benchmark W1 "
          f"reshard/load: scale {args.scale}, "
          f"{args.reps} rep(s), mpiexec -n {args.ranks}, cases "
          f"{', '.join(c.label for c in cases)}; load via "
          f"{'hpcckpt load (CLI)' if lv == run.RSS_WRAP else 'hpcckpt.load() driver'}; "
          f"inputs {args.cache}; workdir {args.workdir}", flush=True)
    s = None
    checks, raw, launch_s, rows = [], [], [], []
    try:
        s = do_setup(args, args.scale, mpiexec)
        e = s.expected_nl
        print(f"  expected node-local MPI traffic (placement r % {args.ranks}, d % {args.ranks}):"
              f" {e['bytes_moved']} B moved ({e['bytes_moved'] / MiB:.0f} MiB; received per "
              f"rank {[x // MiB for x in e['received_per_rank']]} MiB), {e['bytes_local']} B "
              "local", flush=True)
        if args.check:
            checks = run_checks(s, cases)
        if args.reps:
            raw, launch_s = run_reps(s, cases, args)
            rows = summarize(s, cases, raw, launch_s)
    except BenchError as e:
        print(f"\nbenchmark: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbenchmark: interrupted", file=sys.stderr)
        return 130
    finally:
        if s is not None and not args.keep:
            remove(s.ctx.root)
        root = Path(args.workdir)
        if not args.keep and root.is_dir() and not any(root.iterdir()):
            root.rmdir()
    ok = all(c["ok"] is not False for c in checks)
    if rows:
        print_table(rows)
        print("\nMarkdown (README):\n")
        print(markdown_table(rows))
        ok = ok and all(r["bytes"]["sent_ok"] and r["bytes"]["read_ok"] for r in rows)
    if args.json:
        doc = {"workload": "W1", "benchmark": "reshard_load", "config": vars(args),
               "targets": {"ratio": TARGET_RATIO, "peak_rss_mib": TARGET_RSS_MIB},
               "expected_node_local": s.expected_nl if s else None,
               "environment": run.environment(mpiexec), "checks": checks, "rows": rows,
               "runs": raw}
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"\nresults saved to {args.json}")
    if args.plot and rows:
        plot(rows, args.plot)
        print(f"plot saved to {args.plot}")
    return 0 if ok else 2


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == LOAD_DRIVER_FLAG:
        sys.exit(load_driver(sys.argv[2:]))
    sys.exit(main())
