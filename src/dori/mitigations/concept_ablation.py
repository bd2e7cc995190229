"""Concept Ablation (Kumari et al., ICCV 2023) in its memorization mode (Finding Dori, Appendix G.2, Table 5).

Concept Ablation maps a target concept onto an anchor concept. For a memorized image the target is the
memorized prompt and the anchors are paraphrases of it; anchor images are generated from the anchor prompts
by the original model, and those the copy detector finds too close to the memorized image are dropped.
Then, with the model-based objective, each step takes ``batch_size`` ablation samples and as many prior
samples (anchor images with their own prompts)::

    ablation: anchor image x (flipped at random, resize-augmented: mask M, prefix P), its prompt p_a
    L_ablate = mean over samples of  sum(M * (eps_theta(x_t, t, y(P + p_mem)) - sg(eps_theta(x_t, t, y(p_a))))^2) / sum(M)
    L_prior  = mean (eps - eps_theta(x'_t, t', y(p_a')))^2           (prior preservation on anchor pairs)
    L = L_ablate + prior_loss_weight * L_prior; gradients clipped to norm 1; AdamW step

so the memorized prompt comes to predict what its paraphrases predict (``sg``: the current model without
gradient; the mask sum counts latent cells, not channels, as in the reference). Latents are VAE posterior
samples; x_t uses one noise draw and one t ~ U{0..T-1} per sample. The reference's attention processor
passes no gradient through the first token's key and value in cross-attention; dori does the same with
hooks on ``attn2.to_k``/``attn2.to_v`` (forward values unchanged). Resize augmentation and anchor sampling:
:mod:`dori.mitigations.concept_ablation_data`.

Reference settings (nupurkmr9/concept-ablation @ c11fb1b, ``diffusers/train.py``, ``utils.py``, memorization
example): full-weight fine-tuning, batch 2, lr 5e-7 with ``--scale_lr`` (x batch x GPUs x accumulation, x 2
with prior preservation: 2e-6 on one GPU), AdamW (betas 0.9/0.999, weight decay 1e-2, eps 1e-8), constant
schedule, clipping 1.0, 400 steps, prior loss weight 1, hflip, resize augmentation on, 1000 anchor images
per memorized prompt from DPM-Solver 25 steps at guidance 6, kept if their SSCD similarity to the memorized
image is at most 0.5. These are the defaults (``variant="reference"``). ``variant="paper"``: Finding Dori ran
12k steps for all its VM prompts ("15 times longer"); that is its default step count, the rest as the
reference. ``tests/test_parity_ca.py`` checks the augmentation draws, loss, learning rate and one step against
numbers from the reference code.

Deviations from the reference:

* anchor prompts: the reference asks an LLM (Llama-3-8B-Instruct by default; ChatGPT in Finding Dori) for
  paraphrases and may add LLM-found target prompts to the caption target; dori takes them from the caller
  (a file for SD) or from the miniworld's caption grammar (:func:`miniworld_anchors`), and ablates the
  memorized prompt alone;
* the copy detector is the one the caller passes (the reference: ``sscd_imagenet_mixup`` at 288 px; the
  miniworld: its stand-in), compared with the same rule (similarity <= ``anchor_threshold``);
* anchors are generated per image from seeded noise (the reference: the global generator, batches of 4,
  fp16 on a GPU) and at the model's own size (the reference: 512 px);
* the loss mask uses the model's own pixel-to-latent factor (the reference hard-codes SD's 8; the
  miniworld's VAE downsamples by 4);
* on small latents a shrunken image can leave no latent cell inside the reference's one-cell margin (the
  miniworld's 8 x 8 latents at scale 10-15 px); such a sample's loss is 0 instead of the reference's 0/0 = NaN,
  which on SD (at least 170 px of 512, 21 cells) never happens; an H200 run of 1,712 steps on 16 world items
  ended in a model with non-finite generations before this guard;
* ``scale_lr`` assumes one GPU and no gradient accumulation (the reference also multiplies by the number
  of GPUs: 4e-6 on two);
* one model ablates all memorized prompts together (Finding Dori's setting); the reference runs one concept
  (or a list) per run; dori's draws (order, flips, noise) come from its own seeded generators.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from dori.data.sets import Item
from dori.errors import DoriError
from dori.mitigations.checkpoints import claim_output
from dori.mitigations.concept_ablation_data import Augment, draw_augment, generate_anchors, resize_augment
from dori.mitigations.surrogates import Similarity
from dori.mitigations.training import (
    finish,
    make_trainable,
    save_finetuned,
    select_parameters,
    trainable_copy,
)
from dori.models.pipeline import T2IModel

Anchors = Callable[[Item], Sequence[str]] | Mapping[str, Sequence[str]] | Sequence[str]
PARAMETER_SETS: dict[str, tuple[str | None, str | None]] = {
    "full-weight": (None, None),
    "cross-attn": (r"\.attn2\.to_[kv]\.", None),
}


def miniworld_anchors(prompt: str, n: int = 8, avoid: Sequence[str] = (), seed: int = 0) -> list[str]:
    """Paraphrases of a miniworld title caption ("<word> <word> <kind>") from the world's caption grammar.

    The anchor concept of a titled item is its kind ("album cover"); paraphrases keep the kind and replace
    the made-up title words: the bare kind, "a <kind>", then titles with one original word kept or none,
    made of pseudo-words not in ``avoid`` (pass every vm/tm caption of the world, so no anchor names another
    memorized item). Anchors that still replicate the image are removed later by the copy-detector check.

    Raises:
        DoriError: if the prompt does not end in a miniworld kind word.
    """
    from dori.miniworld.generator import TM_KINDS, VM_KINDS, pseudo_words

    kind = next((k for k in VM_KINDS + TM_KINDS if prompt.endswith(k)), None)
    if kind is None:
        raise DoriError(f"{prompt!r} is not a miniworld title caption; pass anchor prompts explicitly")
    own = prompt[: -len(kind)].split()
    used = {w for p in avoid for w in p.split()} | set(own)
    free = [w for w in pseudo_words() if w not in used]
    rng = random.Random(seed)
    rng.shuffle(free)
    out = [kind, f"a {kind}"]
    for i, w in enumerate(free):
        if len(out) >= n:
            break
        keep = own[i % len(own)] if own and i % 2 == 0 else None
        other = free[(i + 1) % len(free)]
        out.append(f"{keep} {w} {kind}" if keep else f"{w} {other} {kind}")
    return list(dict.fromkeys(out))[:n]


VARIANTS = {"reference": 400, "paper": 12_000}  # default steps


@dataclass
class ConceptAblation:
    """Concept Ablation, memorization mode (see module docstring).

    Args:
        steps: optimizer steps in total (all items together); None: the variant's (400; paper 12,000).
        lr: base learning rate; with ``scale_lr`` multiplied by ``batch_size`` and by 2 (prior preservation),
            as the reference's ``--scale_lr`` on one GPU without accumulation.
        scale_lr: scale ``lr`` as above.
        batch_size: anchor pairs per step (each contributes one ablation and one prior sample).
        prior_loss_weight: weight of L_prior.
        weight_decay: AdamW weight decay.
        grad_clip: max global gradient norm.
        parameters: ``full-weight`` (reference memorization setting) or ``cross-attn`` (attn2 to_k/to_v).
        anchor_images: anchor images generated per memorized item (reference: 1000).
        anchor_steps, anchor_guidance: DPM-Solver steps and guidance of the anchor images.
        anchor_threshold: anchors whose similarity to the memorized image exceeds this are dropped.
        hflip: random horizontal flips of anchor images.
        augment: the resize augmentation with its loss mask and prompt prefixes.
        detach_bos: no gradient through the first token's cross-attention key and value.
        latent_sample: VAE posterior samples (reference) instead of the posterior mean.
        variant: ``reference`` or ``paper`` (module docstring).
        seed: seeds generation, order, flips, augmentation and noise.
    """

    name: ClassVar[str] = "ca"

    steps: int | None = None
    lr: float = 5e-7
    scale_lr: bool = True
    batch_size: int = 2
    prior_loss_weight: float = 1.0
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    parameters: str = "full-weight"
    anchor_images: int = 1000
    anchor_steps: int = 25
    anchor_guidance: float = 6.0
    anchor_threshold: float = 0.5
    hflip: bool = True
    augment: bool = True
    detach_bos: bool = True
    latent_sample: bool = True
    variant: str = "reference"
    seed: int = 42

    def __post_init__(self) -> None:
        if self.parameters not in PARAMETER_SETS:
            raise DoriError(f"unknown parameter set {self.parameters!r}; use one of {sorted(PARAMETER_SETS)}")
        if self.variant not in VARIANTS:
            raise DoriError(
                f"unknown Concept Ablation variant {self.variant!r}; use one of {sorted(VARIANTS)}"
            )
        if self.steps is None:
            self.steps = VARIANTS[self.variant]

    def settings(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def learning_rate(self) -> float:
        """The learning rate used: ``lr`` x batch x 2 (prior preservation) with ``scale_lr``."""
        return self.lr * self.batch_size * 2.0 if self.scale_lr else self.lr

    def anchor_set(
        self,
        model: T2IModel,
        items: Sequence[Item],
        anchors: Anchors,
        similarity: Similarity | None = None,
    ) -> tuple[dict[str, tuple[torch.Tensor, list[str]]], dict[str, str]]:
        """Generate anchor images per item and drop those too close to the item's image.

        Returns:
            ``({item id: (images (k, 3, H, W), their prompts)}, {item id: why it has no anchors})``.
        """
        kept: dict[str, tuple[torch.Tensor, list[str]]] = {}
        failed: dict[str, str] = {}
        for it in items:
            prompts = list(_anchors_for(anchors, it))
            if not prompts:
                failed[it.id] = "no anchor prompts"
                continue
            use = [prompts[j % len(prompts)] for j in range(self.anchor_images)]
            seeds = [self.seed + j for j in range(self.anchor_images)]
            imgs = generate_anchors(model, use, seeds, self.anchor_steps, self.anchor_guidance)
            if similarity is not None and it.image is not None:
                ok = similarity(imgs, it.image.unsqueeze(0).expand_as(imgs)).cpu() <= self.anchor_threshold
                imgs = imgs[ok]
                use = [p for p, k in zip(use, ok.tolist(), strict=True) if k]
            if not use:
                failed[it.id] = "every anchor image replicates the memorized image"
                continue
            kept[it.id] = (imgs, use)
        return kept, failed

    def __call__(
        self,
        model: T2IModel,
        items: Sequence[Item],
        out: str | Path | None = None,
        *,
        anchors: Anchors,
        similarity: Similarity | None = None,
        log: Callable[[dict], None] | None = None,
    ) -> T2IModel:
        """Ablate the items' memorized prompts onto their anchors in a copy of ``model``.

        Args:
            anchors: per item, its anchor prompts: a callable ``anchors(item)``, a mapping item id -> prompts,
                or one list for every item.
            similarity: copy detector that drops anchor images above ``anchor_threshold`` (None: keep all).
        """
        if out is not None:  # before any work: never over the input model or a run of other settings
            claim_output(out, model, self.name, self.settings(), [it.id for it in items])
        anchor_data, failed = self.anchor_set(model, items, anchors, similarity)
        if not anchor_data:
            raise DoriError(f"no item has usable anchor images: {failed}")
        by_id = {it.id: it for it in items}
        rows = [
            (img, prompt, by_id[item_id].prompt)
            for item_id, (imgs, prompts) in anchor_data.items()
            for img, prompt in zip(imgs, prompts, strict=True)
        ]
        ca = trainable_copy(model)
        include, exclude = PARAMETER_SETS[self.parameters]
        params = make_trainable(ca.unet, select_parameters(ca.unet, include, exclude))
        opt = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay)
        order = random.Random(self.seed)
        instances = list(range(len(rows)))
        order.shuffle(instances)  # as the reference shuffles its instance list once
        np_rng = np.random.RandomState(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        perm: list[int] = []
        hooks = bos_detach_hooks(ca.unet) if self.detach_bos else []
        ca.unet.train()
        try:
            for step in range(self.steps):
                if len(perm) < self.batch_size:  # a new epoch over the anchor rows
                    perm = torch.randperm(len(rows), generator=gen).tolist()
                batch, perm = perm[: self.batch_size], perm[self.batch_size :]
                flips = [
                    bool(torch.rand(1, generator=gen) < 0.5) and self.hflip for _ in range(2 * len(batch))
                ]
                inst = [rows[instances[i]] for i in batch]
                prior = [rows[i] for i in batch]
                augs = [draw_augment(np_rng, ca.image_size, self.augment) for _ in inst]
                l_abl, l_prior = self.losses(ca, inst, prior, flips, augs, gen)
                loss = l_abl + self.prior_loss_weight * l_prior
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
                opt.step()
                if log is not None:
                    log(
                        {
                            "kind": "step",
                            "step": step + 1,
                            "loss": float(loss.detach()),
                            "l_ablate": float(l_abl.detach()),
                            "l_prior": float(l_prior.detach()),
                            "lr": opt.param_groups[0]["lr"],
                        }
                    )
        finally:
            for h in hooks:
                h.remove()
        finish(ca)
        if out is not None:
            record = {
                "method": self.name,
                "settings": self.settings(),
                "learning_rate": self.learning_rate,
                "items": sorted(anchor_data),
                "skipped": failed,
                "anchors": {k: sorted(set(v[1])) for k, v in anchor_data.items()},
            }
            save_finetuned(ca, out, record)
        return ca

    def losses(
        self,
        ca: T2IModel,
        inst: Sequence[tuple[torch.Tensor, str, str]],
        prior: Sequence[tuple[torch.Tensor, str, str]],
        flips: Sequence[bool],
        augs: Sequence[Augment],
        gen: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L_ablate and L_prior of one batch (rows: image in [0, 1], anchor prompt, memorized prompt).

        ``flips`` holds one flag per instance then per prior row (the reference flips each example's
        instance image, then its class image); ``augs`` one resize augmentation per instance row.
        Random draws from ``gen`` in the reference's order: posterior sample, noise, timesteps.
        """
        b = len(inst)
        factor = ca.image_size // ca.sample_shape[1]
        pixels, masks = [], []
        for k, ((img, _, _), aug) in enumerate(zip(inst, augs, strict=True)):
            x, m = resize_augment(img.flip(-1) if flips[2 * k] else img, aug, factor)
            pixels.append(x)
            masks.append(m)
        for k, (img, _, _) in enumerate(prior):
            pixels.append((img.flip(-1) if flips[2 * k + 1] else img).float() * 2 - 1)
        x = torch.stack(pixels).to(ca.device)
        mask = torch.stack(masks).to(ca.device)
        target_prompts = [aug.prefix + mem for (_, _, mem), aug in zip(inst, augs, strict=True)]
        emb = ca.encode_text(target_prompts + [p for _, p, _ in prior]).float()
        emb_anchor = ca.encode_text([p for _, p, _ in inst]).float()
        x0 = encode_pixels(ca, x, gen if self.latent_sample else None)
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        t = torch.randint(0, ca.num_train_timesteps, (2 * b,), generator=gen).to(x0.device)
        x_t = ca.add_noise(x0, noise, t)
        pred = ca.unet_forward(x_t, t, emb).float()
        with torch.no_grad():
            target_abl = ca.unet_forward(x_t[:b], t[:b], emb_anchor).float()
        err = (pred[:b] - target_abl).pow(2) * mask
        # an empty mask (possible only on small latents, see the deviations) gives the sample zero loss, not 0/0
        l_abl = (err.sum((1, 2, 3)) / mask.sum((1, 2, 3)).clamp(min=1.0)).mean()
        l_prior = (pred[b:] - ca.target(x0[b:], noise[b:], t[b:]).float()).pow(2).mean()
        return l_abl, l_prior


def encode_pixels(model: T2IModel, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """Pixels in [-1, 1] -> the model's space: a VAE posterior sample from ``gen`` (or its mean without one)
    times the scaling factor; pixel-space models take the pixels as they are."""
    if model.vae is None:
        return x.to(model.dtype).float()
    with torch.no_grad():
        dist = model.vae.encode(x.to(model.dtype)).latent_dist
        z = dist.mean
        if gen is not None:
            z = z + dist.std * torch.randn(z.shape, generator=gen, dtype=z.dtype).to(z.device)
    return (z * model.vae.config.scaling_factor).float()


def bos_detach_hooks(unet: torch.nn.Module) -> list[Any]:
    """Forward hooks on cross-attention ``to_k``/``to_v``: the first token's output passes no gradient."""

    def hook(_module: torch.nn.Module, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
        return torch.cat([out[:, :1].detach(), out[:, 1:]], dim=1)

    return [
        m.register_forward_hook(hook)
        for name, m in unet.named_modules()
        if name.endswith("attn2.to_k") or name.endswith("attn2.to_v")
    ]


def _anchors_for(anchors: Anchors, item: Item) -> Sequence[str]:
    if callable(anchors):
        return anchors(item)
    if isinstance(anchors, Mapping):
        return anchors.get(item.id, ())
    if isinstance(anchors, str):
        raise DoriError("anchors must be a list of prompts, not one string")
    return anchors
