"""NeMo's memorization score as a detector (Hintersdorf et al., NeurIPS 2024; dori's :mod:`dori.mitigations.nemo`).

For a prompt, NeMo takes ``n_seeds`` initial latents (one batch from a CPU generator seeded with ``seed``, the
same for every prompt), one UNet prediction each, the noise differences ``eps_hat - x_T`` min-max normalized
per channel (:func:`dori.mitigations.nemo_noise.noise_differences`), and the MS-SSIM of every pair of seeds.
A memorized prompt steers every seed to the same image, so its differences look alike. NeMo calls a prompt
memorized when some pair exceeds tau_mem (its seed filter); the score here is therefore the **maximum
pairwise MS-SSIM** (``mean_pairwise`` is recorded too). The noise settings are the ones NeMo's detection uses
(variant ``reference``: the second DDIM timestep, no guidance; ``paper``: the first, guidance 7); nothing is
blocked, so no calibration is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from dori.detection.base import check_batch, register
from dori.errors import DoriError
from dori.metrics.ssim import ms_ssim_settings, pairwise_ms_ssim, upper_pairs
from dori.mitigations.nemo import VARIANTS
from dori.mitigations.nemo_noise import NoiseSettings, initial_latents, noise_differences
from dori.models.pipeline import T2IModel


@register("nemo")
@dataclass
class NeMoScore:
    """NeMo's (unblocked) memorization score.

    Args:
        variant: ``reference`` or ``paper`` noise settings (see :mod:`dori.mitigations.nemo`).
        n_seeds / seed: seeds per prompt (10) drawn in one batch from ``manual_seed(seed)`` (1).
        steps: DDIM steps of the schedule the timestep comes from (50).
        max_rows: most UNet rows per forward pass.
    """

    variant: str = "reference"
    n_seeds: int = 10
    seed: int = 1
    steps: int = 50
    max_rows: int = 64
    name: str = "nemo"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise DoriError(f"unknown NeMo variant {self.variant!r}: use reference or paper")
        if self.n_seeds < 2:
            raise DoriError("NeMo's score needs at least 2 seeds")

    @property
    def noise(self) -> NoiseSettings:
        return NoiseSettings(**{**VARIANTS[self.variant]["detect"].__dict__, "steps": self.steps})

    def settings(self) -> dict:
        return {
            **asdict(self),
            "noise": asdict(self.noise),
            "statistic": "max over seed pairs of MS-SSIM of normalized noise differences",
        }

    @torch.no_grad()
    def score(self, model: T2IModel, prompts: Sequence[str], indices: Sequence[int]) -> list[dict]:
        """Per prompt: ``score`` (max pairwise MS-SSIM) and ``mean_pairwise``; ``indices`` are not used
        (NeMo draws the same seeds for every prompt)."""
        check_batch(prompts, indices)
        latents = initial_latents(model, self.n_seeds, self.seed)
        ssim = ms_ssim_settings(*model.sample_shape[1:])
        per_rows = max(1, self.max_rows // (2 if self.noise.guidance else 1))
        per_call = max(1, per_rows // self.n_seeds)
        out = []
        for lo in range(0, len(prompts), per_call):
            group = list(prompts[lo : lo + per_call])
            cond = model.encode_text(group).repeat_interleave(self.n_seeds, dim=0)
            x = latents.repeat(len(group), 1, 1, 1)
            diffs = noise_differences(model, cond, x, self.noise).view(
                len(group), self.n_seeds, *latents.shape[1:]
            )
            for d in diffs:
                pairs = upper_pairs(pairwise_ms_ssim(d, ssim))
                out.append({"score": float(pairs.max()), "mean_pairwise": float(pairs.mean())})
        return out
