# Helpers that the GPU call scripts of experiments/ source (bash, from the repository root): a timeline, a deadline,
# the results packed into the call's output folder after every stage, and one summary line per audit row.
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
