#!/usr/bin/env bash
# Issue 4/8 runs on the shipped miniworld on the lent GPU: Dori step sweeps (Tables 6-7, Fig. 7) and the
# locality recipe (its config is edited in place: run it on a throwaway copy such as the device machine's). Results (JSON/MD/PNG) are packed into $OUT/sweeps.tgz after every stage.
set -u
bash tools/gpu_env.sh || exit 1
R=runs/gpu; mkdir -p $R
pack() { tar czf $OUT/sweeps.tgz $(find $R -maxdepth 3 \( -name '*.json' -o -name '*.md' -o -name '*.png' -o -name '*.log' \) ! -path '*/results/*' ! -path '*/artifacts/*') 2>/dev/null; }
A="dori audit --model miniworld --device cuda --batch-size 512 --no-progress"
SW="--attack dori --steps 150 --snapshots 1,10,25,50,100"
for spec in "vm prompt 40" "vm random 40" "heldout prompt 100" "heldout random 100" "unique prompt 100"; do
  set -- $spec
  /usr/bin/time -f "%e s" timeout 120 $A --set $1 --limit $3 $SW --init $2 --out $R/sweep-$1-$2 --json $R/sweep-$1-$2.json > $R/sweep-$1-$2.log 2>&1
  tail -n 12 $R/sweep-$1-$2.log; pack
done
sed -i 's/^EXTRA: list\[str\] = \[\]/EXTRA = ["--device", "cuda"]/; s#^OUT = Path("runs/locality-miniworld")#OUT = Path("runs/gpu/locality")#' experiments/locality_figures.py
timeout ${LOC_S:-200} python3 experiments/locality_figures.py > $R/locality.log 2>&1; tail -n 15 $R/locality.log; pack
ls -la $OUT
