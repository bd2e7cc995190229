"""Concept Ablation (Kumari et al., ICCV 2023) in its memorization mode (Finding Dori, Appendix G.2, Table 5).

Concept Ablation maps a target concept onto an anchor concept. For a memorized image the target is the
memorized prompt and the anchors are paraphrases of it; anchor images are generated from the anchor prompts
by the original model, and those that replicate the memorized image are dropped (the reference code checks
them with SSCD). Then, with the model-based objective::

    (x, p_anchor) ~ anchor images and their prompts;  x_t = noised x;  t ~ U{0..T-1}
    L_ablate = || eps_theta(x_t, t, y_mem) - sg(eps_theta(x_t, t, y_anchor)) ||^2
    L_prior  = || eps' - eps_theta(x'_t, t', y_anchor') ||^2           (prior preservation on anchor pairs)
    L = L_ablate + prior_loss_weight * L_prior                          Adam step on the chosen parameters

so the memorized prompt comes to predict what its paraphrases predict (``sg``: the current model without
gradient). Horizontal flips augment the anchor images (``--hflip``).

Reference settings (nupurkmr9/concept-ablation, memorization example): full-weight fine-tuning, batch 2,
lr 5e-7 scaled by the batch size (``--scale_lr``), 400 steps, prior loss weight 1, 1000 anchor images per
memorized prompt generated from LLM paraphrases. Finding Dori ran it 12k steps for all VM prompts (15x the
original) and lost 7 prompts that had no paraphrase free of replication. On the miniworld the anchors come
from its caption grammar (:func:`miniworld_anchors`) instead of an LLM; any callable, mapping or list of
anchor prompts can be passed instead.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from dori.data.sets import Item
from dori.errors import DoriError
from dori.mitigations.checkpoints import claim_output
from dori.mitigations.surrogates import Similarity
from dori.mitigations.training import (
    encode_in_batches,
    finish,
    make_trainable,
    save_finetuned,
    select_parameters,
    trainable_copy,
)
from dori.models.pipeline import SamplingConfig, T2IModel

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


@dataclass
class ConceptAblation:
    """Concept Ablation, memorization mode (see module docstring).

    Args:
        steps: optimizer steps in total (all items together).
        lr: base learning rate; multiplied by ``batch_size`` when ``scale_lr`` (the reference's ``--scale_lr``
            on one GPU without accumulation).
        scale_lr: scale ``lr`` by the batch size.
        batch_size: anchor pairs per step (each contributes one ablation and one prior sample).
        prior_loss_weight: weight of L_prior.
        parameters: ``full-weight`` (reference memorization setting) or ``cross-attn`` (attn2 to_k/to_v).
        anchor_images: anchor images generated per memorized item (reference: 1000).
        hflip: random horizontal flips of anchor images.
        sampling: settings for generating anchor images.
        seed: seeds generation, draws and flips.
    """

    name: ClassVar[str] = "ca"

    steps: int = 400
    lr: float = 5e-7
    scale_lr: bool = True
    batch_size: int = 2
    prior_loss_weight: float = 1.0
    parameters: str = "full-weight"
    anchor_images: int = 1000
    hflip: bool = True
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.parameters not in PARAMETER_SETS:
            raise DoriError(f"unknown parameter set {self.parameters!r}; use one of {sorted(PARAMETER_SETS)}")

    def settings(self) -> dict[str, Any]:
        return asdict(self)

    def anchor_set(
        self,
        model: T2IModel,
        items: Sequence[Item],
        anchors: Anchors,
        similarity: Similarity | None = None,
        threshold: float | None = None,
    ) -> tuple[dict[str, tuple[torch.Tensor, list[str]]], dict[str, str]]:
        """Generate anchor images per item and drop replicas of the item's image.

        Returns:
            ``({item id: (images (k, 3, H, W), their prompts)}, {item id: why it has no anchors})``.
        """
        if (similarity is None) != (threshold is None):
            raise DoriError("pass both similarity and threshold, or neither")
        kept: dict[str, tuple[torch.Tensor, list[str]]] = {}
        failed: dict[str, str] = {}
        for it in items:
            prompts = list(_anchors_for(anchors, it))
            if not prompts:
                failed[it.id] = "no anchor prompts"
                continue
            use = [prompts[j % len(prompts)] for j in range(self.anchor_images)]
            seeds = [self.seed + j for j in range(self.anchor_images)]
            imgs = model.generate(use, seeds, self.sampling)
            if similarity is not None and it.image is not None:
                ok = similarity(imgs, it.image.unsqueeze(0).expand_as(imgs)) < threshold
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
        threshold: float | None = None,
        log: Callable[[dict], None] | None = None,
    ) -> T2IModel:
        """Ablate the items' memorized prompts onto their anchors in a copy of ``model``.

        Args:
            anchors: per item, its anchor prompts: a callable ``anchors(item)``, a mapping item id -> prompts,
                or one list for every item.
            similarity, threshold: copy-detector check that drops anchor images replicating the item
                (both or neither).
        """
        if out is not None:  # before any work: never over the input model or a run of other settings
            claim_output(out, model, self.name, self.settings(), [it.id for it in items])
        anchor_data, failed = self.anchor_set(model, items, anchors, similarity, threshold)
        if not anchor_data:
            raise DoriError(f"no item has usable anchor images: {failed}")
        ca = trainable_copy(model)
        include, exclude = PARAMETER_SETS[self.parameters]
        params = make_trainable(ca.unet, select_parameters(ca.unet, include, exclude))
        lr = self.lr * self.batch_size if self.scale_lr else self.lr
        opt = torch.optim.Adam(params, lr=lr)
        by_id = {it.id: it for it in items}
        # one row per anchor image: its latents (plain, flipped), its prompt embedding, its item's y_mem
        lat, lat_flip, emb, mem = [], [], [], []
        for item_id, (imgs, prompts) in anchor_data.items():
            lat.append(encode_in_batches(ca, imgs).float())
            lat_flip.append(encode_in_batches(ca, imgs.flip(-1)).float())
            emb.append(ca.encode_text(prompts).float())
            mem.append(ca.encode_text([by_id[item_id].prompt]).float().expand(len(prompts), -1, -1))
        lat, lat_flip, emb, mem = (torch.cat(v) for v in (lat, lat_flip, emb, mem))
        gen = torch.Generator().manual_seed(self.seed)
        device, b = ca.device, self.batch_size
        ca.unet.train()
        for step in range(self.steps):
            rows = torch.randint(0, len(lat), (2 * b,), generator=gen)
            flip = (
                torch.rand(2 * b, generator=gen) < 0.5 if self.hflip else torch.zeros(2 * b, dtype=torch.bool)
            )
            x0 = torch.where(
                flip.view(-1, 1, 1, 1).to(device), lat_flip[rows.to(device)], lat[rows.to(device)]
            )
            noise = torch.randn(x0.shape, generator=gen).to(device)
            t = torch.randint(0, ca.num_train_timesteps, (2 * b,), generator=gen).to(device)
            x_t = ca.add_noise(x0, noise, t)
            abl, pri = rows[:b].to(device), rows[b:].to(device)
            with torch.no_grad():
                target_abl = ca.unet_forward(x_t[:b], t[:b], emb[abl]).float()
            pred = ca.unet_forward(x_t, t, torch.cat([mem[abl], emb[pri]])).float()
            l_abl = (pred[:b] - target_abl).pow(2).mean()
            l_prior = (pred[b:] - ca.target(x0[b:], noise[b:], t[b:]).float()).pow(2).mean()
            loss = l_abl + self.prior_loss_weight * l_prior
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if log is not None:
                log(
                    {
                        "kind": "step",
                        "step": step + 1,
                        "l_ablate": float(l_abl.detach()),
                        "l_prior": float(l_prior.detach()),
                    }
                )
        finish(ca)
        if out is not None:
            record = {
                "method": self.name,
                "settings": self.settings(),
                "items": sorted(anchor_data),
                "skipped": failed,
                "anchors": {k: sorted(set(v[1])) for k, v in anchor_data.items()},
            }
            save_finetuned(ca, out, record)
        return ca


def _anchors_for(anchors: Anchors, item: Item) -> Sequence[str]:
    if callable(anchors):
        return anchors(item)
    if isinstance(anchors, Mapping):
        return anchors.get(item.id, ())
    if isinstance(anchors, str):
        raise DoriError("anchors must be a list of prompts, not one string")
    return anchors
