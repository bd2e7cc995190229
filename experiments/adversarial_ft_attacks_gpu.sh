#!/usr/bin/env bash
# Issue 21 on the lent GPU, part 2 of 2: attacks the fine-tuned model was not trained against. DELTA names a UNet
# delta from part 1 (adversarial_ft_default_gpu.sh; e.g. .carry/A.unet.xz), rebuilt bit for bit on the shipped
# world; then, side by side: Dori lr 0.05 for 150 steps from the prompt (snapshots 50, 100), Dori 150 steps from
# random init (snapshot 100), UnlearnDiffAtk on the first 10 items, heldout A_CLIP of it and of the unmitigated
# world, Dori 50 steps in float32 (--no-fast; part 1's audits ran the CUDA default, bf16), and `sd14-random` end to
# end on one item. DELTA: the UNet delta (default .carry/A.unet.xz). Results: $OUT/results.tgz, $OUT/summary.log.
# ONLY: the names of the jobs to run (default all: A-lr05 A-150r A-uda A-util none-util A-dp-fp32 sd14). GPU_JOB: a
# command run beside them. Session 14 (the teacher-target default, model T0e10 from adversarial_ft_epochs_gpu.sh):
#   DELTA=.carry/T0e10.unet.xz ONLY="A-lr05 A-150r sd14" \
#   GPU_JOB="AUDIT_ONLY=1 REPEAT=1 EXTRA=--compile N=10 bash benchmarks/gpu_cli_audit.sh" bash experiments/adversarial_ft_attacks_gpu.sh
set -u
bash tools/gpu_env.sh || exit 1
R=runs/gpu21b; DEADLINE=${DEADLINE:-550}
. experiments/gpu_common.sh
AUD="--batch-size 1000 --no-progress"
ONLY=${ONLY:-A-lr05 A-150r A-uda A-util none-util A-dp-fp32 sd14}
on() { case " $ONLY " in *" $1 "*) return 0;; esac; return 1; }
job() { local name=$1; shift; on $name || on ${name%-audit} || return 0; timeout $(left) "$@" $AUD --out $R/$name > $R/$name.log 2>&1; t "$name rc=$?"; rows $R/$name; pack; }
M=$R/A; cp -r src/dori/assets/miniworld $M && python3 tools/weights_delta.py unpack ${DELTA:-.carry/A.unet.xz} \
  $M/unet/diffusion_pytorch_model.safetensors && t "model rebuilt" || exit 1
if [ -n "${GPU_JOB:-}" ]; then ( timeout $(left) bash -c "$GPU_JOB" > $L/gpu_job.log 2>&1; t "GPU_JOB rc=$?" ) & fi
HELD="--set heldout --limit 100"
job A-lr05 $D audit --model $M --set vm --attack dori --lr 0.05 --steps 150 --snapshots 50,100 &
job A-150r $D audit --model $M --set vm --attack dori --steps 150 --init random --snapshots 100 &
job A-uda $D audit --model $M --set vm --limit 10 --attack unlearndiffatk &
job A-util $D audit --model $M $HELD &
job none-util $D audit --model miniworld $HELD &
# the fast path's bf16 (the CUDA default, every audit above) against float32 on the same model and items
job A-dp-fp32 $D audit --model $M --set vm --attack dori --steps 50 --snapshots 10,25 --no-fast &
on sd14 && ( python3 - <<'PY' > $R/sd14-prep.log 2>&1
import json, torch
from pathlib import Path
from PIL import Image
from dori.models.loading import load_model
from dori.data.sets import load_set
out = Path("runs/gpu21b/sd"); out.mkdir(parents=True, exist_ok=True)
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
    --steps 50 --snapshots none --n-gens 2 --sample-steps 10 --fast ) &
wait; t "all done"; pack
cat $L/summary.log; grep -h " s .*KB" $R/*.log
