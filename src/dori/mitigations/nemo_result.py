"""Fitted NeMo (per-item neuron sets: apply, save, load) and iterative NeMo (Finding Dori, Appendix H.6)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dori import distributed
from dori.errors import DoriError
from dori.mitigations import register_mitigation
from dori.mitigations.nemo_noise import merge_blockings
from dori.models.hooks import rowwise_scale_output_channels, scale_output_channels
from dori.models.layers import get_module
from dori.models.pipeline import T2IModel

if TYPE_CHECKING:
    from dori.mitigations.nemo import NeMo
    from dori.mitigations.nemo_calibration import Calibration


@dataclass
class NeMoItem:
    """NeMo's outcome for one prompt / embedding.

    Attributes:
        memorized: False when no seed passed the seed filter (then nothing is blocked).
        kept_seeds: seed indices that passed the filter (the score is the max over them).
        initial / refined: layer -> neuron indices after the initial selection / the refinement.
        initial_score / refined_score: memorization score with those neurons blocked.
        theta, k: where the initial selection stopped; refine_tau: the refinement's threshold.
        evaluations: memorization scores computed (one batched UNet call each).
    """

    id: str
    memorized: bool
    kept_seeds: list[int]
    initial: dict[str, list[int]]
    initial_score: float
    refined: dict[str, list[int]]
    refined_score: float
    theta: float | None = None
    k: int = 0
    refine_tau: float | None = None
    evaluations: int = 0

    def neurons(self) -> dict[str, torch.Tensor]:
        """Refined neurons as layer -> sorted LongTensor."""
        return {k: torch.tensor(sorted(v), dtype=torch.long) for k, v in self.refined.items()}


@register_mitigation("nemo")
@dataclass
class NeMoResult:
    """Fitted NeMo: per-item neuron sets, applied by scaling ``to_v`` output channels (reversibly).

    ``applied(model, item_ids)`` blocks the union of the given items' refined neurons; ``item_ids=None``
    blocks the union over all items (how Finding Dori computes FID for NeMo, Appendix H.1).
    """

    items: dict[str, NeMoItem]
    layers: list[str]
    config: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    name: str = "nemo"
    per_item: bool = True
    model_sha: str | None = None  # the fitted model's coarse weights fingerprint (config.json), if recorded

    def neurons(self, item_ids: Sequence[str] | None = None) -> dict[str, list[int]]:
        """Union of refined neurons over ``item_ids`` (None: all items): layer -> sorted indices."""
        ids = list(self.items) if item_ids is None else [str(i) for i in item_ids]
        missing = [i for i in ids if i not in self.items]
        if missing:
            raise DoriError(f"NeMo has no neuron set for item(s) {missing[:5]} ({len(self.items)} fitted)")
        out: dict[str, set[int]] = {layer: set() for layer in self.layers}
        for i in ids:
            for layer, idx in self.items[i].refined.items():
                out.setdefault(layer, set()).update(idx)
        return {layer: sorted(v) for layer, v in out.items()}

    @contextlib.contextmanager
    def applied(self, model: T2IModel, item_ids: Sequence[str] | None = None) -> Iterator[None]:
        """Within the block the items' neurons are scaled by ``config['scale']`` (0); restored on exit."""
        from dori.mitigations.fitted import check_fits

        blocked = {k: v for k, v in self.neurons(item_ids).items() if v}
        check_fits(self, model, blocked, "NeMo neurons")
        with scale_output_channels(model.unet, blocked, float(self.config.get("scale", 0.0))):
            yield

    @contextlib.contextmanager
    def applied_rows(self, model: T2IModel, row_ids: Sequence[str]) -> Iterator[None]:
        """Per-item neurons for items sharing one UNet batch: row r runs with item ``row_ids[r]``'s neurons
        blocked (the same as :meth:`applied` for that item alone, without a loop over items)."""
        from dori.mitigations.fitted import check_fits

        sets = {i: self.neurons([i]) for i in dict.fromkeys(row_ids)}
        check_fits(self, model, self.neurons(list(sets)), "NeMo neurons")
        scale = float(self.config.get("scale", 0.0))
        with rowwise_scale_output_channels(
            model.unet, row_multipliers(model.unet, [sets[i] for i in row_ids], scale)
        ):
            yield

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/nemo.json`` (neurons, scores, settings, calibration, provenance)."""
        from dori.runs import atomic_write_text, provenance

        folder = Path(folder)
        data = {
            "method": "nemo",
            "layers": self.layers,
            "config": self.config,
            "calibration": self.calibration,
            "provenance": self.provenance or provenance(),
            "items": {k: asdict(v) for k, v in self.items.items()},
        }
        atomic_write_text(folder / "nemo.json", json.dumps(data, indent=1, default=str))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> NeMoResult:
        path = Path(folder) / "nemo.json"
        if not path.exists():
            raise DoriError(
                f"{folder} holds no NeMo result (no nemo.json; run dori mitigate nemo --out {folder})"
            )
        from dori.mitigations.fitted import check_indices, fitted_model_sha
        from dori.runs import read_json

        data = read_json(path)
        if not isinstance(data, dict) or data.get("method") != "nemo":
            raise DoriError(f"{path} is not a NeMo result")
        try:
            items = {str(k): NeMoItem(**v) for k, v in data["items"].items()}
            for it in items.values():
                check_indices(it.initial, f"{path}: item {it.id}")
                check_indices(it.refined, f"{path}: item {it.id}")
            result = cls(
                items,
                list(data["layers"]),
                data.get("config", {}),
                data.get("calibration", {}),
                data.get("provenance", {}),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise DoriError(f"{path} is not a valid NeMo result (tampered or truncated: {err})") from err
        result.model_sha = fitted_model_sha(folder)
        return result


def row_multipliers(
    unet: torch.nn.Module, rows: Sequence[dict[str, list[int]]], scale: float = 0.0
) -> dict[str, torch.Tensor]:
    """Per-row channel multipliers for :func:`rowwise_scale_output_channels`: row r scales the neurons
    ``rows[r]`` (layer -> indices) by ``scale`` and leaves every other channel at 1."""
    mults = {}
    for layer in sorted({k for row in rows for k, v in row.items() if v}):
        mult = torch.ones(len(rows), get_module(unet, layer).out_features)
        for r, row in enumerate(rows):
            if row.get(layer):
                mult[r, row[layer]] = scale
        mults[layer] = mult
    return mults


def neuron_count(result: NeMoResult) -> int:
    """Neurons over all items' sets (an item's neurons count once per item that blocks them)."""
    return sum(len(v) for item in result.items.values() for v in item.refined.values())


@dataclass
class NeMoRound:
    """One round of iterative NeMo: the cumulative neuron sets and the embeddings searched against them."""

    result: NeMoResult
    embeddings: torch.Tensor


def iterative_nemo(
    nemo: NeMo,
    model: T2IModel,
    ids: Sequence[str],
    cond: torch.Tensor,
    search: Callable[[int, list[dict[str, list[int]]]], torch.Tensor],
    rounds: int = 5,
    calibration: Calibration | None = None,
    progress: Callable[[int], None] | None = None,
    done: Sequence[NeMoRound] = (),
    on_round: Callable[[NeMoRound], None] | None = None,
) -> list[NeMoRound]:
    """Iterative NeMo (Finding Dori, Appendix H.6): prune, search new triggers, prune again.

    Round r: NeMo runs on the current embeddings with every neuron found so far already blocked (per
    item); its new neurons join the item's set; then ``search(r, blocked)`` returns new adversarial
    embeddings (N, tokens, dim) found against the model with ``blocked[i]`` blocked for item i (e.g. Dori
    from the prompt embedding, see :func:`make_dori_search`). Round 1 starts from ``cond`` (the prompts).

    Args:
        done: rounds finished earlier (a resumed run): their neuron sets and last embeddings are the state
            the next round starts from, and they are returned first.
        on_round: called with each new round when it is finished (to save it).

    Returns:
        One :class:`NeMoRound` per round: cumulative neuron sets (NeMoResult) and that round's embeddings.
    """
    ids = [str(i) for i in ids]
    calib = calibration or nemo.calibrate(model)
    blocked: list[dict[str, list[int]]] = [{} for _ in ids]
    emb = cond
    out = list(done)
    if done:
        last = done[-1]
        if sorted(last.result.items) != sorted(ids) or last.embeddings.shape[0] != len(ids):
            raise DoriError("the finished rounds of iterative NeMo are for other items")
        blocked = [{k: list(v) for k, v in last.result.items[i].refined.items()} for i in ids]
        emb = last.embeddings
    for r in range(len(done), rounds):
        # per item, so sharded over the ranks of a torchrun job (one call per rank; all ranks get every item)
        found = distributed.map_sharded(
            lambda idx, e=emb, bl=blocked: nemo.detect(
                model, e[idx], calib, [ids[i] for i in idx], base_blockings=[bl[i] for i in idx]
            ),
            list(range(len(ids))),
            batch_size=len(ids),
        )
        blocked = [merge_blockings(b, item.refined) for b, item in zip(blocked, found, strict=True)]
        for item, b in zip(found, blocked, strict=True):
            item.refined = {k: sorted(v) for k, v in b.items()}
        emb = search(r, blocked).detach().float().cpu()
        if emb.shape[0] != len(ids):
            raise DoriError(f"the search returned {emb.shape[0]} embeddings for {len(ids)} items")
        result = NeMoResult(
            {it.id: it for it in found}, list(found[0].refined) if found else [],
            config={**nemo.settings(), "round": r + 1}, calibration=dict(calib.info, tau=nemo.threshold(calib)),
        )  # fmt: skip
        out.append(NeMoRound(result, emb))
        if on_round is not None:
            on_round(out[-1])
        if progress is not None:
            progress(r + 1)
    return out


def make_dori_search(
    dori: Callable, model: T2IModel, x0: torch.Tensor, init: torch.Tensor, seeds: Sequence[int]
) -> Callable[[int, list[dict[str, list[int]]]], torch.Tensor]:
    """A ``search`` for :func:`iterative_nemo`: run ``dori`` (a :class:`dori.attacks.dori.Dori`) for every item,
    from ``init[i]``, against the model with that item's neurons blocked; round r uses seed ``seeds[i] + r``.

    Items are searched together, as many as one of Dori's UNet batches holds (``max_micro_batch //
    batch_size``), each row of the batch with its own item's neurons blocked
    (:func:`rowwise_scale_output_channels`). Dori's items do not interact, so this gives the embeddings of
    searching them one at a time.
    """

    def search(r: int, blocked: list[dict[str, list[int]]]) -> torch.Tensor:
        b = dori.batch_size
        per_call = max(1, dori.max_micro_batch // b)
        groups = [
            list(range(lo, min(len(blocked), lo + per_call))) for lo in range(0, len(blocked), per_call)
        ]

        def run(batch: list[list[int]]) -> list[torch.Tensor]:
            (group,) = batch
            mults = row_multipliers(model.unet, [blocked[i] for i in group for _ in range(b)])
            with rowwise_scale_output_channels(model.unet, mults):
                res = dori(model, x0[group], init[group], [int(seeds[i]) + r for i in group])
            return [res.embeddings]

        # the groups are sharded over the ranks of a torchrun job; every rank gets all embeddings
        return torch.cat(distributed.map_sharded(run, groups))

    return search
