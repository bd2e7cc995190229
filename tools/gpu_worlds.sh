#!/usr/bin/env bash
# Issues 3 and 4 on the lent GPU: seed-0 worlds with fewer duplicates (--duplicates) and with more uncaptioned
# detail (--detail 1), trained side by side on one GPU, then measured with the paper's protocol.
#   PHASE=train  parts per detail level (once), then every world's UNet until BUDGET seconds after the start;
#                a UNet that is not done is checkpointed (--pause-after): run the same again to resume it
#                (while the machine is warm: runs/ stays on it between calls).
#   PHASE=check  every finished world: dori miniworld check (vm, tm, heldout; 200 items), Dori (50 steps,
#                prompt init, snapshots 10/25) on 40 heldout and 40 unique items; results and worlds to $OUT.
#   Session 10: a fourth field, the latent channels (default 4), e.g. WORLDS="c8:1:50:8 c16:1:50:16";
#                UNET=W0,W1,W2 sets every world's UNet widths; NO_WORLD=1 brings back results, no worlds.
# Usage: WORLDS="name:detail:dups[:latent] ..." PHASE=train|check tools/gpu_worlds.sh   (carry .whl)
set -u
bash tools/gpu_env.sh || exit 1
START=$(date +%s); BUDGET=${BUDGET:-560}
WORLDS=${WORLDS:-"w0d50:0:50 w0d25:0:25 w1d50:1:50 w1d25:1:25"}
R=runs/gpu/worlds; mkdir -p $R
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
if [ "${PHASE:-train}" = train ]; then
  for dc in $(for w in $WORLDS; do IFS=: read -r n d k c <<< "$w"; echo $d:${c:-4}; done | sort -u); do
    IFS=: read -r d c <<< "$dc"; P=$R/parts-d$d-c$c
    [ -f $P/train/features.safetensors ] || /usr/bin/time -f "parts d$d c$c %e s" dori miniworld train \
      --seed 0 --detail $d --latent-channels $c --stop-before-unet --out $P --workers 6 > $P.log 2>&1 &
  done; wait
  for w in $WORLDS; do
    IFS=: read -r n d k c <<< "$w"; c=${c:-4}
    [ -f $R/$n/dori_world.json ] && continue
    mkdir -p $R/$n/train; [ -f $R/$n/train/meta.json ] || cp -r $R/parts-d$d-c$c/train/. $R/$n/train/
    timeout $(( $(left) + 25 )) dori miniworld train --seed 0 --detail $d --duplicates $k --latent-channels $c --out $R/$n \
      --workers 3 --pause-after $(( $(left) - 130 )) ${UNET:+--unet-channels $UNET} >> $R/$n.log 2>&1 &
  done; wait
  for w in $WORLDS; do n=${w%%:*}; echo "$n: $(grep -E 'unet step|paused|resumed|wrote' $R/$n.log | tail -n 1)"; done
  grep -h "threshold\|parts" $R/parts-*.log
  tar cf $OUT/train-logs.tar -C $R $(cd $R && ls *.log)  # at most 8 files come back
else
  O=$OUT; OUT=$O/res; mkdir -p $OUT  # at most 8 files come back: results go in one tar
  for w in $WORLDS; do
    IFS=: read -r n d k c <<< "$w"; W=$R/$n
    [ -f $W/dori_world.json ] || { echo "$n: not finished"; continue; }
    (
      dori_on() { timeout $(( $(left) - 30 )) dori audit --model $W --device cuda --set $1 --limit 40 --attack dori \
        --steps 50 --snapshots 10,25 --no-progress --out $R/audit-$n-$1 --json $OUT/dori-$1-$n.json > $OUT/dori-$1-$n.log 2>&1; }
      dori_on heldout; dori_on vm  # first what issue 4 asks; then the world's own check; then unique
      timeout $(( $(left) - 30 )) dori miniworld check --model $W --device cuda --sets vm,tm,heldout --limit ${LIMIT:-200} \
        --out $OUT/check-$n.json > $OUT/check-$n.log 2>&1
      dori_on unique
    ) &
  done; wait
  for w in $WORLDS; do n=${w%%:*}; [ -f $R/$n/dori_world.json ] || continue
    tail -n 8 $OUT/check-$n.log; grep -h -E "^\|? ?(dori|none)" $OUT/dori-*-$n.log | head -4
    [ -n "${NO_WORLD:-}" ] || tar cf - -C $R --exclude $n/train $n | split -b 15m - $O/world-$n.tar.
  done
  tar cf $O/results.tar -C $O res && rm -r $O/res
fi
