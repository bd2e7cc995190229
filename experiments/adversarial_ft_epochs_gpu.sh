#!/usr/bin/env bash
# Issue 21, FID against epochs on all 40 vm items, one call on one H200. The 20-item screen
# (adversarial_ft_utility_gpu.sh) found FID 3.27 after 8 epochs and 8.12 after 12, and final FIDs of 4.3-14.2 for
# small changes of the recipe. Here two runs of the one command's defaults (12 epochs), training seeds 0 and 1 with
# the same surrogates, are audited at epochs 6, 8, 10 and 12 (a checkpoint of epoch k is bit for bit what
# `--epochs k` makes: the constant learning rate does not depend on the number of epochs): prompts + Dori 50 from the
# prompt with FID/KID on 500 heldout prompts, Dori 50 from random init. Beside them F2 = defaults + --ema 0.99,
# audited at the end. Seed 0's UNets after epochs 8 and 10 come back as bit-exact deltas (tools/weights_delta.py).
# Results: $OUT/results.tgz, $OUT/summary.log, $OUT/timeline.log, $OUT/F0-e8.unet.xz, $OUT/F0-e10.unet.xz.
# EXTRA: options every fine-tuning gets (session 14: EXTRA="--utility-target teacher" NO_EMA=1, run folder R=runs/ep21t).
# Since 0a6e70a the library's utility target is the teacher: the session-13 study above (L_DM) needs
# EXTRA="--utility-target data".
# NO_EMA=1 leaves out F2 (three fine-tunings at once did not all reach epoch 12 within one call). F1_OPTS: F1's options
# (default --seed 1). E: the epochs of the fine-tunings (default 12) and CK the checkpoints audited before the end.
# Session 14's second call: R=runs/ep21u EXTRA="--utility-target teacher --utility-weight 30" E=10 CK=8 NO_EMA=1
#   F1_OPTS="--utility-weight 10 --ema 0.99"
# BASE=1: also the unmitigated world's prompts row with FID/KID on the same 500 heldout prompts, at the start.
# ONLY_F0=1: F0 alone (no F1, no F2).
# Session 15 (the guided distillation target, seed 0, the final model only, the unmitigated FID beside it; the
# session's device time left room for one fine-tuning):
#   R=runs/ep21g EXTRA="--utility-target guided" E=10 CK=" " ONLY_F0=1 BASE=1 DEADLINE=470 bash experiments/adversarial_ft_epochs_gpu.sh
set -u
bash tools/gpu_env.sh || exit 1
R=${R:-runs/ep21}; EXTRA=${EXTRA:-}; NO_EMA=${NO_EMA:-0}; F1_OPTS=${F1_OPTS:---seed 1}; E=${E:-12}; CK=${CK:-6 8 10}; DEADLINE=${DEADLINE:-550}
. experiments/gpu_common.sh
AUD="--set vm --batch-size 1000 --no-progress"; FID="--utility-set heldout --n-utility 500"
ft() { local name=$1; shift
  /usr/bin/time -f "$name finetune %e s %M KB" timeout $(( $(left) - 60 )) $D mitigate adversarial-ft --model miniworld \
    --set vm --no-progress --out $R/$name --epochs $E $EXTRA "$@" > $R/$name.ft.log 2>&1; t "$name finetune rc=$?"; }
watch() {  # name: audit its checkpoints of epochs 6, 8, 10 as they are written, then the final model
  local name=$1 c=$R/$1/checkpoints
  for k in $CK; do
    local e=$(printf "epoch-%04d" $k) n=$(printf "epoch-%04d" $((k + 1)))
    while [ ! -f $c/$e/train_state.pt ] && [ ! -d $c/$n ] && [ ! -f $R/$name/model_index.json ] && [ $(left) -gt 0 ]; do sleep 3; done
    [ -d $c/$e/unet ] || return
    if [ $name = F0 ] && [ $k != 6 ]; then python3 tools/weights_delta.py pack $c/$e/unet/diffusion_pytorch_model.safetensors $L/F0-e$k.unet.xz & fi
    both $name-e$k $c/$e &
  done
  while [ ! -f $R/$name/model_index.json ] && [ $(left) -gt 0 ]; do sleep 3; done
  [ -f $R/$name/model_index.json ] || { wait; return; }
  [ $name = F0 ] && [ ! -f $L/F0-e$E.unet.xz ] && python3 tools/weights_delta.py pack $R/F0/unet/diffusion_pytorch_model.safetensors $L/F0-e$E.unet.xz &
  both $name-e$E $R/$name
  wait
}
[ "${BASE:-0}" = 1 ] && audit none-fid --model miniworld $FID &
ft F0 & watch F0 &
while [ ! -f $R/F0/surrogates/surrogates.json ] && [ $(left) -gt 0 ]; do sleep 2; done; t "surrogates ready"
S="--surrogates $R/F0/surrogates"
if [ "${ONLY_F0:-0}" != 1 ]; then
  ft F1 $S $F1_OPTS & watch F1 &
  [ $NO_EMA = 1 ] || ( ft F2 $S --ema 0.99; [ -f $R/F2/model_index.json ] && both F2-e$E $R/F2 ) &
fi
wait; t "all done"; pack
sort $L/summary.log; grep -h " s .*KB" $R/*.log; ls -la $L
