"""Side by side: MindSpore 2.10's own tools and hpcckpt on W1 in MindSpore's layout.

Optional; runs where a Python with ``mindspore==2.10.0`` exists (``--ms-python``, e.g.
the venv of tests/golden/mindspore/make_golden.py). This script itself runs in the
repo's ``.venv``:

    .venv/bin/python benchmarks/mindspore_side_by_side.py --ms-python /work/msvenv/bin/python \\
        --scale 1 --reps 3

Setup (untimed): W1 (see run.py) is split by hpcckpt under its pp2·dp2·tp2 strategy and
then stripped of ``manifest.json`` and ``strategy.yaml``: a distributed checkpoint as
MindSpore training leaves it (``rank_<r>/*.safetensors``); the strategy is converted to
MindSpore protobuf (``hpcckpt strategy convert``), and so is tp4, the target layout.
Rows (every command reads the MindSpore strategy files):

* merge:   ``ms.parallel.unified_safetensors(dist, w1.ckpt, out)`` vs
           ``hpcckpt merge dist out --strategy w1.ckpt --layout ms``
* split:   ``load_distributed_checkpoint(None, format="safetensors", unified_safetensors_dir=
           unified, predict_strategy=tp4.ckpt, dst_safetensors_dir=out)`` vs
           ``hpcckpt split unified out --strategy tp4.ckpt``
* reshard: MindSpore's two steps (unified, then load_distributed_checkpoint) vs
           ``hpcckpt reshard dist out --strategy tp4.ckpt --src-strategy w1.ckpt``

MindSpore does not fsync, so hpcckpt runs with ``--no-fsync``. "MindSpore s" is the
time of the call inside its process (the ~3-10 s import of mindspore excluded); hpcckpt
"wall s" is the whole ``mpiexec`` command, start-up included, and "internal s" its own
``--json`` seconds. Before each timed run the inputs are read into the page cache and
the disk is settled (run.py's ``set_cache`` / ``settle_disk``). The first repetition of
each row checks that both tools wrote the same tensor bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as w1  # noqa: E402  (W1 itself, the disk and cache helpers)

from hpcckpt.layout.mindspore import strategy_to_ms  # noqa: E402
from hpcckpt.layout.yaml_io import strategy_from_dict, write_strategy_yaml  # noqa: E402

MS_SNIPPET = r"""
import json, sys, time
import mindspore as ms
from mindspore.parallel import unified_safetensors
from mindspore.parallel.checkpoint_transform import load_distributed_checkpoint
op, a = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
if op in ("merge", "reshard"):
    unified_safetensors(a[0], a[1], a[2], max_process_num=int(a[5]))
if op in ("split", "reshard"):
    src = a[0] if op == "split" else a[2]
    load_distributed_checkpoint(None, format="safetensors", unified_safetensors_dir=src,
                                predict_strategy=a[3], dst_safetensors_dir=a[4],
                                max_process_num=int(a[5]))
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def ms_run(ms_python: str, op: str, args: list[str]) -> float:
    p = subprocess.run([ms_python, "-c", MS_SNIPPET, op, *args], capture_output=True, text=True,
                       env={**os.environ, "GLOG_v": "3"})
    if p.returncode != 0:
        raise SystemExit(f"MindSpore {op} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])["seconds"]


def hp_run(cmd: list[str], ranks: int) -> tuple[float, float]:
    full = [w1.find_mpiexec(), "-n", str(ranks), sys.executable, "-m", "hpcckpt", *cmd,
            "--json", "--no-fsync"]
    t0 = time.perf_counter()
    p = subprocess.run(full, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"hpcckpt {cmd[0]} failed:\n{p.stderr[-3000:]}")
    doc, _ = json.JSONDecoder().raw_decode(p.stdout[p.stdout.index("{"):])
    return wall, doc["seconds"]


def tensors_of(directory: Path) -> dict[str, bytes]:
    """Every tensor's bytes in a directory tree of safetensors files (rank files keyed
    by rank directory), hyper parameters aside."""
    from safetensors.numpy import load_file
    out = {}
    for f in sorted(directory.rglob("*.safetensors")):
        if f.name == "hyper_param.safetensors":
            continue
        rank = f.parent.name if f.parent.name.startswith("rank_") else ""
        for k, v in load_file(f).items():
            if k != "global_step":
                out[f"{rank}/{k}"] = v.tobytes()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ms-python", required=True, help="a python with mindspore==2.10.0")
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=2, help="hpcckpt ranks and MindSpore processes")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/hpcckpt_ms_bench"))
    args = ap.parse_args()
    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    complete, dist, unified = wd / "complete", wd / "dist", wd / "unified"
    w1_yaml, tp4_yaml = wd / "w1.yaml", wd / "tp4.yaml"
    w1_ms, tp4_ms = wd / "w1.ckpt", wd / "tp4.ckpt"

    # ---- setup ------------------------------------------------------------------------
    complete.mkdir(exist_ok=True)
    if not w1.complete_is_valid(complete / "model.safetensors", args.scale):
        w1.write_w1_complete(complete / "model.safetensors", args.scale)
    for doc, y, m in ((w1.w1_strategy_doc(args.scale), w1_yaml, w1_ms),
                      (w1.tp4_strategy_doc(args.scale), tp4_yaml, tp4_ms)):
        s = strategy_from_dict(doc, str(y))
        write_strategy_yaml(s, y)
        m.write_bytes(strategy_to_ms(s))
    if not dist.exists():
        cmd = ["split", complete, dist, "--strategy", w1_yaml]
        hp_run([str(c) for c in cmd], args.ranks)
        (dist / "manifest.json").unlink()
        (dist / "strategy.yaml").unlink()
    if not unified.exists():
        ms_run(args.ms_python, "merge", [str(dist), str(w1_ms), str(unified), "", "",
                                         str(args.ranks)])
    inputs = {"merge": dist, "split": unified, "reshard": dist}
    rows = {
        "merge": (lambda out: ["merge", dist, out, "--strategy", w1_ms, "--layout", "ms"],
                  lambda out: [dist, w1_ms, out, "", "", args.ranks]),
        "split": (lambda out: ["split", unified, out, "--strategy", tp4_ms],
                  lambda out: [unified, "", "", tp4_ms, out, args.ranks]),
        "reshard": (lambda out: ["reshard", dist, out, "--strategy", tp4_ms, "--src-strategy",
                                 w1_ms],
                    lambda out: [dist, w1_ms, wd / "ms_tmp_unified", tp4_ms, out, args.ranks]),
    }
    results = []
    for op, (hp_cmd, ms_args) in rows.items():
        ms_t, hp_wall, hp_int = [], [], []
        for rep in range(args.reps):
            for who in ("ms", "hp"):
                out = wd / f"out_{who}"
                w1.remove(out)
                w1.remove(wd / "ms_tmp_unified")
                w1.set_cache([inputs[op]], "warm")
                w1.settle_disk(wd)
                if who == "ms":
                    ms_t.append(ms_run(args.ms_python, op, [str(a) for a in ms_args(out)]))
                else:
                    wall, internal = hp_run([str(a) for a in hp_cmd(out)], args.ranks)
                    hp_wall.append(wall)
                    hp_int.append(internal)
            if rep == 0:
                same = tensors_of(wd / "out_ms") == tensors_of(wd / "out_hp")
                if not same:
                    raise SystemExit(f"{op}: MindSpore and hpcckpt wrote different tensor bytes")
        m, hw, hi = (statistics.median(x) for x in (ms_t, hp_wall, hp_int))
        results.append((op, m, hw, hi))
        print(f"{op:8s} MindSpore {m:7.2f} s   hpcckpt wall {hw:6.2f} s, internal {hi:6.2f} s"
              f"   MindSpore / hpcckpt wall {m / hw:5.2f}x", flush=True)
    gib = w1.W1_TENSORS * args.scale * int(np.prod(w1.W1_SHAPE)) * 4 / (1 << 30)
    print(f"\nW1 scale {args.scale} ({gib:.2f} GiB), {args.ranks} ranks/processes, medians of "
          f"{args.reps}; identical tensor bytes checked")
    print("| op | MindSpore s | hpcckpt wall s | hpcckpt internal s | MindSpore / hpcckpt |")
    print("|---|---:|---:|---:|---:|")
    for op, m, hw, hi in results:
        print(f"| {op} | {m:.2f} | {hw:.2f} | {hi:.2f} | {m / hw:.2f}x |")
    for who in ("ms", "hp"):
        w1.remove(wd / f"out_{who}")
    shutil.rmtree(wd / "ms_tmp_unified", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
