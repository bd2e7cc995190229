#!/usr/bin/env bash
# Issue 7 on the lent GPU, without ESD and CA (each needed more than 330 s on an H100 for 16 items,
# tools/gpu_table5.sh): NeMo, adversarial FT, then its LoRA variant and SISS side by side, then the audit.
set -u
bash tools/gpu_env.sh || exit 1
R=runs/gpu; mkdir -p $R
T5="python3 experiments/table5_adversarial_ft.py --device cuda --out $R/table5 --limit 16 --epochs 5 --n-utility 200 --n-heldout 50 --check-utility 50 --baselines siss"
pack() { tar czf $OUT/table5.tgz $(find $R/table5 -maxdepth 2 \( -name '*.json' -o -name '*.md' -o -name '*.jsonl' \) ! -path '*/audit/*') $R/*.log 2>/dev/null; }
/usr/bin/time -f "fit nemo+advft %e s" timeout 200 $T5 --only nemo,advft > $R/t5-chain.log 2>&1
/usr/bin/time -f "fit lora %e s" timeout 100 $T5 --only advft-lora > $R/t5-lora.log 2>&1 & A=$!
/usr/bin/time -f "fit siss %e s" timeout 100 $T5 --only siss > $R/t5-siss.log 2>&1 & B=$!
wait $A $B; pack
/usr/bin/time -f "audit %e s" timeout ${AUDIT_S:-160} $T5 > $R/t5-audit.log 2>&1; pack
tail -n 4 $R/t5-chain.log $R/t5-lora.log $R/t5-siss.log; grep -v "it/s\]" $R/t5-audit.log | tail -n 22
