"""The one way dori reads a ``torch.save`` file it did not just write: tensors and plain containers only.

``torch.load`` unpickles, and unpickling can run arbitrary code (a planted ``__reduce__``). Every training
state dori resumes from (the miniworld UNet checkpoint, fine-tuning optimizer states) holds only tensors,
numbers, strings, lists, dicts and ``None``, so it is read with ``weights_only=True``: a file that asks for
anything else is refused with an error naming it, before any of its code runs. Model weights are read from
safetensors (:mod:`dori.models.loading`); pickle model checkpoints need ``--allow-pickle``.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from dori.errors import DoriError


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Read a saved training state without running code from it.

    Args:
        path: a file written by ``torch.save`` (tensors and plain containers).
        map_location: where tensors are placed.

    Returns:
        The saved object.

    Raises:
        DoriError: the file asks to build other objects (it could run code), or is truncated/unreadable;
            the message names the file and says to delete it to start over.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DoriError(
            f"{path} is not a plain training state (loading it would build other objects, which can run code: "
            f"{why[:200]}); dori does not load it. Delete it to start over."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as err:
        raise DoriError(
            f"{path} is unreadable or truncated ({type(err).__name__}: {str(err)[:200]}); delete it to start over"
        ) from err


def state_field(state: Any, key: str, path: str | Path) -> Any:
    """``state[key]`` of a loaded state, or an error naming the file when it is not a dict holding ``key``."""
    if not isinstance(state, dict) or key not in state:
        raise DoriError(f"{path} is not a dori training state (no {key!r}); delete it to start over")
    return state[key]
