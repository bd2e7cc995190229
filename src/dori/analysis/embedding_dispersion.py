"""Embedding dispersion (Finding Dori, Section 4.1, Appendix J.1; Figures 3, 10 and 11).

If replication triggers of a memorized image were local in the text-embedding space, Dori runs started
far apart would end up close together. The experiment, for one memorized image x_mem::

    K inits y^(0)_k ~ N(0, I)                     (Fig. 3)    or the embeddings of K non-memorized
                                                              prompts (Fig. 10)
    y_adv,k = Dori(x_mem, init y^(0)_k, seed k)   (50 steps; all K in ONE batched search)
    check that each y_adv,k replicates x_mem      (generate, copy-detector similarity >= threshold)
    t-SNE of {y^(0)_k} U {y_adv,k}                (Fig. 3, 10)
    pairwise L2 distances within {y^(0)_k} and within {y_adv,k}, and ||y^(0)_k - y_adv,k|| (Fig. 11)

and, as the reference the paper compares with, the pairwise distances between embeddings of different
non-memorized prompts (the non-memorized inits themselves). Distances are between whole embeddings
(tokens x dim flattened), as Dori optimizes the whole embedding.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dori.attacks.dori import Dori, DoriResult
from dori.errors import DoriError
from dori.metrics.replication import replicated
from dori.models.pipeline import SamplingConfig, T2IModel

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(generated images (M, 3, H, W), reference image (3, H, W)) -> similarity of each generation (M,)."""


def flatten(embeddings: torch.Tensor) -> torch.Tensor:
    """(N, tokens, dim) or (N, D) -> (N, D) float64."""
    return embeddings.detach().reshape(embeddings.shape[0], -1).to(torch.float64).cpu()


def pairwise_l2(embeddings: torch.Tensor) -> torch.Tensor:
    """L2 distance of every unordered pair i < j: (N (N - 1) / 2,) float64, in ``torch.pdist`` order."""
    if embeddings.shape[0] < 2:
        raise DoriError("pairwise distances need at least 2 embeddings")
    return torch.pdist(flatten(embeddings))


def paired_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_k - b_k|| for each row k (e.g. init to result): (N,) float64."""
    if a.shape != b.shape:
        raise DoriError(f"paired distances need equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (flatten(a) - flatten(b)).norm(dim=1)


def summarize(values: torch.Tensor | np.ndarray | Sequence[float]) -> dict[str, float]:
    """Median, mean, quartiles, min and max of a set of numbers."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise DoriError("cannot summarize an empty set of values")
    q = np.quantile(v, [0.0, 0.25, 0.5, 0.75, 1.0])
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "min": float(q[0]),
        "q25": float(q[1]),
        "median": float(q[2]),
        "q75": float(q[3]),
        "max": float(q[4]),
    }


def tsne_2d(
    inits: torch.Tensor, results: torch.Tensor, seed: int = 0, perplexity: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One joint t-SNE of inits and results (as Fig. 3 and 10 plot both in one map).

    Args:
        perplexity: default min(30, (2K - 1) / 3) so that small K still works.

    Returns:
        2-D coordinates of the inits (K, 2) and of the results (K, 2).
    """
    from sklearn.manifold import TSNE

    points = torch.cat([flatten(inits), flatten(results)]).numpy()
    n = points.shape[0]
    if n < 4:
        raise DoriError("t-SNE needs at least 2 inits and 2 results")
    perp = perplexity if perplexity is not None else min(30.0, (n - 1) / 3)
    xy = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(points)
    k = inits.shape[0]
    return xy[:k], xy[k:]


def timed_search(
    dori: Dori, model: T2IModel, x0: torch.Tensor, init: torch.Tensor, seeds: Sequence[int]
) -> tuple[DoriResult, float]:
    """Dori from K inits towards one target x0 (1, C, H, W), as ONE batched search; returns the result
    and the wall-clock seconds it took."""
    k = init.shape[0]
    if x0.shape[0] != 1:
        raise DoriError("the dispersion search has one target image")
    if len(seeds) != k:
        raise DoriError(f"need one seed per init: {k} inits, {len(seeds)} seeds")
    targets = x0.expand(k, *x0.shape[1:])
    start = time.perf_counter()
    result = dori(model, targets, init, seeds)
    return result, time.perf_counter() - start


def replication_scores(
    model: T2IModel,
    embeddings: torch.Tensor,
    image: torch.Tensor,
    scorer: Scorer,
    seeds: Sequence[int],
    config: SamplingConfig | None = None,
) -> torch.Tensor:
    """Generate from each embedding with each seed and score every generation against the image.

    Args:
        embeddings: (N, tokens, dim) triggers.
        image: the memorized training image (3, H, W) in [0, 1].
        scorer: the copy detector as a :data:`Scorer` (see :func:`copy_detector_scorer`).
        seeds: the G generation seeds used for every embedding (the protocol's fixed seeds per item).

    Returns:
        Similarities (N, G); an embedding replicates if its best generation passes the threshold.
    """
    n, g = embeddings.shape[0], len(seeds)
    if g == 0:
        raise DoriError("need at least one generation seed")
    images = model.sample(embeddings.repeat_interleave(g, dim=0), list(seeds) * n, config)
    scores = torch.as_tensor(scorer(images, image), dtype=torch.float32).flatten()
    if scores.numel() != n * g:
        raise DoriError(f"scorer returned {scores.numel()} scores for {n * g} images")
    return scores.view(n, g)


def replication_summary(scores: torch.Tensor, threshold: float) -> dict:
    """Per embedding the best score and whether it passes ``threshold``; the share that replicates."""
    best = scores.max(dim=1).values
    hits = replicated(best, threshold)
    return {
        "threshold": float(threshold),
        "best": best.tolist(),
        "replicated": hits.tolist(),
        "rate": float(hits.float().mean()),
    }


def copy_detector_scorer(detector: Callable[[torch.Tensor], torch.Tensor]) -> Scorer:
    """A :data:`Scorer` from a copy detector returning L2-normalized descriptors (cosine = dot).

    Images are rounded to 8 bits first, as :mod:`dori.evaluation` scores the stored uint8 generations.
    """

    def score(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        images = (images.float().clamp(0, 1) * 255).round() / 255
        ref = detector(((reference.float().clamp(0, 1) * 255).round() / 255).unsqueeze(0)).float()
        feats = torch.cat([detector(images[i : i + 64]).float() for i in range(0, images.shape[0], 64)])
        return (feats @ ref.T).flatten().cpu()

    return score


@dataclass
class DispersionRun:
    """The search of one init kind: inits, results, seconds, final loss per run."""

    init: torch.Tensor
    adv: torch.Tensor
    seconds: float
    final_loss: list[float]


def dispersion_numbers(init: torch.Tensor, adv: torch.Tensor, seed: int = 0) -> dict:
    """Fig. 11 numbers and Fig. 3/10 coordinates of one init kind.

    Returns:
        ``pairwise_init`` / ``pairwise_adv`` (all pairwise L2 distances within each set), ``init_to_adv``
        (per run), a ``summary`` of each, and ``tsne`` coordinates ``{"init": [[x, y]...], "adv": [...]}``.
    """
    within_init, within_adv = pairwise_l2(init), pairwise_l2(adv)
    travel = paired_l2(init, adv)
    xy_init, xy_adv = tsne_2d(init, adv, seed=seed)
    return {
        "pairwise_init": within_init.tolist(),
        "pairwise_adv": within_adv.tolist(),
        "init_to_adv": travel.tolist(),
        "summary": {
            "pairwise_init": summarize(within_init),
            "pairwise_adv": summarize(within_adv),
            "init_to_adv": summarize(travel),
        },
        "tsne": {"init": xy_init.tolist(), "adv": xy_adv.tolist()},
    }
