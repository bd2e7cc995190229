"""Finding Dori, Table 11 (Appendix H.6): iterative NeMo does not remove memorization.

Command that reproduces the committed result (``docs/results/table11.md``; world v2, one H200)::

    python experiments/table11_iterative_nemo.py --device cuda --batch-size 512 --out runs/gpu-v2

Five rounds of NeMo on the 40 ``vm`` items (:func:`dori.fitting.fit_nemo_iterative`: prune, search new Dori
embeddings against the pruned model, prune again), then each round's neurons audited from the prompts and with
new Dori embeddings (50 steps; snapshots 10 and 25). Resumable; writes ``OUT/nemo-it/round-r/``,
``OUT/audit-itd-r/audit.json`` and ``OUT/iterative.json`` / ``OUT/ITERATIVE.md``.
"""

import argparse
import json
from pathlib import Path

from dori.attacks.dori import Dori
from dori.audit_run import AuditJob, run_audit_job
from dori.data.sets import load_set
from dori.fitting import fit_nemo_iterative
from dori.mitigations import load_mitigation
from dori.mitigations.nemo import NeMo
from dori.mitigations.nemo_result import neuron_count
from dori.models.devices import open_model
from dori.report.tables import format_table

ROUNDS = 5  # the paper's
DORI_STEPS = 50

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--model", default="miniworld")
parser.add_argument("--out", type=Path, default=Path("runs/table11"))
parser.add_argument("--device", default=None)
parser.add_argument("--batch-size", type=int, default=64, help="images per UNet batch when sampling")
parser.add_argument("--rounds", type=int, default=ROUNDS)
parser.add_argument("--limit", type=int, default=None, help="only the first K vm items (a quick check)")
args = parser.parse_args()

model = open_model(args.model, args.device)
items = load_set("vm", model, limit=args.limit)
rounds = fit_nemo_iterative(
    model, items, args.out / "nemo-it", NeMo(), args.rounds, DORI_STEPS,
    run_config={"method": "nemo", "model": args.model, "set": "vm", "limit": args.limit},
)  # fmt: skip
results = {}
for r in range(1, args.rounds + 1):
    job = AuditJob(
        model=args.model, set="vm", limit=args.limit,
        mitigation=load_mitigation(f"nemo:{args.out / 'nemo-it' / f'round-{r}'}"),
        attack=Dori(steps=DORI_STEPS), snapshots=(10, 25), batch_size=args.batch_size, device=args.device,
    )  # fmt: skip
    results[r] = run_audit_job(args.out / f"audit-itd-{r}", job)
    print(f"## round {r}\n{format_table(results[r]['rows'])}\n", flush=True)

summary = {
    "rounds": [
        {
            "round": r,
            "flagged": sum(v.memorized for v in rounds[r - 1].result.items.values()),
            "neurons": neuron_count(rounds[r - 1].result),
            "rows": results[r]["rows"],
        }
        for r in results
    ]
}
(args.out / "iterative.json").write_text(json.dumps(summary, indent=1, default=str))
md = ["# Iterative NeMo (Table 11)", ""]
for s in summary["rounds"]:
    md += [f"## round {s['round']}: {s['flagged']} items flagged, {s['neurons']} neurons", ""]
    md += [format_table(s["rows"], fmt="markdown"), ""]
(args.out / "ITERATIVE.md").write_text("\n".join(md))
print(f"written: {args.out / 'iterative.json'}, {args.out / 'ITERATIVE.md'}")
