"""A tiny sharded audit (tiny-random: one batched Dori search and two generations per item).

Run by tests/test_distributed.py in one process and under ``torchrun --nproc_per_node 2`` (gloo):
``python tests/dist_worker.py RUN_DIR``.
"""

from __future__ import annotations

import sys

import torch

from dori.attacks.dori import Dori, initial_embeddings
from dori.distributed import init, open_run, run_sharded, shutdown
from dori.models.builders import build_tiny_random
from dori.models.pipeline import SamplingConfig

PROMPTS = ["a red circle", "a blue square", "green triangle", "two dots", "a star", "yellow stripes"]


def audit(out: str) -> dict[str, dict]:
    torch.set_num_threads(1)
    ctx = init(device="cpu")
    model = build_tiny_random(seed=0)
    run = open_run(ctx, out, {"audit": "tiny", "steps": 3})

    def work(batch: list[tuple[int, str]]) -> list[dict]:
        idx = [i for i, _ in batch]
        gen = [torch.Generator().manual_seed(100 + i) for i in idx]
        x0 = model.encode_images(torch.stack([torch.rand(3, 16, 16, generator=g) for g in gen]))
        res = Dori(steps=3)(model, x0, initial_embeddings(model, [p for _, p in batch]), seeds=idx)
        seeds = [10 * i + k for i in idx for k in range(2)]
        imgs = model.sample(
            res.embeddings.repeat_interleave(2, 0), seeds, SamplingConfig(steps=2, batch_size=3)
        )
        return [
            {
                "loss": res.losses[j].tolist(),
                "norm": float(res.embeddings[j].norm()),
                "gen_mean": float(imgs[2 * j : 2 * j + 2].mean()),
                "rank": ctx.rank,
            }
            for j in range(len(batch))
        ]

    items = list(enumerate(PROMPTS))
    results = run_sharded(ctx, run, items, key=lambda it: f"item{it[0]}", work=work, batch_size=2)
    shutdown(ctx)
    return results


if __name__ == "__main__":
    audit(sys.argv[1])
