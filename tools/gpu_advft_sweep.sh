#!/usr/bin/env bash
# Issue 7 on the lent GPU: adversarial fine-tuning settings on the first LIMIT vm items of the shipped
# miniworld, several configurations as parallel processes, each audited at chosen epochs (Dori 50 steps from
# the prompt and from N(0, I); heldout utility: A_CLIP on 50 captions, FID/KID on 200).
# Usage: [LIMIT=16] CONFIGS="name:lr:epochs:eval-epochs(,):finetune-options(_ for spaces) ..." tools/gpu_advft_sweep.sh
# e.g. CONFIGS="d8-3e-5:3e-5:20:10,20:--noise-draws_8"; results (JSON) come back in $OUT/sweep.tgz
# CONFIRM=1 adds, for every audited epoch and the unmitigated model, a utility check on prompts the selection
# never sees (util2-*: A_CLIP on heldout 500-549, FID/KID on heldout 200-999).
# The last eval epoch of a configuration audits its final model (RUN/finetune.json says epochs_done).
set -u
bash tools/gpu_env.sh || exit 1
R=${R:-runs/gpu/advft-sweep}; K=${LIMIT:-16}; mkdir -p $R
W="--model miniworld --set vm --limit $K --device cuda"
# NeMo only to make surrogates: a surrogate folder carried in $R/surrogates (e.g. all 40 items with fallbacks) skips it
[ -f $R/nemo/nemo.json ] || [ -f $R/surrogates/surrogates.json ] || dori mitigate nemo $W --out $R/nemo --no-progress > $R/nemo.log 2>&1
# surrogates once (NeMo, 4 per item, checked), shared by every configuration
[ -f $R/surrogates/surrogates.json ] || { dori finetune adversarial $W --seed 0 --epochs 1 --utility-set unique \
  --n-utility 100 --surrogate-mitigation nemo:$R/nemo --surrogates-per-item 4 --out $R/surr-run --no-progress \
  > $R/surr.log 2>&1; cp -r $R/surr-run/surrogates $R/surrogates; }
one() {  # name lr epochs evals args: trains up to each eval epoch in turn (resuming), audits it, goes on
  local n=$1 lr=$2 e=$3 evals=${4//,/ } args=$5
  for ep in $evals $e; do
    dori finetune adversarial $W --seed 0 --utility-set unique --n-utility 2000 --epochs $ep --lr $lr \
      --steps-per-embedding 3 --dori-steps 50 --surrogates $R/surrogates $args --out $R/$n --no-progress >> $R/$n.log 2>&1
    [[ " $evals " == *" $ep "* ]] || continue
    m=$R/$n/checkpoints/epoch-$(printf %04d $ep)
    [ "$ep" != "$e" ] || m=$R/$n  # the final model: the last epoch's, or the kept one when --stop-mr ended the run early
    for init in prompt random; do
      [ -f $R/audit-$n-e$ep-$init.json ] || dori audit --model $m --set vm --limit $K --device cuda --attack dori \
        --steps 50 --snapshots none --init $init --out $R/audit-$n-e$ep-$init --json $R/audit-$n-e$ep-$init.json \
        --no-progress > $R/audit-$n-e$ep-$init.log 2>&1
    done
    [ -f $R/util-$n-e$ep.json ] || dori audit --model $m --set heldout --limit 50 --device cuda --attack none \
      --utility-set heldout --n-utility 200 --out $R/util-$n-e$ep --json $R/util-$n-e$ep.json --no-progress > $R/util-$n-e$ep.log 2>&1
    [ -z "${CONFIRM:-}" ] || confirm $m $n-e$ep
  done
}
confirm() {  # model name: utility on a disjoint set of heldout prompts
  [ -f $R/util2-$2.json ] || dori audit --model $1 --set heldout --skip 500 --limit 50 --device cuda --attack none \
    --utility-set heldout --utility-skip 200 --n-utility 800 --out $R/util2-$2 --json $R/util2-$2.json --no-progress > $R/util2-$2.log 2>&1
}
base() {  # the unmitigated model's utility, beside the configurations
  [ -f $R/util-base.json ] || dori audit --model miniworld --set heldout --limit 50 --device cuda --attack none \
    --utility-set heldout --n-utility 200 --out $R/util-base --json $R/util-base.json --no-progress > $R/util-base.log 2>&1
  [ -z "${CONFIRM:-}" ] || confirm miniworld base
}
base &
pids="$!"
for c in $CONFIGS; do
  IFS=: read -r n lr e evals args <<< "$c"
  ( /usr/bin/time -f "$n %e s" timeout ${CONFIG_S:-520} bash -c "$(declare -f one confirm); CONFIRM=${CONFIRM:-}; R=$R; W='$W'; K=$K; one $n $lr $e $evals '${args//_/ }'" ) 2>&1 | tail -n 1 &
  pids="$pids $!"
done
wait $pids
tar czf $OUT/sweep.tgz $R/*.json $R/*.log $(ls $R/*/losses.jsonl $R/*/finetune.json 2>/dev/null)
ls $R/*.json
