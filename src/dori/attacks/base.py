"""The shared interface of attacks: what an audit needs from Dori and UnlearnDiffAtk.

An attack's settings go to its constructor; the model is passed at call time, so one configured attack runs
against every (mitigated) model. ``run`` searches one conditioning per target image and returns an
:class:`AttackResult`; the audit saves each item's part of it as one artifact,
``{attack.key}.{mitigation}.{item}.safetensors`` (the tensors of the result) plus one JSON record, so a rerun
skips finished items. A new attack is one file with one class that satisfies :class:`Attack`, listed in
:data:`ATTACKS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from dori.errors import DoriError
from dori.models.pipeline import T2IModel

Success = Callable[[list[int], torch.Tensor], list[bool]]
"""``success(indices, embeddings) -> [bool]``: does item ``indices[i]``'s current conditioning replicate?"""


@dataclass
class AttackResult:
    """What an attack found for N targets.

    Attributes:
        embeddings: the final conditioning per target (N, tokens, dim), float32 on the CPU.
        losses: the attack's loss per target and iteration (N, iterations).
        snapshots: step -> embeddings (N, tokens, dim) after that many steps (attacks with steps to sweep).
        tensors: further per-target tensors (leading dimension N) saved with each item's artifact.
        records: one JSON-able dict per target (e.g. the discrete prompt found), or empty.
    """

    embeddings: torch.Tensor
    losses: torch.Tensor
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)


@runtime_checkable
class Attack(Protocol):
    """An attack as the audit runs it.

    Attributes:
        name: the ``attack`` of the audit's settings (``dori``, ``unlearndiffatk``).
        key: the row-key suffix and artifact prefix (``dori``, ``uda``).
        label: what tables print after ``+``.
        steps: iterations per target (progress bars).
    """

    name: str
    key: str
    label: str

    @property
    def steps(self) -> int: ...

    def settings(self) -> dict: ...

    def row_steps(self, snapshots: Sequence[int]) -> list[int | None]:
        """The steps whose embeddings the audit evaluates, one row each (None: the attack's one result)."""
        ...

    def recording(self, steps: Sequence[int | None]) -> Attack:
        """This attack, set to keep the embeddings of ``steps`` (the rows the audit evaluates)."""
        ...

    def rowwise_items(self, max_items: int) -> int | None:
        """Items per call when each UNet row may carry its own item's mitigation (None: not supported);
        item i then occupies the rows ``row_ids`` gives."""
        ...

    def row_ids(self, ids: Sequence[str]) -> list[str]:
        """The item of each UNet row of a call on ``ids`` (for a row-wise mitigation)."""
        ...

    def target(self, image: torch.Tensor, size: int) -> torch.Tensor:
        """A training image (3, H, W) in [0, 1] prepared as this attack's reference prepares its targets, at
        the model's ``size`` (Dori: resized; UnlearnDiffAtk: shorter side resized, centre-cropped)."""
        ...

    def run(
        self,
        model: T2IModel,
        x0: torch.Tensor,
        prompts: Sequence[str],
        seeds: Sequence[int],
        init_prompts: Sequence[str] | None = None,
        success: Success | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> AttackResult:
        """Search one conditioning per target ``x0[i]`` (model space) with memorized prompt ``prompts[i]``;
        ``seeds[i]`` fixes all of target i's randomness, so a target's result does not depend on its batch."""
        ...


ATTACKS: dict[str, str] = {
    "dori": "dori.attacks.dori:Dori",
    "unlearndiffatk": "dori.attacks.unlearndiffatk:UnlearnDiffAtk",
}
"""Attack name -> ``module:Class`` (imported on use)."""


def attack_class(name: str) -> type:
    """The class registered as ``name`` in :data:`ATTACKS`."""
    if name not in ATTACKS:
        raise DoriError(f"unknown attack {name!r}: use one of {', '.join(sorted(ATTACKS))}")
    module, cls = ATTACKS[name].split(":")
    return getattr(importlib.import_module(module), cls)
