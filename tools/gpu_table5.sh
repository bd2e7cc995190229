#!/usr/bin/env bash
# Issue 7 on the lent GPU: the Tables 3/5 recipe on the shipped miniworld, its independent fit stages as
# parallel processes (--only), then the audit; beside it, the parts of a second-seed world (issue 3),
# packed for a later call that trains its UNet. Everything that comes back is written under $OUT.
set -u
bash tools/gpu_env.sh || exit 1
R=runs/gpu; mkdir -p $R
T5="python3 experiments/table5_adversarial_ft.py --device cuda --out $R/table5 --limit ${LIMIT:-16} --epochs ${EPOCHS:-5} --n-utility ${N_UTILITY:-200}"
pack() { tar czf $OUT/table5.tgz $(find $R/table5 -maxdepth 2 \( -name '*.json' -o -name '*.md' -o -name '*.jsonl' \) ! -path '*/audit/*') $R/*.log 2>/dev/null; }
( /usr/bin/time -f "seed1 parts %e s" dori miniworld train --seed 1 --out $R/seed1 --workers 6 --stop-before-unet > $R/seed1-parts.log 2>&1
  tar cf - -C $R seed1 | split -b 15m - $OUT/seed1-parts.tar. ) &
SEED1=$!
/usr/bin/time -f "fit chain %e s" timeout ${FIT_S:-330} $T5 --only nemo,advft,advft-lora,siss > $R/t5-chain.log 2>&1 & A=$!
/usr/bin/time -f "fit esd %e s" timeout ${FIT_S:-330} $T5 --only esd > $R/t5-esd.log 2>&1 & B=$!
/usr/bin/time -f "fit ca %e s" timeout ${FIT_S:-330} $T5 --only ca > $R/t5-ca.log 2>&1 & C=$!
wait $A $B $C; pack
tail -n 3 $R/t5-chain.log $R/t5-esd.log $R/t5-ca.log
/usr/bin/time -f "audit %e s" timeout ${AUDIT_S:-200} $T5 > $R/t5-audit.log 2>&1; pack
tail -n 30 $R/t5-audit.log
wait $SEED1; tail -n 5 $R/seed1-parts.log; ls -la $OUT
