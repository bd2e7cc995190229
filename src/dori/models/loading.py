"""Resolve a model spec (built-in name, local diffusers folder, hub id) and load it offline-safely.

Rules:
* Nothing is downloaded unless ``allow_download=True``; a hub id is looked up in the local Hugging Face
  cache only. Missing files give a :class:`DoriError` naming them and saying how to provide them.
* Weights load from safetensors. Pickle checkpoints (``.bin``/``.ckpt``) can run code when loaded, so
  they are refused unless ``allow_pickle=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dori.errors import DoriError
from dori.models.pipeline import T2IModel
from dori.world import World

KNOWN_HUB_IDS = (
    "CompVis/stable-diffusion-v1-4",
    "stabilityai/stable-diffusion-2-base",
    "stabilityai/stable-diffusion-2",
)
BUILTIN = ("miniworld", "tiny-random", "sd14-random", "sd2-random", "sd2-768-random")

# component -> (config file, safetensors weights, pickle weights); None config = tokenizer / scheduler
_COMPONENTS = {
    "unet": ("config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("config.json", "model.safetensors", "pytorch_model.bin"),
}
_REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")


def miniworld_dir() -> Path:
    """The shipped miniworld folder inside the package."""
    return Path(__file__).resolve().parent.parent / "assets" / "miniworld"


def list_models() -> list[dict]:
    """What ``dori models`` prints: built-ins, known hub ids and whether their weights are present."""
    rows = []
    for name in BUILTIN:
        present = miniworld_dir().joinpath("model_index.json").exists() if name == "miniworld" else True
        rows.append({"name": name, "kind": "built-in", "available": present})
    for hub_id in KNOWN_HUB_IDS:
        try:
            _hub_snapshot(hub_id, allow_download=False)
            ok = True
        except DoriError:
            ok = False
        rows.append({"name": hub_id, "kind": "hub", "available": ok})
    return rows


def _variant_files(folder: Path, component: str, allow_pickle: bool) -> list[str]:
    """Missing files of one component ([] when complete)."""
    sub = folder / component
    if component == "tokenizer":
        if (sub / "tokenizer.json").exists() or (
            (sub / "vocab.json").exists() and (sub / "merges.txt").exists()
        ):
            return []
        return [f"{component}/vocab.json", f"{component}/merges.txt"]
    if component == "scheduler":
        return [] if (sub / "scheduler_config.json").exists() else [f"{component}/scheduler_config.json"]
    config, safe, pickle = _COMPONENTS[component]
    missing = [] if (sub / config).exists() else [f"{component}/{config}"]
    if (sub / safe).exists():
        return missing
    if (sub / pickle).exists() or any(sub.glob("*.ckpt")):
        if allow_pickle:
            return missing
        raise DoriError(
            f"{sub} holds only a pickle checkpoint ({pickle}); pickle files can run arbitrary code when loaded. "
            f"Convert it to {safe}, or pass --allow-pickle if you trust its source."
        )
    return missing + [f"{component}/{safe}"]


def check_folder(folder: Path, allow_pickle: bool = False) -> bool:
    """Raise a DoriError listing missing files; return whether the folder has a VAE."""
    if not folder.is_dir():
        raise DoriError(f"model folder {folder} does not exist")
    missing: list[str] = []
    for comp in _REQUIRED:
        missing += _variant_files(folder, comp, allow_pickle)
    has_vae = (folder / "vae").is_dir()
    if has_vae:
        missing += _variant_files(folder, "vae", allow_pickle)
    if missing:
        raise DoriError(
            f"model folder {folder} is incomplete; missing: {', '.join(missing)}. "
            "A diffusers folder needs unet/, text_encoder/, tokenizer/, scheduler/ (and vae/ for latent models), "
            "as written by `StableDiffusionPipeline.save_pretrained` or `dori miniworld train`."
        )
    return has_vae


def _hub_snapshot(hub_id: str, allow_download: bool, deadline_s: float | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from dori.deadline import DOWNLOAD_DEADLINE_S, call_with_deadline

    patterns = ["model_index.json", "*/config.json", "*/*.safetensors", "tokenizer/*", "scheduler/*"]
    patterns = [p for p in patterns if "safety_checker" not in p]
    here = Path(hub_id).expanduser().resolve()
    try:
        path = call_with_deadline(
            lambda: snapshot_download(hub_id, allow_patterns=patterns, local_files_only=not allow_download),
            DOWNLOAD_DEADLINE_S if deadline_s is None else deadline_s,
            f"downloading {hub_id} (--download)" if allow_download else f"looking up {hub_id} in the cache",
        )
    except LocalEntryNotFoundError as err:
        cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
        if allow_download:
            raise DoriError(
                f"could not download {hub_id} (--download was given): {str(err).splitlines()[0][:200]}. "
                f"Check the network and the hub id, or pass --model /path/to/diffusers/folder"
            ) from err
        raise DoriError(
            f"{hub_id!r} is not a folder ({here} does not exist) and, as a hub id, not in the local Hugging Face "
            f"cache ({cache}). If it is a hub id: on a machine with internet, "
            f"`huggingface-cli download {hub_id} --include 'unet/*' 'vae/*' 'text_encoder/*' 'tokenizer/*' "
            f"'scheduler/*' model_index.json`, then copy the cache here, or add --download to fetch it now."
        ) from err
    except DoriError:
        raise
    except Exception as err:  # network errors, bad ids: one line, no traceback
        raise DoriError(f"could not resolve {hub_id}: {type(err).__name__}: {str(err)[:300]}") from err
    return Path(path)


def resolve(spec: str, allow_download: bool = False) -> Path | str:
    """A spec -> a local folder (Path) or a built-in name (str)."""
    if spec in BUILTIN and spec != "miniworld":
        return spec
    if spec == "miniworld":
        folder = miniworld_dir()
        if not (folder / "model_index.json").exists():
            raise DoriError(
                f"the shipped miniworld is missing from {folder}; reinstall dori or train one with "
                "`dori miniworld train --out DIR` and pass --model DIR"
            )
        return folder
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return _hub_snapshot(spec, allow_download)
    raise DoriError(
        f"unknown model {spec!r}: not a built-in ({', '.join(BUILTIN)}), not an existing folder, not a hub id"
    )


def load_model(
    spec: str = "miniworld",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    allow_download: bool = False,
) -> T2IModel:
    """Load a text-to-image model from a built-in name, a local diffusers folder or a hub id.

    Returns a :class:`T2IModel` in eval mode with all weights frozen (``requires_grad=False``).
    """
    from dori.models import builders

    where = resolve(spec, allow_download)
    sd_random = {"sd14-random": "1.4", "sd2-random": "2-base", "sd2-768-random": "2-768"}
    if where == "tiny-random":
        model = builders.build_tiny_random()
    elif where in sd_random and torch.device(device).type == "cuda":
        # 1B random weights are drawn on the GPU (seconds, not a minute on the CPU; other values than the
        # CPU's draw, equally random); the schedule's tensors stay on the CPU
        with torch.device(device):
            model = builders.build_sd_random(sd_random[where])
        model.scheduler = type(model.scheduler).from_config(model.scheduler.config)
    elif where in sd_random:
        model = builders.build_sd_random(sd_random[where])
    else:
        model = load_folder(Path(where), allow_pickle=allow_pickle, name=spec)
    return model.to(device=device, dtype=dtype).eval()


def load_folder(folder: Path, allow_pickle: bool = False, name: str | None = None) -> T2IModel:
    """Load a diffusers-format folder (SD or miniworld) component by component."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors import SafetensorError
    from transformers import AutoTokenizer, CLIPTextModel

    has_vae = check_folder(folder, allow_pickle)

    def safe(comp: str) -> bool:
        return not allow_pickle or (folder / comp / _COMPONENTS[comp][1]).exists()

    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=safe("unet"))
        text = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=safe("text_encoder"))
        tok = AutoTokenizer.from_pretrained(folder / "tokenizer")
        sched = DDPMScheduler.from_pretrained(folder / "scheduler")
        vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=safe("vae")) if has_vae else None
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # truncated or corrupt files
        raise DoriError(
            f"could not load the model in {folder}: {type(err).__name__}: {str(err)[:300]}"
        ) from err
    world = World.find(folder)
    info = dict(world.info) if world is not None else {}
    return T2IModel(
        unet=unet,
        text_encoder=text,
        tokenizer=tok,
        scheduler=sched,
        vae=vae,
        name=name or str(folder),
        info=info,
        world=world,
    )


def save_model(model: T2IModel, folder: str | Path) -> Path:
    """Write a diffusers-format folder (safetensors) that :func:`load_model` reads back."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.unet.save_pretrained(folder / "unet", safe_serialization=True)
    model.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    model.tokenizer.save_pretrained(folder / "tokenizer")
    model.scheduler.save_pretrained(folder / "scheduler")
    comps = {
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    if model.vae is not None:
        model.vae.save_pretrained(folder / "vae", safe_serialization=True)
        comps["vae"] = ["diffusers", "AutoencoderKL"]
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1", **comps}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    if model.info:
        (folder / "dori_world.json").write_text(json.dumps(model.info, indent=2))
    return folder
