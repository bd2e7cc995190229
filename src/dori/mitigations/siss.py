"""SISS, Subtracted Importance Sampled Scores (Alberti et al.), data unlearning per memorized image (Finding
Dori, Section 4.4 "Baseline", Appendix E.2, Eq. (4); Table 3 row "SISS + Dori").

SISS fine-tunes the UNet to keep a set X \\ A (``keep``) and forget a set A (``forget``), one memorized image
at a time, each from the original model. Noisy samples come from the defensive mixture
q_lambda(m_t | x, a) = (1 - lambda) q(m_t | x) + lambda q(m_t | a), and both terms are importance-weighted.
Per micro-batch (the reference's order of random draws: latents of x and a, noise, mixture choice)::

    x ~ keep, a ~ forget  (VAE posterior samples),  eps ~ N(0, I),  t = 999
    m_t = gamma_t (a if the lambda-coin says so else x) + sigma_t eps
    w_x = q(m_t|x) / q_lambda,   w_a = q(m_t|a) / q_lambda        (Gaussian forward densities)
    L_keep = sum over C, H, W of w_x (eps_x - eps_theta(m_t, t, y))^2 / (batch * accumulation)
    L_del  = sum over C, H, W of w_a (eps_a - eps_theta(m_t, t, y))^2 / (batch * accumulation)
    after the accumulation: gradient = grad L_keep - c grad L_del, with c such that ||c grad L_del|| =
    scaling_norm; clipped to norm 1; AdamW step

where eps_x = (m_t - gamma_t x) / sigma_t (eps_a likewise) and y is the embedding of the *modified* prompt
(for a v-prediction model the targets are the matching velocities). Minimizing L_keep - L_del is SISS's
objective with the superfactor chosen each step so that the deletion gradient has a fixed norm.

Data variants (:mod:`dori.mitigations.siss_data`; chosen explicitly with ``variant``):

* ``reference`` (default): generations of a modified prompt (random tokens appended), split by 2-means on
  pixels into the memorized-looking cluster (forgotten) and the rest (kept); conditioning on that prompt;
* ``paper`` (Finding Dori, Appendix E.2): 128 generations of the modified prompt, split by the copy
  detector into replicas (forgotten) and non-replicas (kept); conditioning on that prompt;
* ``surrogates`` (dori's earlier setup, not from either source): keep = surrogate images of the item
  (generated under a pruning mitigation, as adversarial fine-tuning uses), forget = the training image,
  conditioning on the memorized prompt.

Reference settings (claserken/SISS @ af2a29c, ``config/delete_sd.yaml``, ``delete_sd.py``,
``losses/ddpm_deletion_loss.py``; the Dori paper used them): 35 steps, lambda 0.5, AdamW lr 1e-5 (betas
0.9/0.999, weight decay 0.01, eps 1e-8), batch 1 with 16 accumulation steps, gradient clipping 1.0, scaling
norm 750, t fixed at 999, losses summed over C x H x W, VAE ``latent_dist.sample()``. The reference README
advises a scaling norm of about 10% of the naive-deletion gradient norm; on a model much smaller than SD v1.4
(the miniworld), whose gradient norms are far from SD's, ``scaling_norm=None`` applies that rule: 10% of the
keep-term gradient norm of the first step. ``tests/test_parity_siss.py`` checks one full step against
numbers from the reference code.

Deviations from the reference:

* the reference's data set (Kaggle) is not available; ``reference`` rebuilds it the way its files describe
  (k-means labels of generations of a modified prompt), with ``n_images`` generations by dori's DDIM sampler
  (50 steps, guidance 7) instead of the reference data's unknown sampler;
* the 2-means split is dori's own (Lloyd's algorithm from a deterministic start, :func:`siss_data.two_means`);
  the reference ships its labels (``kmeans_labels.json``) and the split is not compared with them;
* which keep/forget images each micro-batch takes, and the posterior and noise draws, come from dori's
  seeded generators (the parity test feeds both sides the same draws);
* Eq. (4)'s n/(n-k) and k/(n-k) factors are absent, as in the reference code (the second disappears in the
  rescaling to ``scaling_norm``);
* no gradient checkpointing or mixed precision settings (numerically the same in fp32); dori's draws come
  from its own seeded generators, so runs match the reference only where those are aligned (the tests);
* on the miniworld ``scaling_norm`` is "auto" (750 is SD v1.4's gradient scale); a pixel-space model has no
  posterior to sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from dori.data.sets import Item
from dori.errors import DoriError
from dori.mitigations.checkpoints import claim_output
from dori.mitigations.siss_data import SISSData, siss_data
from dori.mitigations.surrogates import Similarity, SurrogateSet
from dori.mitigations.training import encode_in_batches, finish, save_finetuned, trainable_copy
from dori.models.pipeline import T2IModel
from dori.runs import safe_key


def mixture_weights(
    m: torch.Tensor, x: torch.Tensor, a: torch.Tensor, gamma: torch.Tensor, sigma: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance weights q(m|x)/q_lambda and q(m|a)/q_lambda per sample (computed in log space).

    q(m|x) = N(m; gamma x, sigma^2 I) and q_lambda = (1 - lambda) q(m|x) + lambda q(m|a); the Gaussian
    normalizers cancel. (1 - lambda) w_x + lambda w_a = 1 for every sample.
    """
    var2 = 2 * sigma.flatten() ** 2
    log_qx = -(m - gamma * x).pow(2).flatten(1).sum(1) / var2
    log_qa = -(m - gamma * a).pow(2).flatten(1).sum(1) / var2
    log_mix = torch.logsumexp(torch.stack([log_qx + math.log(1 - lam), log_qa + math.log(lam)]), dim=0)
    return (log_qx - log_mix).exp(), (log_qa - log_mix).exp()


VARIANTS = ("reference", "paper", "surrogates")


@dataclass
class SISS:
    """SISS per item (see module docstring).

    Args:
        steps: optimizer steps per item.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        batch_size: samples per micro-batch.
        grad_accum: micro-batches per step.
        lam: mixture weight lambda.
        scaling_norm: norm the deletion gradient is rescaled to (None: 10% of the first keep gradient norm).
        grad_clip: max global gradient norm.
        timestep: the diffusion timestep of every sample (reference: 999); None draws t uniformly.
        latent_sample: encode with a VAE posterior sample (reference) instead of its mean.
        variant: data recipe: ``reference``, ``paper`` or ``surrogates`` (module docstring).
        n_images: generations per item for the ``reference`` and ``paper`` recipes.
        seed: seeds every draw (the same for every item, as each starts from the original model).
    """

    name: ClassVar[str] = "siss"
    per_item: ClassVar[bool] = True

    steps: int = 35
    lr: float = 1e-5
    weight_decay: float = 1e-2
    batch_size: int = 1
    grad_accum: int = 16
    lam: float = 0.5
    scaling_norm: float | None = 750.0
    grad_clip: float = 1.0
    timestep: int | None = 999
    latent_sample: bool = True
    variant: str = "reference"
    n_images: int = 128
    seed: int = 42

    def __post_init__(self) -> None:
        if not 0.0 < self.lam < 1.0:
            raise DoriError(f"lambda must be in (0, 1), got {self.lam}")
        if self.variant not in VARIANTS:
            raise DoriError(f"unknown SISS variant {self.variant!r}; use one of {VARIANTS}")

    def settings(self) -> dict[str, Any]:
        return asdict(self)

    def data(
        self,
        model: T2IModel,
        items: Sequence[Item],
        *,
        keep: SurrogateSet | Mapping[str, torch.Tensor] | None = None,
        similarity: Similarity | None = None,
        threshold: float | None = None,
    ) -> tuple[dict[str, SISSData], dict[str, str]]:
        """The variant's data per item: ``({item id: SISSData}, {item id: why it has none})``."""
        if self.variant != "surrogates":
            if keep is not None:
                raise DoriError(
                    f"SISS variant {self.variant!r} builds its own data; keep= is for 'surrogates'"
                )
            return siss_data(
                model, items, self.variant, similarity, threshold, n_images=self.n_images, seed=self.seed
            )
        if keep is None:
            raise DoriError("SISS variant 'surrogates' needs keep= (surrogate images per item)")
        keep_images = keep.images if isinstance(keep, SurrogateSet) else keep
        data, failed = {}, {}
        for it in items:
            k_imgs = keep_images.get(it.id)
            if it.image is None or k_imgs is None or len(k_imgs) == 0:
                failed[it.id] = "no training image" if it.image is None else "no keep images"
                continue
            data[it.id] = SISSData(it.prompt, k_imgs, it.image[None])
        return data, failed

    def __call__(
        self,
        model: T2IModel,
        items: Sequence[Item],
        out: str | Path | None = None,
        *,
        data: Mapping[str, SISSData] | None = None,
        keep: SurrogateSet | Mapping[str, torch.Tensor] | None = None,
        similarity: Similarity | None = None,
        threshold: float | None = None,
        log: Callable[[dict], None] | None = None,
    ) -> dict[str, T2IModel | Path]:
        """Unlearn each item from its own copy of the original model.

        Args:
            data: per item id, its prompt, keep and forget images; default: built by the variant's recipe
                (:meth:`data`; ``keep`` for ``surrogates``, ``similarity``/``threshold`` for ``paper``).
            out: folder; each item's model goes to ``out/<item id>/`` (skipped if already there, so a killed
                run resumes) and the result maps ids to those folders. Without ``out`` the models are
                returned in memory.

        Returns:
            item id -> fine-tuned model (or its folder); items without data are left out.
        """
        if out is not None:  # before any work: never over the input model or a run of other settings
            claim_output(out, model, self.name, self.settings(), [it.id for it in items])
        result: dict[str, T2IModel | Path] = {}
        todo = [
            it for it in items if out is None or not (Path(out) / safe_key(it.id) / "finetune.json").exists()
        ]
        pending = {it.id for it in todo}
        for it in items:
            if it.id not in pending:
                result[it.id] = Path(out) / safe_key(it.id)
        failed: dict[str, str] = {}
        if data is None and todo:
            data, failed = self.data(model, todo, keep=keep, similarity=similarity, threshold=threshold)
        for it in todo:
            d = (data or {}).get(it.id)
            if d is None:
                continue
            unlearned = self.unlearn(model, it, d.keep, d.forget, prompt=d.prompt, log=log)
            if out is None:
                result[it.id] = unlearned
            else:
                record = {
                    "method": self.name,
                    "settings": self.settings(),
                    "items": [it.id],
                    "data": d.summary(),
                }
                result[it.id] = save_finetuned(unlearned, Path(out) / safe_key(it.id), record)
        if failed and log is not None:
            log({"kind": "skipped", "items": failed})
        return result

    def unlearn(
        self,
        model: T2IModel,
        item: Item,
        keep: torch.Tensor,
        forget: torch.Tensor,
        prompt: str | None = None,
        log: Callable[[dict], None] | None = None,
    ) -> T2IModel:
        """SISS for one item on a fresh copy of ``model``, conditioned on ``prompt`` (default: the item's)."""
        ft = trainable_copy(model)
        ft.unet.requires_grad_(True)
        params = list(ft.unet.parameters())
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        x_keep = LatentPosterior(ft, keep, self.latent_sample)
        x_del = LatentPosterior(ft, forget, self.latent_sample)
        y = ft.encode_text([prompt or item.prompt]).float()
        gen = torch.Generator().manual_seed(self.seed)  # latents, noise, mixture choice (reference order)
        pick = torch.Generator().manual_seed(self.seed + 1)  # which images
        alphas = ft.scheduler.alphas_cumprod.to(ft.device, torch.float32)
        scaling = self.scaling_norm
        device, b = ft.device, self.batch_size
        ft.unet.train()
        for step in range(self.steps):
            g_keep = [torch.zeros_like(p) for p in params]
            g_del = [torch.zeros_like(p) for p in params]
            l_keep_sum = l_del_sum = 0.0
            for _ in range(self.grad_accum):
                ik = torch.randint(0, len(x_keep), (b,), generator=pick)
                ia = torch.randint(0, len(x_del), (b,), generator=pick)
                x, a = x_keep.sample(ik, gen), x_del.sample(ia, gen)
                eps = torch.randn(x.shape, generator=gen).to(device)
                if self.timestep is None:
                    t = torch.randint(0, ft.num_train_timesteps, (b,), generator=gen).to(device)
                else:
                    t = torch.full((b,), self.timestep, dtype=torch.long, device=device)
                from_a = (~(torch.rand(b, generator=gen) > self.lam)).to(device).view(-1, 1, 1, 1)
                l_keep, l_del = self.losses(ft, x, a, eps, from_a, t, y, alphas)
                gk = torch.autograd.grad(l_keep, params, retain_graph=True, allow_unused=True)
                gd = torch.autograd.grad(l_del, params, allow_unused=True)
                for acc, g in zip(g_keep, gk, strict=True):
                    if g is not None:
                        acc += g
                for acc, g in zip(g_del, gd, strict=True):
                    if g is not None:
                        acc += g
                l_keep_sum += float(l_keep.detach())
                l_del_sum += float(l_del.detach())
            keep_norm = float(torch.stack([g.norm() for g in g_keep]).norm())
            del_norm = float(torch.stack([g.norm() for g in g_del]).norm())
            if scaling is None:
                scaling = 0.1 * keep_norm
            c = scaling / del_norm if del_norm > 0 else 0.0
            for p, gk_, gd_ in zip(params, g_keep, g_del, strict=True):
                p.grad = gk_ - c * gd_
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if log is not None:
                log(
                    {
                        "kind": "step",
                        "item": item.id,
                        "step": step + 1,
                        "l_keep": l_keep_sum,
                        "l_del": l_del_sum,
                        "keep_grad_norm": keep_norm,
                        "del_grad_norm": del_norm,
                        "scaling_norm": scaling,
                    }
                )
        return finish(ft)

    def losses(
        self,
        ft: T2IModel,
        x: torch.Tensor,
        a: torch.Tensor,
        eps: torch.Tensor,
        from_a: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        alphas: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L_keep and L_del of one micro-batch (summed over C x H x W, divided by batch and accumulation)."""
        b = x.shape[0]
        gamma = alphas[t].sqrt().view(-1, 1, 1, 1)
        sigma = (1 - alphas[t]).sqrt().view(-1, 1, 1, 1)
        m = gamma * torch.where(from_a, a, x) + sigma * eps
        w_x, w_a = mixture_weights(m, x, a, gamma, sigma, self.lam)
        pred = ft.unet_forward(m, t, y.expand(b, -1, -1)).float()
        # what the UNet should predict for m_t if it came from x (or a): the scheduler's target
        target_x = ft.target(x, (m - gamma * x) / sigma, t).float()
        target_a = ft.target(a, (m - gamma * a) / sigma, t).float()
        err_x = (target_x - pred).pow(2).flatten(1).sum(1)
        err_a = (target_a - pred).pow(2).flatten(1).sum(1)
        scale = b * self.grad_accum
        return (w_x * err_x).sum() / scale, (w_a * err_a).sum() / scale


class LatentPosterior:
    """Images in the model's space, drawn per use: a VAE posterior sample (mean + std * N(0, I), times the
    scaling factor, as ``latent_dist.sample()``) or its mean; pixel-space models give the images in [-1, 1]."""

    def __init__(self, model: T2IModel, images: torch.Tensor, sample: bool = True) -> None:
        self.sample_latents = sample and model.vae is not None
        self.factor = 1.0 if model.vae is None else float(model.vae.config.scaling_factor)
        if self.sample_latents:
            means, stds = [], []
            with torch.no_grad():
                for i in range(0, len(images), 32):
                    x = images[i : i + 32].to(model.device, model.dtype) * 2 - 1
                    dist = model.vae.encode(x).latent_dist
                    means.append(dist.mean.float())
                    stds.append(dist.std.float())
            self.mean, self.std = torch.cat(means), torch.cat(stds)
        else:
            self.mean, self.std = encode_in_batches(model, images).float(), None

    def __len__(self) -> int:
        return len(self.mean)

    def sample(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Rows ``idx``; a fresh posterior sample for each (drawn on the CPU from ``gen``)."""
        idx = idx.to(self.mean.device)
        mean = self.mean[idx]
        if self.std is None:
            return mean
        z = torch.randn(mean.shape, generator=gen, dtype=mean.dtype).to(mean.device)
        return (mean + self.std[idx] * z) * self.factor
