"""Finding Dori, Section 4.1-4.3 and Appendix J: Figures 3, 4, 5, 10, 11, 12 and 13 on a world.

Command that reproduces the committed result (``docs/locality/LOCALITY.md``; world v2, one H200)::

    python experiments/locality_figures.py --device cuda --out runs/gpu/locality

It runs the locality analyses (:func:`dori.locality_run.locality_to_folder`, what ``dori analyze locality``
runs) with the settings below (resumable: run it again after a kill), then writes ``LOCALITY.md`` into the
run directory: the verdict table (each check: measured quantity, criterion, outcome; ``verdict`` in
``locality.json``), then per figure the PNG and its note. Edit the config and rerun to change anything; a
changed setting needs a new ``OUT``.
"""

import argparse
import sys
import time
from pathlib import Path

from dori.analysis.locality import LocalityConfig
from dori.data.sets import load_set
from dori.locality_run import copy_check, find_item, locality_to_folder
from dori.models.devices import open_model
from dori.models.pipeline import SamplingConfig
from dori.report.figures_locality import TITLES
from dori.report.locality_notes import locality_markdown

# ---------------------------------------------------------------- config
MODEL = "miniworld"  # a built-in name, a world folder, or a diffusers model with --sscd
SET = "vm"  # the item's set; its prompts also form Y_mem and Fig. 13
ITEM = None  # item id; None = the first item of SET
NONMEM_SET = None  # None = "unique" on a world (the paper's non-memorized prompts), else "nonmem"
K = 100  # Dori runs per init kind and size of Y_mem (paper: 100)
STEPS = 50  # Dori steps per run (paper: 50)
GENS = 1  # generations per trigger for the replication check
SEED = 0
parser = argparse.ArgumentParser(description="Locality figures of Finding Dori on a world (resumable)")
parser.add_argument("--model", default=MODEL)
parser.add_argument("--out", type=Path, default=Path("runs/locality-miniworld"))
parser.add_argument("--device", default=None)
parser.add_argument(
    "--sscd", default=None, help="SSCD TorchScript file (a real model; a world uses its stand-in)"
)
parser.add_argument("--k", type=int, default=K)
args = parser.parse_args()
OUT = args.out

# ---------------------------------------------------------------- run
start = time.perf_counter()
model = open_model(args.model, args.device)
items = load_set(SET, model)
item = find_item(items, ITEM, SET)
nonmem_name = NONMEM_SET or ("unique" if model.world is not None else "nonmem")
cfg = LocalityConfig(
    k=args.k,
    steps=STEPS,
    seed=SEED,
    generation_seeds=tuple(range(SEED, SEED + GENS)),
    sampling=SamplingConfig(),
)
settings = {
    "command": "analyze locality",
    "model": args.model,
    "dtype": "fp32",
    "set": SET,
    "nonmem_set": nonmem_name,
}
out = locality_to_folder(
    OUT, model, item, [it.prompt for it in load_set(nonmem_name, model)], [it.prompt for it in items], cfg,
    *copy_check(model, args.sscd), settings=settings, log=lambda msg: print(f"[locality] {msg}", flush=True),
)  # fmt: skip
wall = time.perf_counter() - start

# ---------------------------------------------------------------- page
command = f"python experiments/locality_figures.py {' '.join(sys.argv[1:])}".strip()
(OUT / "LOCALITY.md").write_text(locality_markdown(out, command, TITLES, wall))
print(f"\nwrote {OUT / 'LOCALITY.md'}")
