#!/usr/bin/env bash
# A worker of a queue of sweep jobs, one process per job and one thread each. Start one worker per core:
#   for worker in 1 2; do nohup configs/sweeps/queue.sh configs/sweeps/width_study.jobs > runs/logs/queue_$worker.log 2>&1 & done
# The jobs file holds one job per line, in priority order: `name|config|cell|series|out|more sweep arguments`
# ('#' starts a comment). A worker takes the next job that no other worker holds (a lock folder under
# runs/queue/<jobs file name>). A finished job is skipped by `sweep` itself, or here where collect.sh has copied its
# results into docs/results/*/sweeps/; an interrupted one resumes from its last checkpoint. After a restart of every
# worker, clear the stale locks first: rm -rf runs/queue/<jobs file name>
set -u
jobs_file=$(realpath "$1")
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
LOCKS=runs/queue/$(basename "$jobs_file" .jobs)
mkdir -p "$LOCKS"
grep -v '^\s*#' "$jobs_file" | grep -v '^\s*$' | while IFS='|' read -r name config cell series out more; do
  if compgen -G "docs/results/*/sweeps/$(basename "$out")/$cell/results.json" > /dev/null; then
    continue  # finished and committed by configs/sweeps/collect.sh: a new machine does not train it again
  fi
  mkdir "$LOCKS/$name" 2>/dev/null || continue
  echo "$(date -u +%FT%TZ) start $name"
  # shellcheck disable=SC2086  # `more` is a list of arguments
  OMP_NUM_THREADS=1 nice -n 19 "$PYTHON" -m sagsae sweep --config "$config" --cells "$cell" --series "$series" \
    --out "$out" $more < /dev/null
  echo "$(date -u +%FT%TZ) end $name: exit $?"
done
