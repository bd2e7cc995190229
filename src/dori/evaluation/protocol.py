"""The evaluation protocol's shared parts: its settings (:class:`EvalConfig`), one audit row's model state and
conditioning (:class:`Setting`), the seed scheme, the run's file names, and the helpers that turn generations
into the uint8 images and features every score is computed from (see :mod:`dori.evaluation` for the protocol).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from dori.errors import DoriError
from dori.models.pipeline import SamplingConfig

SEED_STRIDE = 1000
DORI_SEED_OFFSET = 999
UTILITY_SEED_BASE = 10_000_000
UTILITY_CHUNK = 256

MitigationContext = Callable[[Sequence[str] | None], AbstractContextManager]
"""``context(item_ids)``: a mitigation bound to the model under evaluation (``lambda ids: m.applied(model, ids)``
or, per UNet row, ``lambda rows: m.applied_rows(model, rows)``); the only such type in dori."""


@dataclass
class EvalConfig:
    """Settings of the protocol (defaults: the paper's).

    Attributes:
        n_gens: generations per item and conditioning (10).
        sampling: DDIM steps, guidance and UNet batch size (50, 7.0).
        seed: the base seed (see module docstring).
        feature_batch: images per feature-model call.
        jpeg: score generations after a JPEG round trip at this quality (NeMo saves its generations as
            JPEG, PIL's default quality 75), or None to score the uint8 images as generated.
        a_clip: per-item aggregation of A_CLIP in the rows: ``median`` (NeMo's script, with its
            lower-middle median across items too) or ``mean`` (mean per item, midpoint median across items).
    """

    n_gens: int = 10
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0
    feature_batch: int = 64
    jpeg: int | None = None
    a_clip: str = "median"

    def __post_init__(self) -> None:
        if not 1 <= self.n_gens < DORI_SEED_OFFSET:
            raise DoriError(f"n_gens must be in [1, {DORI_SEED_OFFSET - 1}], got {self.n_gens}")
        if self.jpeg is not None and not 1 <= self.jpeg <= 95:
            raise DoriError(f"jpeg quality must be in [1, 95], got {self.jpeg}")
        if self.a_clip not in ("median", "mean"):
            raise DoriError(f"a_clip aggregation must be median or mean, got {self.a_clip!r}")

    def describe(self) -> dict:
        return {
            "n_gens": self.n_gens,
            "sampler": "DDIM",
            "steps": self.sampling.steps,
            "guidance": self.sampling.guidance,
            "uncond": "null prompt",
            "scored_as": "uint8" if self.jpeg is None else f"JPEG quality {self.jpeg} (PIL), as NeMo",
            "a_clip": "per-item median, median across items (NeMo's compute_prompt_alignment.py)"
            if self.a_clip == "median"
            else "per-item mean, median across items",
            "seed": self.seed,
            "seeds": f"seed + {SEED_STRIDE} * item_index + k (k < n_gens); "
            f"Dori: seed + {SEED_STRIDE} * item_index + {DORI_SEED_OFFSET}; "
            f"utility prompt i: seed + {UTILITY_SEED_BASE} + i",
        }


@dataclass
class Setting:
    """One row of an audit: a model state (mitigation) and a conditioning (prompt or attack).

    Attributes:
        key: file-safe name (``none``, ``nemo``, ``nemo+dori-10``).
        label: what tables print.
        mitigation: ``none`` or the mitigation spec.
        attack: ``none`` or ``dori``.
        dori_steps: Dori steps behind the embeddings (None without attack).
        init: Dori initialization.
        reference: key of the setting SSCD_gen compares with (the unmitigated prompt), or None.
    """

    key: str
    label: str
    mitigation: str = "none"
    attack: str = "none"
    dori_steps: int | None = None
    init: str | None = None
    reference: str | None = None

    def describe(self) -> dict:
        return asdict(self)


def generation_seeds(base: int, index: int, n: int) -> list[int]:
    """Seeds of the ``n`` generations of the item at ``index`` of its set."""
    return [base + SEED_STRIDE * index + k for k in range(n)]


def dori_seed(base: int, index: int) -> int:
    """Seed of the Dori search of the item at ``index`` of its set."""
    return base + SEED_STRIDE * index + DORI_SEED_OFFSET


def item_key(setting: str, item_id: str) -> str:
    return f"item.{setting}.{item_id}"


def generation_artifact(setting: str, item_id: str) -> str:
    return f"gen.{setting}.{item_id}.safetensors"


def train_artifact(item_id: str) -> str:
    return f"train.{item_id}.safetensors"


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> uint8 (rounded), the form generations are stored and scored in."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def embed(
    fn: Callable[[torch.Tensor], torch.Tensor], images: Sequence[torch.Tensor], batch: int
) -> torch.Tensor:
    """Features of images (each (3, H, W) in [0, 1]) in batches of equal-size images, on the CPU."""
    out: list[torch.Tensor | None] = [None] * len(images)
    by_shape: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(tuple(im.shape), []).append(i)
    for idx in by_shape.values():
        for lo in range(0, len(idx), batch):
            chunk = idx[lo : lo + batch]
            feats = fn(torch.stack([images[i].float() for i in chunk])).float().cpu()
            for i, f in zip(chunk, feats, strict=True):
                out[i] = f
    if not out:
        raise DoriError("no images to embed")
    return torch.stack(out)  # type: ignore[arg-type]


def require_finite(values: torch.Tensor, what: str, setting: str, ids: Sequence[str]) -> None:
    """Refuse non-finite values (one block per item along dim 0): a NaN image decodes black and scores as
    "not memorized", so reporting it would be a false all-clear. The error names the setting and the items.

    Raises:
        DoriError: some item's values hold NaN or inf.
    """
    flat = values.detach().reshape(len(ids), -1)
    bad = ~torch.isfinite(flat).all(dim=1)
    if bool(bad.any()):
        names = [i for i, b in zip(ids, bad.tolist(), strict=True) if b]
        raise DoriError(
            f"setting {setting!r}: the {what} of {len(names)} item(s) ({', '.join(names[:5])}) are not finite "
            "(NaN or inf), so this setting was not measured and no result is reported for it; check its numbers "
            "(Dori learning rate, guidance, norm ball, dtype)"
        )


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False, dynamic_ncols=True)
