"""An item (id, prompt, kind, lazily loaded training image) and the image-file reader every set uses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dori.errors import DoriError


@dataclass
class Item:
    """One example: ``id``, ``prompt``, ``kind`` and (lazily) its training image in [0, 1]."""

    id: str
    prompt: str
    kind: str = "user"
    image_ref: str | None = None
    meta: dict = field(default_factory=dict)
    _image: torch.Tensor | None = field(default=None, repr=False)
    _loader: Callable[[Item], torch.Tensor] | None = field(default=None, repr=False)
    skip_reason: str | None = None

    @property
    def image(self) -> torch.Tensor | None:
        """The training image (3, H, W) float in [0, 1], or None (see ``skip_reason``)."""
        if self._image is None and self._loader is not None and self.skip_reason is None:
            try:  # the one place a bad item becomes a skip with its reason; the run goes on
                self._image = self._loader(self)
            except DoriError as err:
                self.skip_reason = str(err)
            except Exception as err:  # an unforeseen decoder/IO failure is still this item's, not the run's
                self.skip_reason = f"cannot load its image ({type(err).__name__}: {str(err)[:200]})"
        return self._image

    def with_image(self, image: torch.Tensor) -> Item:
        self._image = image
        return self


def load_image_file(path: str | Path, size: int | None = None) -> torch.Tensor:
    """Read an image file as (3, H, W) float in [0, 1], optionally resized (bicubic) to size x size."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # bombs: PIL's pixel limit
        raise DoriError(f"cannot read image {path}: {err}") from err
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
