"""NeMo's per-model calibration: out-of-distribution statistics and the memorization threshold tau_mem.

* **OOD statistics** (reference ``1_compute_activations_statistics.py``): for each prompt of a
  non-memorized set, the output of every value layer ``attn2.to_v`` on its text embedding (tokens x d),
  reduced over the tokens (reference: ``abs`` then ``mean``), gives one d-vector; the per-neuron mean and
  (unbiased) standard deviation over the prompts are the statistics. ``to_v`` only sees the text, so no
  UNet call is needed. For SD v1.4 the reference statistics (50,000 LAION prompts) ship with dori.
* **Threshold** (reference ``2_compute_pairwise_ssim.py``): for each held-out prompt, the MS-SSIM of
  every pair of its 10 seeds' noise differences; tau_mem = mean + 1 std of all pair values (0.428 on
  SD v1.4); strong NeMo uses mean - 1 std (0.288 on SD v1.4, Finding Dori Appendix H.1).

Both depend on the model, so they are computed once per model and cached as safetensors, keyed by a
fingerprint of the weights they depend on (value layers, text encoder, UNet output layer).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dori.errors import DoriError
from dori.metrics.ssim import MSSSIMSettings, pairwise_ms_ssim, upper_pairs
from dori.mitigations.nemo_noise import NoiseSettings, initial_latents, noise_differences
from dori.models.layers import get_module, value_layers
from dori.models.pipeline import T2IModel
from dori.world import world_of

PROMPT_DIR = Path(__file__).resolve().parent.parent / "data" / "prompts"
SD14_STATISTICS = PROMPT_DIR / "statistics_additional_laion_prompts_v1_4.json"
SD14_NAMES = ("CompVis/stable-diffusion-v1-4", "stable-diffusion-v1-4")
# tau_mem = 0.428 = mean + std and 0.288 = mean - std (Finding Dori, Appendix H.1) -> mean 0.358, std 0.070
SD14_THRESHOLD = (0.358, 0.070)


@dataclass
class Calibration:
    """What NeMo needs to know about one model (see module docstring).

    Attributes:
        means, stds: value-layer name -> per-neuron mean / std of the token-reduced activation.
        ssim_mean, ssim_std: mean and std of pairwise MS-SSIM of noise differences on held-out prompts.
        info: where the numbers come from (prompt set, count, fingerprint, settings).
    """

    means: dict[str, torch.Tensor]
    stds: dict[str, torch.Tensor]
    ssim_mean: float
    ssim_std: float
    info: dict = field(default_factory=dict)

    def tau(self, strong: bool = False) -> float:
        """tau_mem: mean + 1 std (strong NeMo: mean - 1 std)."""
        return self.ssim_mean - self.ssim_std if strong else self.ssim_mean + self.ssim_std

    def save(self, path: str | Path) -> None:
        from dori.runs import atomic_save_tensors

        tensors = {f"mean.{k}": v for k, v in self.means.items()}
        tensors.update({f"std.{k}": v for k, v in self.stds.items()})
        tensors["ssim"] = torch.tensor([self.ssim_mean, self.ssim_std], dtype=torch.float64)
        path = Path(path)
        atomic_save_tensors(path, tensors)
        path.with_suffix(".json").write_text(json.dumps(self.info, indent=1, default=str))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        from dori.runs import load_tensors

        path = Path(path)
        if not path.exists():
            raise DoriError(f"NeMo calibration file {path} does not exist")
        t = load_tensors(path)
        info_file = path.with_suffix(".json")
        info = json.loads(info_file.read_text()) if info_file.exists() else {}
        means = {k[5:]: v for k, v in t.items() if k.startswith("mean.")}
        stds = {k[4:]: v for k, v in t.items() if k.startswith("std.")}
        return cls(means, stds, float(t["ssim"][0]), float(t["ssim"][1]), info)

    def check(self, model: T2IModel) -> None:
        """Raise unless the statistics cover exactly this model's value layers with the right widths."""
        layers = value_layers(model.unet)
        if sorted(layers) != sorted(self.means):
            raise DoriError(
                f"NeMo statistics are for layers {sorted(self.means)}, the model has {sorted(layers)}"
            )
        for name in layers:
            width = get_module(model.unet, name).out_features
            if self.means[name].numel() != width:
                raise DoriError(
                    f"NeMo statistics for {name} have {self.means[name].numel()} neurons, not {width}"
                )


# ------------------------------------------------------------------ activations
def value_activations(
    model: T2IModel, cond: torch.Tensor, reduce: str = "abs-mean", layers: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """Token-reduced ``to_v`` outputs for each embedding: layer -> (N, d) float32 on the CPU.

    Args:
        cond: (N, tokens, dim) text embeddings.
        reduce: ``abs-mean`` (reference: mean over tokens of |a|) or ``mean`` (signed mean over tokens).
    """
    if reduce not in ("abs-mean", "mean"):
        raise DoriError(f"unknown activation reduction {reduce!r}: use abs-mean or mean")
    layers = list(layers or value_layers(model.unet))
    out = {}
    with torch.no_grad():
        for name in layers:
            attn = get_module(model.unet, name.rsplit(".", 1)[0])
            h = cond.to(model.device, model.dtype)
            if getattr(attn, "norm_cross", None):
                h = attn.norm_encoder_hidden_states(h)
            a = get_module(model.unet, name)(h).float()
            out[name] = (a.abs().mean(1) if reduce == "abs-mean" else a.mean(1)).cpu()
    return out


def activation_statistics(
    model: T2IModel, prompts: Sequence[str], reduce: str = "abs-mean", batch_size: int = 256
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-neuron mean and unbiased std over ``prompts`` of the token-reduced value-layer outputs."""
    if len(prompts) < 2:
        raise DoriError("NeMo activation statistics need at least 2 prompts")
    acc: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(prompts), batch_size):
        emb = model.encode_text(list(prompts[i : i + batch_size]))
        for k, v in value_activations(model, emb, reduce).items():
            acc.setdefault(k, []).append(v)
    stacked = {k: torch.cat(v) for k, v in acc.items()}
    return {k: v.mean(0) for k, v in stacked.items()}, {k: v.std(0) for k, v in stacked.items()}


def reference_statistics(
    model: T2IModel | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """NeMo's shipped SD v1.4 statistics (50,000 LAION prompts, abs-mean), checked against ``model``."""
    data = json.loads(SD14_STATISTICS.read_text())
    means = {
        n: torch.tensor(m, dtype=torch.float32) for n, m in zip(data["layers"], data["means"], strict=True)
    }
    stds = {
        n: torch.tensor(s, dtype=torch.float32) for n, s in zip(data["layers"], data["stds"], strict=True)
    }
    if model is not None:
        Calibration(means, stds, 0.0, 0.0).check(model)
    return means, stds


# ------------------------------------------------------------------ threshold
def pairwise_ssim_values(
    model: T2IModel,
    prompts: Sequence[str],
    noise: NoiseSettings,
    ssim: MSSSIMSettings,
    n_seeds: int = 10,
    seed: int = 1,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """MS-SSIM of every seed pair of every prompt's noise differences: (prompts, n_seeds*(n_seeds-1)/2)."""
    latents = initial_latents(model, n_seeds, seed)
    per_batch = max(1, batch_size // n_seeds)
    rows = []
    for i in range(0, len(prompts), per_batch):
        chunk = list(prompts[i : i + per_batch])
        emb = model.encode_text(chunk).repeat_interleave(n_seeds, 0)
        diffs = noise_differences(model, emb, latents.repeat(len(chunk), 1, 1, 1), noise)
        for j in range(len(chunk)):
            rows.append(upper_pairs(pairwise_ms_ssim(diffs[j * n_seeds : (j + 1) * n_seeds], ssim)))
        if progress is not None:
            progress(min(i + per_batch, len(prompts)))
    return torch.stack(rows)


# ------------------------------------------------------------------ model identity and cache
def model_fingerprint(model: T2IModel) -> str:
    """A short hash of the weights NeMo's calibration depends on (value layers, text encoder, UNet output)."""
    h = hashlib.sha256()
    tensors = [get_module(model.unet, n).weight for n in value_layers(model.unet)]
    tensors += [p for _, p in sorted(model.text_encoder.named_parameters())]
    tensors += list(model.unet.conv_out.parameters()) if hasattr(model.unet, "conv_out") else []
    for t in tensors:
        flat = t.detach().flatten()[:65536].float().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(flat.numpy().tobytes())
    return h.hexdigest()[:16]


def is_sd14(model: T2IModel) -> bool:
    """Whether the model is (named as) Stable Diffusion v1.4, whose reference statistics ship with dori."""
    name = str(model.name).rstrip("/")
    return any(name == n or name.endswith("/" + n) or name.endswith(n) for n in SD14_NAMES)


def default_cache_dir() -> Path:
    return Path(os.environ.get("DORI_CACHE", Path.home() / ".cache" / "dori")) / "nemo"


def laion_holdout_prompts() -> list[str]:
    """The 500 shipped hold-out LAION prompts (a sample of NeMo's 50,000-prompt statistics set)."""
    with open(PROMPT_DIR / "additional_laion_prompts_500.csv", encoding="utf-8", newline="") as f:
        return [r["Caption"] for r in csv.DictReader(f, delimiter=";")]


def default_calibration_prompts(model: T2IModel) -> tuple[str, list[str]]:
    """(name, prompts): the model's world ``heldout`` set if it has one, else the LAION hold-out sample."""
    world = world_of(model)
    if world is not None:
        return world.calibration_prompts()
    return "laion-holdout-500", laion_holdout_prompts()


def calibrate(
    model: T2IModel,
    reduce: str,
    noise: NoiseSettings,
    ssim: MSSSIMSettings,
    n_seeds: int = 10,
    seed: int = 1,
    statistics: str = "auto",
    prompts: Sequence[str] | None = None,
    prompt_set: str | None = None,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> Calibration:
    """Statistics and threshold for ``model``, from the cache when present (see module docstring).

    Args:
        statistics: ``auto`` (the shipped reference statistics and tau for SD v1.4 with the reference
            settings, else computed), ``reference`` (force the shipped ones) or ``compute``.
        prompts / prompt_set: the held-out prompts (default :func:`default_calibration_prompts`).
        limit: use only the first ``limit`` prompts.
        cache_dir: where computed calibrations are kept (default ``$DORI_CACHE/nemo`` or ``~/.cache/dori/nemo``).
    """
    reference_settings = reduce == "abs-mean" and noise == NoiseSettings(guidance=7.0, swapped_cfg=True)
    use_reference = statistics == "reference" or (
        statistics == "auto" and is_sd14(model) and reference_settings
    )
    if statistics not in ("auto", "reference", "compute"):
        raise DoriError(f"unknown statistics source {statistics!r}: use auto, reference or compute")
    if use_reference:
        means, stds = reference_statistics(model)
        info = {"source": "reference (NeMo SD v1.4, 50,000 LAION prompts; tau from Finding Dori H.1)"}
        return Calibration(means, stds, *SD14_THRESHOLD, info=info)
    if prompts is None:
        prompt_set, prompts = default_calibration_prompts(model)
    prompts = list(prompts)[:limit] if limit else list(prompts)
    fp = model_fingerprint(model)
    settings_key = json.dumps(
        [reduce, noise.__dict__, ssim.as_dict(), n_seeds, seed, prompt_set, len(prompts)], sort_keys=True
    )
    key = hashlib.sha256((fp + settings_key + "".join(prompts)).encode()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"calibration-{fp}-{key}.safetensors"
    if path.exists():
        return Calibration.load(path)
    world = world_of(model)
    shipped = world.shipped_calibration(path.name) if world is not None else None
    if shipped is not None:  # a world may carry its calibration (the shipped one does)
        calib = Calibration.load(shipped)
        calib.info = {
            **calib.info,
            "source": f"{calib.info.get('source', 'computed')}, shipped with the world",
        }
        return calib
    means, stds = activation_statistics(model, prompts, reduce)
    pairs = pairwise_ssim_values(model, prompts, noise, ssim, n_seeds, seed, batch_size, progress)
    flat = pairs.flatten().double()
    ssim_mean, ssim_std = float(flat.mean()), float(flat.std())
    if not (math.isfinite(ssim_mean) and math.isfinite(ssim_std)):
        raise DoriError("NeMo threshold calibration gave a non-finite value (degenerate noise differences)")
    info = {
        "source": "computed",
        "prompt_set": prompt_set or "given",
        "prompts": len(prompts),
        "fingerprint": fp,
        "reduce": reduce,
        "noise": noise.__dict__,
        "ms_ssim": ssim.as_dict(),
        "n_seeds": n_seeds,
        "seed": seed,
        "tau": ssim_mean + ssim_std,
        "tau_strong": ssim_mean - ssim_std,
    }
    calib = Calibration(means, stds, ssim_mean, ssim_std, json.loads(json.dumps(info)))
    with contextlib.suppress(OSError):  # a read-only cache only costs recomputation
        calib.save(path)
    return calib
