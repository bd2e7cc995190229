"""The miniworld's stand-ins for the third-party metric models (SSCD, CLIP, Inception roles).

* :class:`MiniCLIP`: a contrastive text-image model. Its text tower is a ``transformers.CLIPTextModel`` (pooled
  end-of-text state + a linear projection); frozen, the same text model is the diffusion model's text encoder,
  as CLIP ViT-L/14's text tower is Stable Diffusion v1's. Its image tower is a small CNN + projection.
* :class:`CopyDetector`: a small CNN -> 128-d L2-normalized descriptor trained with NT-Xent on augmented world
  images (the SSCD role): replicas score high, other images of the same caption score low.
* :class:`FeatureNet`: a small CNN classifier of scene attributes; its pooled 128-d penultimate features
  (unnormalized) are the FID/KID features (the Inception role).

All take images (B, 3, 32, 32) in [0, 1] and resize other sizes bilinearly to 32x32 first. Weights live in a
world's ``standins/`` folder (safetensors + ``config.json``); :func:`load_standins` returns them as
:class:`dori.metrics.features.Backends`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dori.errors import DoriError
from dori.metrics.features import Backends

STANDINS_DIR = "standins"
IMAGE_SIZE = 32


def _prepare(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[0, 1] images -> [-1, 1] float32 on ``device``, resized to 32x32 if needed."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise DoriError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    x = images.to(device=device, dtype=torch.float32)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(
            x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False
        )
    return x * 2 - 1


class ConvNet(nn.Module):
    """Conv-GroupNorm-SiLU stages (32 -> 16 -> 8 -> 4 pixels), global average pool, linear head."""

    def __init__(self, width: int = 32, out_dim: int = 128):
        super().__init__()
        chans = [width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        prev = 3
        for i, c in enumerate(chans):
            layers += [
                nn.Conv2d(prev, c, 3, stride=1 if i == 0 else 2, padding=1),
                nn.GroupNorm(8, c),
                nn.SiLU(),
                nn.Conv2d(c, c, 3, padding=1),
                nn.GroupNorm(8, c),
                nn.SiLU(),
            ]
            prev = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(prev, out_dim)
        self.pool_dim = prev

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(x))


class MiniCLIP(nn.Module):
    """Text tower (CLIPTextModel + projection) and image tower (CNN + projection) in one embedding space."""

    def __init__(self, text_encoder: nn.Module, embed_dim: int = 128, width: int = 32):
        super().__init__()
        self.text_encoder = text_encoder
        self.text_projection = nn.Linear(text_encoder.config.hidden_size, embed_dim, bias=False)
        self.image_encoder = ConvNet(width, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), as CLIP

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        pooled = self.text_encoder(ids).pooler_output
        return F.normalize(self.text_projection(pooled).float(), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_encoder(images * 2 - 1).float(), dim=-1)

    def head_state(self) -> dict[str, torch.Tensor]:
        """Weights that are not the text encoder (which is saved as the world's ``text_encoder``)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("text_encoder.")}


class CopyDetector(nn.Module):
    """CNN descriptor, L2-normalized (cosine similarity = dot product)."""

    def __init__(self, width: int = 32, dim: int = 128):
        super().__init__()
        self.net = ConvNet(width, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(images * 2 - 1).float(), dim=-1)


# label heads of the feature model: background colour, and per 3x3 cell: shape, colour, size (0 = empty)
FEATURE_HEADS = {"background": 12, "shape": 9 * 7, "colour": 9 * 13, "size": 9 * 3}


class FeatureNet(nn.Module):
    """Scene-attribute classifier; ``features`` = pooled penultimate activations (FID/KID)."""

    def __init__(self, width: int = 32, dim: int = 128):
        super().__init__()
        self.net = ConvNet(width, dim)
        self.heads = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in FEATURE_HEADS.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return F.silu(self.net(images * 2 - 1)).float()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(images)
        return {k: head(h) for k, head in self.heads.items()}


# ----------------------------------------------------------------------------- backends (protocols)
class _Backend:
    def __init__(self, name: str, module: nn.Module, batch_size: int = 512):
        self.name = name
        self.module = module.eval().requires_grad_(False)
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @torch.no_grad()
    def _batched(self, fn, images: torch.Tensor) -> torch.Tensor:
        outs = []
        for i in range(0, images.shape[0], self.batch_size):
            x = _prepare(images[i : i + self.batch_size], self.device)
            outs.append(fn((x + 1) / 2).cpu())
        return torch.cat(outs) if outs else torch.zeros(0)


class CopyDetectorBackend(_Backend):
    """The SSCD role: images -> L2-normalized 128-d descriptors (CPU float32)."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self._batched(self.module, images)


class FeatureBackend(_Backend):
    """The Inception role: images -> 128-d pooled features (CPU float32, unnormalized)."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self._batched(self.module.features, images)


class AlignerBackend(_Backend):
    """The CLIP role: L2-normalized image and text features; A_CLIP = their cosine."""

    def __init__(self, name: str, module: MiniCLIP, tokenizer, batch_size: int = 512):
        super().__init__(name, module, batch_size)
        self.tokenizer = tokenizer

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self._batched(self.module.encode_image, images)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            raise DoriError("text_features expects a list of prompts, not one string")
        outs = []
        for i in range(0, len(prompts), self.batch_size):
            ids = self.tokenizer(
                list(prompts[i : i + self.batch_size]),
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            outs.append(self.module.encode_text(ids.to(self.device)).cpu())
        return torch.cat(outs)


def save_standins(
    world_dir: Path, clip: MiniCLIP, copy_detector: CopyDetector, features: FeatureNet, config: dict
) -> None:
    """Write the stand-ins' weights (safetensors) and config to ``world_dir/standins``."""
    from safetensors.torch import save_file

    out = Path(world_dir) / STANDINS_DIR
    out.mkdir(parents=True, exist_ok=True)
    for name, state in (
        ("clip", clip.head_state()),
        ("copy_detector", copy_detector.state_dict()),
        ("features", features.state_dict()),
    ):
        save_file(
            {k: v.detach().float().contiguous().cpu() for k, v in state.items()},
            str(out / f"{name}.safetensors"),
        )
    (out / "config.json").write_text(json.dumps(config, indent=2))


def build_standins(config: dict, text_encoder: nn.Module) -> tuple[MiniCLIP, CopyDetector, FeatureNet]:
    """Fresh (untrained) stand-ins of the sizes in ``config``."""
    clip = MiniCLIP(text_encoder, config["clip_dim"], config["clip_width"])
    return clip, CopyDetector(config["copy_width"], config["copy_dim"]), FeatureNet(config["feature_width"])


def load_standins(world_dir: str | Path, device: str | torch.device = "cpu") -> Backends:
    """A world's stand-ins as metric backends, with its calibrated replication threshold.

    Args:
        world_dir: a miniworld folder (``dori miniworld train --out``, or the shipped one).
        device: where the stand-ins run; inputs may be on any device, outputs are on the CPU.

    Returns:
        :class:`Backends` with ``copy_detector``, ``threshold`` (from ``dori_world.json``), ``aligner`` (the
        mini-CLIP with the world's tokenizer and text encoder) and ``features``.
    """
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, CLIPTextModel

    world_dir = Path(world_dir)
    folder = world_dir / STANDINS_DIR
    info_file = world_dir / "dori_world.json"
    if not (folder / "config.json").exists() or not info_file.exists():
        raise DoriError(f"{world_dir} holds no miniworld stand-ins ({folder}/config.json, dori_world.json)")
    config = json.loads((folder / "config.json").read_text())
    info = json.loads(info_file.read_text())
    text = CLIPTextModel.from_pretrained(world_dir / "text_encoder", use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(world_dir / "tokenizer")
    clip, copy_det, feats = build_standins(config, text)
    missing, unexpected = clip.load_state_dict(load_file(str(folder / "clip.safetensors")), strict=False)
    if unexpected or any(not k.startswith("text_encoder.") for k in missing):
        raise DoriError(f"{folder}/clip.safetensors does not match the mini-CLIP: {unexpected or missing}")
    copy_det.load_state_dict(load_file(str(folder / "copy_detector.safetensors")))
    feats.load_state_dict(load_file(str(folder / "features.safetensors")))
    tag = f"miniworld-{info.get('seed', '?')}"
    return Backends(
        copy_detector=CopyDetectorBackend(f"{tag}-copy-detector", copy_det.to(device)),
        threshold=float(info["copy_detector"]["threshold"]),
        aligner=AlignerBackend(f"{tag}-miniclip", clip.to(device), tokenizer),
        features=FeatureBackend(f"{tag}-features", feats.to(device)),
    )
