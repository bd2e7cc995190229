#!/usr/bin/env bash
# CPU: adversarial FT learning-rate check on the first K vm items (usage: [LIMIT=K] [D=DIR] tools/cpu_advft_lr.sh LR;
# defaults K=4, D=runs/cpu-advft): NeMo (for the surrogates), fine-tuning, Dori audits, heldout utility.
set -u
. .venv/bin/activate
export DORI_CACHE=runs/cache
D=${D:-runs/cpu-advft}; K=${LIMIT:-4}; mkdir -p $D
lr=$1
[ -f $D/nemo/nemo.json ] || dori mitigate nemo --set vm --limit $K --device cpu --out $D/nemo --no-progress > $D/nemo.log 2>&1
/usr/bin/time -f "advft lr$lr %e s" dori finetune adversarial --model miniworld --set vm --limit $K --device cpu --seed 0 \
  --utility-set unique --n-utility 2000 --epochs 5 --lr $lr --steps-per-embedding 3 --dori-steps 50 \
  --surrogate-mitigation nemo:$D/nemo --surrogates-per-item 4 --out $D/lr$lr --no-progress > $D/lr$lr.log 2>&1
for init in prompt random; do
  /usr/bin/time -f "audit lr$lr $init %e s" dori audit --model $D/lr$lr --set vm --limit $K --device cpu --attack dori --steps 50 \
    --snapshots none --init $init --out $D/audit-lr$lr-$init --json $D/audit-lr$lr-$init.json --no-progress > $D/audit-lr$lr-$init.log 2>&1
done
# utility on heldout (A_CLIP on 50 captions, FID/KID on 200), for the fine-tuned model; run it once for
# --model miniworld as the baseline
/usr/bin/time -f "util lr$lr %e s" dori audit --model $D/lr$lr --set heldout --limit 50 --device cpu --attack none \
  --utility-set heldout --n-utility 200 --out $D/util-lr$lr --json $D/util-lr$lr.json --no-progress > $D/util-lr$lr.log 2>&1
