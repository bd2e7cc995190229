#!/usr/bin/env bash
# Issue 21 on the lent GPU, one call: the one-command default of adversarial fine-tuning on all 40 vm items
# (surrogates from the model alone), its audits (prompts, Dori prompt and random init at 50 steps, heldout
# utility against the unmitigated world), attacks it was not trained against (Dori lr 0.05 / 150 steps,
# UnlearnDiffAtk), the run continued to 12 epochs as a check of the epoch count, and `sd14-random` end to end.
# Logs and a tarball of the small JSON files go to $OUT.
set -u
bash tools/gpu_env.sh || exit 1
R=runs/gpu21; mkdir -p $R; L=$OUT; T0=$(date +%s)
t() { echo "$(( $(date +%s) - T0 )) s: $*" | tee -a $L/timeline.log; }
pack() { tar czf $L/results.tgz $(find $R \( -name 'audit.json' -o -name 'finetune.json' -o -name 'surrogates.json' \
  -o -name 'losses.jsonl' -o -name '*.log' \) ! -path '*/checkpoints/*' 2>/dev/null) 2>/dev/null; }
D="python3 -m dori"
AUD="--batch-size 1000 --no-progress"
UTIL="--set heldout --limit 100 --utility-set heldout --n-utility 500"

# sd14-random end to end (a few items; batches cut to fit the SD UNet's activations), beside the world's run
python3 - <<'PY' > $L/sd14-prep.log 2>&1
import json, torch
from pathlib import Path
from PIL import Image
from dori.models.loading import load_model
from dori.data.sets import load_set
out = Path("runs/gpu21/sd"); out.mkdir(parents=True, exist_ok=True)
w = load_model("miniworld", device="cpu")
for name, src, n in (("mem", "vm", 2), ("util", "unique", 8)):
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
torch.jit.script(Pixels()).save(str(out / "pixel_copy_detector.pt"))
print("sd14 inputs ready")
PY
SD=$R/sd
( t "sd14 start"
  /usr/bin/time -f "sd14 finetune %e s %M KB" $D mitigate adversarial-ft --model sd14-random --set $SD/mem.jsonl \
    --utility-set $SD/util.jsonl --sscd $SD/pixel_copy_detector.pt --limit 1 --epochs 1 --noise-draws 1 \
    --utility-batch 2 --autocast bf16 --out $R/sd14-A --no-progress > $R/sd14.log 2>&1
  /usr/bin/time -f "sd14 audit %e s %M KB" $D audit --model $R/sd14-A --set $SD/mem.jsonl --limit 1 \
    --sscd $SD/pixel_copy_detector.pt --attack dori --steps 50 --snapshots none --n-gens 2 --fast \
    --out $R/sd14-audit --no-progress >> $R/sd14.log 2>&1
  t "sd14 done rc=$?" ) &
SDPID=$!

# the one command, defaults only
t "advft start"
/usr/bin/time -f "advft %e s %M KB" $D mitigate adversarial-ft --model miniworld --set vm --out $R/A > $R/ft.log 2>&1
t "advft done rc=$?"; pack
cp -r $R/A $R/A12
( $D mitigate adversarial-ft --model miniworld --set vm --out $R/A12 --epochs 12 > $R/ft12.log 2>&1; t "advft12 done rc=$?"
  $D audit --model $R/A12 --set vm --attack dori --steps 50 --snapshots 25 $AUD --out $R/A12-prompt > $R/a12p.log 2>&1
  $D audit --model $R/A12 --set vm --attack dori --steps 50 --init random --snapshots 25 $AUD --out $R/A12-random > $R/a12r.log 2>&1
  $D audit --model $R/A12 $UTIL $AUD --out $R/A12-util > $R/a12u.log 2>&1; t "advft12 audits done" ) &
P12=$!
$D audit --model $R/A --set vm --attack dori --steps 50 --snapshots 10,25 $AUD --out $R/A-prompt > $R/ap.log 2>&1 &
$D audit --model $R/A --set vm --attack dori --steps 50 --init random --snapshots 10,25 $AUD --out $R/A-random > $R/ar.log 2>&1 &
$D audit --model $R/A $UTIL $AUD --out $R/A-util > $R/au.log 2>&1 &
$D audit --model miniworld $UTIL $AUD --out $R/none-util > $R/nu.log 2>&1 &
$D audit --model $R/A --set vm --attack dori --lr 0.05 --steps 150 --snapshots 50,100 $AUD --out $R/A-lr05 > $R/alr.log 2>&1 &
$D audit --model $R/A --set vm --attack dori --steps 150 --init random --snapshots 100 $AUD --out $R/A-150r > $R/a150r.log 2>&1 &
timeout ${UDA_S:-200} $D audit --model $R/A --set vm --limit 32 --attack unlearndiffatk $AUD --out $R/A-uda > $R/auda.log 2>&1 &
timeout ${UDA_S:-200} $D audit --model $R/A --set vm --skip 32 --attack unlearndiffatk $AUD --out $R/A-uda2 > $R/auda2.log 2>&1 &
wait $(jobs -p | grep -v "^$P12$" | grep -v "^$SDPID$") 2>/dev/null
t "A audits done"; pack
wait $SDPID; pack
wait $P12; t "all done"; pack
for f in $R/A-*/audit.json $R/none-util/audit.json $R/A12-*/audit.json; do
  python3 -c "import json,sys; d=json.load(open('$f')); [print('$f', r.get('key'), r.get('n_items'), 'MR', r.get('mr'), 'A_CLIP', (r.get('a_clip') or {}).get('median'), 'FID', r.get('fid')) for r in d['rows']]" 2>/dev/null
done
grep -h "s .*KB\|Error\|error" $R/*.log | tail -20
tail -n 3 $R/sd14.log
