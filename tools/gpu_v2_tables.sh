#!/usr/bin/env bash
# World v2 (shipped since session 8) on the lent GPU, one PHASE per call (each fits a 10-minute call):
#   PHASE=sweeps     Dori step sweeps (Tables 6-7, Fig. 7): vm / heldout / unique, prompt and random init, 150 steps,
#                    and heldout from the prompt up to 500 steps (Appendix F.2: steps to replicate non-memorized images)
#   PHASE=iterative  iterative NeMo (Table 11, Appendix H.6): 5 rounds on the 40 vm items, then each round's
#                    neurons audited from the prompts and with new Dori embeddings (50 steps)
#   PHASE=wanda      Tables 8-10: Wanda masks per prompt / groups of 10 / all, 1-50 timesteps, 1-10% sparsity,
#                    each audited from the prompts and with Dori (50 steps), 40 vm items
# Results (JSON/MD/logs) are packed into $OUT/$PHASE.tgz after every stage.
set -u
bash tools/gpu_env.sh || exit 1
R=runs/gpu-v2; mkdir -p $R
pack() { tar czf $OUT/$PHASE.tgz $(find $R -maxdepth 3 \( -name '*.json' -o -name '*.md' -o -name '*.log' \) ! -path '*/results/*' ! -path '*/artifacts/*') 2>/dev/null; }
A="dori audit --model miniworld --device cuda --batch-size 512 --no-progress"
M="dori mitigate --model miniworld --device cuda --no-progress"
t() { /usr/bin/time -f "%e s" "$@"; }
case "$PHASE" in
sweeps)
  SW="--attack dori --steps 150 --snapshots 1,10,25,50,100"
  for spec in "vm prompt 40" "vm random 40" "heldout prompt 100" "heldout random 100" "unique prompt 100"; do
    set -- $spec
    t timeout 150 $A --set $1 --limit $3 $SW --init $2 --out $R/sweep-$1-$2 --json $R/sweep-$1-$2.json > $R/sweep-$1-$2.log 2>&1
    tail -n 3 $R/sweep-$1-$2.log; pack
  done
  t timeout 150 $A --set heldout --limit 40 --attack dori --steps 500 --snapshots 50,100,150,250,350 --init prompt \
    --out $R/long-heldout --json $R/long-heldout.json > $R/long-heldout.log 2>&1; tail -n 3 $R/long-heldout.log; pack ;;
iterative)
  t $M nemo --set vm --iterative 5 --out $R/nemo-it --json $R/nemo-it.json > $R/nemo-it.log 2>&1; tail -n 8 $R/nemo-it.log; pack
  for r in 1 2 3 4 5; do
    t timeout 100 $A --set vm --mitigation nemo:$R/nemo-it/round-$r --attack dori --steps 50 --snapshots none \
      --out $R/audit-it-$r --json $R/audit-it-$r.json > $R/audit-it-$r.log 2>&1; tail -n 3 $R/audit-it-$r.log; pack
  done ;;
wanda)
  fit() { local n=$1; shift; t $M wanda --set vm "$@" --out $R/w-$n > $R/w-$n.fit.log 2>&1; }
  aud() { t timeout 90 $A --set vm --mitigation wanda:$R/w-$1 --attack dori --steps 50 --snapshots none \
      --out $R/audit-w-$1 --json $R/audit-w-$1.json > $R/audit-w-$1.log 2>&1; tail -n 3 $R/audit-w-$1.log; pack; }
  for spec in "g-prompt --group prompt" "g-10 --group 10" "g-all --group all" "t1 --timesteps 1" "t20 --timesteps 20" \
      "t50 --timesteps 50" "s02 --sparsity 0.02" "s03 --sparsity 0.03" "s04 --sparsity 0.04" "s05 --sparsity 0.05" \
      "s10 --sparsity 0.10"; do
    set -- $spec; n=$1; shift; [ -f $R/audit-w-$n.json ] && continue  # a second call goes on where the first stopped
    fit $n "$@"; aud $n
  done ;;
esac
ls -la $OUT
