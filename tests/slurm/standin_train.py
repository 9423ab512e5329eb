"""A stand-in training for the save template's mechanics (one task, no MPI).

    standin_train.py CKPT LAST_STEP SAVE_EVERY STEP_SECONDS

State is the sum of the step numbers so far, so a run that resumes from the wrong step,
or from no step, ends with the wrong value. A commit writes ``state.json`` and then
``rank_0/meta.json`` (what the template reads), each atomically. SIGUSR1 makes the next
step end with a save and the run exit 0, as CheckpointManager's preemption hook does.
"""
import json
import os
import signal
import sys
import time
from pathlib import Path

ckpt, last, every, step_s = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
preempted = False


def on_usr1(signum, frame):
    global preempted
    preempted = True


def write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


signal.signal(signal.SIGUSR1, on_usr1)
meta = ckpt / "rank_0" / "meta.json"
start = json.loads(meta.read_text())["last_step"] if meta.exists() else 0
state = json.loads((ckpt / "state.json").read_text())["state"] if start else 0
print(json.dumps({"run": int(os.environ.get("SLURM_RESTART_COUNT", 0)), "resumed_from": start,
                  "state": state}), flush=True)
step = start
for step in range(start + 1, last + 1):
    time.sleep(step_s)
    state += step
    if step % every == 0 or preempted or step == last:
        write(ckpt / "state.json", {"state": state, "step": step})
        write(meta, {"last_epoch": 1, "last_step": step, "last_ckpt_file": f"s-1_{step}"})
        print(json.dumps({"committed": step, "preempted": preempted}), flush=True)
    if preempted:
        break
