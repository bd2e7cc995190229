"""Wen et al.'s detector: the magnitude of the text-conditional noise prediction.

*Detecting, Explaining, and Mitigating Memorization in Diffusion Models* (Wen, Liu, Chen, Lyu; ICLR 2024).
For a prompt ``c`` and the DDIM trajectory of classifier-free guided sampling, step ``k`` at timestep ``t_k``
gives ``d_k = ||eps(x_{t_k}, c) - eps(x_{t_k}, "")||_2`` (L2 norm over all latent dimensions of one image).
The prompt's score is the mean of ``d_k`` over the steps ``start <= k < end`` and over ``n_gens``
generations; memorized prompts have large text-conditional predictions from the first step on.

Settings of the reference code (``YuxinWenRick/diffusion_memorization`` at c8fe471: ``detect_mem.py`` and
``local_sd_pipeline.py``, aggregation in ``examples/det_mem_viz.ipynb``), reproduced here by default:

* DDIM with 50 steps (the model's training schedule, ``timestep_spacing`` as configured), eta 0;
* guidance 7.5 (it moves the trajectory after the first step; the first step does not depend on it);
* 4 generations per prompt; the prompt at position ``i`` of its set draws its ``n_gens`` initial latents
  in one ``torch.randn`` batch seeded with ``i + gen_seed`` (``gen_seed`` 0). On the CPU this is the
  reference's draw exactly; the reference draws on the GPU, whose generator gives other numbers;
* the unconditional branch is the empty prompt ``""``;
* the score is ``d`` at the first step (``start=0, end=1``), the setting of the headline result (AUC 0.960,
  TPR@1%FPR 0.760 on SD v1.4, 500 memorized vs 2,000 non-memorized prompts, with one generation).

Deviations: dori computes in the model's dtype (float32 on the CPU; the reference uses float16) and runs only
the ``end`` steps it needs instead of the whole generation (the score does not depend on later steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from dori.detection.base import check_batch, register
from dori.errors import DoriError
from dori.models.pipeline import T2IModel


def wen_latents(model: T2IModel, index: int, n_gens: int, gen_seed: int) -> torch.Tensor:
    """The reference's initial latents of the prompt at position ``index``: one CPU draw of ``n_gens``."""
    gen = torch.Generator().manual_seed(int(index) + int(gen_seed))
    return torch.randn((n_gens, *model.sample_shape), generator=gen)


@register("wen")
@dataclass
class WenScore:
    """Text-conditional noise magnitude (see module docstring for the algorithm and the reference settings).

    Args:
        steps: DDIM steps of the sampling schedule (50).
        guidance: classifier-free guidance of the trajectory (7.5).
        n_gens: generations per prompt (4).
        gen_seed: added to the prompt's position to seed its latents (0).
        start, end: the steps averaged, ``start <= k < end`` (0, 1: the first step).
        max_rows: most UNet rows per forward pass (each generation takes two: empty and text prompt).
    """

    steps: int = 50
    guidance: float = 7.5
    n_gens: int = 4
    gen_seed: int = 0
    start: int = 0
    end: int = 1
    max_rows: int = 64
    name: str = "wen"

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end <= self.steps:
            raise DoriError(
                f"Wen score: need 0 <= start < end <= steps, got {self.start}, {self.end}, {self.steps}"
            )
        if self.n_gens < 1:
            raise DoriError("Wen score: n_gens must be >= 1")

    def settings(self) -> dict:
        return {
            **asdict(self),
            "statistic": "mean over generations and steps [start, end) of ||eps(x_t, c) - eps(x_t, '')||_2",
            "sampler": "DDIM, eta 0",
            "latents": "torch.randn((n_gens, C, H, W)) from a CPU generator seeded with index + gen_seed",
            "reference": "YuxinWenRick/diffusion_memorization@c8fe471 detect_mem.py, local_sd_pipeline.py",
        }

    @torch.no_grad()
    def norms(self, model: T2IModel, prompts: Sequence[str], indices: Sequence[int]) -> torch.Tensor:
        """``d`` of each prompt, generation and step < ``end``: (P, n_gens, end), float32 on the CPU."""
        check_batch(prompts, indices)
        per_call = max(1, self.max_rows // (2 * self.n_gens))
        out = []
        for lo in range(0, len(prompts), per_call):
            group = list(range(lo, min(lo + per_call, len(prompts))))
            cond = model.encode_text([prompts[i] for i in group]).repeat_interleave(self.n_gens, dim=0)
            uncond = model.null_embedding().expand(cond.shape[0], -1, -1)
            x = torch.cat([wen_latents(model, indices[i], self.n_gens, self.gen_seed) for i in group])
            sched = model.ddim_scheduler(self.steps)
            x = x.to(model.device, torch.float32) * sched.init_noise_sigma
            d = torch.zeros(x.shape[0], self.end)
            for k, t in enumerate(sched.timesteps[: self.end]):
                x_in = sched.scale_model_input(x, t)
                rows = x.shape[0]
                both = model.unet_forward(
                    torch.cat([x_in, x_in]), t.to(model.device).expand(2 * rows), torch.cat([uncond, cond])
                ).float()
                u, c = both.chunk(2)
                d[:, k] = (c - u).flatten(1).norm(dim=1).cpu()
                if k + 1 < self.end:
                    x = sched.step(u + self.guidance * (c - u), t, x).prev_sample
            out.append(d.view(len(group), self.n_gens, self.end))
        return torch.cat(out)

    def score(self, model: T2IModel, prompts: Sequence[str], indices: Sequence[int]) -> list[dict]:
        """Per prompt: ``score``, ``per_gen`` (mean over the steps) and ``per_step`` (mean over generations)."""
        d = self.norms(model, prompts, indices)[:, :, self.start : self.end]
        return [
            {
                "score": float(row.mean()),
                "per_gen": row.mean(1).tolist(),
                "per_step": row.mean(0).tolist(),
            }
            for row in d
        ]
