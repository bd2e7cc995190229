"""Real feature models behind the metrics, in plain torch (no torchvision), loaded from local files only.

* **SSCD** (copy detection, Pizzi et al. 2022): the TorchScript file ``sscd_disc_mixup.torchscript.pt``
  as NeMo uses it: ``Resize([320, 320])`` (aspect not kept), ImageNet mean/std normalization; rows are
  L2-normalized so cosine = dot product; replication threshold 0.7.
* **CLIP ViT-B/32** (the A_CLIP role): ``transformers`` ``CLIPModel`` and tokenizer from a local folder
  or a hub id already in the Hugging Face cache; openai preprocessing: resize the shortest side to 224
  (bicubic), center crop 224, CLIP mean/std.
* **Inception** (FID/KID): clean-fid's TorchScript ``inception-2015-12-05.pt``: resize to 299x299
  (bicubic), scale to [0, 255], normalize ``(x - 128) / 128``, run its ``layers`` and keep the 2048-d
  pool3 features.

Resizing uses ``torch.nn.functional.interpolate`` with antialiasing on float images; NeMo and clean-fid
resize with PIL on decoded files, so scores can differ from theirs in the third decimal.

:func:`load_backends` picks the miniworld's trained stand-ins for a miniworld model and these files
otherwise. A missing file raises a :class:`DoriError` naming it and where to get it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from dori.errors import DoriError
from dori.metrics.features import Backends
from dori.world import world_of

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SSCD_THRESHOLD = 0.7
SSCD_FILE = "sscd_disc_mixup.torchscript.pt"
SSCD_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchscript.pt"
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
)
CLIP_HUB_ID = "openai/clip-vit-base-patch32"


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise DoriError(f"expected images (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")


def _resize(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(images.shape[-2:]) == size:
        return images
    out = F.interpolate(images, size=size, mode=mode, antialias=True, align_corners=False)
    return out.clamp(0, 1)


def _normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - m) / s


def _load_torchscript(path: str | Path | None, file_name: str, url: str, role: str, flag: str, device):
    if path is None:
        raise DoriError(f"the {role} needs {file_name}: download it from {url} and pass {flag} PATH")
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / file_name
    if not path.is_file():
        raise DoriError(f"{role} file {path} not found: download {file_name} from {url} and pass {flag} PATH")
    try:
        with warnings.catch_warnings():  # the published files are TorchScript; torch 2.x deprecates the API
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as err:
        raise DoriError(f"{path} is not a TorchScript file ({err})") from err
    return module.eval(), path


class SSCD:
    """SSCD copy detector (see module docstring)."""

    def __init__(self, path: str | Path | None, device: str | torch.device = "cpu", size: int = 320):
        self.module, self.path = _load_torchscript(
            path, SSCD_FILE, SSCD_URL, "SSCD copy detector", "--sscd", device
        )
        self.device = torch.device(device)
        self.size = size
        self.name = f"sscd:{self.path.name}@{size}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        x = _resize(images.to(self.device, torch.float32), (self.size, self.size), "bilinear")
        feats = self.module(_normalize(x, IMAGENET_MEAN, IMAGENET_STD))
        return F.normalize(feats.float().flatten(1), dim=1)


class InceptionPool:
    """clean-fid Inception pool3 features (see module docstring)."""

    def __init__(self, path: str | Path | None, device: str | torch.device = "cpu"):
        self.module, self.path = _load_torchscript(
            path, INCEPTION_FILE, INCEPTION_URL, "Inception feature model", "--inception", device
        )
        self.device = torch.device(device)
        self.name = f"inception:{self.path.name}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        x = _resize(images.to(self.device, torch.float32), (299, 299), "bicubic") * 255
        x = (x - 128) / 128
        net = self.module.layers if hasattr(self.module, "layers") else self.module
        return net(x).float().reshape(x.shape[0], -1)


class CLIPAligner:
    """CLIP image and text features for A_CLIP (see module docstring)."""

    def __init__(self, spec: str | Path | None = None, device: str | torch.device = "cpu"):
        from safetensors import SafetensorError
        from transformers import AutoTokenizer, CLIPModel

        spec = str(spec or CLIP_HUB_ID)
        local = Path(spec).expanduser()
        if not local.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") != 1):
            raise DoriError(
                f"CLIP folder {local} not found: pass --clip with a folder holding {CLIP_HUB_ID} or its hub id"
            )
        source = str(local) if local.exists() else spec
        if local.is_dir() and not any(local.glob("*.safetensors")):
            pickles = sorted(p.name for p in local.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            raise DoriError(
                f"CLIP folder {local} holds no safetensors weights"
                + (
                    f" (only pickle files: {', '.join(pickles)}, which can run code when loaded)"
                    if pickles
                    else ""
                )
                + "; convert them to model.safetensors"
            )
        try:
            self.model = (
                CLIPModel.from_pretrained(source, local_files_only=True, use_safetensors=True)
                .to(device)
                .eval()
            )
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except (RuntimeError, SafetensorError) as err:
            raise DoriError(
                f"CLIP model {source!r} could not be loaded ({type(err).__name__}: {err})"
            ) from err
        except (OSError, ValueError) as err:
            raise DoriError(
                f"CLIP model {source!r} is not available offline ({type(err).__name__}); fetch it once with "
                f"`huggingface-cli download {CLIP_HUB_ID}` or pass --clip with a local folder"
            ) from err
        self.device = torch.device(device)
        self.size, self.mean, self.std = 224, CLIP_MEAN, CLIP_STD
        pre = local / "preprocessor_config.json" if local.exists() else None
        if pre is not None and pre.is_file():
            cfg = json.loads(pre.read_text())
            crop = cfg.get("crop_size", self.size)
            self.size = int(crop["height"] if isinstance(crop, dict) else crop)
            self.mean = tuple(cfg.get("image_mean", self.mean))
            self.std = tuple(cfg.get("image_std", self.std))
        self.name = f"clip:{Path(source).name if local.exists() else source}"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize the shortest side to ``size`` (bicubic), center-crop, normalize."""
        _check_images(images)
        x = images.to(self.device, torch.float32)
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        new = (max(self.size, round(h * scale)), max(self.size, round(w * scale)))
        x = _resize(x, new, "bicubic")
        top, left = (new[0] - self.size) // 2, (new[1] - self.size) // 2
        x = x[..., top : top + self.size, left : left + self.size]
        return _normalize(x, self.mean, self.std)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=self.preprocess(images))
        return F.normalize(_pooled(out).float(), dim=1)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        max_len = min(int(self.tokenizer.model_max_length), 77)
        tok = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"
        )
        out = self.model.get_text_features(
            input_ids=tok.input_ids.to(self.device), attention_mask=tok.attention_mask.to(self.device)
        )
        return F.normalize(_pooled(out).float(), dim=1)


def _pooled(out) -> torch.Tensor:
    """transformers 5 returns a model output whose ``pooler_output`` is projected; older ones a tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


def load_backends(
    model,
    sscd: str | Path | None = None,
    clip: str | Path | None = None,
    inception: str | Path | None = None,
    device: str | torch.device | None = None,
) -> Backends:
    """The feature models one evaluation uses.

    For a miniworld model (``model.world``) with no file given, the world's trained stand-ins
    (:func:`dori.miniworld.standins.load_standins`). Otherwise SSCD is required; CLIP and Inception are
    loaded when given (A_CLIP and FID/KID are then reported, else left out).

    Args:
        model: the model under audit (for its ``info`` and device).
        sscd: SSCD TorchScript file (or a folder holding it).
        clip: CLIP ViT-B/32 folder or hub id in the local cache.
        inception: clean-fid Inception TorchScript file (or a folder holding it).
        device: where the feature models run (default: the model's device).
    """
    world = world_of(model)
    device = device if device is not None else getattr(model, "device", "cpu")
    if world is not None and sscd is None and clip is None and inception is None:
        return world.backends(device)
    return Backends(
        copy_detector=SSCD(sscd, device),
        threshold=SSCD_THRESHOLD,
        aligner=CLIPAligner(clip, device) if clip is not None else None,
        features=InceptionPool(inception, device) if inception is not None else None,
    )
