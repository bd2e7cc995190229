#!/usr/bin/env bash
# Issue 3 (second seed) and issue 6 (fast-path equivalence) on the lent GPU. Needs the parts that
# tools/gpu_table5.sh packed, unpacked here under runs/carry/seed1 (carry runs/carry). Trains the seed-1
# UNet, checks the world with the paper's protocol, runs Dori at 50 steps on vm/heldout/unique; beside it,
# Table 1 on the shipped world with fp32 and with --fast. The world and the results come back in $OUT.
set -u
bash tools/gpu_env.sh || exit 1
R=runs/gpu; mkdir -p $R; mkdir -p $R/seed1 && cp -r runs/carry/seed1/. $R/seed1/  # no nesting on a warm machine
pack() { tar czf $OUT/results.tgz $(find $R -maxdepth 2 \( -name '*.json' -o -name '*.md' -o -name '*.log' -o -name '*.png' \) ! -path '*/train/*') 2>/dev/null; }
( /usr/bin/time -f "seed1 unet %e s" dori miniworld train --seed 1 --out $R/seed1 --workers 6 > $R/seed1-unet.log 2>&1 ) & S=$!
T1="python3 experiments/table1.py --device cuda --batch-size 512"
/usr/bin/time -f "table1 fp32 %e s" timeout 420 $T1 --out $R/t1-fp32 > $R/t1-fp32.log 2>&1 & A=$!
/usr/bin/time -f "table1 fast %e s" timeout 420 $T1 --fast --out $R/t1-fast > $R/t1-fast.log 2>&1 & B=$!
wait $S; tail -n 4 $R/seed1-unet.log; pack
if [ -f $R/seed1/unet/diffusion_pytorch_model.safetensors ]; then
  tar cf - -C $R --exclude seed1/train seed1 | split -b 15m - $OUT/seed1-world.tar.
  C="dori miniworld check --model $R/seed1 --device cuda"
  timeout 60 $C --limit 200 --out $R/seed1-check.json > $R/seed1-check.log 2>&1; tail -n 8 $R/seed1-check.log; pack
  A2="dori audit --model $R/seed1 --device cuda --batch-size 512 --no-progress --attack dori --steps 50 --snapshots 10,25"
  for spec in "vm 40" "heldout 100" "unique 100"; do set -- $spec
    timeout 50 $A2 --set $1 --limit $2 --out $R/seed1-dori-$1 --json $R/seed1-dori-$1.json > $R/seed1-dori-$1.log 2>&1
    tail -n 6 $R/seed1-dori-$1.log; pack
  done
fi
wait $A $B; tail -n 14 $R/t1-fp32.log $R/t1-fast.log; pack; ls -la $OUT
