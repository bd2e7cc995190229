"""Reversible interventions on a model: every one is a context manager that restores the model exactly.

* :func:`scale_output_channels`: multiply chosen output channels of named linear layers by a factor
  (NeMo blocks neurons by scaling ``attn2.to_v`` outputs with 0).
* :class:`WeightMasks` and :func:`apply_weight_masks`: zero chosen weights (Wanda), saved/loaded as
  safetensors, undone on exit.
* :func:`record_activations`: capture outputs (or inputs) of named layers per UNet call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dori.errors import DoriError
from dori.models.layers import get_module


@contextlib.contextmanager
def scale_output_channels(
    unet: torch.nn.Module, channels: dict[str, list[int] | torch.Tensor], scale: float = 0.0
) -> Iterator[None]:
    """Within the block, ``layer(x)[..., idx] *= scale`` for each ``layer name -> idx``.

    Implemented with forward hooks (weights untouched), removed on exit even after an exception.
    """
    handles = []
    try:
        for name, idx in channels.items():
            idx_t = torch.as_tensor(list(idx) if not torch.is_tensor(idx) else idx, dtype=torch.long)
            if idx_t.numel() == 0:
                continue
            module = get_module(unet, name)

            def hook(_mod, _inp, out, idx_t=idx_t):
                out = out.clone()
                out[..., idx_t.to(out.device)] *= scale
                return out

            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class WeightMasks:
    """Boolean masks over weight matrices of named layers; True = pruned (set to zero)."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_file(
            {k: v.to(torch.uint8).contiguous().cpu() for k, v in self.masks.items()},
            str(tmp),
            metadata={k: str(v) for k, v in self.meta.items()},
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> WeightMasks:
        path = Path(path)
        if not path.exists():
            raise DoriError(f"mask file {path} does not exist")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        return cls({k: v.bool() for k, v in load_file(str(path)).items()}, meta)

    def union(self, other: WeightMasks) -> WeightMasks:
        keys = set(self.masks) | set(other.masks)
        out = {}
        for k in keys:
            a, b = self.masks.get(k), other.masks.get(k)
            out[k] = a | b if a is not None and b is not None else (a if a is not None else b)
        return WeightMasks(out, dict(self.meta))

    def count(self) -> dict[str, int]:
        return {k: int(v.sum()) for k, v in self.masks.items()}


@contextlib.contextmanager
def apply_weight_masks(unet: torch.nn.Module, masks: WeightMasks | dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, masked weights are zero; the original values are restored on exit."""
    masks = masks.masks if isinstance(masks, WeightMasks) else masks
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, mask in masks.items():
                weight = get_module(unet, name).weight
                if mask.shape != weight.shape:
                    raise DoriError(
                        f"mask for {name} has shape {tuple(mask.shape)}, weight has {tuple(weight.shape)}"
                    )
                m = mask.to(weight.device)
                saved.append((weight, m, weight[m].clone()))
                weight[m] = 0
        yield
    finally:
        with torch.no_grad():
            for weight, m, values in reversed(saved):
                weight[m] = values


@contextlib.contextmanager
def record_activations(
    unet: torch.nn.Module,
    layer_names: list[str],
    inputs: bool = False,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record each named layer's output (or its first input) at every call, optionally reduced.

    Yields a dict ``name -> list`` (one entry per forward call, detached, on the CPU unless ``reduce``
    keeps it elsewhere).
    """
    store: dict[str, list[torch.Tensor]] = {n: [] for n in layer_names}
    handles = []

    def make(name: str):
        def hook(_mod, inp, out):
            x = inp[0] if inputs else out
            x = x.detach()
            store[name].append(reduce(x) if reduce is not None else x.cpu())

        return hook

    try:
        for name in layer_names:
            handles.append(get_module(unet, name).register_forward_hook(make(name)))
        yield store
    finally:
        for h in handles:
            h.remove()


def _rows_for(out: torch.Tensor, n_rows: int, name: str) -> int:
    """How many times the row layout repeats in this call: 1, or 2 under classifier-free guidance."""
    if out.shape[0] == n_rows:
        return 1
    if out.shape[0] == 2 * n_rows:
        return 2
    raise DoriError(
        f"row-wise intervention on {name}: a call with {out.shape[0]} rows, expected {n_rows} or {2 * n_rows}"
    )


def row_multipliers(
    unet: torch.nn.Module,
    rows: Sequence[Mapping[str, Sequence[int]] | None],
    scale: float = 0.0,
    layers: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-row channel multipliers for :func:`rowwise_scale_output_channels`, the one place they are built:
    row r scales the channels ``rows[r][layer]`` by ``scale`` and leaves every other channel at 1. Only layers
    some row touches appear (restricted to ``layers`` when given, in that order)."""
    touched = {k for row in rows if row for k, v in row.items() if len(v)}
    order = [lay for lay in layers if lay in touched] if layers is not None else sorted(touched)
    mults = {}
    for layer in order:
        mult = torch.ones(len(rows), get_module(unet, layer).out_features)
        for r, row in enumerate(rows):
            idx = list(row.get(layer, ())) if row else []
            if idx:
                mult[r, idx] = scale
        mults[layer] = mult
    return mults


@contextlib.contextmanager
def rowwise_scale_output_channels(
    unet: torch.nn.Module, multipliers: dict[str, torch.Tensor]
) -> Iterator[None]:
    """Per-row channel scaling: ``layer(x)[r, ..., c] *= multipliers[layer][r, c]``.

    Lets several items with different NeMo neuron sets share one UNet batch (row r belongs to one item).
    A call with twice the rows (classifier-free guidance: [uncond; cond]) uses the layout for both halves.
    """
    handles = []
    try:
        for name, mult in multipliers.items():
            module = get_module(unet, name)

            def hook(_mod, _inp, out, mult=mult, name=name):
                rep = _rows_for(out, mult.shape[0], name)
                m = mult.to(out.device, out.dtype).repeat(rep, 1)
                return out * m.view(m.shape[0], *([1] * (out.ndim - 2)), m.shape[1])

            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def rowwise_weight_masks(
    unet: torch.nn.Module, masks: dict[str, list[torch.Tensor]], row_group: torch.Tensor
) -> Iterator[None]:
    """Per-row weight masks on linear layers: row r computes with ``W * ~masks[layer][row_group[r]]``.

    Implemented as ``out_r -= x_r (W * M_g)^T`` for the rows of each group g (masks are sparse), so items
    with different Wanda masks share one UNet batch; weights are never modified. Rows with group -1 are
    left unmasked. Doubled calls (classifier-free guidance) use the layout for both halves.
    """
    handles = []
    try:
        for name, group_masks in masks.items():
            module = get_module(unet, name)
            if not isinstance(module, torch.nn.Linear):
                raise DoriError(
                    f"row-wise weight masks need a linear layer, {name} is {type(module).__name__}"
                )

            def hook(mod, inp, out, group_masks=group_masks, name=name):
                rep = _rows_for(out, row_group.shape[0], name)
                groups = row_group.to(out.device).repeat(rep)
                x = inp[0]
                out = out.clone()
                for g in torch.unique(groups).tolist():
                    if g < 0:
                        continue
                    rows = (groups == g).nonzero().flatten()
                    w = mod.weight * group_masks[g].to(mod.weight.device, mod.weight.dtype)
                    out[rows] -= torch.nn.functional.linear(x[rows], w)
                return out

            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
