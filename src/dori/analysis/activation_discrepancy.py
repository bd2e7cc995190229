"""Activation discrepancy (Finding Dori, Section 4.2, Appendix J.2, Eq. 6; Figures 4 and 12).

Different triggers of the same memorized image should, if memorization were local, drive a layer into
similar activations. The discrepancy of a set of embeddings Y = {y_1..y_N} in one layer is the mean
pairwise squared L2 distance of that layer's activations, with the input noise fixed and only the
conditioning varied, at the first denoising step::

    Discrepancy(y_i, y_j) = || A(y_i) - A(y_j) ||_2^2
    MeanDiscrepancy(Y)    = 1 / (N (N - 1)) * sum_{i != j} Discrepancy(y_i, y_j)

Eq. (6) as printed divides by (N - 1)^2 instead of N (N - 1); that is the mean over pairs times
N / (N - 1), a size-dependent factor (1.0101 at N = 100) that would bias comparisons between sets of
different sizes. We report the mean over pairs (``eq6_as_printed = value * N / (N - 1)`` if needed).

No N x N loop and no stored activations: the sum over all ordered pairs has the closed form::

    sum_{i, j} ||a_i - a_j||^2 = 2 N sum_i ||a_i||^2 - 2 || sum_i a_i ||^2

so each hooked layer only accumulates sum_i a_i (one activation's worth of numbers) and sum_i ||a_i||^2,
in float64 to keep the subtraction accurate.

Which activations (``A``): NeMo's statistic is the output of the cross-attention value layers
``attn2.to_v``; Wanda's is the input of ``ff.net.2`` (the GEGLU output whose column norms it scores);
Fig. 12 takes the outputs of every layer type of :data:`dori.models.layers.LAYER_TYPES`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dori.errors import DoriError
from dori.models.hooks import record_activations
from dori.models.layers import LAYER_TYPES, ffn_layers, layers_of_type, value_layers
from dori.models.pipeline import T2IModel


@dataclass
class MomentSums:
    """Running sums from which the mean pairwise squared distance follows (see module docstring).

    Attributes:
        total: sum of the flattened activations (D,), float64.
        sq: sum of their squared L2 norms.
        n: number of activations added.
    """

    total: torch.Tensor | None = None
    sq: float = 0.0
    n: int = 0

    def add(self, acts: torch.Tensor) -> None:
        """Add a batch of activations (B, ...): one row per embedding."""
        flat = acts.detach().flatten(1).to(torch.float64)
        s = flat.sum(0).cpu()
        self.total = s if self.total is None else self.total + s
        self.sq += float(flat.pow(2).sum())
        self.n += flat.shape[0]

    def add_packed(self, packed: torch.Tensor, n: int) -> None:
        """Add the output of :func:`pack_moments` (sum of rows, then the sum of squared norms)."""
        s = packed[:-1].cpu()
        self.total = s if self.total is None else self.total + s
        self.sq += float(packed[-1])
        self.n += n

    def pair_sum(self) -> float:
        """sum over all ordered pairs (i, j) of ||a_i - a_j||^2 (the i = j terms are 0)."""
        if self.total is None:
            return 0.0
        value = 2 * self.n * self.sq - 2 * float(self.total.pow(2).sum())
        return max(value, 0.0)  # rounding can leave a tiny negative for identical activations

    def mean_discrepancy(self) -> float:
        """Mean over the N (N - 1) ordered pairs i != j; needs N >= 2."""
        if self.n < 2:
            raise DoriError(f"mean discrepancy needs at least 2 activations, got {self.n}")
        return self.pair_sum() / (self.n * (self.n - 1))


def pack_moments(acts: torch.Tensor) -> torch.Tensor:
    """A batch of activations (B, ...) -> [sum of flattened rows (D), sum of squared norms] in float64.

    Used as the ``reduce`` of :func:`dori.models.hooks.record_activations`, so nothing of size B x D
    outlives the hook.
    """
    flat = acts.flatten(1).to(torch.float64)
    return torch.cat([flat.sum(0), flat.pow(2).sum().view(1)]).cpu()


def mean_discrepancy(acts: torch.Tensor) -> float:
    """MeanDiscrepancy of N activations given as one tensor (N, ...) (mean over pairs i != j)."""
    sums = MomentSums()
    sums.add(acts)
    return sums.mean_discrepancy()


def first_step_input(model: T2IModel, seed: int = 0, steps: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet input of the first DDIM denoising step for a fixed noise seed: (x_T (1, C, H, W), t)."""
    sched = model.ddim_scheduler(steps)
    t = sched.timesteps[0]
    x = model.initial_noise([seed]).to(model.device, model.dtype) * sched.init_noise_sigma
    return sched.scale_model_input(x, t), t.to(model.device)


@torch.no_grad()
def layer_discrepancies(
    model: T2IModel,
    embeddings: torch.Tensor,
    outputs: Sequence[str] = (),
    inputs: Sequence[str] = (),
    seed: int = 0,
    sampling_steps: int = 50,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[str, float]]:
    """MeanDiscrepancy of each named layer over a set of conditioning embeddings.

    One conditional UNet call per embedding (the unconditional half of guidance is the same for every
    embedding and adds nothing to a distance), all on the same noise ``x_T`` at the first DDIM timestep.

    Args:
        model: the model (weights unchanged).
        embeddings: the set Y (N, tokens, dim), N >= 2.
        outputs: layers whose output is the activation (NeMo's ``to_v``, Fig. 12's layer types).
        inputs: layers whose first input is the activation (Wanda's ``ff.net.2``).
        seed: the fixed noise seed.
        sampling_steps: DDIM steps that define the first timestep (the paper's 50: t = 981 on SD).
        batch_size: embeddings per UNet call.
        progress: optional callable ``progress(n_done)``.

    Returns:
        ``{"output" | "input": {layer name: MeanDiscrepancy}}``.
    """
    n = embeddings.shape[0]
    if embeddings.ndim != 3 or n < 2:
        raise DoriError(f"need embeddings (N >= 2, tokens, dim), got {tuple(embeddings.shape)}")
    if not outputs and not inputs:
        raise DoriError("name at least one layer")
    x, t = first_step_input(model, seed, sampling_steps)
    sums = {"output": {k: MomentSums() for k in outputs}, "input": {k: MomentSums() for k in inputs}}
    with (
        record_activations(model.unet, list(outputs), reduce=pack_moments) as out_store,
        record_activations(model.unet, list(inputs), inputs=True, reduce=pack_moments) as in_store,
    ):
        for lo in range(0, n, batch_size):
            emb = embeddings[lo : lo + batch_size].to(model.device, model.dtype)
            b = emb.shape[0]
            model.unet_forward(x.expand(b, -1, -1, -1), t.expand(b), emb)
            for kind, store in (("output", out_store), ("input", in_store)):
                for name, calls in store.items():
                    if len(calls) != 1:
                        raise DoriError(f"layer {name} ran {len(calls)} times in one UNet call")
                    sums[kind][name].add_packed(calls.pop(), b)
            if progress is not None:
                progress(min(lo + b, n))
    return {kind: {k: s.mean_discrepancy() for k, s in d.items()} for kind, d in sums.items()}


@dataclass
class DiscrepancyResult:
    """Discrepancies of Y_adv and Y_mem in the layers of Fig. 4 and Fig. 12.

    Attributes:
        nemo: ``{"layers": [...], "adv": [...], "mem": [...]}`` over NeMo's value layers (outputs).
        wanda: the same over Wanda's FFN layers (inputs of ``ff.net.2``).
        layer_types: layer type -> the same, over that type's layers (outputs).
        n_adv, n_mem: sizes of the two sets.
    """

    nemo: dict
    wanda: dict
    layer_types: dict[str, dict] = field(default_factory=dict)
    n_adv: int = 0
    n_mem: int = 0

    def to_dict(self) -> dict:
        return {
            "nemo": self.nemo,
            "wanda": self.wanda,
            "layer_types": self.layer_types,
            "n_adv": self.n_adv,
            "n_mem": self.n_mem,
            "normalization": "mean over ordered pairs i != j (Eq. 6 as printed = value * N / (N - 1))",
            "activation": {"nemo": "attn2.to_v output", "wanda": "ff.net.2 input", "layer_types": "output"},
        }


def adv_vs_mem(
    model: T2IModel,
    y_adv: torch.Tensor,
    y_mem: torch.Tensor,
    seed: int = 0,
    layer_types: Sequence[str] | None = None,
    batch_size: int = 16,
) -> DiscrepancyResult:
    """The Section 4.2 experiment: discrepancies of Y_adv (triggers of one item) and Y_mem (prompts of
    different memorized items) in NeMo's and Wanda's layers and, per layer type, in the whole UNet.

    Args:
        layer_types: types of :data:`LAYER_TYPES` for Fig. 12 (default: all of them; ``()`` for none).
    """
    unet = model.unet
    nemo_layers, wanda_layers = value_layers(unet), ffn_layers(unet)
    types = list(LAYER_TYPES) if layer_types is None else list(layer_types)
    by_type = {ty: layers_of_type(unet, ty) for ty in types}
    outputs = list(dict.fromkeys(nemo_layers + [n for names in by_type.values() for n in names]))
    res = {
        name: layer_discrepancies(model, y, outputs, wanda_layers, seed=seed, batch_size=batch_size)
        for name, y in (("adv", y_adv), ("mem", y_mem))
    }

    def table(layers: list[str], kind: str) -> dict:
        return {
            "layers": layers,
            "adv": [res["adv"][kind][n] for n in layers],
            "mem": [res["mem"][kind][n] for n in layers],
        }

    return DiscrepancyResult(
        nemo=table(nemo_layers, "output"),
        wanda=table(wanda_layers, "input"),
        layer_types={ty: table(names, "output") for ty, names in by_type.items() if names},
        n_adv=int(y_adv.shape[0]),
        n_mem=int(y_mem.shape[0]),
    )
