"""The shared interface of mitigations.

Two kinds:

* **Inference-time mitigations** (NeMo, Wanda) leave the weights file alone and are applied reversibly:
  ``with mitigation.applied(model, item_ids): ...``. They are fitted once (``fit``), saved to a folder with
  provenance (``save``) and loaded back (``load``); ``dori audit --mitigation nemo:DIR`` uses them.
* **Weight-changing mitigations** (adversarial fine-tuning, ESD, Concept Ablation, SISS) write a new model
  folder in diffusers format; audits load it with ``--model DIR``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from dori.models.pipeline import T2IModel


class AppliedMitigation(Protocol):
    """A fitted, reversible mitigation (see module docstring)."""

    name: str

    def applied(
        self, model: T2IModel, item_ids: Sequence[str] | None = None
    ) -> contextlib.AbstractContextManager:
        """Apply to ``model`` within the block: for the given items (per-item neuron sets / masks), or
        for all fitted items at once when ``item_ids`` is None; restore the model exactly on exit."""
        ...

    def save(self, folder: Path) -> None: ...


@contextlib.contextmanager
def no_mitigation(model: T2IModel, item_ids: Sequence[str] | None = None) -> Iterator[None]:
    yield
