#!/bin/bash
# HPCCKPT_TASK_WRAPPER of the SLURM tests: note which (emulated) node and rank this task is,
# then run the task, under strace when HPCCKPT_TEST_TRACE=1 (every file it opens).
set -eu
rank=${PMI_RANK:-${SLURM_PROCID:-x}}
echo "${SLURMD_NODENAME:-?} ${PMI_RANK:-} ${SLURM_PROCID:-}" > "$HPCCKPT_TEST_RECORD/task.$rank.$$"
if [ "${HPCCKPT_TEST_TRACE:-0}" = 1 ]; then
  exec strace -f -qq -e trace=open,openat,openat2,creat,truncate,rename,unlink \
    -o "$HPCCKPT_TEST_RECORD/trace.$rank" "$@"
fi
exec "$@"
