#!/usr/bin/env bash
# Issue 21, FID: which change keeps the adversarially fine-tuned world's FID near the unmitigated one without giving
# back the memorization result? One call on one H200, the first 20 vm items, every fine-tuning at the defaults of
# main (12 epochs, lr 8e-5, 2 fresh + 2 persistent searches, caption dropout 0.1, all utility pairs) plus one change:
#   U0  the defaults                     U1  --ema 0.99 (the weights' moving average is the model)
#   U2  --lr-schedule cosine             U3  --utility-batch 192 (3x the utility pairs per update)
#   U4  --weight-decay 0                 U5  --ema 0.99 --lr-schedule cosine
#   U6  --utility-target teacher (added after the session-13 run of U0-U5 at commit 5173232; never run here: the
#       teacher target was measured on 40 items by adversarial_ft_epochs_gpu.sh and became the default in 0a6e70a,
#       so at later commits U0 is the teacher target and U6 repeats it; pass --utility-target data for L_DM)
# Each is audited as it ends: prompts + Dori 50 from the prompt with FID/KID on 500 heldout prompts, Dori 50 from
# random init. Beside them: the unmitigated world's FID in bf16 with generation seeds 0 and 1 (the noise of a
# 500-prompt FID), and U0's FID after epochs 4 and 8 (its checkpoints). Every stage has a deadline.
# Results: $OUT/results.tgz, $OUT/summary.log, $OUT/timeline.log.
set -u
bash tools/gpu_env.sh || exit 1
R=runs/util21; DEADLINE=${DEADLINE:-550}; N=${N:-20}
. experiments/gpu_common.sh
AUD="--set vm --limit $N --batch-size 1000 --no-progress"; FID="--utility-set heldout --n-utility 500"
cfg() {  # name, then fine-tuning options; fine-tunes, then audits what it made
  local name=$1; shift
  /usr/bin/time -f "$name finetune %e s %M KB" timeout $(( $(left) - 110 )) $D mitigate adversarial-ft --model miniworld \
    --set vm --limit $N --no-progress --out $R/$name "$@" > $R/$name.ft.log 2>&1
  t "$name finetune rc=$? $(tail -1 $R/$name/losses.jsonl 2>/dev/null | cut -c1-120)"
  [ -f $R/$name/model_index.json ] || return
  audit $name-dp --model $R/$name --attack dori --steps 50 --snapshots 10,25 $FID &
  audit $name-dr --model $R/$name --attack dori --steps 50 --init random --snapshots 10,25 &
  if [ $name = U0 ]; then for e in 4 8; do
    audit U0-e$e --model $R/U0/checkpoints/epoch-000$e $FID & done; fi
  wait
}
audit base-s0 --model miniworld $FID &
audit base-s1 --model miniworld $FID --seed 1 &
cfg U0 &
while [ ! -f $R/U0/surrogates/surrogates.json ] && [ $(left) -gt 0 ]; do sleep 2; done; t "surrogates ready"
S="--surrogates $R/U0/surrogates"
cfg U1 $S --ema 0.99 &
cfg U2 $S --lr-schedule cosine &
cfg U3 $S --utility-batch 192 &
cfg U4 $S --weight-decay 0 &
cfg U5 $S --ema 0.99 --lr-schedule cosine &
cfg U6 $S --utility-target teacher &
wait; t "all done"; pack
cat $L/summary.log; grep -h " s .*KB" $R/*.log; nvidia-smi --query-gpu=memory.used --format=csv
