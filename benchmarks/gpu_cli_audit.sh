#!/usr/bin/env bash
# Issue 23 on one H200: `dori audit --attack dori` on sd14-random through the CLI itself (what a user gets by
# default on CUDA), the same under `torchrun --nproc_per_node 1`, and bench_sd's NeMo/Wanda rows (library vs
# plain loops). Run from the repository root on the GPU machine; logs and JSON go to $OUT.
#   N=16 N_TORCHRUN=8 bash benchmarks/gpu_cli_audit.sh
#   AUDIT_ONLY=1 EXTRA=--compile N=16 bash benchmarks/gpu_cli_audit.sh     (the first audit only, with extra options)
#   AUDIT_ONLY=1 REPEAT=1 EXTRA=--compile N=16 bash ...   (then the same audit again in a new process and folder:
#                                                        with --compile, what Inductor's on-disk cache leaves to pay)
set -uo pipefail
N=${N:-16}
N_TORCHRUN=${N_TORCHRUN:-8}
MODEL=${MODEL:-sd14-random}
BENCH=${BENCH:-}
W=${W:-/tmp/w}
EXTRA=${EXTRA:-}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/src
[ -d .whl ] && python3 -m pip install -q --no-deps .whl/*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 benchmarks/cli_audit_inputs.py --out "$W" --n "$N" || exit 1
COMMON=(audit --model "$MODEL" --set vm --images "$W/images" --sscd "$W/sscd.pt" --attack dori --snapshots none --no-progress)
s=$SECONDS
python3 -m dori "${COMMON[@]}" $EXTRA --limit "$N" --out "$W/a1" --json "$OUT/a1.json" 2>&1 | grep --line-buffered -v "^Loading\|should be kept" | tee "$OUT/a1.log"
echo "a1 wall $((SECONDS - s)) s" | tee -a "$OUT/a1.log"
if [ -n "${AUDIT_ONLY:-}" ]; then
  runs="a1"
  if [ -n "${REPEAT:-}" ]; then
    s=$SECONDS
    python3 -m dori "${COMMON[@]}" $EXTRA --limit "$N" --out "$W/a1b" --json "$OUT/a1b.json" 2>&1 | grep --line-buffered -v "^Loading\|should be kept" | tee "$OUT/a1b.log"
    echo "a1b wall $((SECONDS - s)) s" | tee -a "$OUT/a1b.log"; runs="a1 a1b"
  fi
  for r in $runs; do
    python3 -c "import json; t = json.load(open('$OUT/$r.json'))['timing']; print('$r', {k: v for k, v in t.items() if k != 'phases'}); print([(p['phase'], round(p['seconds'], 1), p['items']) for p in t['phases']])"
  done
  exit 0
fi
python3 benchmarks/bench_sd.py --hooks-only --fast-repeats 3 $BENCH --out "$OUT/hooks.json" 2>&1 | tail -12 | tee "$OUT/hooks.log"
s=$SECONDS
python3 -m torch.distributed.run --standalone --nproc_per_node 1 -m dori "${COMMON[@]}" --limit "$N_TORCHRUN" \
  --out "$W/a2" --json "$OUT/a2.json" 2>&1 | grep --line-buffered -v "^Loading\|should be kept" | tee "$OUT/a2.log"
echo "a2 wall $((SECONDS - s)) s" | tee -a "$OUT/a2.log"
python3 - "$OUT" "$W" <<'PY'
import json, sys
from pathlib import Path
out, w = sys.argv[1], Path(sys.argv[2])
a1, a2 = (json.load(open(f"{out}/{n}.json")) for n in ("a1", "a2"))
for name, a in (("1 process", a1), ("torchrun 1", a2)):
    t = a["timing"]
    print(name, {k: t.get(k) for k in ("items_done", "work_s", "s_per_item", "startup_s", "peak_allocated_gib", "peak_reserved_gib")})
    print("  phases", [(p["phase"], round(p["seconds"], 1), p["items"]) for p in t["phases"]])
print("rows", [(r["key"], r["n_items"], r["mr"], r["sscd_orig"]["median"]) for r in a1["rows"]])
# the items both runs audited: per-item SSCD_orig (max over generations) of the two launches
common = {}
for f in sorted((w / "a2" / "results").glob("item.*.json")):
    g = w / "a1" / "results" / f.name
    if g.exists():
        common[f.name] = abs(json.loads(f.read_text())["sscd_orig"]["max"] - json.loads(g.read_text())["sscd_orig"]["max"])
summary = {"items_compared": len(common), "max_abs_diff_sscd_orig_max": max(common.values(), default=None)}
print("1 process vs torchrun 1, same items:", summary)
json.dump(summary, open(f"{out}/compare.json", "w"))
PY
