#!/usr/bin/env bash
# Issue 21 screening on the lent GPU, one call: which change makes adversarial fine-tuning remove (not hide) the
# first 20 vm items of the shipped world? Five fine-tunings run side by side on one H200, each audited as soon as it
# ends (prompts + Dori 50 steps from the prompt with FID/KID on 500 heldout prompts; Dori 50 steps from random init;
# Dori 150 steps from random init for the 12-epoch runs). Every stage has a deadline (DEADLINE s after the start).
#   C0  the defaults of main before this sweep (8 epochs, 2 fresh searches per item and epoch)
#   C1  C0 + caption dropout in the utility loss (--uncond-share 0.1)
#   C2  C1 + one persistent search per item (--persistent 1), 12 epochs
#   C3  C1, 12 epochs (epochs alone)
#   C4  C2 with twice the learning rate (8e-5)
# Results: $OUT/results.tgz (audit.json, finetune.json, losses.jsonl, logs), $OUT/summary.log.
set -u
bash tools/gpu_env.sh || exit 1
R=runs/sweep21; DEADLINE=${DEADLINE:-540}; N=${N:-20}
. experiments/gpu_common.sh
AUD="--set vm --limit $N --batch-size 1000 --no-progress"
model() { if [ -f $R/$1/model_index.json ]; then echo $R/$1; else ls -d $R/$1/checkpoints/epoch-* 2>/dev/null | tail -1; fi; }
cfg() {  # name, then fine-tuning options; fine-tunes, then audits what it made
  local name=$1; shift
  /usr/bin/time -f "$name finetune %e s %M KB" timeout $(( $(left) - 120 )) $D mitigate adversarial-ft --model miniworld \
    --set vm --limit $N --no-progress --out $R/$name "$@" > $R/$name.ft.log 2>&1
  t "$name finetune rc=$? $(tail -1 $R/$name/losses.jsonl 2>/dev/null | cut -c1-120)"
  local m; m=$(model $name); [ -n "$m" ] || return
  audit $name-dp --model $m --attack dori --steps 50 --snapshots 10,25 --utility-set heldout --n-utility 500 &
  audit $name-dr --model $m --attack dori --steps 50 --init random --snapshots 10,25 &
  case $name in C2|C4) audit $name-r150 --model $m --attack dori --steps 150 --init random --snapshots 100 & ;; esac
  wait
}
cfg C0 --uncond-share 0 --persistent 0 --epochs 8 &
while [ ! -f $R/C0/surrogates/surrogates.json ] && [ $(left) -gt 0 ]; do sleep 2; done; t "surrogates ready"
S="--surrogates $R/C0/surrogates"
cfg C1 $S --uncond-share 0.1 --persistent 0 --epochs 8 &
cfg C2 $S --uncond-share 0.1 --persistent 1 --epochs 12 &
cfg C3 $S --uncond-share 0.1 --persistent 0 --epochs 12 &
cfg C4 $S --uncond-share 0.1 --persistent 1 --epochs 12 --lr 8e-5 &
wait; t "all done"; pack
cat $L/summary.log; grep -h " s .*KB" $R/*.log; nvidia-smi --query-gpu=memory.used --format=csv
