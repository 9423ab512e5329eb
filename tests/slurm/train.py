"""A training loop for the preemption test, saving through hpcckpt.CheckpointManager.

    train.py CKPT STRATEGY LAST_STEP STEP_SECONDS

Every tensor of STRATEGY (F32) starts as ``base(name)`` and gains 1.0 per step, so the
state after step k is ``base + k`` exactly: a run that resumed from the wrong step, or
from wrong bytes, fails its own check at start or the test's check at the end. The
manager saves every 5 steps; SIGUSR1 (forwarded by the save template) makes it save the
current step on every rank and sets ``preempted``, and the loop then stops (exit 0).
"""
import json
import os
import sys
import time

import numpy as np
from mpi4py import MPI

import hpcckpt

SAVE_STEPS = 5


def base(shape) -> np.ndarray:
    n = int(np.prod(shape, dtype=np.int64))
    return (np.arange(n, dtype=np.float32) * np.float32(0.5)).reshape(shape)


def my_slices(strategy, rank: int, value: float) -> dict[str, np.ndarray]:
    out = {}
    for t, box in strategy.rank_boxes(rank):
        whole = base(t.shape) + np.float32(value)
        out[t.name] = np.ascontiguousarray(
            whole[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))])
    return out


def main() -> int:
    ckpt, strategy_path, last, step_s = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    comm = MPI.COMM_WORLD
    strategy = hpcckpt.load_strategy(strategy_path)
    mgr = hpcckpt.CheckpointManager(ckpt, strategy, comm=comm, prefix="train", keep_max=2,
                                    save_steps=SAVE_STEPS)
    if hasattr(mgr, "install_signal_handler"):
        mgr.install_signal_handler()
    else:
        hpcckpt.install_signal_handler()
    latest = mgr.latest()
    start = 0 if latest is None else latest[1]
    if latest is None:
        state = my_slices(strategy, comm.rank, 0)
    else:
        state = hpcckpt.load(ckpt, strategy, comm=comm)
        want = my_slices(strategy, comm.rank, start)
        bad = [n for n in want if np.asarray(state[n]).tobytes() != want[n].tobytes()]
        if bad:
            print(f"rank {comm.rank}: resumed step {start} holds wrong data in {bad}", flush=True)
            return 1
    step = start
    for step in range(start + 1, last + 1):
        time.sleep(step_s)
        for a in state.values():
            a += np.float32(1)
        mgr.save(state, epoch=1, step=step)
        if mgr.preempted:
            break
    mgr.wait()
    mgr.close()
    print(json.dumps({"rank": comm.rank, "run": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
                      "resumed_from": start, "stopped_at": step,
                      "preempted": bool(mgr.preempted)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
