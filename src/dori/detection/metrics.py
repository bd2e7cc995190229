"""Detection metrics on per-prompt scores: ROC curve, AUC and TPR at a fixed FPR, computed strictly.

Convention: a prompt is flagged as memorized when its score is **at or above** a threshold (higher score =
more memorized). The labels are never flipped: a detector whose scores are lower on memorized prompts gets
an AUC below 0.5 and is reported as such.

* :func:`roc_curve`: one point per distinct score value (thresholds from +inf down to the smallest score),
  so tied scores move together and the curve has no points a threshold cannot produce.
* :func:`auc`: the area under that curve (trapezoids), equal to the Mann-Whitney probability
  P(s_pos > s_neg) + 0.5 P(s_pos = s_neg).
* :func:`tpr_at_fpr`: the TPR of the operating point with the largest FPR that does not exceed the target,
  i.e. the smallest threshold whose FPR <= target (TPR can only grow as the threshold falls, so this is the
  best TPR any threshold reaches within the FPR budget). No interpolation between ROC points. Wen et al.'s
  notebook takes ``tpr[where(fpr < target)[-1]]`` (strictly below); here FPR equal to the target counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dori.errors import DoriError


def _check(pos: Sequence[float], neg: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pos, dtype=np.float64).ravel()
    n = np.asarray(neg, dtype=np.float64).ravel()
    if p.size == 0 or n.size == 0:
        raise DoriError(f"detection metrics need positives and negatives (got {p.size} and {n.size})")
    if not (np.isfinite(p).all() and np.isfinite(n).all()):
        raise DoriError("detection scores must be finite")
    return p, n


def roc_curve(pos: Sequence[float], neg: Sequence[float]) -> dict[str, list[float]]:
    """ROC of scores ``pos`` (memorized) against ``neg`` (not memorized).

    Returns:
        ``{"fpr", "tpr", "thresholds"}``: lists of equal length; point k flags scores >= thresholds[k]. The
        first point is (0, 0) at threshold +inf, the last (1, 1) at the smallest score.
    """
    p, n = _check(pos, neg)
    thresholds = np.unique(np.concatenate([p, n]))[::-1]
    p_sorted, n_sorted = np.sort(p), np.sort(n)
    # number of scores >= thr: size - (number of scores < thr)
    tp = p.size - np.searchsorted(p_sorted, thresholds, side="left")
    fp = n.size - np.searchsorted(n_sorted, thresholds, side="left")
    fpr = np.concatenate([[0.0], fp / n.size])
    tpr = np.concatenate([[0.0], tp / p.size])
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": [float("inf"), *thresholds.tolist()]}


def auc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """Area under the ROC curve (ties count one half)."""
    curve = roc_curve(pos, neg)
    return float(np.trapezoid(curve["tpr"], curve["fpr"]))


def tpr_at_fpr(pos: Sequence[float], neg: Sequence[float], target: float) -> dict[str, float]:
    """TPR at the operating point with the largest FPR <= ``target`` (see module docstring).

    Returns:
        ``{"tpr", "fpr", "threshold"}`` of that point (threshold None when only +inf qualifies: TPR 0).
    """
    if not 0.0 <= target <= 1.0:
        raise DoriError(f"target FPR must be in [0, 1], got {target}")
    curve = roc_curve(pos, neg)
    best = 0
    for k, f in enumerate(curve["fpr"]):
        if f <= target + 1e-12:
            best = k  # FPR and TPR never decrease along the curve
    thr = curve["thresholds"][best]
    return {
        "tpr": curve["tpr"][best],
        "fpr": curve["fpr"][best],
        "threshold": thr if np.isfinite(thr) else None,
    }


def summarize(pos: Sequence[float], neg: Sequence[float], targets: Sequence[float] = (0.01, 0.03)) -> dict:
    """AUC, TPR at each target FPR and the ROC curve of one (positives, negatives) pair."""
    out: dict = {"n_pos": len(pos), "n_neg": len(neg), "auc": auc(pos, neg)}
    for target in targets:
        point = tpr_at_fpr(pos, neg, target)
        key = f"{round(target * 100, 3):g}"
        out[f"tpr@{key}%fpr"] = point["tpr"]
        out[f"threshold@{key}%fpr"] = point["threshold"]
    out["roc"] = {k: v for k, v in roc_curve(pos, neg).items() if k != "thresholds"}
    return out
