"""NeMo: localize and block memorization neurons (Hintersdorf et al., NeurIPS 2024; Finding Dori Sec. 2.2).

A "neuron" is an output channel of a cross-attention value layer ``attn2.to_v`` in the down and mid
blocks (7 layers on SD v1.4); blocking scales it by 0 for every token. For one prompt embedding::

    d_s      = noise difference of seed s (s = 1..10, seed 1)           (see nemo_noise)
    keep     = {s : max_{s' != s} MS-SSIM(d_s, d_s') > tau}             seed filter; none -> not memorized
    score(B) = max_{s in keep} MS-SSIM(d_s, d_s with neurons B blocked)  memorization score
    z_l      = |a_l - mu_l| / sigma_l     a_l: token-reduced to_v output, (mu, sigma): OOD statistics
    initial selection: theta = 5, k = 0; repeat
        B = {z > theta} + top-k per layer;  if score(B) <= tau: stop
        theta -= 0.25 (while theta > theta_min = 1); k += 1
        if theta == 1 or k >= max neurons: stop, refinement threshold := score(B)
    refinement: for each layer (last first): unblock it; drop it if the score stays < threshold;
                then for each remaining neuron: unblock it; drop it if the score stays < threshold

tau = tau_mem = mean + 1 std of pairwise MS-SSIM on held-out prompts (0.428 on SD v1.4; strong NeMo:
mean - 1 std). See :mod:`dori.mitigations.nemo_calibration`.

Variants (``variant=``):

* ``reference`` (default) reproduces the reference code's quirks: the noise difference at the *second*
  DDIM timestep without guidance; activations reduced as mean over tokens of ``|a|``; the top-k on the raw
  activations, not on z; the threshold from noise differences with guidance 7 and the reference's swapped
  CFG chunks; the loop stops when theta *reaches* 1, so theta = 1 itself is never evaluated.

Reference behaviour whatever the variant (named options give the alternatives):

* ``stop="reference"``: the selection loop stops when theta equals 1 exactly (``theta == 1``,
  ``3_detect_memorized_neurons.py`` 95, whatever ``theta_min``) or k reaches the maximum. With the paper's
  SD 2 setting (theta_min 0.25, step 0.2, Appendix H.8) theta drifts past 1 (0.9999999999999978) and the
  reference keeps raising k; ``stop="theta-min"`` stops when theta reaches ``theta_min`` instead (about 0.2
  there; dori's earlier behaviour). Identical for the default schedule (5 - 16 x 0.25 = 1 exactly).
* ``duplicates="keep"``: a neuron chosen both by theta and by top-k is listed twice, as in the reference;
  refinement then walks the list with duplicates and unblocks one copy per trial (``list.remove``), so such
  a neuron is only truly unblocked at its second place in the list. ``duplicates="drop"`` lists it once
  (dori's earlier behaviour), which can change the refinement order and so the refined set. The lists
  returned are de-duplicated either way (blocking a channel twice is blocking it once).
* ``paper`` follows the paper's description: the first DDIM timestep with classifier-free guidance 7,
  activations as the signed mean over tokens (|z| then measures the deviation), top-k on z, and the same
  noise settings for the threshold. Our reading of the text; the loop structure is the reference's.

Deviations from the reference (both variants): k stops at ``max_neurons`` (default: the widest value layer),
not at the reference's constant 1280 (equal on SD v1.4 and 2). On a smaller model, once theta has stopped
moving, every step from k = widest on blocks the same neurons and scores the same, so the reference's last
blocking (k = 1279) is reached with ``max_neurons = widest + 1`` (or 1280); the default stops one step
earlier, where the top-k does not yet hold every neuron of the widest layers; the noise differences of all prompts and seeds being
evaluated are computed in shared UNet batches (per-row masks); MS-SSIM falls back to a smaller window on
models whose latents are smaller than 44 x 44 (:func:`dori.metrics.ssim.ms_ssim_settings`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass

import torch

from dori.errors import DoriError
from dori.metrics.ssim import max_pairwise_ms_ssim, ms_ssim, ms_ssim_settings
from dori.mitigations.nemo_calibration import Calibration, calibrate, model_fingerprint, value_activations
from dori.mitigations.nemo_noise import (
    Blocking,
    NoiseSettings,
    initial_latents,
    masks_for_rows,
    merge_blockings,
    noise_differences,
)
from dori.mitigations.nemo_result import NeMoItem, NeMoResult
from dori.models.layers import get_module, value_layers
from dori.models.pipeline import T2IModel

VARIANTS = {
    "reference": dict(
        detect=NoiseSettings(timestep_index=1, guidance=0.0),
        threshold=NoiseSettings(timestep_index=1, guidance=7.0, swapped_cfg=True),
        reduce="abs-mean",
        topk_on="activation",
    ),
    "paper": dict(
        detect=NoiseSettings(timestep_index=0, guidance=7.0),
        threshold=NoiseSettings(timestep_index=0, guidance=7.0),
        reduce="mean",
        topk_on="zscore",
    ),
}

# in-memory cache: (fingerprint, settings, prompts) -> calibration
_CALIBRATIONS: dict[tuple, Calibration] = {}

__all__ = ["VARIANTS", "NeMo", "NeMoItem", "NeMoResult"]


def _unique(blocking: dict[str, list[int]]) -> dict[str, list[int]]:
    return {layer: list(dict.fromkeys(v)) for layer, v in blocking.items()}


@dataclass
class NeMo:
    """NeMo's settings; the model is passed at call time (see module docstring for the algorithm).

    Args:
        variant: ``reference`` (the reference code's quirks) or ``paper``.
        strong: strong NeMo, tau = mean - 1 std (Finding Dori Table 7).
        tau: override tau_mem (seed filter, initial selection and refinement); None = from calibration.
        n_seeds / seed: seeds per prompt (10) drawn in one batch from ``manual_seed(seed)`` (1).
        steps: DDIM steps of the schedule the detection timestep comes from (50).
        theta_start, theta_step, theta_min: the z-score threshold schedule (5, 0.25, 1).
        k_start: initial top-k (0); use_theta / use_top_k: the reference's ``--no_theta`` / ``--no_top_k``.
        max_neurons: stop when k reaches it (None: the widest value layer, 1280 on SD v1.4).
        stop: ``reference`` (stop at theta == 1 exactly) or ``theta-min`` (stop when theta reaches theta_min).
        duplicates: ``keep`` (reference: list a neuron chosen twice twice) or ``drop``.
        scale: factor applied to blocked neurons (0 = deactivate).
        statistics: ``auto`` | ``reference`` | ``compute`` (see :func:`nemo_calibration.calibrate`).
        calibration_limit: use only the first N held-out prompts for the calibration.
        cache_dir: calibration cache folder.
        batch_size: UNet rows per forward pass.
    """

    variant: str = "reference"
    strong: bool = False
    tau: float | None = None
    n_seeds: int = 10
    seed: int = 1
    steps: int = 50
    theta_start: float = 5.0
    theta_step: float = 0.25
    theta_min: float = 1.0
    k_start: int = 0
    use_theta: bool = True
    use_top_k: bool = True
    max_neurons: int | None = None
    stop: str = "reference"
    duplicates: str = "keep"
    scale: float = 0.0
    statistics: str = "auto"
    calibration_limit: int | None = None
    cache_dir: str | None = None
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise DoriError(f"unknown NeMo variant {self.variant!r}: use reference or paper")
        if not self.use_theta and not self.use_top_k:
            raise DoriError("NeMo needs theta or top-k selection (use_theta / use_top_k both off)")
        if self.n_seeds < 2:
            raise DoriError("NeMo needs at least 2 seeds (the seed filter compares pairs)")
        if self.stop not in ("reference", "theta-min"):
            raise DoriError(f"NeMo stop must be reference or theta-min, got {self.stop!r}")
        if self.duplicates not in ("keep", "drop"):
            raise DoriError(f"NeMo duplicates must be keep or drop, got {self.duplicates!r}")

    def settings(self) -> dict:
        return asdict(self)

    @property
    def _v(self) -> dict:
        noise = dict(VARIANTS[self.variant])
        noise["detect"] = NoiseSettings(**{**noise["detect"].__dict__, "steps": self.steps})
        noise["threshold"] = NoiseSettings(**{**noise["threshold"].__dict__, "steps": self.steps})
        return noise

    # ------------------------------------------------------------------ calibration
    def calibrate(
        self,
        model: T2IModel,
        prompts: Sequence[str] | None = None,
        prompt_set: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Calibration:
        """The OOD statistics and threshold for ``model`` (computed once, cached on disk and in memory)."""
        calib_keys = ("variant", "n_seeds", "seed", "steps", "statistics", "calibration_limit", "cache_dir")
        key = (model_fingerprint(model), tuple(getattr(self, k) for k in calib_keys), prompt_set,
               None if prompts is None else tuple(prompts))  # fmt: skip
        if key not in _CALIBRATIONS:
            calib = calibrate(
                model, self._v["reduce"], self._v["threshold"], ms_ssim_settings(*model.sample_shape[1:]),
                n_seeds=self.n_seeds, seed=self.seed, statistics=self.statistics, prompts=prompts,
                prompt_set=prompt_set, limit=self.calibration_limit, cache_dir=self.cache_dir,
                batch_size=self.batch_size, progress=progress,
            )  # fmt: skip
            calib.check(model)
            _CALIBRATIONS[key] = calib
        return _CALIBRATIONS[key]

    def threshold(self, calibration: Calibration) -> float:
        return float(self.tau) if self.tau is not None else calibration.tau(self.strong)

    # ------------------------------------------------------------------ the algorithm
    def _initial(self, acts: dict[str, torch.Tensor], calib: Calibration, theta: float, k: int) -> dict:
        out = {}
        for layer, a in acts.items():
            z = (a - calib.means[layer]).abs() / calib.stds[layer]
            chosen = torch.nonzero(z > theta).flatten().tolist() if math.isfinite(theta) else []
            if k > 0:
                ranking = a.abs() if self._v["topk_on"] == "activation" else z.nan_to_num(-1.0)
                seen = set(chosen) if self.duplicates == "drop" else set()
                chosen += [i for i in ranking.topk(min(k, a.numel())).indices.tolist() if i not in seen]
            out[layer] = chosen
        return out

    def search(
        self, acts: dict[str, torch.Tensor], calib: Calibration, tau: float, max_neurons: int
    ) -> Generator[dict[str, list[int]], float, dict]:
        """NeMo's selection for one embedding as a coroutine: yields blockings, receives their scores.

        Written against ``score(blocking)`` only, so the driver can batch the UNet calls of many prompts.
        Returns the initial and refined neurons with their scores.
        """
        theta = self.theta_start if self.use_theta else math.inf
        k = self.k_start if self.use_top_k else 0
        refine_tau, score = tau, math.inf
        while score > tau:
            blocking = self._initial(acts, calib, theta, k)
            score = yield blocking
            if score > tau:
                if self.use_theta and theta > self.theta_min:
                    theta -= self.theta_step
                if self.use_top_k:
                    k += 1
            if self.stop == "reference":
                theta_done = self.use_theta and theta == 1
            else:
                theta_done = self.use_theta and theta <= self.theta_min + 1e-9
            if theta_done or k >= max_neurons:
                refine_tau = score
                break
        current = {layer: list(v) for layer, v in blocking.items()}
        for layer in reversed(list(current)):
            if current[layer] and (yield {**current, layer: []}) < refine_tau:
                current[layer] = []
        for layer in reversed(list(current)):
            for n in list(current[layer]):
                trial = list(current[layer])
                trial.remove(n)  # one copy (a neuron listed twice stays blocked until its second trial)
                if (yield {**current, layer: trial}) < refine_tau:
                    current[layer] = trial
        final = yield current
        blocking, current = _unique(blocking), _unique(current)
        return dict(initial=blocking, initial_score=score, refined=current, refined_score=final,
                    theta=theta if math.isfinite(theta) else None, k=k, refine_tau=refine_tau)  # fmt: skip

    def _diffs(
        self, model, cond, latents, requests: list[tuple[int, list[int], Blocking]]
    ) -> list[torch.Tensor]:
        """Noise differences for (embedding index, seed indices, blocking) requests, batched over rows."""
        rows = [(i, s, b) for i, seeds, b in requests for s in seeds]
        layers = value_layers(model.unet)
        per = max(1, self.batch_size // (2 if self._v["detect"].guidance else 1))
        out = []
        for lo in range(0, len(rows), per):
            chunk = rows[lo : lo + per]
            masks = masks_for_rows(model, layers, [b for _, _, b in chunk], self.scale)
            emb = torch.stack([cond[i] for i, _, _ in chunk])
            x = torch.stack([latents[s] for _, s, _ in chunk])
            out.append(noise_differences(model, emb, x, self._v["detect"], masks))
        flat = torch.cat(out) if out else torch.empty(0)
        sizes = [len(seeds) for _, seeds, _ in requests]
        return list(flat.split(sizes)) if sizes else []

    def detect(
        self,
        model: T2IModel,
        cond: torch.Tensor,
        calibration: Calibration | None = None,
        ids: Sequence[str] | None = None,
        base_blockings: Sequence[Blocking] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[NeMoItem]:
        """Run NeMo on each embedding of ``cond`` (N, tokens, dim), all of them batched together.

        Args:
            calibration: statistics and threshold (default :meth:`calibrate` on the default prompts).
            ids: names for the items (default ``"0"``, ``"1"``, ...).
            base_blockings: neurons already blocked for each embedding (iterative NeMo); they stay blocked
                in every evaluation, including the unblocked reference noise differences.
            progress: called with the number of finished embeddings.
        """
        if cond.ndim == 2:
            cond = cond.unsqueeze(0)
        n = cond.shape[0]
        ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
        base = list(base_blockings) if base_blockings is not None else [{} for _ in range(n)]
        if len(ids) != n or len(base) != n:
            raise DoriError(f"NeMo.detect got {n} embeddings, {len(ids)} ids and {len(base)} base blockings")
        calib = calibration or self.calibrate(model)
        tau = self.threshold(calib)
        layers = value_layers(model.unet)
        max_neurons = self.max_neurons or max(get_module(model.unet, lay).out_features for lay in layers)
        ssim_settings = ms_ssim_settings(*model.sample_shape[1:])
        cond = cond.to(model.device, model.dtype)
        latents = initial_latents(model, self.n_seeds, self.seed)
        all_seeds = list(range(self.n_seeds))
        unblocked = self._diffs(model, cond, latents, [(i, all_seeds, base[i]) for i in range(n)])
        acts = value_activations(model, cond, self._v["reduce"], layers)
        results: dict[int, NeMoItem] = {}
        gens, pending, kept, counts = {}, {}, {}, {}
        for i in range(n):
            keep = torch.nonzero(max_pairwise_ms_ssim(unblocked[i], ssim_settings) > tau).flatten().tolist()
            kept[i] = keep
            if not keep:
                empty = {lay: [] for lay in layers}
                results[i] = NeMoItem(ids[i], False, [], empty, 0.0, dict(empty), 0.0)
                continue
            gens[i] = self.search({lay: acts[lay][i] for lay in layers}, calib, tau, max_neurons)
            pending[i], counts[i] = next(gens[i]), 0
        done = len(results)
        if progress is not None and done:
            progress(done)
        while pending:
            order = sorted(pending)
            requests = [(i, kept[i], merge_blockings(base[i], pending[i])) for i in order]
            diffs = self._diffs(model, cond, latents, requests)
            for i, d in zip(order, diffs, strict=True):
                counts[i] += 1
                score = float(ms_ssim(unblocked[i][kept[i]], d, ssim_settings).max())
                try:
                    pending[i] = gens[i].send(score)
                except StopIteration as stop:
                    r = stop.value
                    del pending[i]
                    results[i] = NeMoItem(ids[i], True, kept[i], evaluations=counts[i], **r)
                    done += 1
                    if progress is not None:
                        progress(done)
        return [results[i] for i in range(n)]

    def select(
        self, model: T2IModel, cond: torch.Tensor, calibration: Calibration | None = None
    ) -> dict[str, torch.Tensor]:
        """Neurons NeMo would block for one embedding (tokens, dim) or (1, tokens, dim): layer -> indices."""
        return self.detect(model, cond[:1] if cond.ndim == 3 else cond, calibration)[0].neurons()

    def select_many(
        self, model: T2IModel, cond: torch.Tensor, calibration: Calibration | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """:meth:`select` for each of N embeddings, batched."""
        return [item.neurons() for item in self.detect(model, cond, calibration)]

    def fit(
        self,
        model: T2IModel,
        items: Sequence,
        calibration: Calibration | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> NeMoResult:
        """NeMo for each item (objects with ``id`` and ``prompt``, or plain prompts) -> :class:`NeMoResult`."""
        ids = [str(getattr(it, "id", i)) for i, it in enumerate(items)]
        prompts = [getattr(it, "prompt", it) for it in items]
        calib = calibration or self.calibrate(model)
        found = self.detect(model, model.encode_text(prompts), calib, ids, progress=progress)
        return NeMoResult(
            items={it.id: it for it in found},
            layers=value_layers(model.unet),
            config=self.settings(),
            calibration=dict(calib.info, tau=self.threshold(calib)),
        )
