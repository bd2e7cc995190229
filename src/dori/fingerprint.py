"""Content fingerprints that bind a run folder to what produced its results (resume keyed on content).

A rerun of an audit resumes from the results in its run folder only when these are unchanged: the items
(each id, prompt and training-image hash), the files of the mitigation (``nemo:DIR``/``wanda:DIR``), and the
model's weights (:func:`dori.models.identity.weights_fingerprint`). They are written into the run's
``config.json`` next to the arguments, so an edited prompt, a replaced image, a re-fitted mitigation in the
same folder or other weights under the same model name are refused, never silently reused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from dori.models.identity import weights_fingerprint

__all__ = ["files_fingerprint", "items_fingerprint", "run_inputs", "weights_fingerprint"]


def items_fingerprint(items: Sequence) -> str:
    """SHA-256 (16 hex digits) over every item's id, prompt, kind and training image (uint8 bytes; ``-`` and
    the skip reason for an item without one)."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.id}\x00{it.prompt}\x00{it.kind}\x00".encode())
        image = it.image
        if image is None:
            h.update(f"-{it.skip_reason}".encode())
        else:
            arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
            h.update(f"{tuple(arr.shape)}".encode())
            h.update(arr.cpu().numpy().tobytes())
        h.update(b"\x01")
    return h.hexdigest()[:16]


def files_fingerprint(folder: str | Path) -> str:
    """SHA-256 (16 hex digits) over the relative names and bytes of every file under ``folder``."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\x00")
        with open(path, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def mitigation_fingerprint(spec: str | None) -> str | None:
    """The files fingerprint of a ``NAME:DIR`` mitigation spec's folder (None for ``none``)."""
    if not spec or spec == "none" or ":" not in spec:
        return None
    folder = Path(spec.split(":", 1)[1]).expanduser()
    return files_fingerprint(folder) if folder.is_dir() else None


def run_inputs(items: Sequence, model, mitigation: str | None = None) -> dict:
    """The content a run folder's results depend on, for its ``config.json`` (see module docstring)."""
    return {
        "items_sha": items_fingerprint(items),
        "mitigation_sha": mitigation_fingerprint(mitigation),
        "model_sha": weights_fingerprint(model),
    }
