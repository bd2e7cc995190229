#!/usr/bin/env bash
# Table 12 (concept utility of Wanda, Appendix H) on the shipped miniworld, CPU-sized:
# Wanda masks (one mask from the first 12 vm items, sparsity 1% and 10%), then an audit of those 12 items
# with 2 generations per prompt and 3 world paraphrases per item (2 generations each) before and after.
set -euo pipefail
OUT=${OUT:-runs/table12}
N=${N:-12}
for S in 1 10; do
  python -m dori mitigate wanda --model miniworld --set vm --limit "$N" --sparsity "0.$(printf %02d "$S")" \
    --out "$OUT/wanda$S" --no-progress  # resumable
  python -m dori audit --model miniworld --set vm --limit "$N" --mitigation "wanda:$OUT/wanda$S" --attack none \
    --n-gens 2 --paraphrases world --paraphrases-n 3 --out "$OUT/audit$S" --json "$OUT/audit$S.json" --no-progress
done
