#!/usr/bin/env bash
# Issue 21 on the lent GPU, part 1 of 2: the one-command default of adversarial fine-tuning on all 40 vm items
# (`dori mitigate adversarial-ft --model miniworld --set vm --out A`, no other flag) and, beside it on the same GPU,
# the same with twice the learning rate (H1, reusing A's surrogates); each audited as soon as it ends: prompts and
# Dori 50 steps from the prompt (FID/KID on 500 heldout prompts) and Dori 50 steps from random init. A job another
# engineer asked for (GPU_JOB, a command line) runs beside them. Part 2 (adversarial_ft_attacks_gpu.sh) audits a
# model of this call with attacks it was not trained against; the fine-tuned UNets come back as bit-exact deltas
# (tools/weights_delta.py). Every stage has a deadline (DEADLINE s after the start).
# Results: $OUT/results.tgz, $OUT/summary.log, $OUT/timeline.log, $OUT/A.unet.xz, $OUT/H1.unet.xz.
# ONLY_A=1: the one command and its audits alone (session 14, after the defaults became the teacher target and 10
# epochs: `ONLY_A=1 DEADLINE=420 bash experiments/adversarial_ft_default_gpu.sh`).
set -u
bash tools/gpu_env.sh || exit 1
R=runs/gpu21; DEADLINE=${DEADLINE:-550}
. experiments/gpu_common.sh
AUD="--set vm --batch-size 1000 --no-progress"
if [ -n "${GPU_JOB:-}" ]; then ( timeout $(left) bash -c "$GPU_JOB" > $L/gpu_job.log 2>&1; t "GPU_JOB rc=$?" ) & fi
finetuned A &
while [ ! -f $R/A/surrogates/surrogates.json ] && [ $(left) -gt 0 ]; do sleep 2; done; t "surrogates ready"
[ -n "${ONLY_A:-}" ] || finetuned H1 --surrogates $R/A/surrogates --lr 8e-5 &
wait; t "all done"; pack
cat $L/summary.log; grep -h " s .*KB" $R/*.log
