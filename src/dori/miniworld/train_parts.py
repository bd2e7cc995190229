"""Trainers of the miniworld's components other than the UNet: mini-CLIP, VAE, copy detector, feature model,
and the calibration of the replication threshold.

Each trainer takes tensors already on the training device (images as uint8 (N, 3, 32, 32)), a step count and
a seed, and returns the trained module. ``log`` is a callable taking one line of text.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dori.metrics.replication import replicated

Log = Callable[[str], None]


def _float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _schedule(opt: torch.optim.Optimizer, step: int, steps: int, lr: float, warmup: int = 100) -> None:
    """Linear warm-up, then cosine decay to 10% of ``lr``."""
    if step < warmup:
        f = (step + 1) / warmup
    else:
        f = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    for group in opt.param_groups:
        group["lr"] = lr * f


def batches(n: int, batch: int, steps: int, seed: int, device: torch.device, start: int = 0):
    """``steps`` index batches drawn without replacement within each epoch (seeded, on ``device``).

    ``start`` skips the first batches (a resumed run gets the batches an uninterrupted one would).
    """
    gen = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(n, generator=gen), 0
    for step in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        if step >= start:
            yield perm[pos : pos + batch].to(device)
        pos += batch


# ----------------------------------------------------------------------------- augmentations
_BLUR = torch.tensor([1.0, 2.0, 1.0]) / 4


def augment(x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Copy-detection augmentations of images in [0, 1]: small zoom/shift, colour jitter, blur, noise."""
    b, dev = x.shape[0], x.device

    def u(*shape):
        return torch.rand(*shape, device=dev) * 2 - 1

    theta = torch.zeros(b, 2, 3, device=dev)
    scale = 1 - torch.rand(b, device=dev) * 0.15 * strength
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = u(b, 2) * 0.12 * strength
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    x = x * (1 + u(b, 1, 1, 1) * 0.15 * strength) + u(b, 3, 1, 1) * 0.04 * strength
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (1 + u(b, 1, 1, 1) * 0.2 * strength) + mean
    gray = x.mean(dim=1, keepdim=True)
    x = gray + (x - gray) * (1 + u(b, 1, 1, 1) * 0.2 * strength)
    k = _BLUR.to(dev)
    blurred = F.conv2d(
        F.pad(x, (1, 1, 1, 1), mode="replicate"), (k[:, None] * k[None, :]).expand(3, 1, 3, 3), groups=3
    )
    pick = (torch.rand(b, 1, 1, 1, device=dev) < 0.3 * strength).float()
    x = pick * blurred + (1 - pick) * x
    x = x + torch.randn_like(x) * torch.rand(b, 1, 1, 1, device=dev) * 0.03 * strength
    return x.clamp(0, 1)


# ----------------------------------------------------------------------------- mini-CLIP
def train_clip(clip, images, ids, steps: int, batch: int, seed: int, log: Log, lr: float = 1e-3):
    """Contrastive (InfoNCE, both directions) training of text and image towers on (image, caption) pairs.

    Images get half-strength copy-detection augmentations (small shifts, colour jitter, blur, noise), so the
    alignment score judges content, as CLIP does, rather than pixel fidelity.
    """
    torch.manual_seed(seed)
    device = images.device
    clip.to(device).train()
    opt = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.05)
    labels = torch.arange(batch, device=device)
    for step, idx in enumerate(batches(len(images), batch, steps, seed, device)):
        _schedule(opt, step, steps, lr)
        with _autocast(device):
            img = clip.encode_image(augment(_float(images[idx]), 0.5))
            txt = clip.encode_text(ids[idx])
        logits = clip.logit_scale.exp().clamp(max=100) * img @ txt.t()
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            acc = (logits.argmax(1) == labels).float().mean().item()
            log(f"clip step {step}/{steps} loss {loss.item():.3f} batch acc {acc:.2f}")
    return clip.eval()


# ----------------------------------------------------------------------------- VAE
def train_vae(vae, images, steps: int, batch: int, seed: int, log: Log, lr: float = 1e-3, kl: float = 1e-6):
    """Reconstruction (L1 + L2 + image-gradient L1) with a small KL term; sets ``scaling_factor`` = 1/std."""
    torch.manual_seed(seed)
    device = images.device
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    for step, idx in enumerate(batches(len(images), batch, steps, seed + 1, device)):
        _schedule(opt, step, steps, lr)
        x = _float(images[idx]) * 2 - 1
        with _autocast(device):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample.float()
        err = rec - x
        grad_err = (rec.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (
            rec.diff(dim=-2) - x.diff(dim=-2)
        ).abs().mean()
        kl_term = post.kl().float().mean() / x[0].numel()
        loss = err.abs().mean() + err.pow(2).mean() + 0.5 * grad_err + kl * kl_term
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} L1 {err.abs().mean().item():.4f} kl {kl_term.item():.3f}")
    vae.eval()
    with torch.no_grad():
        lat = latents(vae, images[: min(len(images), 8192)], scaled=False)
    std = float(lat.float().std())
    vae.register_to_config(scaling_factor=1.0 / std)
    log(f"vae latent std {std:.4f} -> scaling_factor {1 / std:.4f}")
    return vae


@torch.no_grad()
def latents(vae, images: torch.Tensor, scaled: bool = True, batch: int = 1024) -> torch.Tensor:
    """uint8 images -> posterior means (times ``scaling_factor`` if ``scaled``), float32."""
    outs = []
    for i in range(0, len(images), batch):
        x = _float(images[i : i + batch]) * 2 - 1
        with _autocast(x.device):
            outs.append(vae.encode(x).latent_dist.mean.float())
    lat = torch.cat(outs)
    return lat * vae.config.scaling_factor if scaled else lat


@torch.no_grad()
def round_trip(vae, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """uint8 images -> VAE reconstructions as uint8 (what a perfect latent replica decodes to)."""
    outs = []
    for i in range(0, len(images), batch):
        x = _float(images[i : i + batch]) * 2 - 1
        with _autocast(x.device):
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample.float()
        outs.append(((rec + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(outs)


# ----------------------------------------------------------------------------- copy detector
def train_copy_detector(
    model,
    images,
    images_rt,
    sib_src,
    sib,
    sib_rt,
    steps: int,
    batch: int,
    seed: int,
    log: Log,
    lr: float = 1e-3,
    temperature: float = 0.1,
):
    """SimCLR / NT-Xent: two augmented views of each image are positives, every other image a negative.

    Half of each batch are pairs of images with the same caption (``sib_src[i]`` and its sibling ``sib[i]``),
    so other images of one caption are explicit negatives. Each view starts from the image or, with
    probability 1/2, from its VAE round trip (``*_rt``), so decoded replicas count as replicas.
    """
    torch.manual_seed(seed)
    device = images.device
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    quarter = batch // 4
    pair_batches = batches(len(sib), quarter, steps, seed + 2, device)
    for step, idx in enumerate(batches(len(images), batch - 2 * quarter, steps, seed + 3, device)):
        _schedule(opt, step, steps, lr)
        pidx = next(pair_batches)
        src = torch.cat([images[idx], images[sib_src[pidx]], sib[pidx]])
        src_rt = torch.cat([images_rt[idx], images_rt[sib_src[pidx]], sib_rt[pidx]])
        views = []
        for _ in range(2):
            pick = torch.rand(len(src), 1, 1, 1, device=device) < 0.5
            views.append(augment(_float(torch.where(pick, src_rt, src))))
        with _autocast(device):
            z = model(torch.cat(views))
        n = len(src)
        sim = z @ z.t() / temperature
        sim.fill_diagonal_(-1e4)
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(device)
        loss = F.cross_entropy(sim, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            log(f"copy detector step {step}/{steps} loss {loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    return torch.cat([model(_float(images[i : i + batch])).float() for i in range(0, len(images), batch)])


@torch.no_grad()
def calibrate(model, images, images_rt, sib_src, sib, seed: int) -> dict:
    """Score distributions of the copy detector and the replication threshold chosen from them.

    * replicas: an image vs an augmented copy of its VAE round trip (half strength: what a memorized
      generation looks like) and vs a full-strength augmentation of itself;
    * same caption: an image vs another image of the same caption (:func:`generator.sibling`);
    * unrelated: an image vs a random other image.

    The threshold is the midpoint between the 99.5th percentile of same-caption scores and the 0.5th
    percentile of replica scores when they are separated, else the 99.5th percentile of same-caption scores:
    MR takes the best of 10 generations, so a per-generation false-positive rate of 0.5% keeps the MR of
    captions that are not memorized near or below 5%.
    """
    torch.manual_seed(seed)
    device = images.device
    ref = embed(model, images)
    rep_rt = (ref * embed(model, (augment(_float(images_rt), 0.5) * 255).round().to(torch.uint8))).sum(1)
    rep_aug = (ref * embed(model, (augment(_float(images), 1.0) * 255).round().to(torch.uint8))).sum(1)
    replicas = torch.cat([rep_rt, rep_aug]).cpu().numpy()
    same = (embed(model, images[sib_src]) * embed(model, sib)).sum(1).cpu().numpy()
    other = torch.roll(torch.arange(len(images), device=device), 1)
    unrelated = (ref * ref[other]).sum(1).cpu().numpy()
    hi_neg, lo_pos = float(np.quantile(same, 0.995)), float(np.quantile(replicas, 0.005))
    if hi_neg < lo_pos:
        threshold, rule = (hi_neg + lo_pos) / 2, "midpoint of q99.5(same caption) and q0.5(replicas)"
    else:  # bound false positives: best-of-10 then gives at most ~5% MR on non-memorized captions
        threshold, rule = hi_neg, "q99.5 of same-caption scores (0.5% false positives per generation)"
    threshold = round(threshold, 2)

    def stats(a: np.ndarray) -> dict:
        q = np.quantile(a, [0.005, 0.05, 0.5, 0.95, 0.995])
        return {
            "n": int(a.size),
            "mean": float(a.mean()),
            "std": float(a.std()),
            "q0.5": float(q[0]),
            "q5": float(q[1]),
            "median": float(q[2]),
            "q95": float(q[3]),
            "q99.5": float(q[4]),
        }

    return {
        "threshold": threshold,
        "rule": rule,
        "replicas": stats(replicas),
        "same_caption": stats(same),
        "unrelated": stats(unrelated),
        "replica_recall": float(replicated(replicas, threshold).mean()),
        "same_caption_false_positive": float(replicated(same, threshold).mean()),
        "unrelated_false_positive": float(replicated(unrelated, threshold).mean()),
        "scores": {
            "replicas": replicas.tolist(),
            "same_caption": same.tolist(),
            "unrelated": unrelated.tolist(),
        },
    }


# ----------------------------------------------------------------------------- feature model
def train_features(model, images, labels, steps: int, batch: int, seed: int, log: Log, lr: float = 1e-3):
    """Cross-entropy on scene attributes (background colour; per cell shape, colour, size)."""
    torch.manual_seed(seed)
    device = images.device
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    cuts = {"background": (0, 1, 12), "shape": (1, 10, 7), "colour": (10, 19, 13), "size": (19, 28, 3)}
    for step, idx in enumerate(batches(len(images), batch, steps, seed + 4, device)):
        _schedule(opt, step, steps, lr)
        x = augment(_float(images[idx]), 0.3)
        with _autocast(device):
            out = model(x)
        y = labels[idx]
        loss = sum(
            F.cross_entropy(out[k].float().reshape(-1, n), y[:, a:b].reshape(-1), ignore_index=-1)
            for k, (a, b, n) in cuts.items()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            acc = (out["shape"].reshape(-1, 7).argmax(1) == y[:, 1:10].reshape(-1)).float().mean().item()
            log(f"features step {step}/{steps} loss {loss.item():.3f} cell-shape acc {acc:.2f}")
    return model.eval()
