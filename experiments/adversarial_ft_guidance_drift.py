"""How far a fine-tuned miniworld UNet's predictions moved from the unmitigated world's on held-out data (issue 21).

    python experiments/adversarial_ft_guidance_drift.py --out docs/runs/advft-h200-s15/guidance-drift-cpu.json \
        A=/path/to/A A1=/path/to/A1 G=/path/to/G

For the first 64 held-out images (VAE latents), one noise draw per image (seed 0) at t = 100, 300, 500, 700, 900,
each model predicts the noise with the image's caption (c) and the empty prompt (u). Per model and t: the RMS of
d_c and d_u (the differences from the unmitigated world's predictions) and of the classifier-free-guided difference
d_g = d_u + 7 (d_c - d_u), which is what generation uses; and d_g's mean per latent channel (a shift of the
sample distribution). Float32 on the CPU, about a minute per model. Models are folders of the shipped world with a
fine-tuned UNet (``tools/weights_delta.py unpack``).
"""

import argparse
import json

import torch

from dori.data.sets import load_set
from dori.models.loading import load_model

GUIDANCE = 7.0
TIMESTEPS = (100, 300, 500, 700, 900)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="NAME=FOLDER")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=64)
    args = p.parse_args()
    base = load_model("miniworld")
    held = load_set("heldout", base)[: args.n]
    x0 = base.encode_images(torch.stack([it.image for it in held]))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    c = base.encode_text([it.prompt for it in held])
    u = base.encode_text([""] * len(held))
    models = {name: load_model(folder) for name, folder in (m.split("=", 1) for m in args.models)}
    result = {
        "n_images": len(held),
        "guidance": GUIDANCE,
        "models": dict(m.split("=", 1) for m in args.models),
    }
    rows = []
    for tv in TIMESTEPS:
        t = torch.full((len(held),), tv)
        x_t = base.add_noise(x0, noise, t)
        with torch.no_grad():
            ref_c, ref_u = base.unet_forward(x_t, t, c), base.unet_forward(x_t, t, u)
            for name, m in models.items():
                d_c, d_u = m.unet_forward(x_t, t, c) - ref_c, m.unet_forward(x_t, t, u) - ref_u
                d_g = d_u + GUIDANCE * (d_c - d_u)
                rows.append(
                    {
                        "t": tv,
                        "model": name,
                        "rms_d_c": float(d_c.pow(2).mean().sqrt()),
                        "rms_d_u": float(d_u.pow(2).mean().sqrt()),
                        "rms_d_g": float(d_g.pow(2).mean().sqrt()),
                        "d_g_channel_mean": [round(v, 5) for v in d_g.mean((0, 2, 3)).tolist()],
                    }
                )
                print(rows[-1])
    result["rows"] = rows
    with open(args.out, "w") as f:
        json.dump(result, f, separators=(",", ":"))


if __name__ == "__main__":
    main()
