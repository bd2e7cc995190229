#!/usr/bin/env bash
# Issue 21 on the lent GPU, one call: the one-command default of adversarial fine-tuning on all 40 vm items
# (surrogates from the model alone), then in parallel its audits (prompts and Dori from the prompt at 50 steps with
# FID/KID on 500 heldout prompts; Dori from random init; heldout A_CLIP of it and of the unmitigated world),
# attacks it was not trained against (Dori lr 0.05 for 150 steps with snapshots 50/100, Dori 150 steps from random
# init, UnlearnDiffAtk on the first items) and `sd14-random` end to end on one item. Every stage has a deadline
# (DEADLINE s after the start) so the results are packed before the call's limit. Results: $OUT/results.tgz,
# $OUT/summary.log.
set -u
bash tools/gpu_env.sh || exit 1
R=runs/gpu21; mkdir -p $R; L=$OUT; T0=$(date +%s); DEADLINE=${DEADLINE:-355}
t() { echo "$(( $(date +%s) - T0 )) s: $*" | tee -a $L/timeline.log; }
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
pack() { tar czf $L/results.tgz.tmp $(find $R \( -name 'audit.json' -o -name 'finetune.json' -o -name 'surrogates.json' \
  -o -name 'losses.jsonl' -o -name '*.log' \) ! -path '*/checkpoints/*' 2>/dev/null) 2>/dev/null; mv $L/results.tgz.tmp $L/results.tgz; }
rows() { python3 -c "
import json; d=json.load(open('$1/audit.json'))
for r in d['rows']: print('$1', r.get('key'), r.get('set'), 'n', r.get('n_items'), 'MR', r.get('mr'), 'A_CLIP', (r.get('a_clip') or {}).get('median'), 'FID', r.get('fid'), 'SSCD', (r.get('sscd_orig') or {}).get('median'))
" >> $L/summary.log 2>&1; }
D="python3 -m dori"; AUD="--batch-size 1000 --no-progress"
HELD="--set heldout --limit 100"; UTIL="--utility-set heldout --n-utility 500"
job() { local name=$1; shift; timeout $(left) "$@" > $R/$name.log 2>&1; t "$name rc=$?"; rows $R/$name; pack; }

# the unmitigated world's heldout A_CLIP and FID, beside the fine-tuning
job none-util $D audit --model miniworld $HELD $UTIL $AUD --out $R/none-util &
# the one command, defaults only
t "advft start"
/usr/bin/time -f "advft %e s %M KB" timeout $(left) $D mitigate adversarial-ft --model miniworld --set vm --out $R/A > $R/ft.log 2>&1
t "advft done rc=$?"; pack
job A-prompt $D audit --model $R/A --set vm --attack dori --steps 50 --snapshots 10,25 $UTIL $AUD --out $R/A-prompt &
job A-random $D audit --model $R/A --set vm --attack dori --steps 50 --init random --snapshots 10,25 $AUD --out $R/A-random &
job A-util $D audit --model $R/A $HELD $AUD --out $R/A-util &
job A-lr05 $D audit --model $R/A --set vm --attack dori --lr 0.05 --steps 150 --snapshots 50,100 $AUD --out $R/A-lr05 &
job A-150r $D audit --model $R/A --set vm --attack dori --steps 150 --init random --snapshots 100 $AUD --out $R/A-150r &
job A-uda $D audit --model $R/A --set vm --limit 10 --attack unlearndiffatk $AUD --out $R/A-uda &
# sd14-random end to end, one item (the SD UNet's activations bound the batches; a pixel stand-in copy detector)
( python3 - <<'PY' > $R/sd14-prep.log 2>&1
import json, torch
from pathlib import Path
from PIL import Image
from dori.models.loading import load_model
from dori.data.sets import load_set
out = Path("runs/gpu21/sd"); out.mkdir(parents=True, exist_ok=True)
w = load_model("miniworld", device="cpu")
for name, src, n in (("mem", "vm", 1), ("util", "unique", 8)):
    rows = []
    for it in load_set(src, w, limit=n):
        f = out / f"{it.id}.png"
        Image.fromarray((it.image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(f)
        rows.append({"id": it.id, "prompt": it.prompt, "image": f.name})
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
class Pixels(torch.nn.Module):  # a pixel-space stand-in for SSCD (the real file is not on this machine)
    def forward(self, x):
        x = torch.nn.functional.adaptive_avg_pool2d(x, 16).flatten(1)
        return x - x.mean(1, keepdim=True)
torch.jit.trace(Pixels(), torch.rand(2, 3, 320, 320)).save(str(out / "pixel_copy_detector.pt"))
PY
  SD=$R/sd
  /usr/bin/time -f "sd14 finetune %e s %M KB" timeout $(left) $D mitigate adversarial-ft --model sd14-random --set $SD/mem.jsonl \
    --utility-set $SD/util.jsonl --sscd $SD/pixel_copy_detector.pt --epochs 1 --noise-draws 1 --utility-batch 2 \
    --sample-steps 10 --autocast bf16 --out $R/sd14-A --no-progress > $R/sd14.log 2>&1
  t "sd14 finetune rc=$?"
  job sd14-audit $D audit --model $R/sd14-A --set $SD/mem.jsonl --sscd $SD/pixel_copy_detector.pt --attack dori \
    --steps 50 --snapshots none --n-gens 2 --sample-steps 10 --fast --no-progress --out $R/sd14-audit ) &
wait; t "all done"; pack
cat $L/summary.log; grep -h " s .*KB" $R/*.log
