"""Projections onto the probability simplex {p : p >= 0, sum p = 1}, row by row: the exact sort-based
Euclidean projection and the bisection of UnlearnDiffAtk's reference code (OPTML-Group/Diffusion-MU-Attack @
5a3e5d3), which clips to [0, 1] and is only as accurate as its tolerance. Used by
:class:`dori.attacks.unlearndiffatk.UnlearnDiffAtk` (``projection="exact"`` / ``"bisection"``)."""

from __future__ import annotations

import torch


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row (last dim) onto the probability simplex (sort-based, exact)."""
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    j = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = ((u - css / j) > 0).to(v.dtype).mul(j).argmax(-1, keepdim=True)
    theta = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp_min(0)


def project_bisection(row: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
    """The reference's projection of one distribution onto {p : 0 <= p <= 1, sum p = 1}: clip(row - mu, 0, 1)
    with mu found by bisection on [min(row) - 1, max(row)] until the bracket is narrower than ``tol``
    (the midpoint of the last bracket); rows already summing to 1 within ``tol`` after clipping are
    returned clipped. Because mu is only ``tol``-accurate, the result need not sum to 1."""

    def excess(mu: float) -> torch.Tensor:
        return torch.clip(row - mu, 0, 1).sum() - 1

    clipped = torch.clip(row, 0, 1)
    if abs(clipped.sum().item() - 1) <= tol:
        return clipped
    lo, hi = torch.min(row - 1).item(), torch.max(row).item()
    mu = (lo + hi) / 2
    while abs(hi - lo) > tol:
        mu = (lo + hi) / 2
        e = excess(mu)
        if e == 0:
            break
        if excess(hi) == 0:
            mu = hi
            break
        if e < 0:
            hi = mu
        else:
            lo = mu
    return torch.clip(row - mu, 0, 1)
