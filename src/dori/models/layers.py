"""Named layer targets on any SD-family UNet (SD v1.4, SD 2, the miniworld).

* NeMo's value layers: the cross-attention value projections ``attn2.to_v`` of the down and mid blocks
  (7 layers on SD v1.4: down_blocks 0-2 x 2 attentions + mid_block).
* Wanda's layers: the second linear layer of the feed-forward network ``ff.net.2`` of every transformer
  block (16 on SD v1.4).
* ``layer_type``: the groups of Fig. 12 (self/cross-attention Q, K, V, out, FFN, convolutions).
"""

from __future__ import annotations

import re

import torch

_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def unet_order(names: list[str]) -> list[str]:
    """Sort layer names in the order data flows: down blocks, mid block, up blocks (stable otherwise)."""
    return sorted(names, key=lambda n: _BLOCK_ORDER.get(n.split(".")[0], 3))


def named_linear(unet: torch.nn.Module, pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return unet_order([n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and rx.search(n)])


def value_layers(unet: torch.nn.Module) -> list[str]:
    """NeMo's targets: ``attn2.to_v`` in ``down_blocks`` and ``mid_block`` (in module order)."""
    return named_linear(unet, r"^(down_blocks|mid_block).*\.attn2\.to_v$")


def ffn_layers(unet: torch.nn.Module) -> list[str]:
    """Wanda's targets: ``ff.net.2`` of every transformer block (in module order)."""
    return named_linear(unet, r"\.ff\.net\.2$")


LAYER_TYPES = {
    "self-attn Q": r"\.attn1\.to_q$",
    "self-attn K": r"\.attn1\.to_k$",
    "self-attn V": r"\.attn1\.to_v$",
    "self-attn out": r"\.attn1\.to_out\.0$",
    "cross-attn Q": r"\.attn2\.to_q$",
    "cross-attn K": r"\.attn2\.to_k$",
    "cross-attn V": r"\.attn2\.to_v$",
    "cross-attn out": r"\.attn2\.to_out\.0$",
    "FFN in": r"\.ff\.net\.0\.proj$",
    "FFN out": r"\.ff\.net\.2$",
    "conv": r"resnets\.\d+\.conv[12]$",
}


def layers_of_type(unet: torch.nn.Module, layer_type: str) -> list[str]:
    rx = re.compile(LAYER_TYPES[layer_type])
    mods = unet.named_modules()
    return unet_order(
        [n for n, m in mods if rx.search(n) and isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    )


def get_module(unet: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return unet.get_submodule(name)
    except AttributeError as err:
        raise KeyError(f"the UNet has no layer named {name!r}") from err
