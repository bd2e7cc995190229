#!/usr/bin/env bash
# Issue 21, one call on one H200: does interpolating the fine-tuned UNet back toward the unmitigated one
# (theta = theta_0 + alpha (theta_ft - theta_0), weight-space ensembling as in WiSE-FT) keep the removal and give back
# utility? The fine-tuned model is DELTA (default .carry/T0e10.unet.xz: the teacher-target default, seed 0, epoch 10,
# from adversarial_ft_epochs_gpu.sh). For every ALPHAS value: prompts + Dori 50 from the prompt with FID/KID on 500
# heldout prompts, and Dori 50 from random init. Beside them, the one command at HEAD end to end
# (`dori mitigate adversarial-ft --model miniworld --set vm --out A`, no other flag) and the same with --seed 1
# (A's surrogates), each audited the same way; both UNets come back as deltas (tools/weights_delta.py).
# Results: $OUT/results.tgz, $OUT/summary.log, $OUT/timeline.log, $OUT/A.unet.xz, $OUT/A1.unet.xz.
# Session 15: `ALPHAS="0.5 0.7 0.85" DEADLINE=560 bash experiments/adversarial_ft_interpolate_gpu.sh` (carry .whl and
# .carry/T0e10.unet.xz).
set -u
bash tools/gpu_env.sh || exit 1
R=runs/gpu21i; DEADLINE=${DEADLINE:-550}; ALPHAS=${ALPHAS:-0.5 0.7 0.85}
. experiments/gpu_common.sh
AUD="--set vm --batch-size 1000 --no-progress"
FT_MARGIN=80
T=$R/T; cp -r src/dori/assets/miniworld $T && python3 tools/weights_delta.py unpack ${DELTA:-.carry/T0e10.unet.xz} \
  $T/unet/diffusion_pytorch_model.safetensors && t "model rebuilt" || exit 1
for a in $ALPHAS; do
  cp -r src/dori/assets/miniworld $R/I$a
  python3 - "$a" "$T" "$R/I$a" <<'PY'
import sys
from safetensors.torch import load_file, save_file
a, tuned, out = float(sys.argv[1]), sys.argv[2], sys.argv[3]
f = "/unet/diffusion_pytorch_model.safetensors"
base, ft = load_file("src/dori/assets/miniworld" + f), load_file(tuned + f)
save_file({k: base[k] + a * (ft[k] - base[k]) for k in base}, out + f)
PY
done; t "interpolated"
finetuned A &
while [ ! -f $R/A/surrogates/surrogates.json ] && [ $(left) -gt 0 ]; do sleep 2; done; t "surrogates ready"
finetuned A1 --surrogates $R/A/surrogates --seed 1 &
for a in $ALPHAS; do both I$a $R/I$a & done
wait; t "all done"; pack
sort $L/summary.log; grep -h " s .*KB" $R/*.log; ls -la $L
