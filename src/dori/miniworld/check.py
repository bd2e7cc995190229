"""Checks of a trained miniworld: memorization rate per set, text alignment and FID of generations, and the
copy detector's calibration plot.

The protocol is the paper's (NeMo's): 10 generations per prompt, DDIM 50 steps, guidance 7; an item is
replicated when the best copy-detector similarity between its training image and its generations passes the
world's calibrated threshold; MR = share of replicated items.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from dori.metrics.features import Backends
from dori.metrics.functions import fid
from dori.metrics.replication import replication_rate
from dori.models.pipeline import SamplingConfig, T2IModel


def generate_set(
    model: T2IModel, items, n_gen: int = 10, config: SamplingConfig | None = None, seed: int = 0
) -> torch.Tensor:
    """(len(items), n_gen, 3, H, W) generations; item i uses seeds ``seed + 1000 * i + k``."""
    prompts = [it.prompt for it in items for _ in range(n_gen)]
    seeds = [seed + 1000 * i + k for i in range(len(items)) for k in range(n_gen)]
    imgs = model.generate(prompts, seeds, config)
    return imgs.view(len(items), n_gen, *imgs.shape[1:])


def replication(backends: Backends, items, gens: torch.Tensor) -> dict:
    """Per item best and median similarity of generations to the training image, and the MR."""
    ref = backends.copy_detector(torch.stack([it.image for it in items]))
    n, k = gens.shape[:2]
    emb = backends.copy_detector(gens.flatten(0, 1)).view(n, k, -1)
    sims = (emb * ref[:, None]).sum(-1)
    best = sims.max(1).values
    return {
        "n_items": n,
        "mr": replication_rate(best, backends.threshold),
        "best_sim_mean": float(best.mean()),
        "median_sim_mean": float(sims.median(1).values.mean()),
        "per_item_best": [round(float(x), 4) for x in best],
    }


def check_world(
    model: T2IModel,
    backends: Backends,
    sets: dict[str, list],
    n_gen: int = 10,
    config: SamplingConfig | None = None,
    log=print,
) -> dict:
    """MR for each set in ``sets``; for ``heldout`` also A_CLIP (generated vs real) and FID (feature model)."""
    out: dict = {
        "threshold": backends.threshold,
        "n_gen": n_gen,
        "sampling": vars(config or SamplingConfig()),
    }
    for name, items in sets.items():
        t = time.time()
        gens = generate_set(model, items, n_gen, config)
        res = replication(backends, items, gens)
        if name == "heldout" and backends.aligner is not None:
            txt = backends.aligner.text_features([it.prompt for it in items])
            real = (backends.aligner.image_features(torch.stack([it.image for it in items])) * txt).sum(1)
            gen = (
                backends.aligner.image_features(gens.flatten(0, 1)).view(len(items), n_gen, -1) * txt[:, None]
            ).sum(-1)
            res["a_clip_real"] = float(real.mean())
            res["a_clip_generated"] = float(gen.mean())
            res["a_clip_ratio"] = res["a_clip_generated"] / res["a_clip_real"]
        if name == "heldout" and backends.features is not None:
            real_f = backends.features(torch.stack([it.image for it in items]))
            res["fid"] = fid(backends.features(gens[:, 0]), real_f)
            res["fid_note"] = (
                "first generation of each heldout prompt vs the heldout images, feature-model space"
            )
        res["seconds"] = round(time.time() - t, 1)
        out[name] = res
        log(
            f"{name}: MR {res['mr']:.3f} (best sim mean {res['best_sim_mean']:.3f}, {res['seconds']}s)"
            + (
                f", A_CLIP {res['a_clip_generated']:.3f} vs real {res['a_clip_real']:.3f}"
                if "a_clip_real" in res
                else ""
            )
            + (f", FID {res['fid']:.2f}" if "fid" in res else "")
        )
    return out


def plot_calibration(world_dir: str | Path, path: str | Path) -> Path:
    """Histogram of the copy detector's calibration scores with the chosen threshold (PNG)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dori.runs import load_tensors

    world_dir = Path(world_dir)
    scores = load_tensors(world_dir / "standins" / "calibration.safetensors")
    info = json.loads((world_dir / "dori_world.json").read_text())["copy_detector"]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    bins = np.linspace(-0.4, 1.0, 71)
    labels = {
        "replicas": "replicas (augmented, VAE round trip)",
        "same_caption": "same caption, other image",
        "unrelated": "unrelated images",
    }
    for key, label in labels.items():
        ax.hist(
            scores[key].numpy(), bins=bins, alpha=0.55, density=True, label=f"{label} (n={len(scores[key])})"
        )
    ax.axvline(info["threshold"], color="k", ls="--", label=f"threshold {info['threshold']:.2f}")
    ax.set_xlabel("copy-detector cosine similarity")
    ax.set_ylabel("density")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
