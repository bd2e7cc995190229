#!/usr/bin/env bash
# Table 10's utility column on the shipped miniworld (2 CPU cores): Wanda masks from all 40 vm items at 1-10%
# sparsity, each applied to the whole model while 100 heldout prompts are generated (one image each) for FID/KID
# and A_CLIP against the heldout training images. MR columns: tools/gpu_v2_tables.sh PHASE=wanda.
set -u
. .venv/bin/activate
D=runs/wanda-t10-fid; mkdir -p $D
for s in 0.01 0.02 0.03 0.04 0.05 0.10; do
  [ -d $D/w-$s ] || dori mitigate wanda --model miniworld --set vm --device cpu --sparsity $s --out $D/w-$s --no-progress > $D/w-$s.fit.log 2>&1
  [ -f $D/audit-$s.json ] || /usr/bin/time -f "$s %e s" dori audit --model miniworld --set vm --limit 1 --device cpu --attack none \
    --mitigation wanda:$D/w-$s --utility-set heldout --n-utility 100 --out $D/audit-$s --json $D/audit-$s.json --no-progress > $D/audit-$s.log 2>&1
done
[ -f $D/audit-none.json ] || dori audit --model miniworld --set vm --limit 1 --device cpu --attack none --utility-set heldout \
  --n-utility 100 --out $D/audit-none --json $D/audit-none.json --no-progress > $D/audit-none.log 2>&1
for f in $D/audit-*.json; do python3 -c "
import json; r = json.load(open('$f'))['rows'][-1]
print('$f', r['setting'], 'FID', r.get('fid'), 'KID', r.get('kid'), 'A_CLIP(utility)', r.get('a_clip_utility', r.get('utility')))"; done
