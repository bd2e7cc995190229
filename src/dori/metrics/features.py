"""Interfaces of the feature models behind the metrics (the SSCD, CLIP and Inception roles).

Every backend, real (TorchScript SSCD, CLIP ViT-B/32, clean-fid Inception) or the miniworld's trained
stand-ins, implements one of these small protocols. Images are always (B, 3, H, W) float in [0, 1] on any
device; each backend does its own resizing and normalization, written down in its docstring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


class ImageEmbedder(Protocol):
    """Images -> descriptors (B, D). Copy detectors return L2-normalized rows (cosine = dot product)."""

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class TextImageAligner(Protocol):
    """The CLIP role: L2-normalized image and text features in one space (A_CLIP = cosine)."""

    name: str

    def image_features(self, images: torch.Tensor) -> torch.Tensor: ...

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor: ...


@dataclass
class Backends:
    """The three feature models one evaluation uses, plus the replication threshold of the copy detector.

    Attributes:
        copy_detector: the SSCD role (SSCD_orig, SSCD_gen, D_SSCD, MR).
        threshold: replication threshold on copy-detector cosine (0.7 for SSCD disc_mixup).
        aligner: the CLIP role (A_CLIP); None if unavailable.
        features: the Inception role (FID/KID pool features); None if unavailable.
    """

    copy_detector: ImageEmbedder
    threshold: float
    aligner: TextImageAligner | None = None
    features: ImageEmbedder | None = None

    def describe(self) -> dict:
        return {
            "copy_detector": self.copy_detector.name,
            "threshold": self.threshold,
            "aligner": None if self.aligner is None else self.aligner.name,
            "features": None if self.features is None else self.features.name,
        }
