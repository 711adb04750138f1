#!/usr/bin/env bash
# Runs configs/sweeps/smollm2_l15_width4x.yaml as a queue of (cell, series) jobs, one process per job, one thread
# each, on as many workers as it is started with (one per core):
#   for worker in 1 2; do OMP_NUM_THREADS=1 nohup configs/sweeps/smollm2_l15_width4x.sh > runs/logs/w4_$worker.log 2>&1 & done
# A worker takes the next job that no other worker holds (a lock folder under runs/queue/width4x). A finished job
# is skipped by `sweep` itself; an interrupted one resumes from its last checkpoint. After a restart of every
# worker, clear the stale locks first: rm -rf runs/queue/width4x
set -u
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
LOCKS=runs/queue/width4x
mkdir -p "$LOCKS"
for cell in mlp_out attn_out resid_mid; do
  for job in "TopK(2H):topk" "SA-GSAE(H):sagsae" "Gated(2H):gated" "Gated(2H) no reset:gated_no_reset" "Gated(H):gated_h"; do
    series=${job%%:*}; slug=${job##*:}
    mkdir "$LOCKS/${cell}_$slug" 2>/dev/null || continue
    echo "$(date -u +%FT%TZ) start $cell $series"
    OMP_NUM_THREADS=1 nice -n 19 "$PYTHON" -m sagsae sweep --config configs/sweeps/smollm2_l15_width4x.yaml \
      --cells "$cell" --series "$series" --out "runs/sweeps/smollm2_l15_width4x_$slug"
    echo "$(date -u +%FT%TZ) end $cell $series: exit $?"
  done
done
