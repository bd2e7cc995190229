"""The interface every memorization detector implements, and the registry the CLI looks detectors up in.

A detector holds its settings (constructor arguments, recorded in results) and gets the model at call time,
like the attacks and mitigations. It scores a batch of prompts; ``indices`` are the prompts' positions in
their set, which fix their random draws (a prompt's score does not depend on what else is in the batch).
Higher scores mean "more likely memorized".
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from dori.errors import DoriError
from dori.models.pipeline import T2IModel


@runtime_checkable
class Detector(Protocol):
    """A per-prompt memorization score (see module docstring)."""

    name: str

    def settings(self) -> dict:
        """The constructor arguments and the fixed facts of the method (recorded with every result)."""
        ...

    def score(self, model: T2IModel, prompts: Sequence[str], indices: Sequence[int]) -> list[dict]:
        """One dict per prompt with at least ``"score"`` (float, higher = more memorized)."""
        ...


DETECTORS: dict[str, Callable[..., Detector]] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a detector available by ``name`` (``dori detect --detectors``)."""

    def wrap(cls: type) -> type:
        DETECTORS[name] = cls
        return cls

    return wrap


BUILTIN_MODULES = ("dori.detection.wen", "dori.detection.nemo_score", "dori.detection.trajectory")


def build_detector(name: str, **kwargs) -> Detector:
    """The detector registered as ``name``, constructed with ``kwargs``."""
    for module in BUILTIN_MODULES:  # importing them registers the built-in detectors
        importlib.import_module(module)

    if name not in DETECTORS:
        raise DoriError(f"unknown detector {name!r}; known: {', '.join(sorted(DETECTORS))}")
    return DETECTORS[name](**kwargs)


def check_batch(prompts: Sequence[str], indices: Sequence[int]) -> None:
    if isinstance(prompts, str):
        raise DoriError("a detector scores a list of prompts, not one string")
    if len(prompts) != len(indices):
        raise DoriError(f"got {len(prompts)} prompts but {len(indices)} indices")
