"""Finding Dori, Tables 8-10: Wanda's mask grouping, number of timesteps and sparsity, audited with Dori.

Command that reproduces the committed result (``docs/results/tables8-10.md``; world v2, one H200 for the MR
columns, 2 CPU cores for Table 10's FID/KID column)::

    python experiments/tables8_10_wanda.py --device cuda --batch-size 512 --out runs/gpu-v2
    python experiments/tables8_10_wanda.py --utility --out runs/wanda-t10-fid

Each variant: Wanda fitted on the 40 ``vm`` items (:func:`dori.fitting.fit_wanda`), then audited from the
prompts and with Dori (50 steps) against the pruned model. With ``--utility`` instead: each sparsity's mask
from all items applied to the whole model while 100 held-out prompts are generated, for FID/KID (Table 10's
utility column). Resumable; writes ``OUT/w-<variant>/`` (masks), ``OUT/audit-w-<variant>/audit.json`` and
``OUT/wanda.json`` / ``OUT/WANDA.md``.
"""

import argparse
import json
from pathlib import Path

from dori.attacks.dori import Dori
from dori.audit_run import AuditJob, run_audit_job
from dori.data.sets import load_set
from dori.fitting import fit_wanda
from dori.mitigations import load_mitigation
from dori.mitigations.wanda import Wanda
from dori.models.devices import open_model
from dori.report.tables import format_table

# variant -> (Wanda settings, mask grouping); the default is 1% sparsity, 10 timesteps, one mask for all items
VARIANTS = {
    "g-prompt": ({}, "prompt"),  # Table 8
    "g-10": ({}, "10"),
    "g-all": ({}, "all"),
    "t1": ({"timesteps": 1}, "all"),  # Table 9
    "t20": ({"timesteps": 20}, "all"),
    "t50": ({"timesteps": 50}, "all"),
    "s02": ({"sparsity": 0.02}, "all"),  # Table 10
    "s03": ({"sparsity": 0.03}, "all"),
    "s04": ({"sparsity": 0.04}, "all"),
    "s05": ({"sparsity": 0.05}, "all"),
    "s10": ({"sparsity": 0.10}, "all"),
}
UTILITY_SPARSITIES = {"s01": 0.01, "s02": 0.02, "s03": 0.03, "s04": 0.04, "s05": 0.05, "s10": 0.10}

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--model", default="miniworld")
parser.add_argument("--out", type=Path, default=Path("runs/tables8-10"))
parser.add_argument("--device", default=None)
parser.add_argument("--batch-size", type=int, default=64, help="images per UNet batch when sampling")
parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list (default: all)")
parser.add_argument("--limit", type=int, default=None, help="audit only the first K items (a quick check)")
parser.add_argument(
    "--utility", action="store_true", help="Table 10's FID/KID column instead of the MR columns"
)
args = parser.parse_args()

model = open_model(args.model, args.device)
items = load_set("vm", model)
results = {}
if args.utility:
    for name, sparsity in UTILITY_SPARSITIES.items():
        folder = args.out / f"w-{sparsity}"
        fit_wanda(
            model, items, folder, Wanda(sparsity=sparsity), "all", {"method": "wanda", "model": args.model}
        )
        job = AuditJob(
            model=args.model, set="vm", limit=1, mitigation=load_mitigation(f"wanda:{folder}"),
            utility_set="heldout", n_utility=100, device=args.device,
        )  # fmt: skip
        results[name] = run_audit_job(args.out / f"audit-{sparsity}", job)
else:
    for name in args.variants.split(","):
        settings, group = VARIANTS[name]
        folder = args.out / f"w-{name}"
        fit_wanda(model, items, folder, Wanda(**settings), group, {"method": "wanda", "model": args.model})
        job = AuditJob(
            model=args.model, set="vm", limit=args.limit, mitigation=load_mitigation(f"wanda:{folder}"),
            attack=Dori(steps=50), batch_size=args.batch_size, device=args.device,
        )  # fmt: skip
        results[name] = run_audit_job(args.out / f"audit-w-{name}", job)
        print(f"## {name}\n{format_table(results[name]['rows'])}\n", flush=True)

rows = {name: res["rows"] for name, res in results.items()}
(args.out / "wanda.json").write_text(json.dumps({"variants": rows}, indent=1, default=str))
md = ["# Wanda variants (Tables 8-10)", ""]
for name, rs in rows.items():
    md += [f"## {name}", "", format_table(rs, fmt="markdown"), ""]
(args.out / "WANDA.md").write_text("\n".join(md))
print(f"written: {args.out / 'wanda.json'}, {args.out / 'WANDA.md'}")
