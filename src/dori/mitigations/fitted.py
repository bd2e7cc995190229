"""Checks that tie a fitted mitigation (NeMo neurons, Wanda masks) to the model it was fitted on.

* Neuron indices read from a file must be non-negative integers (a tampered file is refused at load).
* Before a mitigation is applied, every layer must exist in the model and every index fit its channels.
* ``dori mitigate`` records the fitted model's coarse weights fingerprint (``model_sha`` in the folder's
  ``config.json``, :func:`dori.models.identity.weights_fingerprint`); applying the mitigation to other
  weights is refused (checked once per model object).
"""

from __future__ import annotations

import json
from pathlib import Path

from dori.errors import DoriError


def check_indices(neurons: dict, where: str) -> None:
    """Refuse neuron sets whose indices are not non-negative integers."""
    if not isinstance(neurons, dict):
        raise DoriError(f"{where}: neuron sets must map layers to index lists")
    for layer, idx in neurons.items():
        if not isinstance(idx, list) or any(type(i) is not int or i < 0 for i in idx):
            raise DoriError(f"{where}: layer {layer} has indices that are not non-negative integers")


def fitted_model_sha(folder: str | Path) -> str | None:
    """The ``model_sha`` the fitting run recorded in ``folder/config.json`` (None for older fits)."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return None
    try:
        value = json.loads(cfg.read_text(encoding="utf-8")).get("model_sha")
    except (ValueError, UnicodeDecodeError, AttributeError) as err:
        raise DoriError(f"{cfg} is corrupt ({err})") from err
    return str(value) if value else None


def check_fits(fitted, model, neurons: dict[str, list[int]] | None, what: str) -> None:
    """Refuse applying ``fitted`` to ``model`` when it was fitted on other weights, or when a layer or
    neuron index does not exist in ``model``. ``neurons``: layer -> output-channel indices (None: layers
    only are checked by the caller)."""
    from dori.models.hooks import get_module

    checked = fitted.__dict__.setdefault("_fits_checked", set())
    key = id(model.unet)
    if key not in checked:
        sha = getattr(fitted, "model_sha", None)
        if sha:
            from dori.models.identity import weights_fingerprint

            mine = weights_fingerprint(model, coarse=True)
            if mine != sha:
                raise DoriError(
                    f"these {what} were fitted on another model (weights {sha}, this model {mine}); fit them "
                    "again on this model with dori mitigate"
                )
        checked.add(key)
    for layer, idx in (neurons or {}).items():
        try:
            module = get_module(model.unet, layer)
        except (KeyError, AttributeError) as err:
            raise DoriError(f"these {what} do not fit this model: no layer {layer}") from err
        size = getattr(module, "out_features", None)
        if idx and size is not None and max(idx) >= size:
            raise DoriError(
                f"these {what} do not fit this model: layer {layer} has {size} channels, index {max(idx)} given"
            )
