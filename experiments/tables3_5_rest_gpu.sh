#!/usr/bin/env bash
# Issue 26 on the lent H200: what tables3_5_gpu.sh left out. Concept Ablation on vm-000..015 after the empty-mask fix
# (2015e94), and SISS on the four items that run's fit deadline cut (vm-003, vm-011, vm-014, vm-015), one process
# each, through experiments/tables3_5_baselines.py with the settings of tables3_5_gpu.sh (paper variants, reference
# settings otherwise; 10 generations per item, Dori 50 steps from the prompt and from random init).
#   command:  bash experiments/tables3_5_rest_gpu.sh     (repository root; carry .whl, see tools/gpu_env.sh)
#   results:  $OUT/t35rest.tgz (table3_5.json, TABLE3_5.md, per-item records, fit records, logs), $OUT/t35rest.log
set -u
T0=$(date +%s); L=${OUT:?set OUT}; R=runs/t35rest; mkdir -p $R
DEADLINE=${DEADLINE:-480}; FIT_DEADLINE=${FIT_DEADLINE:-330}
t() { echo "$(( $(date +%s) - T0 )) s: $*" | tee -a $L/t35rest.log; }
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
pack() {
  local tmp=$L/.t35rest.$BASHPID.tgz
  tar czf $tmp $(find $R \( -name 'table3_5.json' -o -name 'TABLE3_5.md' -o -name 'finetune.json' \
    -o -name '*.log' -o -path '*/audit/results/*.json' -o -name 'config.json' -o -name 'provenance.json' \) \
    ! -path '*/artifacts/*' ! -path '*/unet/*' ! -path '*/vae/*' ! -path '*/text_encoder/*' 2>/dev/null) 2>/dev/null
  mv $tmp $L/t35rest.tgz
}
if [ -z "${SKIP_ENV:-}" ]; then bash tools/gpu_env.sh >> $L/t35rest.log 2>&1 || { cat $L/t35rest.log; exit 1; }; fi
t "environment ready"; export OMP_NUM_THREADS=2
E="python3 experiments/tables3_5_baselines.py --device ${DEVICE:-cuda} ${EXTRA:-} --fit-deadline $FIT_DEADLINE"
job() { local name=$1; shift; t "$name start"; timeout $(left) "$@" > $R/$name.log 2>&1; t "$name rc=$?"; pack; }
job ca $E --methods ca --limit 16 --n-utility 200 --out $R/ca &
for i in 3 11 14 15; do job siss$i $E --methods siss --first $i --limit 1 --n-utility 0 --out $R/siss$i & done
wait; t "all done"; pack
for f in $R/*/TABLE3_5.md; do echo "== $f"; cat $f; done | tee -a $L/t35rest.log
