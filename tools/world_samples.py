"""The miniworld's sample figure (docs/miniworld_samples.png): training images above generations.

Rows, in pairs: vm training images / generations of their captions; tm template variant 0 / generations;
heldout images / generations. One generation per caption (seed 0; DDIM 50, guidance 7).
Usage: python tools/world_samples.py [--model miniworld] [--n 8] [--out docs/miniworld_samples.png]
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from dori.data.sets import load_set
from dori.models.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="miniworld")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--out", default="docs/miniworld_samples.png")
    args = ap.parse_args()
    model = load_model(args.model, device="cpu")
    rows = []
    for name in ("vm", "tm", "heldout"):
        items = load_set(name, model, limit=args.n)
        with torch.no_grad():
            gen = model.sample(model.encode_text([it.prompt for it in items]), seeds=[0] * len(items))
        rows += [(f"{name} training", [it.image for it in items]), (f"{name} generated", list(gen))]
    fig, axes = plt.subplots(len(rows), args.n, figsize=(1.3 * args.n, 1.4 * len(rows)))
    for r, (label, images) in enumerate(rows):
        for c, img in enumerate(images):
            ax = axes[r, c]
            ax.imshow(img.float().clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
