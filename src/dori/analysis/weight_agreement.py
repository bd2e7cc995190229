"""Weight agreement (Finding Dori, Section 4.3, Appendix J.2, Eq. 7; Figures 5 and 13).

NeMo and Wanda pick the weights to prune from activations. If memorization were local, the weights they
pick for different triggers of one image would coincide. Per layer, for two embeddings::

    Agreement(y_i, y_j) = #(W(y_i) & W(y_j)) / #(W(y_i) | W(y_j)),   1 where both select nothing
    MeanAgreement(Y)    = mean over the pairs i != j of Agreement(y_i, y_j)

Eq. (7) as printed divides the sum over i != j by (N - 1)^2, which would give N / (N - 1) > 1 for a set
whose selections all coincide; we take the mean over pairs, the evident intent (identical selections
give 1, disjoint ones 0).

A selection ``W(y)`` is what the method selects in one layer: NeMo a set of neurons (output channels of
``attn2.to_v``, given as indices), Wanda a boolean mask over the weight matrix of ``ff.net.2``. Both are
turned into sets of flat indices; all pairwise intersections of a layer come from one sparse product, so
100 selections of millions of weights cost no N x N Python loop.

The functions on selections are pure; :func:`nemo_selections` and :func:`wanda_selections` call the
mitigations (``NeMo.select_many`` / ``NeMo.select`` and ``Wanda.masks_each`` / ``Wanda.masks``). Wanda's
masks here come from one embedding each (Finding Dori's per-prompt setting), NeMo's neurons are its
refined per-prompt sets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from dori.errors import DoriError
from dori.models.pipeline import T2IModel

Selection = torch.Tensor | np.ndarray | Sequence[int]
"""Weights selected in one layer: a boolean mask (any shape) or integer indices."""


def to_indices(selection: Selection) -> np.ndarray:
    """A selection as sorted unique flat indices (int64). Boolean masks give their True positions."""
    arr = selection.detach().cpu().numpy() if torch.is_tensor(selection) else np.asarray(selection)
    if arr.dtype == bool:
        return np.flatnonzero(arr.ravel()).astype(np.int64)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DoriError(f"a selection is a boolean mask or integer indices, got dtype {arr.dtype}")
    return np.unique(arr.astype(np.int64).ravel())


def iou(a: Selection, b: Selection) -> float:
    """Intersection over union of two selections; 1.0 when both are empty."""
    ia, ib = to_indices(a), to_indices(b)
    union = np.union1d(ia, ib).size
    if union == 0:
        return 1.0
    return np.intersect1d(ia, ib, assume_unique=True).size / union


def pairwise_iou(selections: Sequence[Selection]) -> np.ndarray:
    """IoU of every pair of N selections of one layer: (N, N), 1 on the diagonal and for empty pairs."""
    from scipy import sparse

    idx = [to_indices(s) for s in selections]
    n = len(idx)
    if n == 0:
        raise DoriError("pairwise agreement needs at least one selection")
    size = max((int(i.max()) + 1 for i in idx if i.size), default=1)
    rows = np.concatenate([np.full(i.size, k, dtype=np.int64) for k, i in enumerate(idx)])
    cols = np.concatenate(idx) if rows.size else np.zeros(0, dtype=np.int64)
    member = sparse.csr_matrix((np.ones(rows.size, dtype=np.float64), (rows, cols)), shape=(n, size))
    inter = (member @ member.T).toarray()
    counts = np.array([i.size for i in idx], dtype=np.float64)
    union = counts[:, None] + counts[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(union > 0, inter / np.where(union > 0, union, 1), 1.0)
    return out


def mean_agreement(selections: Sequence[Selection]) -> float:
    """MeanAgreement (Eq. 7, mean over the pairs i != j) of N >= 2 selections of one layer."""
    n = len(selections)
    if n < 2:
        raise DoriError(f"mean agreement needs at least 2 selections, got {n}")
    m = pairwise_iou(selections)
    return float((m.sum() - np.trace(m)) / (n * (n - 1)))


def layer_agreement(per_embedding: Sequence[dict[str, Selection]], layers: Sequence[str]) -> list[float]:
    """MeanAgreement per layer; a layer missing from an embedding's dict counts as nothing selected."""
    empty = np.zeros(0, dtype=np.int64)
    return [mean_agreement([sel.get(layer, empty) for sel in per_embedding]) for layer in layers]


def layer_counts(per_embedding: Sequence[dict[str, Selection]], layers: Sequence[str]) -> list[list[int]]:
    """Number of selected weights (or neurons) per layer (outer list) and embedding (inner list)."""
    return [
        [int(to_indices(sel[layer]).size) if layer in sel else 0 for sel in per_embedding] for layer in layers
    ]


class NeuronSelector(Protocol):
    """NeMo's role: the neurons (output channels of value layers) it would block for one embedding."""

    def select(self, model: T2IModel, cond_embedding: torch.Tensor) -> dict[str, torch.Tensor]: ...


class MaskSelector(Protocol):
    """Wanda's role: the weight masks it would prune for a set of embeddings (here one at a time)."""

    def masks(self, model: T2IModel, cond_embeddings: torch.Tensor) -> Any: ...


def nemo_selections(
    nemo: NeuronSelector,
    model: T2IModel,
    embeddings: torch.Tensor,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, np.ndarray]]:
    """NeMo's neuron indices per layer for each embedding (N, tokens, dim), one selection per embedding.

    Uses ``nemo.select_many`` (all embeddings batched) where the selector has it, else ``select`` one
    embedding at a time.
    """
    if hasattr(nemo, "select_many"):
        chosen = nemo.select_many(model, embeddings)
        if progress is not None:
            progress(embeddings.shape[0])
    else:
        chosen = []
        for i in range(embeddings.shape[0]):
            chosen.append(nemo.select(model, embeddings[i : i + 1]))
            if progress is not None:
                progress(i + 1)
    return [{layer: to_indices(idx) for layer, idx in sel.items()} for sel in chosen]


def wanda_selections(
    wanda: MaskSelector,
    model: T2IModel,
    embeddings: torch.Tensor,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Wanda's pruned-weight indices per layer for each embedding, each mask computed from that one
    embedding (``WeightMasks`` or a plain ``dict[layer, bool mask]``).

    Uses ``wanda.masks_each`` (all embeddings sampled in shared batches) where the selector has it, else
    ``masks`` one embedding at a time.
    """
    if hasattr(wanda, "masks_each"):
        all_masks = wanda.masks_each(model, embeddings)
        if progress is not None:
            progress(embeddings.shape[0])
    else:
        all_masks = []
        for i in range(embeddings.shape[0]):
            all_masks.append(wanda.masks(model, embeddings[i : i + 1]))
            if progress is not None:
                progress(i + 1)
    out = []
    for masks in all_masks:
        masks = getattr(masks, "masks", masks)
        out.append({layer: to_indices(m.bool()) for layer, m in masks.items()})
    return out


def agreement_table(
    adv: Sequence[dict[str, Selection]], mem: Sequence[dict[str, Selection]], layers: Sequence[str]
) -> dict:
    """Fig. 5 numbers for one method: MeanAgreement per layer over Y_adv and over Y_mem, with counts."""
    return {
        "layers": list(layers),
        "adv": layer_agreement(adv, layers),
        "mem": layer_agreement(mem, layers),
        "count_adv": layer_counts(adv, layers),
        "count_mem": layer_counts(mem, layers),
    }
