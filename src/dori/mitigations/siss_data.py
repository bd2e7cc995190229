"""SISS's data per memorized item: a modified prompt, images to keep (X \\ A) and images to forget (A).

SISS unlearns one image at a time and needs, for it, generations that show the memorized image and
generations that do not. Both recipes below start like the reference data set and Finding Dori (Appendix E.2):
random tokens are appended to the memorized prompt (Wen et al.'s way to obtain a prompt that is only
partially memorized), the original model generates ``n_images`` images from that *modified* prompt, and
the images are split into replicas (A, forgotten) and the rest (X, kept). SISS then conditions on the
modified prompt. They differ in the split:

* ``reference`` (claserken/SISS, the data behind ``kmeans_labels.json``): 2-means clustering of the raw
  pixels (x 255, flattened, as the reference's k-means classifier reads them); the cluster holding the
  generations closest to the training image is the deletion set;
* ``paper`` (Finding Dori, Appendix E.2): 128 generations split by the copy detector: replicas are those at
  or above the memorization threshold.

If a prompt gives only replicas or only non-replicas, the next number of added tokens is tried
(``token_counts``); an item for which no count works gets no data (the paper lost 9 of 112 this way).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dori.data.sets import Item
from dori.errors import DoriError
from dori.mitigations.surrogates import Similarity
from dori.models.pipeline import SamplingConfig, T2IModel

SPLITS = ("reference", "paper")


@dataclass
class SISSData:
    """What SISS trains on for one item.

    Attributes:
        prompt: the conditioning prompt (the modified prompt in both recipes).
        keep: images to keep (k, 3, H, W) in [0, 1].
        forget: images to forget (m, 3, H, W) in [0, 1].
    """

    prompt: str
    keep: torch.Tensor
    forget: torch.Tensor

    def summary(self) -> dict:
        return {"prompt": self.prompt, "keep": len(self.keep), "forget": len(self.forget)}


def modified_prompt(model: T2IModel, prompt: str, n_tokens: int, rng: random.Random) -> str:
    """``prompt`` followed by ``n_tokens`` random vocabulary tokens (special tokens excluded)."""
    tok = model.tokenizer
    special = set(getattr(tok, "all_special_ids", []))
    words = []
    while len(words) < n_tokens:
        tid = rng.randrange(len(tok))
        if tid in special:
            continue
        word = tok.decode([tid]).strip()
        if word:
            words.append(word)
    return " ".join([prompt, *words])


def two_means(x: torch.Tensor, near: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """2-means on the rows of ``x`` (N, D); True for rows in the cluster whose members are nearest ``near``.

    Lloyd's algorithm started from the row nearest ``near`` and the row farthest from it (deterministic).
    """
    d_near = (x - near).pow(2).sum(1)
    centers = torch.stack([x[d_near.argmin()], x[d_near.argmax()]])
    label = torch.zeros(len(x), dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(x, centers).argmin(1)
        if torch.equal(new, label) and _ > 0:
            break
        label = new
        for k in range(2):
            if (label == k).any():
                centers[k] = x[label == k].mean(0)
    mean_d = [
        d_near[label == k].mean() if (label == k).any() else torch.tensor(float("inf")) for k in range(2)
    ]
    return label == int(torch.stack(mean_d).argmin())


def split_generations(
    images: torch.Tensor,
    training_image: torch.Tensor,
    split: str,
    similarity: Similarity | None = None,
    threshold: float | None = None,
) -> torch.Tensor:
    """Which generations are replicas (to forget), following ``split`` (see module docstring)."""
    if split == "paper":
        if similarity is None or threshold is None:
            raise DoriError("SISS's paper data recipe needs a copy detector (similarity) and its threshold")
        return similarity(images, training_image.unsqueeze(0).expand_as(images)).cpu() >= threshold
    if split == "reference":
        flat = (images.float().cpu() * 255).flatten(1)
        near = (training_image.float().cpu() * 255).flatten()
        if similarity is not None:  # the cluster of the most similar generations, by the copy detector
            sims = similarity(images, training_image.unsqueeze(0).expand_as(images)).cpu()
            near = flat[sims.argmax()]
        return two_means(flat, near)
    raise DoriError(f"unknown SISS data recipe {split!r}; use one of {SPLITS}")


def siss_data(
    model: T2IModel,
    items: Sequence[Item],
    split: str = "reference",
    similarity: Similarity | None = None,
    threshold: float | None = None,
    n_images: int = 128,
    token_counts: Sequence[int] = (1, 2, 4, 8),
    sampling: SamplingConfig | None = None,
    seed: int = 0,
) -> tuple[dict[str, SISSData], dict[str, str]]:
    """Build SISS's data for each item (see module docstring).

    Returns:
        ``({item id: SISSData}, {item id: why it has none})``.
    """
    if split not in SPLITS:
        raise DoriError(f"unknown SISS data recipe {split!r}; use one of {SPLITS}")
    data: dict[str, SISSData] = {}
    failed: dict[str, str] = {}
    for it in items:
        if it.image is None:
            failed[it.id] = "no training image"
            continue
        rng = random.Random(f"{seed}:{it.id}")
        for n_tok in token_counts:
            prompt = modified_prompt(model, it.prompt, n_tok, rng)
            gens = model.generate([prompt] * n_images, [seed + j for j in range(n_images)], sampling)
            rep = split_generations(gens, it.image, split, similarity, threshold)
            if 0 < int(rep.sum()) < len(gens):
                data[it.id] = SISSData(prompt, gens[~rep], gens[rep])
                break
        else:
            failed[it.id] = (
                f"no modified prompt with {list(token_counts)} tokens gives both replicas and others"
            )
    return data, failed
