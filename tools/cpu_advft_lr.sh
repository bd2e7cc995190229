#!/usr/bin/env bash
# CPU: adversarial FT check on the first K vm items
# usage: [LIMIT=K] [D=DIR] [EPOCHS=E] [EVAL="e1 e2 ..."] [ARGS="finetune options"] [NAME=run] tools/cpu_advft_lr.sh LR
# defaults K=4, D=runs/cpu-advft, E=5, EVAL=E. NeMo (for the surrogates), fine-tuning (a finished run with
# fewer epochs is continued), then for each epoch in EVAL: Dori audits (prompt and random init) and heldout
# utility of that epoch's checkpoint.
set -u
. .venv/bin/activate
export DORI_CACHE=runs/cache
D=${D:-runs/cpu-advft}; K=${LIMIT:-4}; E=${EPOCHS:-5}; EVAL=${EVAL:-$E}; mkdir -p $D
lr=$1; N=${NAME:-lr$lr}
[ -f $D/nemo/nemo.json ] || dori mitigate nemo --set vm --limit $K --device cpu --out $D/nemo --no-progress > $D/nemo.log 2>&1
/usr/bin/time -f "advft $N to epoch $E %e s" dori finetune adversarial --model miniworld --set vm --limit $K --device cpu --seed 0 \
  --utility-set unique --n-utility 2000 --epochs $E --lr $lr --steps-per-embedding 3 --dori-steps 50 \
  --surrogate-mitigation nemo:$D/nemo --surrogates-per-item 4 ${ARGS:-} --out $D/$N --no-progress >> $D/$N.log 2>&1
for e in $EVAL; do
  m=$D/$N/checkpoints/epoch-$(printf %04d $e); tag=$N-e$e
  for init in prompt random; do
    [ -f $D/audit-$tag-$init.json ] || /usr/bin/time -f "audit $tag $init %e s" dori audit --model $m --set vm --limit $K --device cpu \
      --attack dori --steps 50 --snapshots none --init $init --out $D/audit-$tag-$init --json $D/audit-$tag-$init.json \
      --no-progress > $D/audit-$tag-$init.log 2>&1
  done
  # utility on heldout (A_CLIP on 50 captions, FID/KID on 200); run it once for --model miniworld as the baseline
  [ -f $D/util-$tag.json ] || /usr/bin/time -f "util $tag %e s" dori audit --model $m --set heldout --limit 50 --device cpu \
    --attack none --utility-set heldout --n-utility 200 --out $D/util-$tag --json $D/util-$tag.json --no-progress > $D/util-$tag.log 2>&1
done
