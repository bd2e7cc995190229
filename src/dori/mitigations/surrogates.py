"""Surrogate images for adversarial fine-tuning, and the check that fine-tuning memorizes no utility image.

Surrogates (Finding Dori, Section 4.4 and Appendix I.1-I.2): for each memorized item, images generated from
its memorized prompt *under a pruning mitigation* (NeMo by default), so that they share the memorized image's
content and style but are not replicas of it; each candidate is checked with a copy detector and kept only if
its similarity to the training image is below the replication threshold. Appendix I.1 also allows
generations of another model that never trained on the item: pass that model and no mitigation.

A surrogate folder holds one sub-folder per item (``<folder>/<item id>/<n>.png``) and ``surrogates.json``
(similarities, items without surrogates and why). A folder of the same layout made by hand (any images of the
item's content that are not replicas) is accepted by :func:`load_surrogates`.

Appendix I.7: :func:`utility_memorization` generates images for utility captions and measures how close they
come to the utility images the model was fine-tuned on (before and after fine-tuning), so that fine-tuning
does not introduce new memorization.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dori import distributed
from dori.data.sets import Item, load_image_file
from dori.errors import DoriError
from dori.metrics.replication import Similarity, replicated
from dori.models.pipeline import SamplingConfig, T2IModel
from dori.runs import atomic_write_text, safe_key

ApplyMitigation = Callable[[T2IModel, Sequence[str]], contextlib.AbstractContextManager]
"""``apply(model, item_ids)``: :meth:`dori.mitigations.base.Mitigation.applied` of a fitted mitigation (applies
it for those items, undoes it on exit)."""


@dataclass
class SurrogateSet:
    """Surrogate images per item.

    Attributes:
        images: item id -> surrogates (k, 3, H, W) in [0, 1].
        similarity: item id -> copy-detector similarity of each kept surrogate to the training image.
        failed: item id -> why the item has no surrogate (then it cannot be fine-tuned away).
        alignment: item id -> alignment (CLIP role) of each kept surrogate with the caption, where measured.
        source: item id -> how each kept surrogate was made, where recorded.
    """

    images: dict[str, torch.Tensor] = field(default_factory=dict)
    similarity: dict[str, list[float]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    alignment: dict[str, list[float | None]] = field(default_factory=dict)
    source: dict[str, list[str]] = field(default_factory=dict)

    def merge(self, other: SurrogateSet) -> None:
        """Take ``other``'s surrogates for the items this set has none for (e.g. from a fallback source)."""
        for item_id, imgs in other.images.items():
            if item_id not in self.images:
                self.images[item_id] = imgs
                self.similarity[item_id] = other.similarity.get(item_id, [])
                for mine, theirs in ((self.alignment, other.alignment), (self.source, other.source)):
                    if item_id in theirs:
                        mine[item_id] = theirs[item_id]
                self.failed.pop(item_id, None)
        for item_id, why in other.failed.items():
            if item_id not in self.images and item_id in self.failed:
                self.failed[item_id] = f"{self.failed[item_id]}; fallback: {why}"

    def save(self, folder: str | Path, settings: dict | None = None) -> Path:
        """Write ``<folder>/<item id>/<n>.png`` and ``surrogates.json``."""
        folder = Path(folder)
        index = {"settings": settings or {}, "items": {}, "failed": self.failed}
        for item_id, imgs in self.images.items():
            sub = folder / safe_key(item_id)
            sub.mkdir(parents=True, exist_ok=True)
            files = []
            for j, img in enumerate(imgs):
                arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                name = f"{j}.png"
                Image.fromarray(arr).save(sub / name)
                files.append(f"{safe_key(item_id)}/{name}")
            index["items"][item_id] = {"files": files, "similarity": self.similarity.get(item_id, [])}
            for key, values in (("alignment", self.alignment), ("source", self.source)):
                if item_id in values:
                    index["items"][item_id][key] = values[item_id]
        atomic_write_text(folder / "surrogates.json", json.dumps(index, indent=1))
        return folder


def load_surrogates(folder: str | Path, items: Sequence[Item], size: int | None = None) -> SurrogateSet:
    """Read a surrogate folder (see module docstring) for the given items.

    Args:
        folder: the folder; ``<folder>/<item id>/*.png|jpg|jpeg|webp``.
        items: which items to read; an item without a sub-folder or images is recorded in ``failed``.
        size: resize images to size x size (the model's image size).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DoriError(f"surrogate folder {folder} does not exist")
    index_file = folder / "surrogates.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else {"items": {}, "failed": {}}
    out = SurrogateSet()
    for it in items:
        entry = index["items"].get(it.id)
        if entry is not None:
            files = [folder / f for f in entry["files"]]
        else:
            sub = folder / safe_key(it.id)
            files = sorted(
                (p for p in sub.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")),
                key=lambda p: (len(p.stem), p.stem),
            )
        if not files:
            out.failed[it.id] = index.get("failed", {}).get(
                it.id, f"no surrogate images in {folder / safe_key(it.id)}"
            )
            continue
        out.images[it.id] = torch.stack([load_image_file(f, size) for f in files])
        if entry is not None:
            out.similarity[it.id] = list(entry.get("similarity", []))
            for key, values in (("alignment", out.alignment), ("source", out.source)):
                if key in entry:
                    values[it.id] = list(entry[key])
    return out


@torch.no_grad()
def generate_surrogates(
    model: T2IModel,
    items: Sequence[Item],
    similarity: Similarity,
    threshold: float,
    mitigation: ApplyMitigation | None = None,
    per_item: int = 4,
    max_rounds: int = 3,
    seed: int = 0,
    config: SamplingConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> SurrogateSet:
    """Generate ``per_item`` non-replica surrogates per item from its memorized prompt.

    Each round generates ``per_item`` candidates (new seeds every round) with the mitigation applied for that
    item only, and keeps those whose similarity to the item's training image is below ``threshold``; rounds
    stop when ``per_item`` are kept or after ``max_rounds``. An item that ends with fewer keeps what it has;
    one that ends with none is listed in ``failed``.

    Args:
        model: the model to generate with: the memorizing model under ``mitigation``, or another model that
            never trained on the items (``mitigation=None``, Appendix I.1).
        items: the memorized items (prompt + training image).
        similarity: copy-detector similarity (see :data:`Similarity`).
        threshold: replication threshold (0.7 for SSCD); candidates at or above it are replicas.
        mitigation: applies a pruning mitigation per item (e.g. ``nemo.applied``); None generates plainly.
        per_item: surrogates wanted per item.
        max_rounds: generation rounds per item at most.
        seed: base seed; candidate j of round r uses seed ``seed + r * per_item + j``.
        config: sampling settings (default: the paper's DDIM 50, guidance 7).
        progress: optional ``progress(items_done)``.
    """
    if per_item < 1 or max_rounds < 1:
        raise DoriError("generate_surrogates needs per_item >= 1 and max_rounds >= 1")
    config = config or SamplingConfig()
    n_done = 0

    def one(batch: list[Item]) -> list[tuple[torch.Tensor | None, list[float], str | None]]:
        nonlocal n_done
        (it,) = batch
        n_done += 1
        if it.image is None:
            return [(None, [], f"no training image ({it.skip_reason or 'none given'})")]
        kept: list[torch.Tensor] = []
        sims: list[float] = []
        for r in range(max_rounds):
            seeds = [seed + r * per_item + j for j in range(per_item)]
            ctx = mitigation(model, [it.id]) if mitigation is not None else contextlib.nullcontext()
            with ctx:
                imgs = model.generate([it.prompt] * per_item, seeds, config)
            s = similarity(imgs, it.image.unsqueeze(0).expand_as(imgs)).float().cpu()
            for img, v in zip(imgs, s.tolist(), strict=True):
                if not replicated(v, threshold) and len(kept) < per_item:
                    kept.append(img.cpu())
                    sims.append(float(v))
            if len(kept) >= per_item:
                break
        if progress is not None:
            progress(n_done)
        if kept:
            return [(torch.stack(kept), sims, None)]
        reason = (
            f"all {max_rounds * per_item} candidates are replicas (similarity >= {threshold}); "
            "the mitigation does not stop replication for this item"
        )
        return [(None, [], reason)]

    out = SurrogateSet()
    # one item at a time, sharded over the ranks of a torchrun job (every rank gets every item's result)
    for it, (images, sims, failed) in zip(items, distributed.map_sharded(one, list(items)), strict=True):
        if failed is not None:
            out.failed[it.id] = failed
        else:
            out.images[it.id] = images
            out.similarity[it.id] = sims
    return out


@torch.no_grad()
def utility_memorization(
    model: T2IModel,
    items: Sequence[Item],
    similarity: Similarity,
    threshold: float,
    n_images: int = 10,
    seed: int = 0,
    config: SamplingConfig | None = None,
) -> dict:
    """Appendix I.7: how close generations for utility captions come to the utility images.

    Generates ``n_images`` per item from its caption and scores each against the item's image.

    Returns:
        ``{"n_items", "threshold", "max": {id: best similarity}, "mean", "std", "n_above"}`` where mean and
        std are over all generations (the paper reports 0.16 ± 0.04 on SD v1.4) and ``n_above`` counts items
        whose best generation reaches the threshold (memorized).
    """
    items = [it for it in items if it.image is not None]
    if not items:
        raise DoriError("utility_memorization needs items with images")
    prompts = [it.prompt for it in items for _ in range(n_images)]
    seeds = [seed + j for _ in items for j in range(n_images)]
    gens = model.generate(prompts, seeds, config or SamplingConfig())
    refs = torch.stack([it.image for it in items for _ in range(n_images)])
    sims = similarity(gens, refs).float().view(len(items), n_images)
    best = sims.max(1).values
    return {
        "n_items": len(items),
        "n_images": n_images,
        "threshold": threshold,
        "max": {it.id: float(v) for it, v in zip(items, best, strict=True)},
        "mean": float(sims.mean()),
        "std": float(sims.std()) if sims.numel() > 1 else 0.0,
        "n_above": int(replicated(best, threshold).sum()),
    }


def compare_utility_memorization(before: dict, after: dict) -> dict:
    """Items memorized after fine-tuning that were not before (the I.7 check fails if this is non-empty)."""
    thr = after["threshold"]
    new = sorted(
        k
        for k, v in after["max"].items()
        if replicated(v, thr) and not replicated(before["max"].get(k, 0.0), thr)
    )
    return {
        "before": {k: before[k] for k in ("mean", "std", "n_above")},
        "after": {k: after[k] for k in ("mean", "std", "n_above")},
        "newly_memorized": new,
        "passed": not new,
    }
