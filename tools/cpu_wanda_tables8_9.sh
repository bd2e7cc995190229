#!/usr/bin/env bash
# Tables 8-9 (Wanda mask grouping, number of timesteps) on the shipped miniworld, prompts only: masks fitted on
# all 40 vm items, audits on the first 12 with 4 generations each (2 CPU cores, about 9 min). Session 5.
set -u
. .venv/bin/activate
D=runs/wanda-t89; mkdir -p $D
run() { # name fit-options
  local n=$1; shift
  [ -f $D/$n/wanda.json ] || [ -d $D/$n ] || dori mitigate wanda --model miniworld --set vm --device cpu $@ --out $D/$n --no-progress > $D/$n.fit.log 2>&1
  [ -f $D/audit-$n.json ] || /usr/bin/time -f "$n %e s" dori audit --model miniworld --set vm --limit 12 --n-gens 4 --device cpu --attack none \
    --mitigation wanda:$D/$n --out $D/audit-$n --json $D/audit-$n.json --no-progress > $D/audit-$n.log 2>&1
}
run g-prompt --group prompt
run g-10 --group 10
run g-all --group all
run t1 --group all --timesteps 1
run t20 --group all --timesteps 20
run t50 --group all --timesteps 50
[ -f $D/audit-none.json ] || dori audit --model miniworld --set vm --limit 12 --n-gens 4 --device cpu --attack none --out $D/audit-none --json $D/audit-none.json --no-progress > $D/audit-none.log 2>&1
for f in $D/audit-*.json; do python3 -c "
import json;r=json.load(open('$f'))['rows'][-1];print('$f', r['setting'], r['mr'], round(r['sscd_orig']['median'],3), r.get('a_clip',{}).get('median') if isinstance(r.get('a_clip'),dict) else r.get('a_clip'))"; done
