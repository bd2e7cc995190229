#!/usr/bin/env bash
# Issue 26 on the lent H200, one call: Tables 3 and 5 baselines (ESD, Concept Ablation, SISS; each with and without
# Dori, prompt and random init) after the parity fixes, through experiments/tables3_5_baselines.py (the paper
# variants, reference settings otherwise; its docstring has the settings). The methods run side by side, one
# process each (SISS split over 4 processes by item); every process stops starting fits at FIT_DEADLINE s and
# audits what it fitted, and is killed at DEADLINE s, so the results are packed before the call's limit.
#   command:  bash experiments/tables3_5_gpu.sh      (from the repository root; carry .whl, see tools/gpu_env.sh)
#   items:    ESD on vm-000..vm-(N_ESD-1); CA on vm-000..vm-(N_CA-1); SISS on vm-000..vm-(N_SISS-1), 4 shards
#   time:     at most DEADLINE (380 s) for the jobs plus packing; expected 330-390 s wall on one H200 (estimate: env
#             ~25 s, start-up and unmitigated audit ~40 s per process, ESD 90 iterations x 6 items at ~0.12-0.25 s,
#             CA 107 steps x 16 items at ~0.04-0.08 s plus 1,024 anchors, SISS ~30-80 s per item model, audits ~2 s
#             per item; the only earlier H200 timing: the unmitigated audit of 6 items took 11.4 s)
#   results:  $OUT/results.tgz (table3_5.json, TABLE3_5.md, per-item result JSON, fit records, logs),
#             $OUT/t35.log (timeline and tables)
set -u
T0=$(date +%s)
L=${OUT:?set OUT}; R=runs/t35gpu; mkdir -p $R
N_ESD=${N_ESD:-6}; N_CA=${N_CA:-16}; N_SISS=${N_SISS:-16}; SHARDS=${SHARDS:-4}; N_UTIL=${N_UTIL:-200}
DEADLINE=${DEADLINE:-380}; FIT_DEADLINE=${FIT_DEADLINE:-210}
t() { echo "$(( $(date +%s) - T0 )) s: $*" | tee -a $L/t35.log; }
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
pack() {
  local tmp=$L/.results.$BASHPID.tgz
  tar czf $tmp $(find $R \( -name 'table3_5.json' -o -name 'TABLE3_5.md' -o -name 'finetune.json' \
    -o -name '*.log' -o -path '*/audit/results/*.json' -o -name 'config.json' -o -name 'provenance.json' \) \
    ! -path '*/artifacts/*' ! -path '*/unet/*' ! -path '*/vae/*' ! -path '*/text_encoder/*' 2>/dev/null) 2>/dev/null
  mv $tmp $L/results.tgz
}
if [ -z "${SKIP_ENV:-}" ]; then bash tools/gpu_env.sh >> $L/t35.log 2>&1 || { cat $L/t35.log; exit 1; }; fi
t "environment ready"
export OMP_NUM_THREADS=2
# the settings of docs/results/tables3-5-baselines.md: 10 generations per prompt (DDIM 50, guidance 7), Dori 50 steps
# (CPU trial with tiny settings: SKIP_ENV=1 DEVICE=cpu EXTRA="--esd-per-item 1 ..." OUT=/tmp/o bash experiments/...)
E="python3 experiments/tables3_5_baselines.py --device ${DEVICE:-cuda} ${EXTRA:-} --fit-deadline"
job() { local name=$1; shift; t "$name start"; timeout $(left) "$@" > $R/$name.log 2>&1; t "$name rc=$?"; pack; }
job esd $E $FIT_DEADLINE --methods esd --limit $N_ESD --n-utility $N_UTIL --out $R/esd &
job ca $E $FIT_DEADLINE --methods ca --limit $N_CA --n-utility $N_UTIL --out $R/ca &
per=$(( (N_SISS + SHARDS - 1) / SHARDS ))
for s in $(seq 0 $((SHARDS - 1))); do
  job siss$s $E $FIT_DEADLINE --methods siss --first $((s * per)) --limit $per --n-utility 0 --out $R/siss$s &
done
wait
t "all done"; pack
for f in $R/*/TABLE3_5.md; do echo "== $f"; cat $f; done | tee -a $L/t35.log
grep -h "cost_seconds" -A8 $R/*/table3_5.json | tee -a $L/t35.log > /dev/null
ls -la $L
