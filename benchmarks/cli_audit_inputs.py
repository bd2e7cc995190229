"""Inputs for timing ``dori audit`` on the SD v1.4 architecture with random weights (issue 23).

The audit needs training images and a copy detector. For timing, neither needs to be real: this writes a
random 512x512 image for each of the first ``--n`` VM prompts (named by LAION index, as ``--images`` expects)
and an SSCD stand-in with SSCD's cost (a ResNet-50 with a 512-d head, random weights, TorchScript, run at
320 px as dori runs SSCD)::

    python benchmarks/cli_audit_inputs.py --out /tmp/w --n 16
    dori audit --model sd14-random --set vm --images /tmp/w/images --limit 16 --sscd /tmp/w/sscd.pt \\
        --attack dori --snapshots none --out /tmp/w/audit
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dori.data.sets import sd_set


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=16)
    args = p.parse_args(argv)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for item in sd_set("vm")[: args.n]:
        pixels = (rng.random((512, 512, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(out / "images" / f"{item.meta['laion_index']}.png")
    torch.manual_seed(0)
    try:
        from torchvision.models import resnet50

        net, what = resnet50(num_classes=512).eval(), "ResNet-50"
    except ImportError:  # a CPU check without torchvision: a small net (the cost is then not SSCD's)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 8, 8), torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten()
        )
        what = "small conv net (no torchvision)"
    torch.jit.trace(net, torch.rand(1, 3, 320, 320)).save(str(out / "sscd.pt"))
    print(f"{args.n} images and the SSCD stand-in ({what}) in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
