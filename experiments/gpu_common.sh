# Helpers that the GPU call scripts of experiments/ source (bash, from the repository root): a timeline, a deadline,
# the results packed into the call's output folder after every stage, one summary line per audit row, the two
# audits every fine-tuned model gets (both) and the one command with them (finetuned).
# Set before sourcing: R (the run folder on the GPU machine) and OUT (the call's output folder, the device tool's
# $OUT); DEADLINE (seconds after sourcing, default 550) is optional. Scripts set AUD (options every audit gets).
L=$OUT; T0=$(date +%s); DEADLINE=${DEADLINE:-550}; mkdir -p $R
D="python3 -m dori"
t() { echo "$(( $(date +%s) - T0 )) s: $*" | tee -a $L/timeline.log; }
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
pack() {  # every audit.json, finetune.json, surrogates.json, losses.jsonl and log under $R (checkpoints left out)
  tar czf $L/results.tgz.tmp $(find $R \( -name 'audit.json' -o -name 'finetune.json' -o -name 'surrogates.json' \
    -o -name 'losses.jsonl' -o -name '*.log' \) ! -path '*/checkpoints/*' 2>/dev/null) 2>/dev/null
  mv $L/results.tgz.tmp $L/results.tgz
}
rows() { python3 -c "
import json; d=json.load(open('$1/audit.json'))
for r in d['rows']: print('$1', r.get('key'), 'n', r.get('n_items'), 'MR', r.get('mr'), 'FID', r.get('fid'), 'KID', r.get('kid'), 'A_CLIP', (r.get('a_clip') or {}).get('median'), 'SSCD', (r.get('sscd_orig') or {}).get('median'))
" >> $L/summary.log 2>&1; }
audit() {  # name, then `dori audit` options: runs it into $R/name before the deadline, logs its rows, packs
  local name=$1; shift
  timeout $(left) $D audit "$@" $AUD --out $R/$name > $R/$name.log 2>&1; t "$name rc=$?"; rows $R/$name; pack
}
both() {  # name, model folder: prompts + Dori 50 from the prompt with FID/KID on 500 heldout prompts, and Dori 50 from
  # random init, side by side (audit folders $R/name-dp and $R/name-dr)
  audit $1-dp --model $2 --attack dori --steps 50 --snapshots 10,25 --utility-set heldout --n-utility 500 &
  audit $1-dr --model $2 --attack dori --steps 50 --init random --snapshots 10,25 &
  wait
}
finetuned() {  # name, options: the one command of adversarial fine-tuning on the vm items with these options into
  # $R/name (stopped FT_MARGIN s, default 100, before the deadline), then both audits, and its UNet back as a delta
  local name=$1; shift
  /usr/bin/time -f "$name finetune %e s %M KB" timeout $(( $(left) - ${FT_MARGIN:-100} )) $D mitigate adversarial-ft \
    --model miniworld --set vm --no-progress --out $R/$name "$@" > $R/$name.ft.log 2>&1
  t "$name finetune rc=$? $(tail -1 $R/$name/losses.jsonl 2>/dev/null | cut -c1-100)"; pack
  [ -f $R/$name/model_index.json ] || return
  python3 tools/weights_delta.py pack $R/$name/unet/diffusion_pytorch_model.safetensors $L/$name.unet.xz &
  both $name $R/$name
  wait
}
