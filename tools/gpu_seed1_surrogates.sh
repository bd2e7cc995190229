#!/usr/bin/env bash
# Issue 7 on the lent GPU: train the seed-1 world's UNet (parts from runs/carry/seed1, see tools/gpu_seed1.sh),
# then make surrogates for the first LIMIT vm items of the shipped world: NeMo (fitted in $R/nemo) on the
# memorizing model, and the seed-1 world (Appendix I.1: another model that never trained on these items) for the
# items NeMo leaves replicating. The surrogates and the seed-1 world (split tar) come back in $OUT.
set -u
bash tools/gpu_env.sh || exit 1
R=${R:-runs/gpu/advft-sweep40}; K=${LIMIT:-40}; S1=runs/gpu/seed1; mkdir -p $R $S1 && cp -r ${SEED1_PARTS:-runs/carry/seed1}/. $S1/
/usr/bin/time -f "seed1 world %e s" dori miniworld train --seed 1 --out $S1 --workers 6 > $R/seed1-train.log 2>&1
tail -n 3 $R/seed1-train.log
[ -f $S1/unet/diffusion_pytorch_model.safetensors ] || exit 1
/usr/bin/time -f "surrogates %e s" dori finetune adversarial --model miniworld --set vm --limit $K --device cuda \
  --seed 0 --epochs 1 --utility-set unique --n-utility 100 --surrogate-mitigation nemo:$R/nemo --surrogate-model $S1 \
  --surrogates-per-item 4 --out $R/surr2-run --no-progress > $R/surr2.log 2>&1
tail -n 3 $R/surr2.log
python3 -c "import json; j=json.load(open('$R/surr2-run/surrogates/surrogates.json')); print('fallback', j['settings']['fallback_items'], 'failed', list(j['failed']))"
tar czf $OUT/surrogates2.tgz -C $R/surr2-run surrogates
tar cf - -C runs/gpu --exclude seed1/train seed1 | split -b 15m - $OUT/seed1-world.tar.
cp $R/seed1-train.log $R/surr2.log $OUT/
