#!/usr/bin/env bash
# Issue 21, session 16, on the lent GPU: the mitigation loss L_adv drawn only at timesteps t >= T_MIN
# (`--adv-min-timestep`), all 40 vm items, the rest of the one command's defaults; two fine-tunings side by side.
# FIRST is the one command plus its options (it makes the surrogates, as the one command does); SECOND reuses them.
# SURR=FOLDER: both use these surrogates (made beforehand by the same policy) and start at once; SURR2=FOLDER: only
# SECOND does (it starts at once, FIRST makes its own).
# Each fine-tuned model gets both audits of gpu_common.sh (prompts + Dori 50 from the prompt with FID/KID on 500
# heldout prompts; Dori 50 from random init) and comes back as a UNet delta (tools/weights_delta.py).
#   FIRST="M300 --adv-min-timestep 300" SECOND="M500 --adv-min-timestep 500" bash experiments/adversarial_ft_timesteps_gpu.sh
# Results: $OUT/results.tgz, $OUT/summary.log, $OUT/timeline.log, $OUT/<name>.unet.xz.
set -u
bash tools/gpu_env.sh || exit 1
R=runs/gpu21m; DEADLINE=${DEADLINE:-550}
. experiments/gpu_common.sh
AUD="--set vm --batch-size 1000 --no-progress"
read -r -a first <<< "${FIRST:?name and options}"
read -r -a second <<< "${SECOND:-}"
if [ -n "${SURR:-}" ]; then
  finetuned "${first[0]}" --surrogates $SURR "${first[@]:1}" &
  [ ${#second[@]} -gt 0 ] && finetuned "${second[0]}" --surrogates $SURR "${second[@]:1}" &
else
  finetuned "${first[@]}" &
  if [ -n "${SURR2:-}" ]; then
    finetuned "${second[0]}" --surrogates $SURR2 "${second[@]:1}" &
  elif [ ${#second[@]} -gt 0 ]; then
    while [ ! -f $R/${first[0]}/surrogates/surrogates.json ] && [ $(left) -gt 0 ]; do sleep 2; done
    t "surrogates ready"
    finetuned "${second[0]}" --surrogates $R/${first[0]}/surrogates "${second[@]:1}" &
  fi
fi
wait; t "all done"; pack
cat $L/summary.log; grep -h " s .*KB" $R/*.log
