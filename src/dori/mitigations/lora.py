"""A small LoRA wrapper for the UNet (Hu et al., 2021), for the LoRA variant of adversarial fine-tuning.

Finding Dori, Appendix I.5: LoRA with rank 128 on (1) all fully-connected layers, and (2) both fully-connected
and convolutional layers, does not remove memorization even after 50 epochs. This module adds low-rank
adapters to a UNet in place::

    W x  ->  W x + (alpha / r) * B (A x)          A: (r, in), B: (out, r), B = 0 at the start

so a freshly wrapped UNet computes exactly what it computed before. Convolutions get ``A`` as a convolution
with the base kernel, stride, padding and dilation (``r`` output channels) and ``B`` as a 1x1 convolution.
Only the adapters train; :func:`merge_lora` folds them into the base weights and puts the plain layers back,
so the merged UNet saves in diffusers format and loads with ``--model DIR`` like any other.

A rank at or above ``min(in, out)`` of a layer makes its update full rank; on small models (the miniworld)
state the rank relative to the layer widths when reporting the LoRA result.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from dori.errors import DoriError
from dori.models.layers import get_module


class LoRALinear(nn.Module):
    """``base(x) + scale * up(down(x))`` around a frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        self.scale = alpha / rank
        _init_pair(self.down.weight, self.up.weight)
        self.down.to(base.weight.device, base.weight.dtype)
        self.up.to(base.weight.device, base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The update ``scale * B A`` in the base weight's shape (out, in)."""
        return (self.up.weight @ self.down.weight) * self.scale


class LoRAConv2d(nn.Module):
    """``base(x) + scale * up(down(x))`` around a frozen ``nn.Conv2d`` (groups = 1)."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float):
        super().__init__()
        if base.groups != 1:
            raise DoriError("LoRA on grouped convolutions is not supported")
        self.base = base
        self.down = nn.Conv2d(
            base.in_channels,
            rank,
            base.kernel_size,
            stride=base.stride,
            padding=base.padding,
            dilation=base.dilation,
            bias=False,
        )
        self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        self.scale = alpha / rank
        _init_pair(self.down.weight, self.up.weight)
        self.down.to(base.weight.device, base.weight.dtype)
        self.up.to(base.weight.device, base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The update as one kernel (out, in, kh, kw): the 1x1 ``up`` composed with ``down``."""
        up = self.up.weight.flatten(1)  # (out, r)
        down = self.down.weight.flatten(1)  # (r, in * kh * kw)
        return (up @ down).view_as(self.base.weight) * self.scale


def _init_pair(down: torch.Tensor, up: torch.Tensor) -> None:
    """A as nn.Linear's default (Kaiming uniform), B = 0: the wrapped layer starts as the identity change."""
    nn.init.kaiming_uniform_(down, a=math.sqrt(5))
    nn.init.zeros_(up)


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (get_module(root, parent_name) if parent_name else root), attr


def add_lora(
    unet: nn.Module,
    rank: int = 128,
    alpha: float | None = None,
    convs: bool = False,
    pattern: str | None = None,
) -> list[str]:
    """Wrap layers of ``unet`` in LoRA adapters, in place, and freeze everything but the adapters.

    Args:
        unet: the model to adapt (usually ``model.unet``).
        rank: adapter rank r (paper: 128).
        alpha: scale numerator; ``alpha / rank`` multiplies the update (default ``alpha = rank``, scale 1).
        convs: also wrap ``nn.Conv2d`` layers (the paper's variant 2); default only ``nn.Linear`` (variant 1).
        pattern: optional regular expression; only layers whose name matches are wrapped.

    Returns:
        The names of the wrapped layers.
    """
    if rank < 1:
        raise DoriError(f"LoRA rank must be >= 1, got {rank}")
    if any(isinstance(m, LoRALinear | LoRAConv2d) for m in unet.modules()):
        raise DoriError("this UNet already has LoRA adapters; merge or remove them first")
    alpha = float(rank if alpha is None else alpha)
    rx = re.compile(pattern) if pattern else None
    kinds: tuple[type, ...] = (nn.Linear, nn.Conv2d) if convs else (nn.Linear,)
    targets = [
        n
        for n, m in unet.named_modules()
        if type(m) in kinds
        and (rx is None or rx.search(n))
        and (not isinstance(m, nn.Conv2d) or m.groups == 1)
    ]
    if not targets:
        raise DoriError("add_lora found no layers to wrap")
    unet.requires_grad_(False)
    for name in targets:
        parent, attr = _parent(unet, name)
        base = getattr(parent, attr)
        wrapper = (
            LoRALinear(base, rank, alpha) if isinstance(base, nn.Linear) else LoRAConv2d(base, rank, alpha)
        )
        setattr(parent, attr, wrapper)
    for p in lora_parameters(unet):
        p.requires_grad_(True)
    return targets


def lora_modules(unet: nn.Module) -> dict[str, LoRALinear | LoRAConv2d]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, LoRALinear | LoRAConv2d)}


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter weights (A and B of every wrapped layer), in module order."""
    params: list[nn.Parameter] = []
    for m in lora_modules(unet).values():
        params += [m.down.weight, m.up.weight]
    return params


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights by name (``<layer>.down`` / ``<layer>.up``), for checkpoints."""
    out = {}
    for name, m in lora_modules(unet).items():
        out[f"{name}.down"] = m.down.weight.detach().cpu().contiguous()
        out[f"{name}.up"] = m.up.weight.detach().cpu().contiguous()
    return out


def load_lora_state_dict(unet: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter weights written by :func:`lora_state_dict` into an identically wrapped UNet."""
    mods = lora_modules(unet)
    expected = {f"{n}.{part}" for n in mods for part in ("down", "up")}
    if set(state) != expected:
        raise DoriError(
            "LoRA checkpoint does not match the adapters of this UNet (other rank, layers or convs?)"
        )
    with torch.no_grad():
        for name, m in mods.items():
            m.down.weight.copy_(state[f"{name}.down"])
            m.up.weight.copy_(state[f"{name}.up"])


@torch.no_grad()
def merge_lora(unet: nn.Module) -> int:
    """Fold every adapter into its base weight and put the plain layer back (in place).

    Returns:
        The number of merged layers. The result is a plain diffusers UNet (``save_pretrained`` works).
    """
    mods = lora_modules(unet)
    for name, m in mods.items():
        m.base.weight += m.delta_weight().to(m.base.weight.dtype)
        parent, attr = _parent(unet, name)
        setattr(parent, attr, m.base)
    return len(mods)
