#!/usr/bin/env bash
# Table 12 (concept utility of Wanda, Appendix H) on the shipped miniworld, sized for a shared 2-core CPU:
# one Wanda mask from the first N vm items (sparsity 10%, then 1%), then an audit of those N items with G
# generations per prompt and P world paraphrases per item (G generations each) before and after, DDIM S steps.
set -euo pipefail
OUT=${OUT:-runs/table12}
N=${N:-4}; G=${G:-1}; P=${P:-2}; S=${S:-20}
for SP in 10 1; do
  python -m dori mitigate wanda --model miniworld --set vm --limit "$N" --sparsity "0.$(printf %02d "$SP")" \
    --out "$OUT/wanda$SP-n$N" --no-progress  # resumable
  python -m dori audit --model miniworld --set vm --limit "$N" --mitigation "wanda:$OUT/wanda$SP-n$N" --attack none \
    --n-gens "$G" --sample-steps "$S" --paraphrases world --paraphrases-n "$P" --out "$OUT/audit$SP-n$N" \
    --json "$OUT/audit$SP-n$N.json" --no-progress
done
