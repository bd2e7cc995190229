#!/usr/bin/env bash
# Run one command on the lent GPU machine and bring its results back: set up the environment (tools/gpu_env.sh),
# run the command with a time limit, then pack every small result file (JSON, Markdown, PNG, logs; no tensors)
# under RUNS into $OUT/results.tgz. Experiments are files in experiments/; this only runs them there.
# usage: [RUNS=runs/gpu] [LIMIT_S=540] tools/gpu_run.sh python experiments/tables6_7_dori_steps.py --device cuda ...
set -u
bash tools/gpu_env.sh || exit 1
RUNS=${RUNS:-runs/gpu}; mkdir -p "$RUNS"
/usr/bin/time -f "wall %e s" timeout "${LIMIT_S:-540}" "$@" > "$RUNS/command.log" 2>&1; rc=$?
tail -n 40 "$RUNS/command.log"
tar czf "$OUT/results.tgz" $(find "$RUNS" \( -name '*.json' -o -name '*.md' -o -name '*.png' -o -name '*.log' \) \
  ! -path '*/results/*' ! -path '*/artifacts/*') 2>/dev/null
exit $rc
