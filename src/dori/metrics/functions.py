"""The paper's metrics as pure functions on features and scores (Finding Dori, Section 3.2; NeMo's code).

Feature models live elsewhere (:mod:`dori.metrics.backends`); everything here takes tensors or arrays of
features and returns numbers, so each metric can be checked on known inputs.

Per item (one training image, one conditioning, ``n`` generations at fixed seeds):

* ``sscd_orig``: cosine of each generation's copy-detector features with the training image's; the item
  scores the max (the paper: "the median of the maximum scores across ten generated images") and, as
  NeMo also reports, the median.
* ``sscd_gen``: cosine of generation k with the *unmitigated* model's generation k (same seed); max and
  median over k.
* ``d_sscd``: mean pairwise cosine among the item's generations (Appendix H.2; lower = more diverse).
* ``a_clip``: cosine between each generation's CLIP image features and the caption's text features; the item
  scores their median as NeMo's ``compute_prompt_alignment.py`` does (``torch.median``: for an even count
  the lower of the two middle values), and also the mean.

Across items: ``mr`` (share of items whose max SSCD_orig reaches the threshold) and the median and MAD
(median absolute deviation, unscaled, as ``scipy.stats.median_abs_deviation``) of per-item scores.

Across image sets: ``fid`` (Frechet distance of Gaussian fits of Inception pool features, Heusel et al.
2017) and ``kid`` (unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets as
clean-fid does, Binkowski et al. 2018).

Every metric is registered with :func:`register_metric` and declares whether higher is better, so
tables mark the direction (↑/↓) without special cases.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dori.errors import DoriError
from dori.metrics.replication import replication_rate


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric: its column name, printed label and direction."""

    name: str
    label: str
    higher_is_better: bool
    fn: Callable

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"


METRICS: dict[str, MetricSpec] = {}


def register_metric(name: str, higher_is_better: bool, label: str | None = None) -> Callable:
    """Decorator: add a metric function to :data:`METRICS` under ``name``."""

    def wrap(fn: Callable) -> Callable:
        if name in METRICS:
            raise DoriError(f"metric {name!r} registered twice")
        METRICS[name] = MetricSpec(name, label or name, higher_is_better, fn)
        return fn

    return wrap


# ---------------------------------------------------------------------------------------------- basics
def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``a`` (N, D) with every row of ``b`` (M, D) -> (N, M), float32."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of row i of ``a`` (N, D) with row i of ``b`` (N, D) -> (N,), float32."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return (a * b).sum(-1)


def median(values: Sequence[float] | np.ndarray) -> float:
    """Median of a non-empty sequence (nan when empty)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(np.median(arr)) if arr.size else float("nan")


def mad(values: Sequence[float] | np.ndarray) -> float:
    """Median absolute deviation from the median, unscaled (nan when empty)."""
    arr = np.asarray(values, dtype=np.float64)
    if not arr.size:
        return float("nan")
    return float(np.median(np.abs(arr - np.median(arr))))


def median_mad(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """``{"median": ..., "mad": ...}``: the paper's "x ± y" aggregation over items."""
    return {"median": median(values), "mad": mad(values)}


def lower_median(values: Sequence[float] | np.ndarray | torch.Tensor) -> float:
    """``torch.median`` of float32 values: for an even count the lower of the two middle values (what NeMo's
    metric scripts take), nan when empty."""
    t = torch.as_tensor(np.asarray(values, dtype=np.float32))
    return float(t.median()) if t.numel() else float("nan")


def lower_median_mad(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """NeMo's scripts' "median ± deviation" over items: ``m = x.median()``, ``(x - m).abs().median()`` in
    float32 with ``torch.median`` (``compute_prompt_alignment.py`` 66-68, ``compute_sscd_orig.py``)."""
    t = torch.as_tensor(np.asarray(values, dtype=np.float32))
    if not t.numel():
        return {"median": float("nan"), "mad": float("nan")}
    m = t.median()
    return {"median": float(m), "mad": float((t - m).abs().median())}


# ---------------------------------------------------------------------------------------- per item
@register_metric("sscd_orig", higher_is_better=False, label="SSCD_orig")
def sscd_orig(generated: torch.Tensor, original: torch.Tensor) -> dict[str, object]:
    """Similarity of an item's generations to its training image.

    Args:
        generated: copy-detector features of the item's generations (n, D).
        original: features of the training image (D,) or (1, D).

    Returns:
        ``{"scores": [n floats], "max": ..., "median": ...}``.
    """
    scores = cosine_matrix(generated, original.reshape(1, -1))[:, 0]
    return {"scores": scores.tolist(), "max": float(scores.max()), "median": median(scores.numpy())}


@register_metric("sscd_gen", higher_is_better=False, label="SSCD_gen")
def sscd_gen(generated: torch.Tensor, reference: torch.Tensor) -> dict[str, object]:
    """Similarity of generation k to the unmitigated model's generation k (same seed).

    Args:
        generated: features (n, D) of the evaluated setting's generations.
        reference: features (n, D) of the unmitigated model's generations from the item's prompt.

    Returns:
        ``{"scores": [n floats], "max": ..., "median": ...}``.
    """
    if generated.shape != reference.shape:
        raise DoriError(
            f"sscd_gen needs paired features, got {tuple(generated.shape)} and {tuple(reference.shape)}"
        )
    scores = torch.nn.functional.cosine_similarity(generated.float(), reference.float(), dim=1)
    return {"scores": scores.tolist(), "max": float(scores.max()), "median": median(scores.numpy())}


@register_metric("d_sscd", higher_is_better=False, label="D_SSCD")
def d_sscd(generated: torch.Tensor) -> dict[str, float]:
    """Pairwise similarity among an item's generations (strict lower triangle of the cosine matrix).

    Returns:
        ``{"mean": ..., "max": ...}`` over the n(n-1)/2 pairs (nan for fewer than two generations).
    """
    n = generated.shape[0]
    if n < 2:
        return {"mean": float("nan"), "max": float("nan")}
    sims = cosine_matrix(generated, generated)
    rows, cols = torch.tril_indices(n, n, offset=-1)
    pairs = sims[rows, cols]
    return {"mean": float(pairs.mean()), "max": float(pairs.max())}


@register_metric("a_clip", higher_is_better=True, label="A_CLIP")
def a_clip(image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, object]:
    """Alignment of an item's generations with its caption: cosine of CLIP image and text features.

    Args:
        image_features: (n, D) for the generations.
        text_features: (D,) or (1, D) for the caption.

    Returns:
        ``{"scores": [n floats], "median": ..., "mean": ...}``; ``median`` as NeMo's script (lower middle
        value for an even count).
    """
    scores = cosine_matrix(image_features, text_features.reshape(1, -1))[:, 0]
    return {"scores": scores.tolist(), "median": float(scores.median()), "mean": float(scores.mean())}


def jpeg_roundtrip(images: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """uint8 images (N, 3, H, W) saved as JPEG and read back with PIL (NeMo saves its generations with
    ``Image.save(".jpg")``: quality 75, PIL's default, and 4:2:0 chroma subsampling)."""
    import io

    from PIL import Image

    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise DoriError(
            f"jpeg_roundtrip needs uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im.permute(1, 2, 0).cpu().numpy()).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        out.append(torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1))
    return torch.stack(out)


# ------------------------------------------------------------------------------------------ across items
@register_metric("mr", higher_is_better=False, label="MR")
def memorization_rate(item_max_scores: Sequence[float], threshold: float) -> float:
    """Share of items with at least one generation at or above the replication threshold."""
    return replication_rate(item_max_scores, threshold)


# -------------------------------------------------------------------------------------- across image sets
def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    x = _as_f64(features)
    if x.shape[0] < 2:
        raise DoriError("FID needs at least two feature vectors per set")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)), in float64.

    The trace of the matrix square root is taken through the symmetric form: with S = C1^(1/2) (from an
    eigendecomposition), (C1 C2)^(1/2) is similar to (S C2 S)^(1/2), which is symmetric positive
    semi-definite, so tr (C1 C2)^(1/2) = sum_i sqrt(lambda_i(S C2 S)). Tiny negative eigenvalues from
    rounding are clipped to zero.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape:
        raise DoriError("FID statistics of different dimensions")
    w, v = np.linalg.eigh((cov1 + cov1.T) / 2)
    s = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = s @ cov2 @ s
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt)


@register_metric("fid", higher_is_better=False, label="FID")
def fid(features_a: torch.Tensor | np.ndarray, features_b: torch.Tensor | np.ndarray) -> float:
    """Frechet Inception Distance between two feature sets (N, D) and (M, D)."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


@register_metric("kid", higher_is_better=False, label="KID")
def kid(
    features_a: torch.Tensor | np.ndarray,
    features_b: torch.Tensor | np.ndarray,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
    seed: int = 0,
) -> float:
    """Kernel Inception Distance: unbiased MMD^2 with k(x, y) = (x.y / D + 1)^3, mean over subsets.

    As clean-fid: ``m = min(N, M, max_subset_size)``; each of ``num_subsets`` rounds draws m rows of each
    set without replacement (seeded), and the unbiased estimate drops the diagonals of the within-set
    kernel matrices.
    """
    x, y = _as_f64(features_a), _as_f64(features_b)
    if x.shape[1] != y.shape[1]:
        raise DoriError("KID features of different dimensions")
    m = min(x.shape[0], y.shape[0], max_subset_size)
    if m < 2:
        raise DoriError("KID needs at least two feature vectors per set")
    d = x.shape[1]
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        a = x[rng.choice(x.shape[0], m, replace=False)]
        b = y[rng.choice(y.shape[0], m, replace=False)]
        kaa = (a @ a.T / d + 1) ** 3
        kbb = (b @ b.T / d + 1) ** 3
        kab = (a @ b.T / d + 1) ** 3
        within = (kaa.sum() - np.trace(kaa) + kbb.sum() - np.trace(kbb)) / (m * (m - 1))
        total += within - 2 * kab.mean()
    return float(total / num_subsets)


def _as_f64(features: torch.Tensor | np.ndarray) -> np.ndarray:
    if torch.is_tensor(features):
        features = features.detach().double().cpu().numpy()
    arr = np.asarray(features, dtype=np.float64)
    if arr.ndim != 2:
        raise DoriError(f"features must be (N, D), got shape {arr.shape}")
    return arr
