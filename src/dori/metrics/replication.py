"""The replication rule and the copy-similarity wrapper: the one place that says what "replicated" means.

Finding Dori (Section 3.2, following Somepalli et al. and NeMo) calls a generation a replica of a training
image when the copy detector's (SSCD's) cosine similarity of the two is **at or above** the threshold (0.7
for SSCD on SD; a miniworld calibrates its own). Every count of replicas (MR, surrogate checks, early stops,
the locality analyses, reports) goes through :func:`replicated`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

Similarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``similarity(generated, reference) -> (B,)``: images (B, 3, H, W) in [0, 1] against references of the same
shape (or one reference, broadcast); higher means more alike (a copy detector's cosine)."""


def replicated(score, threshold: float):
    """``score >= threshold``, elementwise for tensors and arrays (a bool for a float)."""
    if isinstance(score, torch.Tensor | np.ndarray):
        return score >= threshold
    return bool(float(score) >= threshold)


def replication_rate(scores, threshold: float) -> float:
    """Share of ``scores`` (one best score per item) that replicate; NaN for no scores."""
    arr = np.asarray(scores.cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    if not arr.size:
        return float("nan")
    return float(replicated(arr, threshold).mean())


def copy_similarity(embedder: Callable[[torch.Tensor], torch.Tensor]) -> Similarity:
    """A :data:`Similarity` from an image embedder (the copy-detector role): cosine of the descriptors."""

    @torch.no_grad()
    def similarity(generated: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        a = torch.nn.functional.normalize(embedder(generated).float(), dim=-1)
        b = torch.nn.functional.normalize(embedder(reference).float(), dim=-1)
        return (a * b.to(a.device)).sum(-1).cpu()

    return similarity
