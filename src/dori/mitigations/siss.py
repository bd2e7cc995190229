"""SISS, Subtracted Importance Sampled Scores (Alberti et al.), data unlearning per memorized image (Finding
Dori, Section 4.4 "Baseline", Appendix E.2, Eq. (4); Table 3 row "SISS + Dori").

SISS fine-tunes the UNet to keep a set X \\ A (here: ``keep``, non-replica images of the item's content, the
role surrogates play in adversarial fine-tuning) and to forget A (here: ``forget``, the memorized training
image and, if given, its replicas). Noisy samples come from the defensive mixture
q_lambda(m_t | x, a) = (1 - lambda) q(m_t | x) + lambda q(m_t | a) and both terms are importance-weighted::

    x ~ keep, a ~ forget, t ~ U{0..T-1}, eps ~ N(0, I);  m_t = gamma_t (a if u < lambda else x) + sigma_t eps
    w_x = q(m_t|x) / q_lambda,   w_a = q(m_t|a) / q_lambda        (Gaussian forward densities, in log space)
    L_keep = n/(n-k) w_x || (m_t - gamma_t x)/sigma_t - eps_theta(m_t, t, y) ||^2
    L_del  = k/(n-k) w_a || (m_t - gamma_t a)/sigma_t - eps_theta(m_t, t, y) ||^2
    gradient = grad L_keep - c grad L_del,   c such that || c grad L_del || = scaling_norm
    AdamW step (gradients clipped to norm 1)

with n = |keep| + |forget|, k = |forget|, y the memorized prompt's embedding (for a v-prediction model the
targets are the matching velocities). Minimizing L_keep - L_del
is SISS's objective; the reference code rescales the deletion gradient to a fixed norm (``scaling_norm``)
instead of choosing the superfactor s directly.

Reference settings (claserken/SISS, SD config; the Dori paper used them): start from the original UNet for
every image, 35 steps, lambda 0.5, AdamW lr 1e-5 (weight decay 0.01), batch 1 with 16 accumulation steps,
gradient clipping 1.0, scaling norm 750. The reference README advises a scaling norm of about 10% of the
naive-deletion gradient norm; on a model much smaller than SD v1.4 (the miniworld), whose gradient norms
are far from SD's, ``scaling_norm=None`` applies that rule: 10% of the keep-term gradient norm of the first
step. The miniworld recipe records which it used.
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
from dori.mitigations.surrogates import SurrogateSet
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
    seed: int = 42

    def __post_init__(self) -> None:
        if not 0.0 < self.lam < 1.0:
            raise DoriError(f"lambda must be in (0, 1), got {self.lam}")

    def settings(self) -> dict[str, Any]:
        return asdict(self)

    def __call__(
        self,
        model: T2IModel,
        items: Sequence[Item],
        out: str | Path | None = None,
        *,
        keep: SurrogateSet | Mapping[str, torch.Tensor],
        forget: Mapping[str, torch.Tensor] | None = None,
        log: Callable[[dict], None] | None = None,
    ) -> dict[str, T2IModel | Path]:
        """Unlearn each item from its own copy of the original model.

        Args:
            keep: per item id, images to keep (B, 3, H, W) (a :class:`SurrogateSet` works).
            forget: per item id, images to forget; default: the item's training image alone.
            out: folder; each item's model goes to ``out/<item id>/`` (skipped if already there, so a killed
                run resumes) and the result maps ids to those folders. Without ``out`` the models are
                returned in memory.

        Returns:
            item id -> fine-tuned model (or its folder); items without keep images are left out.
        """
        if out is not None:  # before any work: never over the input model or a run of other settings
            claim_output(out, model, self.name, self.settings(), [it.id for it in items])
        keep_images = keep.images if isinstance(keep, SurrogateSet) else keep
        result: dict[str, T2IModel | Path] = {}
        for it in items:
            k_imgs = keep_images.get(it.id)
            f_imgs = (
                forget.get(it.id) if forget is not None else (None if it.image is None else it.image[None])
            )
            if k_imgs is None or f_imgs is None or len(k_imgs) == 0 or len(f_imgs) == 0:
                continue
            folder = None if out is None else Path(out) / safe_key(it.id)
            if folder is not None and (folder / "finetune.json").exists():
                result[it.id] = folder
                continue
            unlearned = self.unlearn(model, it, k_imgs, f_imgs, log=log)
            if folder is None:
                result[it.id] = unlearned
            else:
                record = {"method": self.name, "settings": self.settings(), "items": [it.id]}
                result[it.id] = save_finetuned(unlearned, folder, record)
        return result

    def unlearn(
        self,
        model: T2IModel,
        item: Item,
        keep: torch.Tensor,
        forget: torch.Tensor,
        log: Callable[[dict], None] | None = None,
    ) -> T2IModel:
        """SISS for one item on a fresh copy of ``model``; returns the copy."""
        ft = trainable_copy(model)
        ft.unet.requires_grad_(True)
        params = list(ft.unet.parameters())
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        x_keep = encode_in_batches(ft, keep).float()
        x_del = encode_in_batches(ft, forget).float()
        y = ft.encode_text([item.prompt]).float()
        n, k = len(x_keep) + len(x_del), len(x_del)
        c_keep, c_del = n / (n - k), k / (n - k)
        gen = torch.Generator().manual_seed(self.seed)
        alphas = ft.scheduler.alphas_cumprod.to(ft.device, torch.float32)
        scaling = self.scaling_norm
        device, b = ft.device, self.batch_size
        ft.unet.train()
        for step in range(self.steps):
            g_keep = [torch.zeros_like(p) for p in params]
            g_del = [torch.zeros_like(p) for p in params]
            l_keep_sum = l_del_sum = 0.0
            for _ in range(self.grad_accum):
                x = x_keep[torch.randint(0, len(x_keep), (b,), generator=gen).to(device)]
                a = x_del[torch.randint(0, len(x_del), (b,), generator=gen).to(device)]
                t = torch.randint(0, ft.num_train_timesteps, (b,), generator=gen).to(device)
                eps = torch.randn(x.shape, generator=gen).to(device)
                from_a = (torch.rand(b, generator=gen) < self.lam).to(device).view(-1, 1, 1, 1)
                gamma = alphas[t].sqrt().view(-1, 1, 1, 1)
                sigma = (1 - alphas[t]).sqrt().view(-1, 1, 1, 1)
                m = gamma * torch.where(from_a, a, x) + sigma * eps
                w_x, w_a = mixture_weights(m, x, a, gamma, sigma, self.lam)
                pred = ft.unet_forward(m, t, y.expand(b, -1, -1)).float()
                # what the UNet should predict for m_t if it came from x (or a): the scheduler's target
                target_x = ft.target(x, (m - gamma * x) / sigma, t).float()
                target_a = ft.target(a, (m - gamma * a) / sigma, t).float()
                err_x = (target_x - pred).pow(2).flatten(1).mean(1)
                err_a = (target_a - pred).pow(2).flatten(1).mean(1)
                l_keep = (c_keep * w_x * err_x).mean() / self.grad_accum
                l_del = (c_del * w_a * err_a).mean() / self.grad_accum
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
