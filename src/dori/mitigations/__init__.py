"""Mitigations: a registry of fitted, reversible mitigations and the spec parser the CLI uses.

A *spec* names a fitted mitigation: ``none``, ``nemo:DIR`` or ``wanda:DIR`` (``DIR`` is what
``dori mitigate`` wrote). :func:`load_mitigation` turns a spec into an object with
``applied(model, item_ids=None)`` (a context manager that restores the model exactly) and ``name``.

The registry is a dict and a decorator: ``@register_mitigation("nemo")`` on a class with a
``load(folder)`` classmethod makes ``nemo:DIR`` loadable.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dori.errors import DoriError

MITIGATIONS: dict[str, type] = {}
"""Registered mitigation name -> class with ``load(folder)``."""

_BUILTIN_MODULES = ("dori.mitigations.nemo", "dori.mitigations.wanda")


def register_mitigation(name: str) -> Callable[[type], type]:
    """Class decorator: register a fitted-mitigation class (with ``load(folder)``) under ``name``."""

    def deco(cls: type) -> type:
        if name in MITIGATIONS and MITIGATIONS[name] is not cls:
            raise DoriError(f"mitigation name {name!r} is already registered by {MITIGATIONS[name].__name__}")
        MITIGATIONS[name] = cls
        return cls

    return deco


def available_mitigations() -> list[str]:
    """Registered names (the built-in NeMo and Wanda are imported on first use)."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    return sorted(MITIGATIONS)


class NoMitigation:
    """The identity mitigation (spec ``none``)."""

    name = "none"
    source = ""
    per_item = False

    @contextlib.contextmanager
    def applied(self, model: Any, item_ids: Sequence[str] | None = None) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def applied_rows(self, model: Any, row_ids: Sequence[str]) -> Iterator[None]:
        yield

    def __repr__(self) -> str:
        return "NoMitigation()"


def load_mitigation(spec: str) -> Any:
    """Parse ``none``, ``nemo:DIR`` or ``wanda:DIR`` (any registered name) and load the mitigation.

    Raises:
        DoriError: for a malformed spec, an unknown name, or a folder that does not exist or holds no
            fitted mitigation of that kind.
    """
    if spec is None or not str(spec).strip():
        raise DoriError("empty mitigation spec: use none, nemo:DIR or wanda:DIR")
    spec = str(spec).strip()
    if spec == "none":
        return NoMitigation()
    names = available_mitigations()
    name, sep, folder = spec.partition(":")
    if not sep or not folder:
        if name in names:
            raise DoriError(
                f"mitigation spec {spec!r} needs a folder: {name}:DIR (written by dori mitigate {name})"
            )
        raise DoriError(
            f"bad mitigation spec {spec!r}: use none or NAME:DIR with NAME one of {', '.join(names)}"
        )
    if name not in MITIGATIONS:
        raise DoriError(f"unknown mitigation {name!r} in {spec!r}; known: none, {', '.join(names)}")
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise DoriError(
            f"mitigation folder {path} does not exist (make it with: dori mitigate {name} --out {path})"
        )
    fitted = MITIGATIONS[name].load(path)
    fitted.source = folder
    return fitted


__all__ = ["MITIGATIONS", "NoMitigation", "available_mitigations", "load_mitigation", "register_mitigation"]
