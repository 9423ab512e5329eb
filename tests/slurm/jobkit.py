"""What the SLURM tests share: a small model, its layouts, and `render -> sbatch -> wait`."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

import hpcckpt
from hpcckpt.jobs import JobOptions, render
from hpcckpt.ops.filecopy import CopyOptions
from hpcckpt.formats.safetensors import build_header, read_header

from helpers import (DTYPES, assert_bytes_equal, assert_nothing_complete,  # noqa: F401
                     make_tensors, read_tensor)

EMB, DOWN, NORM, SCALE, POS, HEAD = ("model.embed_tokens.weight",
                                     "model.layers.0/mlp.down_proj.weight",
                                     "model.layers.0.input_layernorm.weight", "model.logit_scale",
                                     "model.position_ids", "lm_head.weight")
TENSORS = {EMB: ([96, 40], "BF16"), DOWN: ([40, 71], "F32"), NORM: ([40], "F16"),
           SCALE: ([], "F32"), POS: ([13], "I64"), HEAD: ([96, 40], "BF16")}
FULL = make_tensors(TENSORS, seed=12)


def _doc(mesh: dict, layouts: dict) -> dict:
    return {"format": "hpcckpt.strategy/1", "mesh": mesh,
            "tensors": {n: {"shape": s, "dtype": d, **layouts.get(n, {})}
                        for n, (s, d) in TENSORS.items()}}


#: 4 ranks, ZeRO over dp on down_proj
DP2TP2 = _doc({"dp": 2, "tp": 2}, {EMB: {"split": ["tp", None]}, DOWN: {"split": [None, "tp"],
                                                                          "zero": "dp"},
                                   POS: {"split": ["dp"]}, HEAD: {"split": ["tp", None]}})
#: 8 ranks over two pipeline stages
PP2DP2TP2 = _doc({"pp": 2, "dp": 2, "tp": 2}, {
    EMB: {"split": ["tp", None], "stage": 0}, DOWN: {"split": [None, "tp"], "stage": 0, "zero": "dp"},
    NORM: {"stage": 0}, POS: {"zero": "dp"}, HEAD: {"split": ["tp", None], "stage": 1}})
#: 3 ranks, uneven pieces
TP3 = _doc({"tp": 3}, {EMB: {"split": ["tp", None]}, DOWN: {"split": [None, "tp"]},
                       POS: {"split": ["tp"]}, HEAD: {"split": [None, "tp"]}})
NO_FSYNC = CopyOptions(fsync=False, progress=False)


def write_model(d: Path) -> dict[str, Path]:
    """The model as one safetensors file, and the strategies as YAML, under ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    head, _ = build_header([(n, TENSORS[n][1], a.shape) for n, a in FULL.items()],
                           {"format": "pt"})
    model = d / "model.safetensors"
    with open(model, "wb") as f:
        f.write(head)
        for a in FULL.values():
            f.write(a.tobytes())
    out = {"model": model}
    for name, doc in (("dp2tp2", DP2TP2), ("pp2dp2tp2", PP2DP2TP2), ("tp3", TP3)):
        out[name] = d / f"{name}.yaml"
        out[name].write_text(yaml.safe_dump(doc, sort_keys=False))
    return out



def check_merged(out: Path) -> None:
    """``out`` is complete HF weights equal, bit for bit, to the model."""
    idx = out / "model.safetensors.index.json"
    weight_map = (json.loads(idx.read_text())["weight_map"] if idx.exists()
                  else {n: "model.safetensors" for n in TENSORS})
    assert sorted(weight_map) == sorted(TENSORS)
    for n in TENSORS:
        assert_bytes_equal(read_tensor(out / weight_map[n], n), FULL[n], n)


def same_tree(got: Path, want: Path) -> None:
    """Every file of ``want`` exists in ``got`` with the same bytes, and nothing else."""
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert files(got) == files(want), f"{got} vs {want}"
    for rel in files(want):
        assert (got / rel).read_bytes() == (want / rel).read_bytes(), f"{got / rel} differs"


def reference_split(model: Path, strategy: Path, out: Path, **kw) -> Path:
    hpcckpt.split(str(model), str(out), hpcckpt.load_strategy(strategy), options=NO_FSYNC, **kw)
    return out


def reference_reshard(dist: Path, strategy: Path, out: Path) -> Path:
    hpcckpt.reshard(str(dist), str(out), hpcckpt.load_strategy(strategy), options=NO_FSYNC)
    return out



def has_verb(verb: str) -> bool:
    """Whether the installed hpcckpt has ``verb`` (other helpers' commands land later)."""
    r = subprocess.run([sys.executable, "-m", "hpcckpt", verb, "--help"], capture_output=True,
                       timeout=60)
    return r.returncode == 0


def verb_help(verb: str) -> str:
    r = subprocess.run([sys.executable, "-m", "hpcckpt", verb, "--help"], capture_output=True,
                       text=True, timeout=60)
    return r.stdout if r.returncode == 0 else ""


@dataclass
class JobRun:
    job_id: str
    info: dict
    out: str
    err: str
    summary: dict | None  #: the JSON summary the job left in its log directory, if any

    @property
    def state(self) -> str:
        return self.info["JobState"]

    @property
    def exit_code(self) -> int:
        return int(self.info["ExitCode"].split(":")[0])

    def describe(self) -> str:
        return (f"job {self.job_id} {self.state} exit {self.info['ExitCode']}\n--- out\n{self.out}"
                f"\n--- err\n{self.err}")


def run_job(cluster, verb: str, args: list | None, work: Path, *, nodes: int = 1,
            tasks_per_node: int = 2, mpi: str = "pmi2", settings=(), sbatch=(), env=None,
            timeout: float = 300, **opts) -> JobRun:
    """Render ``jobs/<verb>.sbatch``, submit it from ``work``, wait for it to end."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    script = render(verb, None if args is None else [str(a) for a in args], JobOptions(
        nodes=nodes, tasks_per_node=tasks_per_node, time="00:10:00", mpi=mpi, env=sys.prefix,
        log_dir=str(logs), settings=tuple(settings), sbatch=tuple(sbatch), **opts))
    job_id = cluster.sbatch(script, work, env=env)
    info = cluster.wait(job_id, timeout=timeout)
    return collect(cluster, job_id, info, logs)


def collect(cluster, job_id: str, info: dict, logs: Path) -> JobRun:
    out = Path(info["StdOut"]).read_text() if Path(info["StdOut"]).exists() else ""
    err = Path(info["StdErr"]).read_text() if Path(info["StdErr"]).exists() else ""
    summary_path = logs / f"{info['JobName']}-{job_id}.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return JobRun(job_id, info, out, err, summary)


def ok(run: JobRun) -> JobRun:
    assert run.state == "COMPLETED" and run.exit_code == 0, run.describe()
    assert run.summary is not None, f"no JSON summary\n{run.describe()}"
    return run


def preempt_training(cluster, command: list, ckpt: Path, last: int, work: Path, *,
                     nodes: int, tasks_per_node: int, timeout: float = 300
                     ) -> tuple[dict, str, list[dict]]:
    """Run ``command`` as a training through the save template; once its first step is
    committed (``rank_0/meta.json``), send SIGUSR1 to the batch shell as SLURM does before
    a time limit; wait until the job ends (requeued runs included). Returns the job's
    record, its output and the JSON lines the training printed."""
    script = render("save", [str(a) for a in command], JobOptions(
        nodes=nodes, tasks_per_node=tasks_per_node, time="00:10:00", env=sys.prefix,
        log_dir=str(work), settings=(("CHECKPOINT_DIR", str(ckpt)), ("LAST_STEP", str(last)))))
    job = cluster.sbatch(script, work)
    deadline = time.monotonic() + 120
    while not (ckpt / "rank_0" / "meta.json").exists():
        assert time.monotonic() < deadline, cluster.job(job)
        time.sleep(0.1)
    cluster.run(["scancel", "--signal=USR1", "--batch", job])
    info = cluster.wait(job, timeout=timeout)
    out = Path(info["StdOut"]).read_text()
    err = Path(info["StdErr"]).read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{out}\n{err}"
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return info, out, events


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
