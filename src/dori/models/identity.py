"""A model's identity for run folders: a fingerprint of its weights, so results and fine-tuning runs are tied
to the weights that produced them (a rerun against other weights is refused, never resumed into)."""

from __future__ import annotations

import hashlib
from pathlib import Path

_SAMPLES = 4096  # values read per tensor (evenly strided): a fine-tune that changes a tensor changes these


def weights_fingerprint(model, coarse: bool = False) -> str:
    """SHA-256 (first 16 hex digits) over names, shapes, dtypes and an even sample of every weight of the UNet,
    text encoder and VAE. Cheap: a few thousand values per tensor (well under a second for SD).

    ``coarse=True`` leaves the dtype out and rounds the samples to bfloat16, so the same weights loaded in fp32
    or cast to bf16 (``--dtype bf16``, the fast path) match: what ties a fitted mitigation to its model."""
    import torch

    h = hashlib.sha256()
    for part in ("unet", "text_encoder", "vae"):
        module = getattr(model, part, None)
        if module is None:
            continue
        for name, t in module.state_dict().items():
            h.update(f"{part}.{name}:{tuple(t.shape)}:{'' if coarse else t.dtype};".encode())
            flat = t.detach().reshape(-1)
            if flat.numel() == 0:
                continue
            step = max(1, flat.numel() // _SAMPLES)
            sample = flat[::step]
            if coarse and sample.is_floating_point():
                sample = sample.to(torch.bfloat16)
            h.update(sample.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def model_sources(model) -> list[Path]:
    """The folders a model was read from (its world folder, its local path), for never writing over them."""
    out = []
    from dori.world import world_of

    world = world_of(model)
    if world is not None:
        out.append(world.folder)
    name = getattr(model, "name", None)
    if name and Path(str(name)).expanduser().is_dir():
        out.append(Path(str(name)).expanduser())
    return out


def check_not_source(out: str | Path, sources) -> None:
    """Refuse to write into an input model's folder (or inside it).

    Raises:
        DoriError: naming both folders.
    """
    from dori.errors import DoriError

    where = Path(out).resolve()
    for src in sources:
        src_r = Path(src).resolve()
        if where == src_r or src_r in where.parents:
            inside = "" if where == src_r else "inside "
            raise DoriError(
                f"--out {out} is {inside}the input model's folder {src}: dori never writes over an input "
                "model; use a new --out"
            )
