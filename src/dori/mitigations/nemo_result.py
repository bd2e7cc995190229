"""Fitted NeMo: per-item neuron sets, applied reversibly (whole batch or row by row), saved and loaded."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dori.errors import DoriError
from dori.mitigations import register_mitigation
from dori.models.hooks import row_multipliers, rowwise_scale_output_channels, scale_output_channels
from dori.models.pipeline import T2IModel


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
    source: str = ""
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


def neuron_count(result: NeMoResult) -> int:
    """Neurons over all items' sets (an item's neurons count once per item that blocks them)."""
    return sum(len(v) for item in result.items.values() for v in item.refined.values())
