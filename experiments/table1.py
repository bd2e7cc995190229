"""Table 1 of Finding Dori on a world.

    python experiments/table1.py                      # shipped miniworld, paper protocol, runs/table1
    python experiments/table1.py --model DIR --out runs/table1-seed1

Copy this file and edit the settings below to run a variant; the library recipe is
``dori.recipes.table1`` (the same code ``dori demo`` runs). Output: ``OUT/table1.json`` (audit schema),
``OUT/TABLE1.md`` (each cell: world (paper)), per-audit run directories with HTML reports.
"""

import argparse
from pathlib import Path

from dori.recipes.table1 import Table1Config, run_table1

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="miniworld")
parser.add_argument("--out", default="runs/table1")
parser.add_argument("--limit", type=int, default=None)
parser.add_argument("--device", default=None)
parser.add_argument("--dtype", default="fp32")
parser.add_argument("--fast", action="store_true", help="audits on the fast path (bf16 on CUDA)")
parser.add_argument("--batch-size", type=int, default=64, help="sampling batch of the audits")
args = parser.parse_args()

config = Table1Config(
    model=args.model,
    mem_set="vm",  # the world's verbatim-memorized items (SD: the 112 VM prompts)
    nonmem_set="unique",  # non-memorized training items (SD: nonmem)
    utility_set="heldout",  # FID/KID and A_CLIP reference (SD: coco with --reference-images)
    n_utility=200,
    n_gens=10,  # generations per item (NeMo's protocol)
    dori_steps=50,  # Adam lr 0.1, batch 8 (Algorithm 1)
    wanda_sparsity=0.01,
    wanda_group="prompt",
    limit=args.limit,
    device=args.device,
    dtype=args.dtype,
    fast=args.fast,
    batch_size=args.batch_size,
)
table = run_table1(args.out, config)
print(Path(args.out, "TABLE1.md").read_text())
