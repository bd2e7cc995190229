"""The shared interfaces of mitigations.

Two kinds:

* **Inference-time mitigations** (NeMo, Wanda: :class:`Mitigation`) leave the weights file alone and are
  applied reversibly: ``with mitigation.applied(model, item_ids): ...``. They are fitted once
  (:mod:`dori.fitting`), saved to a folder with provenance (``save``) and loaded back (``load``;
  :func:`dori.mitigations.load_mitigation` parses ``nemo:DIR``). The audit uses them through this protocol only.
* **Weight-changing methods** (adversarial fine-tuning, ESD, Concept Ablation, SISS: :class:`WeightMethod`)
  write a new model folder in diffusers format; audits load it as a model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from dori.models.pipeline import T2IModel


@runtime_checkable
class Mitigation(Protocol):
    """A fitted, reversible inference-time mitigation.

    Attributes:
        name: the registry name (``nemo``, ``wanda``).
        source: the folder it was loaded from ("" when fitted in memory); ``f"{name}:{source}"`` is its spec.
        per_item: True when items have their own neuron sets / masks (False: one for all items).
    """

    name: str
    source: str

    @property
    def per_item(self) -> bool: ...

    def applied(
        self, model: T2IModel, item_ids: Sequence[str] | None = None
    ) -> contextlib.AbstractContextManager:
        """Apply to ``model`` within the block: for the given items (per-item neuron sets / masks), or for
        all fitted items at once when ``item_ids`` is None; restore the model bit-exactly on exit."""
        ...

    def applied_rows(self, model: T2IModel, row_ids: Sequence[str]) -> contextlib.AbstractContextManager:
        """Row r of every UNet batch in the block computes as under ``applied(model, [row_ids[r]])``."""
        ...

    def save(self, folder: str | Path) -> Path: ...

    @classmethod
    def load(cls, folder: str | Path) -> Mitigation: ...


def spec(mitigation: Mitigation | None) -> str:
    """``none`` or ``name:folder`` (what ``load_mitigation`` parses back)."""
    if mitigation is None or mitigation.name == "none":
        return "none"
    return f"{mitigation.name}:{mitigation.source}" if mitigation.source else mitigation.name


@runtime_checkable
class WeightMethod(Protocol):
    """A mitigation that fine-tunes the weights: settings at construction, then
    ``method(model, items, out, **inputs)`` writes the mitigated model (or one per item) under ``out``."""

    def settings(self) -> dict: ...

    def __call__(self, model: T2IModel, items: Sequence[Any], out: str | Path, **inputs: Any) -> Any: ...
