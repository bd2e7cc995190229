"""What the weight-changing mitigations share: their call contract and a few small training helpers.

Adversarial fine-tuning (:mod:`dori.mitigations.adversarial_ft`) and the unlearning baselines ESD
(:mod:`~dori.mitigations.esd`), Concept Ablation (:mod:`~dori.mitigations.concept_ablation`) and SISS
(:mod:`~dori.mitigations.siss`) all follow one contract (:class:`WeightMitigation`): settings go to the
constructor, the model and the memorized items are passed at call time, the input model is never changed,
and the result is a fine-tuned copy of the model (``save_model`` writes it as a diffusers folder that loads
with ``--model DIR``). SISS starts from the original UNet for every item (as its paper does), so it returns
one model folder per item instead of one model.

Only the UNet is trained; the text encoder, tokenizer and VAE of the copy are the original objects (frozen,
shared, never written to).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from dori.data.sets import Item
from dori.errors import DoriError
from dori.models.pipeline import T2IModel


class WeightMitigation(Protocol):
    """A mitigation that fine-tunes the weights (see module docstring).

    ``__call__(model, items, out=None, ...)``: ``model`` is left untouched; ``items`` are the memorized items
    to remove; ``out`` is an optional folder for the result (and checkpoints, where the method has them).
    Method-specific data (surrogate images, utility pairs, anchor prompts, keep/forget sets) are keyword
    arguments of the call.
    """

    name: str

    def settings(self) -> dict[str, Any]:
        """The constructor settings as plain JSON values (recorded with every result)."""
        ...

    def __call__(
        self, model: T2IModel, items: Sequence[Item], out: Path | None = None, **data: Any
    ) -> Any: ...


def trainable_copy(model: T2IModel) -> T2IModel:
    """A copy of ``model`` with its own UNet (deep copy); the other components are shared and stay frozen."""
    unet = copy.deepcopy(model.unet)
    return dataclasses.replace(model, unet=unet, info=dict(model.info), _null=None)


def finish(model: T2IModel) -> T2IModel:
    """Back to inference: eval mode, every weight frozen."""
    model.unet.eval()
    model.unet.requires_grad_(False)
    return model


def select_parameters(
    unet: torch.nn.Module, include: str | None = None, exclude: str | None = None
) -> list[str]:
    """Names of UNet parameters matching ``include`` and not ``exclude`` (regular expressions, ``re.search``).

    Raises:
        DoriError: when nothing matches (a wrong pattern should not silently train nothing).
    """
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    names = [
        n
        for n, _ in unet.named_parameters()
        if (inc is None or inc.search(n)) and (exc is None or not exc.search(n))
    ]
    if not names:
        raise DoriError(f"no UNet parameter matches include={include!r} exclude={exclude!r}")
    return names


def make_trainable(unet: torch.nn.Module, names: Sequence[str]) -> list[torch.nn.Parameter]:
    """Freeze the UNet, then unfreeze the named parameters; returns them in the UNet's order."""
    unet.requires_grad_(False)
    wanted = set(names)
    params = []
    for n, p in unet.named_parameters():
        if n in wanted:
            p.requires_grad_(True)
            params.append(p)
    return params


def item_images(items: Sequence[Item]) -> torch.Tensor:
    """Training images of the items, stacked (N, 3, H, W); a missing image is an error naming the item."""
    imgs = []
    for it in items:
        img = it.image
        if img is None:
            raise DoriError(f"item {it.id} has no training image ({it.skip_reason or 'none given'})")
        imgs.append(img)
    if not imgs:
        raise DoriError("no items given")
    return torch.stack(imgs)


def encode_in_batches(model: T2IModel, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """``model.encode_images`` in batches, result on the model's device."""
    return torch.cat(
        [model.encode_images(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )


def grad_norm(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients of ``params`` (0 where a gradient is missing)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


_MODEL_ENTRIES = {
    "unet",
    "text_encoder",
    "tokenizer",
    "scheduler",
    "vae",
    "model_index.json",
    "dori_world.json",
}


def save_finetuned(
    model: T2IModel, folder: str | Path, method: dict | None = None, link_world: bool = False
) -> Path:
    """``save_model`` plus what a world folder holds besides the model, so ``--model DIR`` keeps its sets.

    A miniworld folder also holds its item sets and metric stand-ins; they are copied (small entries) or
    symlinked (entries over 64 MB, or all with ``link_world``, as per-epoch checkpoints do) from the source
    world, so audits of the fine-tuned folder resolve ``--set vm`` and the world's metrics as for the
    original. ``method`` (name and settings) is written to ``finetune.json``.
    """
    import json
    import os
    import shutil

    from dori.models.identity import check_not_source, model_sources
    from dori.models.loading import save_model
    from dori.runs import atomic_write_text

    folder = Path(folder)
    check_not_source(folder, model_sources(model))  # the copy carries its source's name and world folder
    save_model(model, folder)
    world = model.world.folder if model.world is not None else None
    if world and world.resolve() != folder.resolve():
        for entry in world.iterdir():
            dest = folder / entry.name
            if entry.name in _MODEL_ENTRIES or dest.exists() or entry.name.startswith("."):
                continue
            size = (
                sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
                if entry.is_dir()
                else entry.stat().st_size
            )
            if link_world or size > 64 * 2**20:
                os.symlink(entry.resolve(), dest)
            elif entry.is_dir():
                shutil.copytree(entry, dest)
            else:
                shutil.copy2(entry, dest)
    if method is not None:
        atomic_write_text(folder / "finetune.json", json.dumps(method, indent=2, default=str))
    return folder


def changed_parameters(before: torch.nn.Module, after: torch.nn.Module, atol: float = 0.0) -> list[str]:
    """Names of parameters whose values differ between two modules of the same architecture."""
    ref = dict(before.named_parameters())
    return [n for n, p in after.named_parameters() if not torch.allclose(p, ref[n], atol=atol, rtol=0)]
