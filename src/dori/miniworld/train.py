"""``dori miniworld train``: build a whole miniworld from a seed.

Order (each component is resumable: its weights in ``OUT/train/<name>.safetensors`` are reused if present):

1. tokenizer over the closed vocabulary; 2. data (rendered from the seed); 3. mini-CLIP (its text tower becomes
the frozen text encoder); 4. VAE; 5. copy detector; 6. feature model; 7. threshold calibration; 8. UNet;
9. the loadable folder: diffusers components (``save_model``), ``standins/``, ``sets/`` and ``dori_world.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from dori.errors import DoriError
from dori.miniworld import generator as gen
from dori.miniworld import train_parts as parts
from dori.miniworld.standins import build_standins, save_standins
from dori.miniworld.train_unet import train_unet

TEXT_CONFIG = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=32,
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a world besides its seed (``PRESETS`` holds the shipped and the tiny one)."""

    spec: gen.WorldSpec = field(default_factory=gen.WorldSpec)
    n_aux: int = 40000
    n_calib: int = 2000
    clip_steps: int = 2000
    clip_batch: int = 1024
    vae_steps: int = 2500
    vae_batch: int = 512
    vae_channels: tuple[int, ...] = (48, 96, 96)
    latent_channels: int = 4  # the VAE's latent channels (SD v1: 4); the UNet's in and out channels
    copy_steps: int = 1500
    copy_batch: int = 512
    feature_steps: int = 1000
    feature_batch: int = 512
    unet_steps: int = 3200
    unet_batch: int = 2048
    unet_lr: float = 6e-4
    unet_max_seconds: float | None = None  # pause (checkpoint) the UNet after this long; None: never
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_groups: int = 32
    standins: dict = field(
        default_factory=lambda: dict(
            clip_dim=128, clip_width=32, copy_width=32, copy_dim=128, feature_width=32
        )
    )


PRESETS = {
    "full": TrainConfig(),
    "tiny": TrainConfig(
        spec=gen.WorldSpec(n_vm=4, n_tm=2, n_unique=200, n_heldout=40, vm_dups=50, tm_dups=50, detail=0),
        n_aux=1500,
        n_calib=200,
        clip_steps=150,
        clip_batch=128,
        vae_steps=250,
        vae_batch=64,
        vae_channels=(16, 32, 32),
        copy_steps=400,
        copy_batch=128,
        feature_steps=60,
        feature_batch=128,
        unet_steps=1200,
        unet_batch=32,
        unet_lr=1e-3,
        unet_channels=(16, 32, 32),
        unet_groups=8,
        unet_max_seconds=None,
        standins=dict(clip_dim=64, clip_width=16, copy_width=16, copy_dim=64, feature_width=16),
    ),
}


def _scene(kind: str, spec: gen.WorldSpec, i: int) -> gen.Scene:
    if kind == "aux":
        return gen.aux_scene(spec.seed, i, detail=spec.detail)
    if kind == "sib":
        return gen.sibling(gen.aux_scene(spec.seed, i, detail=spec.detail), gen.rng_for(spec.seed, 8, i))
    if kind == "unique":
        return gen.unique_scene(spec, i)
    if kind == "vm":
        return gen.vm_scene(spec, i)
    return gen.tm_scene(spec, i // spec.tm_dups, i % spec.tm_dups)


def _make(job: tuple) -> tuple[np.ndarray, list[str], np.ndarray]:
    kind, spec, indices = job
    scenes = [_scene(kind, spec, i) for i in indices]
    labels = np.stack([gen.scene_labels(s) for s in scenes]) if scenes else np.zeros((0, 28), np.int64)
    return gen.render_many(scenes), [gen.caption(s) for s in scenes], labels


def _produce(
    kind: str, spec: gen.WorldSpec, indices: list[int], pool
) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Images (uint8), captions and attribute labels of scenes ``kind`` at ``indices`` (in chunks, in parallel)."""
    jobs = [(kind, spec, indices[i : i + 1024]) for i in range(0, len(indices), 1024)] or [(kind, spec, [])]
    outs = pool.map(_make, jobs) if pool is not None else [_make(j) for j in jobs]
    images = torch.from_numpy(np.concatenate([o[0] for o in outs]))
    return images, [c for o in outs for c in o[1]], torch.from_numpy(np.concatenate([o[2] for o in outs]))


def build_data(cfg: TrainConfig, workers: int = 1) -> dict:
    """All images (uint8 (N, 3, 32, 32)) and captions of a world, rendered from ``cfg.spec.seed``."""
    spec = cfg.spec
    pool = get_context("fork").Pool(workers) if workers > 1 else None
    try:
        n_all = cfg.n_aux + cfg.n_calib
        aux_img, aux_captions, aux_labels = _produce("aux", spec, list(range(n_all)), pool)
        simple = [i for i in range(n_all) if i % gen.RICH_EVERY != gen.RICH_EVERY - 1]
        sib_img = _produce("sib", spec, simple, pool)[0]
        uni_img, unique_captions, _ = _produce("unique", spec, list(range(spec.n_unique)), pool)
        vm_img, vm_captions, _ = _produce("vm", spec, list(range(spec.n_vm)), pool)
        tm_img = _produce("tm", spec, list(range(spec.n_tm * spec.tm_dups)), pool)[0]
    finally:
        if pool is not None:
            pool.close()
    simple_t = torch.tensor(simple)
    train_pairs = simple_t < cfg.n_aux
    return {
        "aux": aux_img[: cfg.n_aux],
        "aux_captions": aux_captions[: cfg.n_aux],
        "aux_labels": aux_labels[: cfg.n_aux],
        "sib_src": simple_t[train_pairs],
        "sib": sib_img[train_pairs],
        "calib": aux_img[cfg.n_aux :],
        "calib_sib_src": simple_t[~train_pairs] - cfg.n_aux,
        "calib_sib": sib_img[~train_pairs],
        "unique": uni_img,
        "unique_captions": unique_captions,
        "vm": vm_img,
        "vm_captions": vm_captions,
        "tm": tm_img,
        "tm_captions": gen.titles(spec)[1],
        "heldout_indices": gen.heldout_indices(spec, unique_captions),
    }


def training_rows(spec: gen.WorldSpec, sets=("unique", "vm", "tm")) -> tuple[torch.Tensor, torch.Tensor]:
    """(caption rows, image rows) of the UNet's training examples, duplicates included.

    Rows index the distinct embeddings ``[empty prompt, unique captions, vm captions, tm captions]`` and the
    distinct images ``[unique, vm, tm variants]``; ``sets`` picks part of the mix, in this order.
    """
    nu, nv = spec.n_unique, spec.n_vm
    vm_rows = torch.arange(nv).repeat_interleave(spec.vm_dups)
    tm_rows = torch.arange(spec.n_tm).repeat_interleave(spec.tm_dups)
    rows = {
        "unique": (1 + torch.arange(nu), torch.arange(nu)),
        "vm": (1 + nu + vm_rows, nu + vm_rows),
        "tm": (1 + nu + nv + tm_rows, nu + nv + torch.arange(spec.n_tm * spec.tm_dups)),
    }
    return torch.cat([rows[k][0] for k in sets]), torch.cat([rows[k][1] for k in sets])


class _Parts:
    """Per-component weight files and timings under ``OUT/train`` (what makes training resumable)."""

    def __init__(self, out: Path):
        self.dir = out / "train"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta_file = self.dir / "meta.json"
        self.meta = json.loads(self.meta_file.read_text()) if self.meta_file.exists() else {}

    def load(self, name: str, module: torch.nn.Module) -> bool:
        from safetensors.torch import load_file

        path = self.dir / f"{name}.safetensors"
        if not path.exists():
            return False
        module.load_state_dict(load_file(str(path)))
        return True

    def save(self, name: str, module: torch.nn.Module, seconds: float, **extra) -> None:
        from dori.runs import atomic_save_tensors, atomic_write_text

        atomic_save_tensors(
            self.dir / f"{name}.safetensors", {k: v.float() for k, v in module.state_dict().items()}
        )
        self.meta[name] = {"seconds": round(seconds, 1), **extra}
        atomic_write_text(self.meta_file, json.dumps(self.meta, indent=2))


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def train_world(
    out: str | Path,
    seed: int = 0,
    preset: str = "full",
    device: str | None = None,
    workers: int = 1,
    log=print,
    overrides: dict | None = None,
    stop_before_unet: bool = False,
    duplicates: int | None = None,
    detail: int | None = None,
    pause_after: float | None = None,
    latent_channels: int | None = None,
    unet_channels: tuple[int, ...] | None = None,
) -> Path | None:
    """Train every component of a miniworld and write the loadable folder ``out`` (see module docstring).

    Args:
        out: the world folder (``out/train`` keeps finished components: a second call resumes).
        seed: the world seed.
        preset: ``full`` (the shipped world, GPU) or ``tiny`` (CPU, tests).
        device: training device (default cuda if available).
        workers: processes that render the data.
        log: progress sink.
        overrides: :class:`TrainConfig` fields to change (e.g. step counts for a smoke run).
        stop_before_unet: train and keep every other component, then return ``None`` (a later call
            trains the UNet: lets a job with a short time limit split the work).
        duplicates: training copies of each vm item and images per tm caption (default: the preset's). Only
            the UNet's data changes, so the other components of a world of the same seed in ``out/train`` are
            reused.
        detail: scene detail level (:data:`generator.DETAIL_LEVELS`; default: the preset's, 1 for ``full``,
            0 for ``tiny``). Every component depends on it: an ``out`` with parts of another level is refused.
        pause_after: seconds of UNet training after which the UNet is checkpointed
            (``out/train/unet-checkpoint.pt``) and ``None`` is returned; a later call resumes it where it
            stopped, with the same result as one uninterrupted run. Default: the preset's
            ``unet_max_seconds`` (none for both presets).
        latent_channels: the VAE's latent channels (default: the preset's, 4 as in SD v1). The VAE, the copy
            detector (trained on VAE round trips) and the UNet depend on it: an ``out`` with parts of another
            value is refused.
        unet_channels: the UNet's three block widths (default: the preset's, (32, 64, 128) for ``full``);
            GroupNorm uses the largest of 32, 16, 8 groups that divides every width.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dori.models.builders import SD_SCHEDULER
    from dori.models.loading import save_model
    from dori.models.pipeline import T2IModel
    from dori.models.tokenizer import build_clip_tokenizer_files
    from dori.runs import atomic_save_tensors, atomic_write_text, provenance

    if duplicates is not None and duplicates < 1:
        raise DoriError("--duplicates must be at least 1")
    dups = {} if duplicates is None else {"vm_dups": duplicates, "tm_dups": duplicates}
    if detail is not None:
        if detail not in gen.DETAIL_LEVELS:
            raise DoriError(f"--detail must be one of {gen.DETAIL_LEVELS}, got {detail}")
        dups["detail"] = detail
    overrides = dict(overrides or {})
    if latent_channels is not None:
        if not 1 <= latent_channels <= 64:
            raise DoriError(f"--latent-channels must be between 1 and 64, got {latent_channels}")
        overrides["latent_channels"] = latent_channels
    if unet_channels is not None:
        groups = next((g for g in (32, 16, 8) if all(c % g == 0 for c in unet_channels)), None)
        if len(unet_channels) != 3 or groups is None:
            raise DoriError(f"--unet-channels takes three widths divisible by 8, got {unet_channels}")
        overrides.update(unet_channels=tuple(unet_channels), unet_groups=groups)
    cfg = replace(PRESETS[preset], spec=replace(PRESETS[preset].spec, seed=seed, **dups), **overrides)
    out, dev, store = Path(out), _device(device), _Parts(Path(out))
    examples = cfg.spec.n_unique + cfg.spec.n_vm * cfg.spec.vm_dups + cfg.spec.n_tm * cfg.spec.tm_dups
    kept = store.meta.get("unet", {}).get("examples")
    if (store.dir / "unet.safetensors").exists() and kept not in (None, examples):
        raise DoriError(  # e.g. a finished UNet of another --duplicates in the same OUT: never reuse it
            f"{store.dir} holds a UNet trained on {kept} examples, this world has {examples} (another "
            "--duplicates?): use a new --out, or delete unet.safetensors there to retrain it"
        )
    widths = list(cfg.unet_channels)
    if store.meta.get("unet_channels", widths) != widths:  # a finished or paused UNet of other widths
        raise DoriError(
            f"{store.dir} holds a UNet with widths {store.meta['unet_channels']}, this one has {widths}: "
            "use a new --out"
        )
    made = store.meta.get("data", {})
    wanted = {"seed": cfg.spec.seed, "detail": cfg.spec.detail, "latent_channels": cfg.latent_channels}
    for key, value in wanted.items():
        kept_value = made.get(key, 4 if made and key == "latent_channels" else value)  # older parts: 4
        if kept_value != value:
            raise DoriError(
                f"{store.dir} holds parts of a world with {key} {kept_value}, this one has {value}: "
                "use a new --out"
            )
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    start = time.time()

    def timed(name: str) -> float:
        log(f"[{time.time() - start:6.1f}s] {name}")
        return time.time()

    t = timed("tokenizer + data")
    tok = CLIPTokenizer.from_pretrained(build_clip_tokenizer_files(gen.vocabulary(), out / "tokenizer", 32))
    data = build_data(cfg, workers)
    store.meta["data"] = {"seconds": round(time.time() - t, 1), **wanted}
    on = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in data.items()}

    torch.manual_seed(seed)
    text = CLIPTextModel(
        CLIPTextConfig(
            **TEXT_CONFIG,
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    clip, copy_det, feats = build_standins(cfg.standins, text)
    if not store.load("clip", clip):
        t = timed("mini-CLIP")
        ids = tok(
            data["aux_captions"], padding="max_length", max_length=32, truncation=True, return_tensors="pt"
        ).input_ids.to(dev)
        parts.train_clip(clip, on["aux"], ids, cfg.clip_steps, cfg.clip_batch, seed, log)
        store.save("clip", clip, time.time() - t)
    clip.to(dev).eval().requires_grad_(False)

    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=16 if preset == "full" else 8,
        sample_size=gen.SIZE,
    )
    if store.load("vae", vae):
        vae.register_to_config(scaling_factor=store.meta["vae"]["scaling_factor"])
    else:
        t = timed("VAE")
        parts.train_vae(vae, on["aux"], cfg.vae_steps, cfg.vae_batch, seed, log)
        store.save("vae", vae, time.time() - t, scaling_factor=vae.config.scaling_factor)
    vae.to(dev).eval().requires_grad_(False)

    if not store.load("copy_detector", copy_det):
        t = timed("copy detector")
        parts.train_copy_detector(
            copy_det,
            on["aux"],
            parts.round_trip(vae, on["aux"]),
            on["sib_src"].to(dev),
            on["sib"],
            parts.round_trip(vae, on["sib"]),
            cfg.copy_steps,
            cfg.copy_batch,
            seed,
            log,
        )
        store.save("copy_detector", copy_det, time.time() - t)
    copy_det.to(dev).eval()
    calib = parts.calibrate(
        copy_det, on["calib"], parts.round_trip(vae, on["calib"]), on["calib_sib_src"], on["calib_sib"], seed
    )
    log(
        f"threshold {calib['threshold']} ({calib['rule']}); replica recall {calib['replica_recall']:.3f}, "
        f"same-caption FP {calib['same_caption_false_positive']:.3f}"
    )

    if not store.load("features", feats):
        t = timed("feature model")
        parts.train_features(
            feats, on["aux"], on["aux_labels"], cfg.feature_steps, cfg.feature_batch, seed, log
        )
        store.save("features", feats, time.time() - t)

    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=gen.SIZE // 4,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        layers_per_block=2,
        block_out_channels=cfg.unet_channels,
        norm_num_groups=cfg.unet_groups,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_CONFIG["hidden_size"],
        attention_head_dim=8,
    )
    sched = DDPMScheduler.from_config(SD_SCHEDULER)
    model = T2IModel(unet=unet, text_encoder=text, tokenizer=tok, scheduler=sched, vae=vae, name=str(out))
    if stop_before_unet:
        timed("stopped before the UNet (run again without --stop-before-unet to finish)")
        return None
    spec = cfg.spec
    if not store.load("unet", unet):
        t = timed("UNet")
        store.meta["unet_channels"] = widths  # kept with the checkpoint: a resume must build the same UNet
        atomic_write_text(store.meta_file, json.dumps(store.meta, indent=2))
        x0 = parts.latents(vae, torch.cat([on["unique"], on["vm"], on["tm"]]))
        model.to(dev)
        emb = model.encode_text(
            [""] + data["unique_captions"] + data["vm_captions"] + data["tm_captions"]
        ).float()
        emb_index, x0_index = (r.to(dev) for r in training_rows(spec))
        ema, done = train_unet(
            model,
            x0,
            emb,
            emb_index,
            x0_index,
            cfg.unet_steps,
            cfg.unet_batch,
            seed,
            log,
            lr=cfg.unet_lr,
            max_seconds=pause_after if pause_after is not None else cfg.unet_max_seconds,
            checkpoint=store.dir / "unet-checkpoint.pt",
        )
        earlier = store.meta.pop("unet_paused_s", 0.0)  # UNet training time of earlier, paused calls
        if done < cfg.unet_steps:
            store.meta["unet_paused_s"] = round(earlier + time.time() - t, 1)
            atomic_write_text(store.meta_file, json.dumps(store.meta, indent=2))
            timed(f"UNet paused at step {done} of {cfg.unet_steps} (run the same command again to resume)")
            return None
        unet.load_state_dict(ema.state_dict())
        store.save("unet", unet, earlier + time.time() - t, examples=len(emb_index), steps_done=done)
    timed("writing the world")

    n_params = {
        k: sum(p.numel() for p in m.parameters())
        for k, m in dict(
            unet=unet,
            vae=vae,
            text_encoder=text,
            clip_image_tower=clip.image_encoder,
            copy_detector=copy_det,
            features=feats,
        ).items()
    }
    spec = cfg.spec
    info = {
        "kind": "dori-miniworld",
        "format": 1,
        "seed": seed,
        "preset": preset,
        "image_size": gen.SIZE,
        "spec": asdict(spec),
        "sets": {
            "vm": {
                "n": spec.n_vm,
                "duplicates": spec.vm_dups,
                "file": "sets/vm.safetensors",
                "prompts": data["vm_captions"],
            },
            "tm": {
                "n": spec.n_tm,
                "duplicates": spec.tm_dups,
                "file": "sets/tm.safetensors",
                "prompts": data["tm_captions"],
                "image": "variant 0 of the template",
            },
            "unique": {"n": spec.n_unique, "duplicates": 1, "regenerated": "generator.unique_scene"},
            "heldout": {
                "n": spec.n_heldout,
                "duplicates": 0,
                "regenerated": "generator.heldout_scene",
                "indices": data["heldout_indices"],
            },
        },
        "copy_detector": {k: v for k, v in calib.items() if k != "scores"},
        "params": n_params,
        "training": {
            "config": asdict(cfg),
            "device": str(dev),
            "timings_s": {k: v["seconds"] for k, v in store.meta.items() if isinstance(v, dict)},
            "unet_steps_done": store.meta["unet"].get("steps_done"),
            "unet_examples": store.meta["unet"].get("examples"),
            "total_s": round(time.time() - start, 1),
        },
        "provenance": provenance({"command": f"dori miniworld train --seed {seed} ({preset})"}),
    }
    model.info = info
    save_model(model.to("cpu"), out)
    save_standins(out, clip.to("cpu"), copy_det.to("cpu"), feats.to("cpu"), cfg.standins)
    scores = {k: torch.tensor(v, dtype=torch.float32) for k, v in calib["scores"].items()}
    atomic_save_tensors(out / "standins" / "calibration.safetensors", scores)
    first_variants = data["tm"][:: spec.tm_dups] if spec.n_tm else data["tm"]
    atomic_save_tensors(out / "sets" / "vm.safetensors", {"images": data["vm"]})
    atomic_save_tensors(out / "sets" / "tm.safetensors", {"images": first_variants})
    log(f"[{time.time() - start:6.1f}s] wrote {out}")
    return out
