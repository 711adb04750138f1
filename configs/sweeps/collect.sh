#!/usr/bin/env bash
# Copies what queued sweep jobs have measured from runs/ into docs/results/, so that a lost machine loses none of it:
#   configs/sweeps/collect.sh docs/results/smollm2_l15_width4x runs/sweeps/smollm2_l15_width4x_*
# A finished cell's results.json, with its job's environment.json and sweep.yaml, goes to DEST/sweeps/<job>/; an
# unfinished cell's progress.json to DEST/in_progress/<cell>_<job>.json, removed again once the cell finishes.
# Then commit DEST. `sagsae report DEST/sweeps/*` reads the finished jobs.
set -euo pipefail
if [ $# -lt 2 ]; then echo "usage: $0 DEST JOB_FOLDER..." >&2; exit 2; fi
dest=$1; shift
for job in "$@"; do
  [ -f "$job/sweep.yaml" ] || { echo "skipped $job: no sweep.yaml (not a sweep's output folder)"; continue; }
  name=$(basename "$job")
  for cell in "$job"/*/; do
    cell=$(basename "$cell")
    snapshot="$dest/in_progress/${cell}_$name.json"
    if [ -f "$job/$cell/results.json" ]; then
      mkdir -p "$dest/sweeps/$name/$cell"
      cp "$job/$cell/results.json" "$dest/sweeps/$name/$cell/"
      cp "$job/sweep.yaml" "$job/environment.json" "$dest/sweeps/$name/"
      rm -f "$snapshot"
      echo "finished: $dest/sweeps/$name/$cell/results.json"
    elif [ -f "$job/$cell/progress.json" ]; then
      mkdir -p "$dest/in_progress"
      cp "$job/$cell/progress.json" "$snapshot"
      echo "in progress: $snapshot"
    fi
  done
done
