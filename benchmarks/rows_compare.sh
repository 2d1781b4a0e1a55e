#!/usr/bin/env bash
# The engine's CPU per step, old and new code alternated (issue 19, helper `rows`): the
# phase profile in process (`core_profile`, adaptation off and on) and each process's CPU
# over ZeroMQ (`core_zmq_cpu`). Usage: benchmarks/rows_compare.sh OLD_CHECKOUT [ROUNDS]
set -euo pipefail
old=$1
rounds=${2:-2}
new=$(cd "$(dirname "$0")/.." && pwd)
only=${3:-}  # "zmq": only the ZeroMQ figures
for round in $(seq "$rounds"); do
  for side in old new; do
    dir=$old; [ "$side" = new ] && dir=$new
    for adapt in "" --adapt; do
      [ "$only" = zmq ] && continue
      echo "== $side ($dir) round $round ${adapt:-(adaptation off)}"
      (cd "$dir" && PYTHONPATH="$dir" "$dir/.venv/bin/python" "$new/benchmarks/core_profile.py" \
        --seconds 4 $adapt 2>&1 | grep -v '^export')
    done
    for memory in false true; do
      echo "== $side ($dir) round $round: over ZeroMQ, CPU per process (adaptation $memory)"
      (cd "$dir" && NEXTWORD_ADAPT_MEMORY=$memory PYTHONPATH="$dir" "$dir/.venv/bin/python" \
        "$new/benchmarks/core_zmq_cpu.py" --seconds 4 2>&1 | grep -v -e '^export' -e INFO)
    done
  done
done
