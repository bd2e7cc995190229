"""Wanda for memorization (Chavhan et al., 2024, after Sun et al., 2024; Finding Dori Sec. 2.2, App. H.4-H.5).

Prune individual weights of the feed-forward output layers ``ff.net.2`` of every transformer block
(16 on SD v1.4). For a group of target prompts and layer ``l``, at UNet call ``t`` of sampling::

    X_t      = inputs of ff.net.2 at call t, all rows (latent positions x batch, CFG uncond rows included),
               each row L2-normalized; rows of every prompt of the group stacked
    S_t      = |W| * ||X_t||_col          (||X_t||_col: column norms, broadcast over the output rows)
    S_t_null = the same for the null prompt "" (one run per prompt of the group, same seed)
    mask_t   = row-wise top k% of S_t  AND  S_t > S_t_null
    mask     = OR over the first N calls (t < N; N = 10)  -> weights set to 0

Settings follow the reference code (ruchikachavhan/concept-prune): sparsity 1% (``int(0.01 * in)`` per
output row), the first 10 calls, the same seed (0) for every prompt, guidance 7.5. Finding Dori fits one
mask on all memorized prompts (Table 1), and also per prompt and per group of 10 (Table 8), for 1 to 50
calls (Table 9) and sparsities 1-10% (Table 10). Checked against the reference (PARITY.md §7): bit-identical union masks when both run one (PNDM) trajectory.
Deviations from the reference: it samples with PNDM (51 UNet calls for 50 steps), dori with its own DDIM
(50 calls; "the first N calls" counts UNet calls as the reference does, so call t is not at exactly the
same timestep; IoU 0.996 on the tiny model); its starting noise is drawn on the CUDA generator in fp16 and
scored in fp16, dori's from its own seeded generator in float32 (other noise for the same seed). Sampling
stops after the N-th call (later calls cannot change the masks); the null prompt runs once, its squared
column norms times the group size (= once per prompt with the same seed). Masks are stored bit-packed.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dori.errors import DoriError
from dori.mitigations import register_mitigation
from dori.models.hooks import WeightMasks, apply_weight_masks, record_activations, rowwise_weight_masks
from dori.models.layers import ffn_layers, get_module
from dori.models.pipeline import T2IModel

SPARSITIES = (0.01, 0.02, 0.03, 0.04, 0.05, 0.10)


def wanda_mask(
    weight: torch.Tensor, target_norm: torch.Tensor, null_norm: torch.Tensor, sparsity: float
) -> torch.Tensor:
    """One call's mask: row-wise top ``int(sparsity * in)`` of |W| * ||X|| that also beat the null prompt.

    Args:
        weight: (out, in) weight of the layer.
        target_norm / null_norm: (in,) column norms of the layer input for the targets / the null prompt.
    """
    w = weight.detach().abs().float()
    s_target = w * target_norm.to(w.device, torch.float32).unsqueeze(0)
    s_null = w * null_norm.to(w.device, torch.float32).unsqueeze(0)
    k = int(sparsity * w.shape[1])
    top = torch.zeros_like(w, dtype=torch.bool)
    if k > 0:
        top.scatter_(1, s_target.topk(k, dim=1).indices, True)
    return (top & (s_target > s_null)).cpu()


@dataclass
class Wanda:
    """Wanda's settings; the model is passed at call time (see module docstring).

    Args:
        sparsity: share of each output row's weights considered (0.01; Table 10: 0.02-0.10).
        timesteps: the first N UNet calls whose masks are united (10; Table 9: 1-50).
        steps: DDIM steps of the sampling trajectory (50).
        guidance: classifier-free guidance of the sampling (7.5, the reference pipeline's default).
        seed: the initial noise of every prompt (0).
        batch_size: prompts per sampling batch (the UNet sees twice as many rows).
    """

    sparsity: float = 0.01
    timesteps: int = 10
    steps: int = 50
    guidance: float = 7.5
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.sparsity < 1:
            raise DoriError(f"Wanda sparsity must be in (0, 1), got {self.sparsity}")
        if not 1 <= self.timesteps <= self.steps:
            raise DoriError(f"Wanda timesteps must be in [1, steps={self.steps}], got {self.timesteps}")

    def settings(self) -> dict:
        return asdict(self)

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def squared_norms(
        self, model: T2IModel, cond: torch.Tensor, progress: Callable[[int], None] | None = None
    ) -> dict[str, torch.Tensor]:
        """Squared column norms of the row-normalized ``ff.net.2`` inputs, per call and embedding.

        Returns:
            layer -> (timesteps, N, in_features) float32 on the CPU; entry [t, i] sums the rows of
            embedding i's uncond and cond branches at UNet call t.
        """
        layers = ffn_layers(model.unet)
        if not layers:
            raise DoriError("this UNet has no ff.net.2 layers for Wanda")
        cond = cond.unsqueeze(0) if cond.ndim == 2 else cond
        out: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}

        def reduce(x: torch.Tensor) -> torch.Tensor:
            x = F.normalize(x.float().reshape(x.shape[0], -1, x.shape[-1]), dim=-1)
            return x.pow(2).sum(1)

        for lo in range(0, cond.shape[0], self.batch_size):
            emb = cond[lo : lo + self.batch_size].to(model.device, model.dtype)
            b = emb.shape[0]
            sched = model.ddim_scheduler(self.steps)
            x = model.initial_noise([self.seed] * b).to(model.device, torch.float32) * sched.init_noise_sigma
            uncond = model.null_embedding()
            with record_activations(model.unet, layers, inputs=True, reduce=reduce) as store:
                for t in sched.timesteps[: self.timesteps]:
                    x_in = sched.scale_model_input(x, t).to(model.dtype)
                    eps = model.predict_noise(x_in, t.to(model.device), emb, uncond, self.guidance)
                    x = sched.step(eps.float(), t, x).prev_sample
            for layer in layers:
                calls = store[layer]
                if len(calls) != self.timesteps:
                    raise DoriError(f"{layer} ran {len(calls)} times in {self.timesteps} UNet calls")
                per = torch.stack([c.cpu() for c in calls])  # (timesteps, rows, in)
                rows = per.shape[1]
                if rows == 2 * b:  # [uncond, cond] in one batch
                    per = per[:, :b] + per[:, b:]
                out[layer].append(per)
            if progress is not None:
                progress(min(lo + b, cond.shape[0]))
        return {layer: torch.cat(v, dim=1) for layer, v in out.items()}

    def null_norms(self, model: T2IModel) -> dict[str, torch.Tensor]:
        """Squared column norms of the null prompt "" (one run): layer -> (timesteps, in)."""
        return {k: v[:, 0] for k, v in self.squared_norms(model, model.null_embedding()).items()}

    # ------------------------------------------------------------------ masks
    def per_call_masks(
        self, model: T2IModel, target: dict[str, torch.Tensor], null: dict[str, torch.Tensor], group_size: int
    ) -> dict[str, list[torch.Tensor]]:
        """Masks of each call t < N for one group from summed squared norms (layer -> list of (out, in))."""
        if int(self.sparsity * next(iter(target.values())).shape[-1]) == 0:
            warnings.warn(
                f"Wanda sparsity {self.sparsity} selects 0 weights per row in some layer", stacklevel=2
            )
        out = {}
        for layer, sq in target.items():
            weight = get_module(model.unet, layer).weight
            out[layer] = [
                wanda_mask(weight, sq[t].sqrt(), (group_size * null[layer][t]).sqrt(), self.sparsity)
                for t in range(self.timesteps)
            ]
        return out

    def masks_from_norms(
        self, model: T2IModel, target: dict[str, torch.Tensor], null: dict[str, torch.Tensor], group_size: int
    ) -> WeightMasks:
        """Union over the first N calls of the per-call masks (``target``: layer -> (N, in) summed norms)."""
        union = {}
        for layer, per in self.per_call_masks(model, target, null, group_size).items():
            m = per[0].clone()
            for extra in per[1:]:
                m |= extra
            union[layer] = m
        return WeightMasks(union, {"method": "wanda", "group_size": str(group_size), **_str(self.settings())})

    def masks(self, model: T2IModel, cond: torch.Tensor) -> WeightMasks:
        """One mask from the statistics of all embeddings in ``cond`` (N, tokens, dim) taken together."""
        sq = self.squared_norms(model, cond)
        n = next(iter(sq.values())).shape[1]
        return self.masks_from_norms(model, {k: v.sum(1) for k, v in sq.items()}, self.null_norms(model), n)

    def masks_each(self, model: T2IModel, cond: torch.Tensor) -> list[WeightMasks]:
        """One mask per embedding of ``cond`` (sampled in shared batches)."""
        sq, null = self.squared_norms(model, cond), self.null_norms(model)
        n = next(iter(sq.values())).shape[1]
        return [self.masks_from_norms(model, {k: v[:, i] for k, v in sq.items()}, null, 1) for i in range(n)]

    def fit(
        self,
        model: T2IModel,
        items: Sequence,
        group: str | int = "all",
        progress: Callable[[int], None] | None = None,
    ) -> WandaResult:
        """Masks for items (with ``id`` and ``prompt``, or plain prompts) grouped by ``group``.

        Args:
            group: ``all`` (one mask from all items, Finding Dori's default), ``prompt`` (one per item) or
                an int N (consecutive groups of N items, Table 8's groups of 10).
        """
        ids = [str(getattr(it, "id", i)) for i, it in enumerate(items)]
        groups = make_groups(ids, group)
        sq = self.squared_norms(
            model, model.encode_text([getattr(it, "prompt", it) for it in items]), progress
        )
        null = self.null_norms(model)
        pos = {i: n for n, i in enumerate(ids)}
        masks = {}
        for gid, members in groups.items():
            idx = torch.tensor([pos[m] for m in members])
            summed = {k: v[:, idx].sum(1) for k, v in sq.items()}
            masks[gid] = self.masks_from_norms(model, summed, null, len(members))
        return WandaResult(groups, masks, config={**self.settings(), "group": str(group)})


def make_groups(ids: Sequence[str], group: str | int) -> dict[str, list[str]]:
    """Group ids: ``all`` -> one group, ``prompt`` -> one per id, N -> consecutive chunks of N."""
    ids = list(ids)
    if group == "all":
        return {"all": ids}
    if group == "prompt":
        return {i: [i] for i in ids}
    try:
        size = int(group)
    except (TypeError, ValueError) as err:
        raise DoriError(f"Wanda group must be all, prompt or a number, got {group!r}") from err
    if size < 1:
        raise DoriError(f"Wanda group size must be >= 1, got {size}")
    width = len(str(max(0, math.ceil(len(ids) / size) - 1)))
    return {f"group-{g:0{width}d}": ids[lo : lo + size] for g, lo in enumerate(range(0, len(ids), size))}


def _str(d: dict) -> dict[str, str]:
    return {k: str(v) for k, v in d.items()}


def pack_masks(masks: WeightMasks) -> dict[str, torch.Tensor]:
    """Bit-pack boolean masks for storage (8 weights per byte)."""
    return {k: torch.from_numpy(np.packbits(v.cpu().numpy().ravel())) for k, v in masks.masks.items()}


def unpack_masks(packed: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    out = {}
    for k, shape in shapes.items():
        count = int(np.prod(shape))
        bits = np.unpackbits(packed[k].numpy(), count=count).astype(bool)
        out[k] = torch.from_numpy(bits.reshape(shape))
    return out


@register_mitigation("wanda")
@dataclass
class WandaResult:
    """Fitted Wanda: masks per group of items, applied by zeroing weights of ``ff.net.2`` (reversibly).

    ``applied(model, item_ids)`` zeroes the union of the masks of the groups holding those items;
    ``item_ids=None`` the union of all groups.
    """

    groups: dict[str, list[str]]
    masks: dict[str, WeightMasks]
    config: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    name: str = "wanda"
    source: str = ""
    model_sha: str | None = None  # the fitted model's coarse weights fingerprint (config.json), if recorded

    @property
    def per_item(self) -> bool:
        """True unless one mask serves every item."""
        return len(self.groups) > 1

    def masks_for(self, item_ids: Sequence[str] | None = None) -> WeightMasks:
        """Union of the masks of the groups containing ``item_ids`` (None: all groups)."""
        if item_ids is None:
            chosen = list(self.masks)
        else:
            where = {i: g for g, members in self.groups.items() for i in members}
            missing = [str(i) for i in item_ids if str(i) not in where]
            if missing:
                raise DoriError(f"Wanda has no mask for item(s) {missing[:5]} ({len(where)} fitted)")
            chosen = list(dict.fromkeys(where[str(i)] for i in item_ids))
        out = WeightMasks({}, {"method": "wanda", "groups": ",".join(chosen)})
        for g in chosen:
            out = out.union(self.masks[g])
        return out

    @contextlib.contextmanager
    def applied(self, model: T2IModel, item_ids: Sequence[str] | None = None) -> Iterator[None]:
        """Within the block the masked weights are 0; the original weights are restored on exit."""
        from dori.mitigations.fitted import check_fits

        masks = self.masks_for(item_ids)
        check_fits(self, model, None, "Wanda masks")
        try:
            for layer, mask in masks.masks.items():
                shape = tuple(get_module(model.unet, layer).weight.shape)
                if tuple(mask.shape) != shape:
                    raise DoriError(
                        f"these Wanda masks do not fit this model: {layer} is {shape}, mask {tuple(mask.shape)}"
                    )
        except KeyError as err:
            raise DoriError(f"these Wanda masks do not fit this model: {err}") from err
        with apply_weight_masks(model.unet, masks):
            yield

    @contextlib.contextmanager
    def applied_rows(self, model: T2IModel, row_ids: Sequence[str]) -> Iterator[None]:
        """Per-item masks for items sharing one UNet batch: row r computes with the masks of item
        ``row_ids[r]``'s group (the same as :meth:`applied` for that item alone)."""
        from dori.mitigations.fitted import check_fits

        check_fits(self, model, None, "Wanda masks")
        where = {i: g for g, members in self.groups.items() for i in members}
        missing = [str(i) for i in row_ids if str(i) not in where]
        if missing:
            raise DoriError(f"Wanda has no mask for item(s) {missing[:5]}")
        order = list(dict.fromkeys(where[str(i)] for i in row_ids))
        row_group = torch.tensor([order.index(where[str(i)]) for i in row_ids])
        layers = sorted({lay for g in order for lay in self.masks[g].masks})
        per_layer = {}
        for lay in layers:
            shape = get_module(model.unet, lay).weight.shape
            per_layer[lay] = [
                self.masks[g].masks.get(lay, torch.zeros(shape, dtype=torch.bool)) for g in order
            ]
        with rowwise_weight_masks(model.unet, per_layer, row_group):
            yield

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/wanda.json`` and one bit-packed mask file per group under ``folder/masks``."""
        folder = Path(folder)
        entries = {gid: write_group_masks(folder, n, m) for n, (gid, m) in enumerate(self.masks.items())}
        write_index(folder, self.groups, entries, self.config, self.provenance)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> WandaResult:
        from dori.runs import load_tensors

        path = Path(folder) / "wanda.json"
        if not path.exists():
            raise DoriError(
                f"{folder} holds no Wanda result (wanda.json missing; run dori mitigate wanda --out {folder})"
            )
        from dori.mitigations.fitted import fitted_model_sha
        from dori.runs import read_json

        data = read_json(path)
        if not isinstance(data, dict) or data.get("method") != "wanda":
            raise DoriError(f"{path} is not a Wanda result")
        masks = {}
        base = (Path(folder) / "masks").resolve()
        try:
            for gid, entry in data["masks"].items():
                name = str(entry["file"])
                file = (base / name).resolve()
                if Path(name).name != name or file.parent != base:  # a mask path never leaves masks/
                    raise DoriError(f"{path}: mask file {name!r} of group {gid} is not a file name in {base}")
                if not file.exists():
                    raise DoriError(f"Wanda mask file {file} is missing")
                masks[gid] = WeightMasks(unpack_masks(load_tensors(file), entry["shapes"]), {"group": gid})
            result = cls(data["groups"], masks, data.get("config", {}), data.get("provenance", {}))
        except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as err:
            raise DoriError(f"{path} is not a valid Wanda result (tampered or truncated: {err})") from err
        result.model_sha = fitted_model_sha(folder)
        return result


def write_group_masks(folder: str | Path, n: int, masks: WeightMasks) -> dict:
    """Save group ``n``'s masks as ``folder/masks/{n:05d}.safetensors``; returns its index entry."""
    from dori.runs import atomic_save_tensors

    name = f"{n:05d}.safetensors"
    atomic_save_tensors(Path(folder) / "masks" / name, pack_masks(masks))
    return {
        "file": name,
        "shapes": {k: list(v.shape) for k, v in masks.masks.items()},
        "counts": masks.count(),
    }


def write_index(
    folder: str | Path,
    groups: dict[str, list[str]],
    entries: dict[str, dict],
    config: dict,
    prov: dict | None,
) -> None:
    """Write ``folder/wanda.json``: settings, provenance, groups and their mask files."""
    from dori.runs import atomic_write_text, provenance

    data = {
        "method": "wanda",
        "config": config,
        "provenance": prov or provenance(),
        "groups": groups,
        "masks": {gid: {k: entries[gid][k] for k in ("file", "shapes", "counts")} for gid in groups},
    }
    atomic_write_text(Path(folder) / "wanda.json", json.dumps(data, indent=1, default=str))
