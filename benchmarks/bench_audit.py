"""A small audit sharded over GPUs with torchrun: the multi-GPU scaling of issue 6.

Each item is one memorized image: a Dori search (50 steps, batch 8, fast path, several items per batch)
and 10 generations (DDIM 50, guidance 7) of its adversarial embedding, on the SD v1.4 architecture with
random weights. Items are sharded with :func:`dori.distributed.run_sharded` into one run directory; the
steady-state wall time (after every rank built its model and warmed up) is what scales::

    torchrun --standalone --nproc_per_node 1 benchmarks/bench_audit.py --rundir /tmp/a1 --out a1.json
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_audit.py --rundir /tmp/a2 --out a2.json

On a CPU (``--device cpu --model tiny-random``) it runs the same code with gloo, for testing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from dori.attacks.dori import Dori
from dori.distributed import init, open_run, run_sharded, shutdown
from dori.fast import FastPath
from dori.models.pipeline import SamplingConfig, T2IModel

PROMPTS = ["a painting of a lighthouse at dusk", "portrait of a woman in a red coat", "an old map"]


def build(spec: str, device: torch.device) -> T2IModel:
    """As in bench_sd.py: SD architectures initialised on the device, other specs through load_model."""
    if spec in ("sd14-random", "sd2-random"):
        from diffusers import DDPMScheduler

        from dori.models.builders import build_sd_random

        with torch.device(device):
            model = build_sd_random({"sd14-random": "1.4", "sd2-random": "2-base"}[spec])
        model.scheduler = DDPMScheduler.from_config(model.scheduler.config)
        return model.to(device).eval()
    from dori.models.loading import load_model

    return load_model(spec, device=device)


def targets(model: T2IModel, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, *model.sample_shape, generator=torch.Generator().manual_seed(seed))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="default: sd14-random on CUDA, tiny-random on the CPU")
    p.add_argument("--rundir", required=True, help="run directory (shared by the ranks)")
    p.add_argument("--out", default=None, help="JSON summary (written by rank 0)")
    p.add_argument("--items", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--gens", type=int, default=10)
    p.add_argument("--memory-budget-gib", type=float, default=32.0)
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (compiled in the warm-up)")
    args = p.parse_args(argv)
    ctx = init(device="cpu" if args.device == "cpu" else None)
    cuda = ctx.device.type == "cuda"
    model = build(args.model or ("sd14-random" if cuda else "tiny-random"), ctx.device)
    fp = FastPath(memory_budget_gib=args.memory_budget_gib, compile=args.compile)
    fp.apply(model)
    dori, k, cfg = fp.prepare(model, SamplingConfig(args.sample_steps, 7.0), steps=args.steps, batch_size=8)
    run = open_run(ctx, args.rundir, {"bench": "audit", "items": args.items, "steps": args.steps})

    def work(batch: list[int]) -> list[dict]:
        x0 = torch.cat([targets(model, 1, seed=1000 + i) for i in batch])
        init_emb = model.encode_text([PROMPTS[i % len(PROMPTS)] for i in batch]).float().cpu()
        res = dori(model, x0, init_emb, seeds=list(batch))
        seeds = [args.gens * i + j for i in batch for j in range(args.gens)]
        imgs = model.sample(res.embeddings.repeat_interleave(args.gens, 0), seeds, cfg)
        return [
            {
                "final_loss": float(res.losses[j, -1]),
                "gen_mean": float(imgs[args.gens * j : args.gens * (j + 1)].mean()),
                "rank": ctx.rank,
            }
            for j in range(len(batch))
        ]

    # warm-up on every rank (kernels, cuDNN plans), outside the timed audit
    short = Dori(steps=2, batch_size=8, max_micro_batch=dori.max_micro_batch)
    short(model, targets(model, k), model.encode_text(PROMPTS[:1] * k).float().cpu(), list(range(k)))
    emb = model.encode_text(PROMPTS[:1]).expand(cfg.batch_size, -1, -1)
    model.sample(
        emb, list(range(cfg.batch_size)), SamplingConfig(2, 7.0, cfg.batch_size, cfg.decode_batch_size)
    )
    if cuda:
        torch.cuda.synchronize()
    ctx.barrier()
    t0 = time.perf_counter()
    results = run_sharded(
        ctx, run, list(range(args.items)), key=lambda i: f"item{i:04d}", work=work, batch_size=k
    )
    wall = time.perf_counter() - t0
    if ctx.is_main:
        summary = {
            "world_size": ctx.world_size,
            "items": args.items,
            "dori_items_per_batch": k,
            "gen_batch": cfg.batch_size,
            "wall_s": wall,
            "s_per_item": wall / args.items,
            "items_per_rank": {
                r: sum(v["rank"] == r for v in results.values()) for r in range(ctx.world_size)
            },
            "gpu": torch.cuda.get_device_name(ctx.device) if cuda else "cpu",
            "peak_alloc_gib_rank0": torch.cuda.max_memory_allocated(ctx.device) / 1024**3 if cuda else None,
        }
        print(json.dumps(summary), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(summary, indent=1))
    shutdown(ctx)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
