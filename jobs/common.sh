# ---- hpcckpt job library (jobs/common.sh; `hpcckpt jobs render` inlines it) ----
# Needs, set above: HPCCKPT_ENV, HPCCKPT_LAUNCHER, HPCCKPT_SRUN_MPI, HPCCKPT_LOG_DIR.
# Optional from the submitting environment: HPCCKPT_TASK_WRAPPER, a command every task
# runs under (e.g. `numactl --interleave=all`, a profiler, `strace -f -o trace`).
set -uo pipefail
hpcckpt_die() { echo "hpcckpt job: error: $*" >&2; exit 2; }

# sbatch hands the job the submitting shell's environment: name the tool by its path,
# never by whatever PATH held at submission.
HPCCKPT="$HPCCKPT_ENV/bin/hpcckpt"
[ -x "$HPCCKPT" ] || hpcckpt_die "$HPCCKPT is not executable: set HPCCKPT_ENV to the environment (venv) where hpcckpt is installed"
export PATH="$HPCCKPT_ENV/bin:$PATH"
# HYDRA_LAUNCHER=fork (fine on a workstation) would start every rank on the batch node
unset HYDRA_LAUNCHER HYDRA_HOST_FILE
# the launch check inside hpcckpt compares SLURM_NTASKS with the MPI world: never skip it here
unset HPCCKPT_SKIP_LAUNCH_CHECK
mkdir -p "$HPCCKPT_LOG_DIR" || hpcckpt_die "cannot create HPCCKPT_LOG_DIR=$HPCCKPT_LOG_DIR"
HPCCKPT_JOB_TAG="${SLURM_JOB_NAME:-hpcckpt}-${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-0}}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}"

case "$HPCCKPT_LAUNCHER" in
  srun)
    # a PMI the MPI library does not speak gives N singletons (refused by the launch check)
    # or an MPI_Init failure; ask srun which plugins this cluster has
    hpcckpt_pmis=$(srun --mpi=list 2>&1 | tr -s ' \t,:' '\n')
    [ -n "$HPCCKPT_SRUN_MPI" ] && grep -qx -- "$HPCCKPT_SRUN_MPI" <<< "$hpcckpt_pmis" \
      || hpcckpt_die "srun has no --mpi=$HPCCKPT_SRUN_MPI here; \`srun --mpi=list\` offers: $(echo $hpcckpt_pmis)" ;;
  mpiexec)
    command -v mpiexec >/dev/null || hpcckpt_die "no mpiexec in $HPCCKPT_ENV/bin nor on PATH" ;;
  *) hpcckpt_die "HPCCKPT_LAUNCHER=$HPCCKPT_LAUNCHER: expected srun or mpiexec" ;;
esac
hpcckpt_how=$HPCCKPT_LAUNCHER; [ "$HPCCKPT_LAUNCHER" = srun ] && hpcckpt_how="srun --mpi=$HPCCKPT_SRUN_MPI"
echo "hpcckpt job $HPCCKPT_JOB_TAG: ${SLURM_NTASKS:-?} tasks on ${SLURM_JOB_NUM_NODES:-?} node(s) (${SLURM_JOB_NODELIST:-?}) by $hpcckpt_how"

# hpcckpt_launch CMD...: one MPI job of every task of the allocation. A failing rank
# ends the step (--kill-on-bad-exit) and the step's exit status is non-zero.
hpcckpt_launch() {
  case "$HPCCKPT_LAUNCHER" in
    srun) srun --mpi="$HPCCKPT_SRUN_MPI" --kill-on-bad-exit=1 ${HPCCKPT_TASK_WRAPPER:-} "$@" ;;
    mpiexec)
      # mpiexec starts one proxy per node with srun, so the ranks would see the proxies'
      # SLURM_NTASKS (= nodes); tell them the job's, which the launch check compares
      local n=${SLURM_NTASKS:-$((SLURM_JOB_NUM_NODES * SLURM_NTASKS_PER_NODE))}
      mpiexec -n "$n" env SLURM_NTASKS="$n" ${HPCCKPT_TASK_WRAPPER:-} "$@" ;;
  esac
}

# hpcckpt_run VERB ARGS...: run `hpcckpt VERB ARGS... --json`; rank 0's JSON summary goes
# to $HPCCKPT_LOG_DIR/<job-name>-<job-id>.json (only when every rank succeeded), a
# one-line summary to the job's output; the job exits with the command's status.
hpcckpt_run() {
  local verb=$1 json="$HPCCKPT_LOG_DIR/$HPCCKPT_JOB_TAG.json" rc
  shift
  hpcckpt_launch "$HPCCKPT" "$verb" "$@" --json > "$json.partial"
  rc=$?
  if [ "$rc" -ne 0 ]; then
    cat "$json.partial"; rm -f "$json.partial"
    echo "hpcckpt job $HPCCKPT_JOB_TAG: hpcckpt $verb FAILED (exit $rc)" >&2
    exit "$rc"
  fi
  mv -f "$json.partial" "$json"
  echo "hpcckpt job $HPCCKPT_JOB_TAG: hpcckpt $verb done; summary (rank 0) in $json:"
  cat "$json"
}

# hpcckpt_last_step DIR: the last committed step of a training directory (rank_0/meta.json,
# written after each commit), 0 when nothing is committed yet
hpcckpt_last_step() {
  "$HPCCKPT_ENV/bin/python" - "$1" <<'PY'
import json, sys
try:
    print(int(json.load(open(sys.argv[1] + "/rank_0/meta.json"))["last_step"]))
except FileNotFoundError:
    print(0)
PY
}

# hpcckpt_train CMD...: run the training step so that it can be preempted. SIGUSR1 to
# this batch shell (#SBATCH --signal=B:USR1@T, or `scancel --signal=USR1 --batch`) is
# forwarded to every task of the job's steps; the training's save manager (install_signal_handler) saves the
# step and the training exits 0. Then: finished (committed step >= LAST_STEP) -> exit 0;
# stopped early but cleanly -> `scontrol requeue` (the next run resumes from the latest
# committed step); failed -> the job fails.
hpcckpt_train() {
  local pid rc=0 cut=0 last
  # srun itself dies of SIGUSR1 (it forwards only INT, TERM, ...): signal the job's steps
  # through slurmctld instead, which reaches every task on every node
  trap 'cut=1; echo "hpcckpt job $HPCCKPT_JOB_TAG: SIGUSR1: forwarding it to the training step"; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
  echo "hpcckpt job $HPCCKPT_JOB_TAG: run ${SLURM_RESTART_COUNT:-0}, latest committed step $(hpcckpt_last_step "$CHECKPOINT_DIR")"
  hpcckpt_launch "$@" &
  pid=$!
  while :; do
    wait "$pid"
    rc=$?
    # a trapped signal cuts `wait` short (status > 128) while the step still runs
    if [ "$cut" = 1 ] && [ "$rc" -gt 128 ]; then cut=0; continue; fi
    break
  done
  trap - USR1
  last=$(hpcckpt_last_step "$CHECKPOINT_DIR")
  # 75 (EX_TEMPFAIL): `hpcckpt save` stopped after the preemption save, like exit 0 here
  if [ "$rc" -eq 75 ]; then rc=0; fi
  if [ "$rc" -ne 0 ]; then
    echo "hpcckpt job $HPCCKPT_JOB_TAG: training FAILED (exit $rc); latest committed step $last" >&2
    exit "$rc"
  fi
  if [ "$last" -ge "$LAST_STEP" ]; then
    echo "hpcckpt job $HPCCKPT_JOB_TAG: finished at step $last"
    exit 0
  fi
  if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
    echo "hpcckpt job $HPCCKPT_JOB_TAG: stopped at step $last of $LAST_STEP after $MAX_REQUEUES requeues; not requeueing" >&2
    exit 1
  fi
  echo "hpcckpt job $HPCCKPT_JOB_TAG: stopped at committed step $last of $LAST_STEP; requeueing"
  scontrol requeue "$SLURM_JOB_ID" || { echo "hpcckpt job: scontrol requeue failed" >&2; exit 1; }
  exit 0
}
# ---- end of the hpcckpt job library ----
