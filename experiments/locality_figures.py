"""Finding Dori, Section 4.1-4.3 and Appendix J: Figures 3, 4, 5, 10, 11, 12 and 13 on a world.

Command (from the repository root)::

    . .venv/bin/activate && python experiments/locality_figures.py

It runs ``dori analyze locality`` with the settings below (resumable: run it again after a kill), then
writes ``LOCALITY.md`` into the run directory: per figure, the PNG and a note written from the measured
numbers that says whether the paper's pattern holds. Edit the config and rerun to change anything; a
changed setting needs a new ``OUT``.
"""

import json
import sys
import time
from pathlib import Path

from dori.cli import main
from dori.report.figures_locality import TITLES

# ---------------------------------------------------------------- config
MODEL = "miniworld"  # a built-in name, a world folder, or a diffusers model with --sscd
SET = "vm"  # the item's set; its prompts also form Y_mem and Fig. 13
ITEM = None  # item id; None = the first item of SET
NONMEM_SET = None  # None = "unique" on a world (the paper's non-memorized prompts), else "nonmem"
K = 100  # Dori runs per init kind and size of Y_mem (paper: 100)
STEPS = 50  # Dori steps per run (paper: 50)
GENS = 1  # generations per trigger for the replication check
SEED = 0
OUT = Path("runs/locality-miniworld")
EXTRA: list[str] = []  # e.g. ["--sscd", "path/to/sscd_disc_mixup.torchscript.pt", "--device", "cuda"]

# ---------------------------------------------------------------- run
argv = ["analyze", "locality", "--model", MODEL, "--set", SET, "--k", str(K), "--steps", str(STEPS)]
argv += ["--gens", str(GENS), "--seed", str(SEED), "--out", str(OUT), *EXTRA]
argv += ["--item", ITEM] if ITEM else []
argv += ["--nonmem-set", NONMEM_SET] if NONMEM_SET else []
print("dori " + " ".join(argv), flush=True)
start = time.perf_counter()
rc = main(argv)
if rc != 0:
    sys.exit(rc)
wall = time.perf_counter() - start

# ---------------------------------------------------------------- notes
out = json.loads((OUT / "locality.json").read_text())
cfg, res = out["config"], out["results"]
searches = {kind: res["dispersion"][kind]["search"] for kind in ("random", "nonmem") if "dispersion" in res}
lines = [
    f"# Locality on {cfg['model']}: item {cfg['item']} of `{cfg['set']}`",
    "",
    f"Command: `python experiments/locality_figures.py` (= `dori {' '.join(argv)}`), K = {cfg['k']}, "
    f"{cfg['steps']} Dori steps, seed {cfg['seed']}, git {out['provenance'].get('git', '?')[:10]}.",
    f"Wall time of this invocation: {wall:.0f} s (a rerun skips finished units).",
]
for kind, s in searches.items():
    lines.append(
        f"- Batched Dori search from {kind} inits: {s['k']} runs x {s['steps']} steps in {s['seconds']:.1f} s "
        f"on {s['device']} ({s['torch_threads']} threads)."
    )
if "seconds" in res.get("activations", {}):
    a = res["activations"]
    lines.append(f"- Activation discrepancy of {a['n_adv']} + {a['n_mem']} embeddings: {a['seconds']:.1f} s.")
for name, table in res.get("agreement", {}).items():
    if isinstance(table, dict) and "seconds" in table:
        lines.append(
            f"- {name} selections for {table['n_adv']} triggers and Fig. 13: {table['seconds']:.1f} s."
        )
for fig, title in TITLES.items():
    if fig in out["figures"]:
        lines += ["", f"## {title}", "", f"![{fig}]({out['figures'][fig]})", "", out["notes"][fig]]
(OUT / "LOCALITY.md").write_text("\n".join(lines) + "\n")
print(f"\nwrote {OUT / 'LOCALITY.md'}")
