#!/usr/bin/env bash
# Issue 3 on the lent GPU: does the share of duplicated items pull generations away from the text?
# Trains the seed-1 world's UNet with DUPS copies per vm item / images per tm caption (the shipped worlds: 200),
# reusing the seed-1 parts carried in SEED1_PARTS (tokenizer + train/: mini-CLIP, VAE, copy detector, features;
# see tools/gpu_seed1_surrogates.sh), then checks it with the paper's protocol (10 generations, DDIM 50,
# guidance 7; A_CLIP and FID on heldout). The world (split tar) and the check come back in $OUT.
# Usage: DUPS=50 [LIMIT=200] tools/gpu_world_dups.sh   (carry runs/carry/seed1h and .whl)
set -u
bash tools/gpu_env.sh || exit 1
D=${DUPS:-50}; W=runs/gpu/seed1-d$D; mkdir -p $W && cp -r ${SEED1_PARTS:-runs/carry/seed1h}/. $W/
/usr/bin/time -f "seed1 d$D world %e s" dori miniworld train --seed 1 --duplicates $D --out $W --workers 6 > $W.log 2>&1
tail -n 3 $W.log; cp $W.log $OUT/
[ -f $W/unet/diffusion_pytorch_model.safetensors ] || exit 1
tar cf - -C runs/gpu --exclude seed1-d$D/train seed1-d$D | split -b 15m - $OUT/world-d$D.tar.
/usr/bin/time -f "check %e s" timeout ${CHECK_S:-120} dori miniworld check --model $W --device cuda --sets vm,tm,heldout \
  --limit ${LIMIT:-200} --out $OUT/check-d$D.json > $OUT/check-d$D.log 2>&1; tail -n 6 $OUT/check-d$D.log
