"""A miniworld as a typed object: what the library asks of "the world this model was trained on".

A miniworld folder (``dori miniworld train --out``, or the shipped one) holds a diffusers model plus
``dori_world.json`` (the world's recipe, its sets, its copy-detector threshold), the world's item sets, its
trained stand-in feature models (copy detector, CLIP, Inception roles) and possibly NeMo's calibration.
:func:`dori.models.loading.load_model` attaches a :class:`World` to the model it loads from such a folder
(``model.world``; None for any other model), and the library asks it, never a path in ``model.info``:

* :meth:`World.items` -- the world's sets (``vm``, ``tm``, ``unique``, ``heldout``);
* :meth:`World.backends` -- the stand-in feature models the metrics use;
* :meth:`World.calibration_prompts` and :meth:`World.shipped_calibration` -- NeMo's held-out prompts and
  the calibration the world ships.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dori.errors import DoriError

WORLD_FILE = "dori_world.json"


@dataclass(frozen=True)
class World:
    """A miniworld folder and its ``dori_world.json``."""

    folder: Path
    info: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def open(cls, folder: str | Path) -> World:
        """The world in ``folder`` (refused when it has no ``dori_world.json``)."""
        folder = Path(folder).resolve()
        path = folder / WORLD_FILE
        if not path.exists():
            raise DoriError(f"{folder} is not a miniworld (no {WORLD_FILE})")
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise DoriError(f"{path} is malformed ({err})") from err
        if not isinstance(info, dict):
            raise DoriError(f"{path} is malformed (not a JSON object)")
        return cls(folder, info)

    @classmethod
    def find(cls, folder: str | Path) -> World | None:
        """The world in ``folder``, or None when it is not a miniworld."""
        return cls.open(folder) if (Path(folder) / WORLD_FILE).exists() else None

    @property
    def set_names(self) -> list[str]:
        return list(self.info.get("sets", {}))

    def items(self, name: str) -> list[Any] | None:
        """The items of world set ``name`` (:class:`dori.data.sets.Item`); None if it is not a world set."""
        from dori.data.world_sets import world_set

        return world_set(self.folder, name)

    def backends(self, device: Any = "cpu") -> Any:
        """The world's stand-in feature models (:class:`dori.metrics.features.Backends`)."""
        from dori.miniworld.standins import load_standins

        return load_standins(self.folder, device=device)

    def calibration_prompts(self) -> tuple[str, list[str]]:
        """NeMo's held-out calibration prompts: the world's ``heldout`` set."""
        return "heldout", [it.prompt for it in self.items("heldout") or []]

    def shipped_calibration(self, name: str) -> Path | None:
        """The calibration file ``name`` the world ships under ``nemo/``, if it does."""
        path = self.folder / "nemo" / name
        return path if path.exists() else None


def world_of(model: Any) -> World | None:
    """The world of a model (None for a model that is not a miniworld, or for no model)."""
    return getattr(model, "world", None) if model is not None else None
