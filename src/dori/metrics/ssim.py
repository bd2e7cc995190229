"""Multi-scale structural similarity (MS-SSIM) in plain torch, as NeMo's memorization score uses it.

NeMo (Hintersdorf et al., 2024) compares noise differences with ``torchmetrics``'
``multiscale_structural_similarity_index_measure(kernel_size=11, betas=(0.33, 0.33, 0.33))``. This is a
reimplementation of that computation (no torchmetrics dependency):

* a Gaussian window (size 11, sigma 1.5), applied per channel after reflection padding; the local means,
  variances and covariance give the SSIM map ``l * cs`` and the contrast-structure map ``cs``
  (constants ``C1 = (0.01 R)^2``, ``C2 = (0.03 R)^2``; without an explicit data range ``R`` is taken
  from the data at each scale, over the whole batch, as torchmetrics does when NeMo calls it);
* both maps are averaged over the positions the window sees without padding, and over channels;
* at each of ``len(betas)`` scales the contrast-structure term is kept, then the images are 2x2
  average-pooled; the last scale contributes its full SSIM instead;
* negative values are clipped to 0 (torchmetrics' default ``normalize="relu"``) and the result is
  ``prod_i value_i ** beta_i``.

Small images: with 3 scales and an 11-wide window the smallest scale must be at least 11 pixels, i.e.
inputs of at least 44 x 44 (SD's 64 x 64 latents qualify). :func:`ms_ssim_settings` keeps the reference
settings whenever they fit and otherwise shrinks the window (sigma scaled with it), then the number of
scales, so that small models (the miniworld, test models) can be scored; the settings used are recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from dori.errors import DoriError


@dataclass(frozen=True)
class MSSSIMSettings:
    """Window size, Gaussian sigma and per-scale exponents of MS-SSIM (NeMo: 11, 1.5, 3 x 0.33)."""

    kernel_size: int = 11
    sigma: float = 1.5
    betas: tuple[float, ...] = (0.33, 0.33, 0.33)

    def as_dict(self) -> dict:
        return asdict(self)


NEMO_MS_SSIM = MSSSIMSettings()


def ms_ssim_settings(height: int, width: int, reference: MSSSIMSettings = NEMO_MS_SSIM) -> MSSSIMSettings:
    """The reference settings if images of this size allow them, else the closest settings that fit.

    The smallest scale (``size / 2 ** (scales - 1)``) must be at least the window size. First the window
    shrinks to the largest odd size that fits (sigma scaled by the same factor, at least 3 wide); if even
    a 3-wide window does not fit, scales are dropped (each keeps the reference's exponent).
    """
    size = min(height, width)
    scales = len(reference.betas)
    beta = reference.betas[-1]
    while scales >= 1:
        smallest = size // 2 ** (scales - 1)
        if smallest >= reference.kernel_size:
            k = reference.kernel_size
        else:
            k = smallest if smallest % 2 == 1 else smallest - 1
        if k >= 3:
            if k == reference.kernel_size and scales == len(reference.betas):
                return reference
            sigma = reference.sigma * k / reference.kernel_size
            return MSSSIMSettings(kernel_size=k, sigma=sigma, betas=(beta,) * scales)
        scales -= 1
    raise DoriError(f"images of {height} x {width} are too small for MS-SSIM (need at least 3 x 3)")


def _gaussian_window(kernel_size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(kernel_size, device=device, dtype=torch.float64) - (kernel_size - 1) / 2
    g = torch.exp(-0.5 * (coords / sigma) ** 2)
    g = g / g.sum()
    window = torch.outer(g, g).to(dtype)
    return window.expand(channels, 1, kernel_size, kernel_size).contiguous()


def _ssim_and_cs(
    x: torch.Tensor, y: torch.Tensor, window: torch.Tensor, data_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM and mean contrast-structure per image, over the unpadded positions and channels."""
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    k = window.shape[-1]
    pad = (k - 1) // 2
    channels = x.shape[1]
    b = x.shape[0]
    stacked = torch.cat([x, y, x * x, y * y, x * y])
    stacked = F.pad(stacked, (pad, pad, pad, pad), mode="reflect")
    mu_x, mu_y, xx, yy, xy = F.conv2d(stacked, window, groups=channels).split(b)
    var_x = (xx - mu_x.pow(2)).clamp_min(0)
    var_y = (yy - mu_y.pow(2)).clamp_min(0)
    cov = xy - mu_x * mu_y
    cs_map = (2 * cov + c2) / (var_x + var_y + c2)
    lum_map = (2 * mu_x * mu_y + c1) / (mu_x.pow(2) + mu_y.pow(2) + c1)
    ssim_map = lum_map * cs_map
    if pad > 0:
        ssim_map = ssim_map[..., pad:-pad, pad:-pad]
        cs_map = cs_map[..., pad:-pad, pad:-pad]
    return ssim_map.flatten(1).mean(1), cs_map.flatten(1).mean(1)


def ms_ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    settings: MSSSIMSettings | None = None,
    data_range: float | None = None,
) -> torch.Tensor:
    """MS-SSIM of each pair of images (see module docstring).

    Args:
        x, y: images (B, C, H, W) of the same shape; computed in float32 (float64 stays float64).
        settings: window, sigma and exponents; default: :func:`ms_ssim_settings` for this size (NeMo's
            11 / 1.5 / (0.33, 0.33, 0.33) whenever the images are at least 44 x 44).
        data_range: the value range R of the inputs. None (what NeMo's calls do) takes it from the data at
            every scale: the larger of the two inputs' (max - min) over the *whole batch*, so after
            pooling R shrinks and a pair's value depends slightly on the rest of the batch (as in
            torchmetrics); pass a number (e.g. 1.0) for batch-independent values.

    Returns:
        (B,) similarities in [0, 1]; identical images give 1.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise DoriError(
            f"ms_ssim needs two (B, C, H, W) tensors of one shape, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    settings = settings or ms_ssim_settings(x.shape[-2], x.shape[-1])
    scales = len(settings.betas)
    smallest = min(x.shape[-2:]) // 2 ** (scales - 1)
    if smallest < settings.kernel_size:
        raise DoriError(
            f"images of {x.shape[-2]} x {x.shape[-1]} are too small for MS-SSIM with {scales} scales and a "
            f"{settings.kernel_size}-wide window; use ms_ssim_settings(H, W)"
        )
    dtype = x.dtype if x.dtype == torch.float64 else torch.float32
    x, y = x.to(dtype), y.to(y.device, dtype)
    window = _gaussian_window(settings.kernel_size, settings.sigma, x.shape[1], x.device, dtype)
    values = []
    for i in range(scales):
        r = (
            data_range
            if data_range is not None
            else float(torch.maximum(x.max() - x.min(), y.max() - y.min()))
        )
        sim, cs = _ssim_and_cs(x, y, window, r)
        values.append(sim if i == scales - 1 else cs)
        if i < scales - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    stack = torch.stack(values).clamp_min(0)
    betas = torch.tensor(settings.betas, device=stack.device, dtype=stack.dtype).view(-1, 1)
    return stack.pow(betas).prod(0)


def pairwise_ms_ssim(images: torch.Tensor, settings: MSSSIMSettings | None = None) -> torch.Tensor:
    """MS-SSIM of every unordered pair of ``images`` (N, C, H, W): (N, N) symmetric, NaN on the diagonal."""
    n = images.shape[0]
    out = torch.full((n, n), float("nan"), dtype=torch.float32)
    if n < 2:
        return out
    i, j = torch.triu_indices(n, n, offset=1)
    vals = ms_ssim(images[i], images[j], settings).float().cpu()
    out[i, j] = vals
    out[j, i] = vals
    return out


def max_pairwise_ms_ssim(images: torch.Tensor, settings: MSSSIMSettings | None = None) -> torch.Tensor:
    """For each image, its highest MS-SSIM with any other image of the set (N,) (NeMo's seed filter)."""
    pw = pairwise_ms_ssim(images, settings)
    if images.shape[0] < 2:
        return torch.zeros(images.shape[0])
    return pw.nan_to_num(float("-inf")).max(1).values


def upper_pairs(values: torch.Tensor) -> torch.Tensor:
    """The strict upper triangle of a square matrix as a flat vector (the N(N-1)/2 pair values)."""
    n = values.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    return values[i, j]


__all__: Sequence[str] = (
    "MSSSIMSettings",
    "NEMO_MS_SSIM",
    "ms_ssim",
    "ms_ssim_settings",
    "pairwise_ms_ssim",
    "max_pairwise_ms_ssim",
    "upper_pairs",
)
