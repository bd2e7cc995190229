"""Training images of SD prompts: a local folder keyed by LAION index, or a guarded URL fetch with a cache.

Fetching is opt-in (``fetch=True``): each download has a timeout, a size cap and a check that the bytes
decode as an image; the result is cached under ``cache_dir`` so a rerun never fetches twice.
"""

from __future__ import annotations

import hashlib
import time
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F

from dori.data.items import Item, load_image_file
from dori.errors import DoriError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class ImageStore:
    """Finds the training image of an item (see module docstring)."""

    def __init__(
        self,
        images_dir=None,
        fetch: bool = False,
        cache_dir=None,
        size: int = 512,
        timeout_s: float = 10.0,
        max_bytes: int = 20 * 2**20,
    ):
        self.images_dir = Path(images_dir) if images_dir else None
        if self.images_dir is not None and not self.images_dir.is_dir():
            raise DoriError(f"--images folder {self.images_dir} does not exist")
        self.fetch = fetch
        self.cache_dir = Path(cache_dir or Path.home() / ".cache" / "dori" / "images")
        self.size, self.timeout_s, self.max_bytes = size, timeout_s, max_bytes

    def local_path(self, item: Item) -> Path | None:
        key = item.meta.get("laion_index") or item.id
        for base in [self.images_dir, self.cache_dir]:
            if base is None:
                continue
            for ext in EXTENSIONS:
                for name in (f"{key}{ext}", f"{item.id}{ext}"):
                    if (base / name).exists():
                        return base / name
        return None

    def load(self, item: Item) -> torch.Tensor:
        path = self.local_path(item)
        if path is None and self.fetch and item.image_ref:
            path = self._download(item)
        if path is None:
            where = f"in {self.images_dir}" if self.images_dir else "locally"
            raise DoriError(f"no training image for {item.id} {where} (expected <LAION index>.jpg/.png)")
        return load_image_file(path, self.size)

    def _download(self, item: Item) -> Path:
        url = item.image_ref or ""
        if not url.startswith(("http://", "https://")):
            raise DoriError(f"{item.id}: not a fetchable URL: {url!r}")
        key = item.meta.get("laion_index") or hashlib.sha1(url.encode()).hexdigest()[:16]
        target = self.cache_dir / f"{key}.img"
        try:
            data = self._read_url(url)
        except DoriError:
            raise
        except Exception as err:  # network failures of every kind become a skip reason
            raise DoriError(f"{item.id}: download failed ({type(err).__name__}: {err})") from err
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        try:
            tmp.write_bytes(data)
            try:
                load_image_file(tmp)
            except DoriError as err:
                raise DoriError(f"{item.id}: downloaded bytes are not a usable image ({err})") from err
            final = target.with_suffix(".png")
            tmp.replace(final)
        finally:
            tmp.unlink(missing_ok=True)  # never a .part file left behind
        return final

    def _read_url(self, url: str) -> bytes:
        """The body of ``url``, at most ``max_bytes``, within ``timeout_s`` in all (not per read: a server
        that trickles bytes is cut off at the deadline)."""
        deadline = time.monotonic() + self.timeout_s
        req = urllib.request.Request(url, headers={"User-Agent": "dori-audit"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            chunks, size = [], 0
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DoriError(f"download of {url} took longer than its {self.timeout_s:g} s deadline")
                sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
                if sock is not None:
                    sock.settimeout(max(0.01, left))
                try:
                    chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
                except TimeoutError as err:  # socket.timeout: the deadline (or the read budget) ran out
                    raise DoriError(
                        f"download of {url} took longer than its {self.timeout_s:g} s deadline"
                    ) from err
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > self.max_bytes:
                    raise DoriError(f"image at {url} is larger than {self.max_bytes} bytes")
        return b"".join(chunks)


def resize_to(image: torch.Tensor, size: int) -> torch.Tensor:
    """A (3, H, W) image in [0, 1] resized (bicubic, antialiased) to size x size, if needed."""
    if tuple(image.shape[-2:]) == (size, size):
        return image
    out = F.interpolate(
        image[None].float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False
    )
    return out[0].clamp(0, 1)
