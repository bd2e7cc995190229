"""Device and dtype names as users write them (``cuda``, ``fp32``), resolved for the library."""

from __future__ import annotations

import torch

from dori.errors import DoriError

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
"""Weights dtype names -> torch dtypes."""


def resolve_device(name: str | None) -> str:
    """``name``, or ``cuda`` when available and ``cpu`` otherwise (under torchrun: this rank's device); a CUDA
    device without CUDA is refused."""
    from dori import distributed

    if distributed.launched() and name in (None, "cuda"):  # torchrun: this rank's device
        return str(distributed.current().device)
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DoriError(f"--device {name} asked for but no CUDA device is available")
    return name


def open_model(
    name: str,
    device: str | None = None,
    dtype: str = "fp32",
    allow_pickle: bool = False,
    allow_download: bool = False,
):
    """:func:`dori.models.loading.load_model` with a device name (None: the default) and a dtype name."""
    from dori.models.loading import load_model

    if dtype not in DTYPES:
        raise DoriError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(DTYPES))}")
    return load_model(
        name, device=resolve_device(device), dtype=DTYPES[dtype], allow_pickle=allow_pickle,
        allow_download=allow_download,
    )  # fmt: skip
