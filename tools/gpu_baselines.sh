#!/usr/bin/env bash
# Issue 7 on the lent GPU: the Table 3/5 baselines (ESD, Concept Ablation, SISS) on the first LIMIT vm items
# of the shipped miniworld, fitted as three parallel processes (--only), then the recipe's audit of the
# unmitigated model and the baselines (resumable: a second call on the warm machine finishes it).
# Usage: [LIMIT=16] [FIT_S=400] [AUDIT_S=150] tools/gpu_baselines.sh   (results under $OUT)
set -u
bash tools/gpu_env.sh || exit 1
R=runs/gpu; mkdir -p $R
T5="python3 experiments/table5_adversarial_ft.py --device cuda --out $R/table5b --limit ${LIMIT:-16} --n-utility 200 --n-heldout 50 --variants ''"
pack() { tar czf $OUT/table5b.tgz $(find $R/table5b -maxdepth 2 \( -name '*.json' -o -name '*.md' -o -name '*.jsonl' \) ! -path '*/audit/*') $R/*.log 2>/dev/null; }
if [ ! -f $R/table5b/siss.json ] || [ ! -f $R/table5b/esd/finetune.json ] || [ ! -f $R/table5b/ca/finetune.json ]; then
  /usr/bin/time -f "fit nemo+siss %e s" timeout ${FIT_S:-400} bash -c "$T5 --only nemo,siss" > $R/t5b-siss.log 2>&1 & A=$!
  /usr/bin/time -f "fit esd %e s" timeout ${FIT_S:-400} bash -c "$T5 --only esd" > $R/t5b-esd.log 2>&1 & B=$!
  /usr/bin/time -f "fit ca %e s" timeout ${FIT_S:-400} bash -c "$T5 --only ca" > $R/t5b-ca.log 2>&1 & C=$!
  wait $A $B $C; pack
  tail -n 4 $R/t5b-siss.log $R/t5b-esd.log $R/t5b-ca.log
fi
/usr/bin/time -f "audit %e s" timeout ${AUDIT_S:-150} bash -c "$T5" >> $R/t5b-audit.log 2>&1; pack
tail -n 25 $R/t5b-audit.log; ls -la $OUT
