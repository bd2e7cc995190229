"""Finding Dori, Tables 6-7 and Figures 2 and 7: replication against the number of Dori steps.

Command that reproduces the committed result (``docs/results/tables6-7.md``; world v2, one H200)::

    python experiments/tables6_7_dori_steps.py --device cuda --batch-size 512 --out runs/gpu-v2

Each run is one audit (:func:`dori.audit_run.run_audit_job`) with Dori against the unmitigated model, its
embeddings evaluated after each snapshot step: memorized (``vm``) items replicate within a few steps, held-out
and non-memorized training images (``heldout``, ``unique``) do not at 50 steps (Fig. 2); ``long-heldout`` runs
500 steps (Appendix F.2). Every Dori row also carries ``dori_norm_ratio``, ||y_adv|| / ||y_init|| (Fig. 7,
right). Resumable; writes ``OUT/<run>/audit.json`` per run and ``OUT/steps.json`` / ``OUT/STEPS.md``.
"""

import argparse
import json
from pathlib import Path

from dori.attacks.dori import Dori
from dori.audit_run import AuditJob, run_audit_job
from dori.report.tables import format_table

SNAPSHOTS = (1, 10, 25, 50, 100)
# run name -> (set, init, items, Dori steps, snapshot steps)
RUNS = {
    "sweep-vm-prompt": ("vm", "prompt", 40, 150, SNAPSHOTS),
    "sweep-vm-random": ("vm", "random", 40, 150, SNAPSHOTS),
    "sweep-heldout-prompt": ("heldout", "prompt", 100, 150, SNAPSHOTS),
    "sweep-heldout-random": ("heldout", "random", 100, 150, SNAPSHOTS),
    "sweep-unique-prompt": ("unique", "prompt", 100, 150, SNAPSHOTS),
    "long-heldout": ("heldout", "prompt", 40, 500, (50, 100, 150, 250, 350)),
}

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--model", default="miniworld")
parser.add_argument("--out", type=Path, default=Path("runs/tables6-7"))
parser.add_argument("--device", default=None)
parser.add_argument("--batch-size", type=int, default=64, help="images per UNet batch when sampling")
parser.add_argument("--runs", default=",".join(RUNS), help="comma list of runs (default: all)")
parser.add_argument("--limit", type=int, default=None, help="at most K items per run (a quick check)")
args = parser.parse_args()

results = {}
for name in args.runs.split(","):
    set_name, init, n, steps, snapshots = RUNS[name]
    job = AuditJob(
        model=args.model, set=set_name, limit=min(n, args.limit or n), attack=Dori(steps=steps, init=init),
        snapshots=snapshots, batch_size=args.batch_size, device=args.device,
    )  # fmt: skip
    results[name] = run_audit_job(args.out / name, job)
    print(f"## {name}\n{format_table(results[name]['rows'])}\n", flush=True)

rows = {name: [r for r in res["rows"] if "/" not in str(r.get("set"))] for name, res in results.items()}
(args.out / "steps.json").write_text(
    json.dumps({"runs": rows, "snapshots": SNAPSHOTS}, indent=1, default=str)
)
md = ["# MR against Dori steps (Tables 6-7, Fig. 2, Fig. 7)", ""]
for name, rs in rows.items():
    md += [f"## {name}", "", format_table(rs, fmt="markdown"), ""]
(args.out / "STEPS.md").write_text("\n".join(md))
print(f"written: {args.out / 'steps.json'}, {args.out / 'STEPS.md'}")
