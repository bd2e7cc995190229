"""NeMo's noise differences: the signal its memorization score is computed on.

For a prompt embedding ``y`` and initial noise ``x_T`` NeMo takes one UNet prediction on ``x_T`` and
forms ``d = eps_hat(x_T, t, y) - x_T``, min-max normalized per sample and channel over (H, W). For a
memorized prompt these differences look alike whatever the seed (the model steers every seed to the
same image), so their MS-SSIM is high; blocking the right neurons makes them seed-specific again.

Two settings of the reference code (ml-research/localizing_memorization_in_diffusion_models) matter
and are reproduced by :class:`NoiseSettings`:

* ``timestep_index``: the reference loop returns at loop index 1, i.e. the prediction at the *second*
  DDIM timestep (981, **961**, ... with 50 steps) on the initial noise (the paper says "first step").
* ``guidance`` and ``swapped_cfg``: detection runs without guidance (conditional prediction only). The
  threshold script runs with guidance 7, where the reference concatenates ``[uncond, cond]`` but splits
  the output as ``(cond, uncond)``, so it computes ``c + g (u - c)``; ``swapped_cfg=True`` reproduces that.

Several prompts and seeds are evaluated in one UNet batch. Each row may block its own neurons:
:func:`dori.models.hooks.rowwise_scale_output_channels` multiplies the output of each value layer by a per-row mask (1 = keep,
``scale`` = blocked), the batched equivalent of :func:`dori.models.hooks.scale_output_channels`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from dori.models.hooks import row_multipliers, rowwise_scale_output_channels
from dori.models.pipeline import T2IModel

Blocking = Mapping[str, Sequence[int]]
"""Neurons to block: value-layer name -> output-channel indices."""


@dataclass(frozen=True)
class NoiseSettings:
    """How one noise difference is computed (see module docstring)."""

    timestep_index: int = 1
    guidance: float = 0.0
    swapped_cfg: bool = False
    steps: int = 50


def detection_timestep(model: T2IModel, settings: NoiseSettings) -> torch.Tensor:
    """The DDIM timestep the prediction is taken at (961 for SD with 50 steps and index 1)."""
    return model.ddim_scheduler(settings.steps).timesteps[settings.timestep_index]


def initial_latents(model: T2IModel, n: int, seed: int) -> torch.Tensor:
    """NeMo's x_T: one batch of ``n`` draws from a CPU generator seeded with ``seed`` (same for every prompt)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn((n, *model.sample_shape), generator=gen)


def masks_for_rows(
    model: T2IModel, layers: Sequence[str], blockings: Sequence[Blocking | None], scale: float = 0.0
) -> dict[str, torch.Tensor] | None:
    """Per-row channel multipliers (:func:`dori.models.hooks.row_multipliers`) of a batch whose row ``r``
    blocks ``blockings[r]`` (None: nothing), on the model's device; None when nothing is blocked."""
    mults = row_multipliers(model.unet, blockings, scale, layers)
    out = {k: m.to(model.device) for k, m in mults.items() if (m != 1).any()}
    return out or None


def normalize_per_channel(diff: torch.Tensor) -> torch.Tensor:
    """Min-max normalize each (sample, channel) plane over (H, W) to [0, 1]."""
    lo = diff.amin(dim=(2, 3), keepdim=True)
    hi = diff.amax(dim=(2, 3), keepdim=True)
    return (diff - lo) / (hi - lo)


@torch.no_grad()
def noise_differences(
    model: T2IModel,
    cond: torch.Tensor,
    latents: torch.Tensor,
    settings: NoiseSettings,
    row_masks: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Normalized ``eps_hat(x_T, t, y) - x_T`` for each row (float32, on the CPU).

    Args:
        cond: (R, tokens, dim) conditional embeddings, one per row.
        latents: (R, C, H, W) initial noise x_T, one per row.
        settings: timestep, guidance and the CFG-order quirk.
        row_masks: optional per-row channel masks of value layers (see :func:`masks_for_rows`).
    """
    t = detection_timestep(model, settings).to(model.device)
    sched = model.ddim_scheduler(settings.steps)
    x = latents.to(model.device, torch.float32) * sched.init_noise_sigma
    x_in = sched.scale_model_input(x, t)
    cond = cond.to(model.device)
    rows = x.shape[0]
    if settings.guidance == 0:
        masks = row_masks or {}
        with rowwise_scale_output_channels(model.unet, masks):
            eps = model.unet_forward(x_in.to(model.dtype), t.expand(rows), cond).float()
    else:
        uncond = model.null_embedding().expand(rows, -1, -1)
        masks = {k: torch.cat([v, v]) for k, v in (row_masks or {}).items()}
        with rowwise_scale_output_channels(model.unet, masks):
            both = model.unet_forward(
                torch.cat([x_in, x_in]).to(model.dtype), t.expand(2 * rows), torch.cat([uncond, cond])
            ).float()
        u, c = both.chunk(2)
        g = settings.guidance
        eps = c + g * (u - c) if settings.swapped_cfg else u + g * (c - u)
    return normalize_per_channel(eps - x).cpu()


def merge_blockings(a: Blocking, b: Blocking) -> dict[str, list[int]]:
    """Union of two blockings (order kept: ``a``'s neurons first)."""
    out = {k: list(v) for k, v in a.items()}
    for k, v in b.items():
        out[k] = list(dict.fromkeys([*out.get(k, []), *v]))
    return out
