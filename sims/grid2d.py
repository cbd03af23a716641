"""Densities on a 2-D grid, shared by the 2-D experiments (``sims.fig_theory``, ``sims.ctrl_toy``):
exact-target samples drawn from a gridded density, and the histogram KL from samples to it.

KL estimator (its bias stated): bins B_j of a ``bins`` x ``bins`` histogram over [-L, L]^2 (samples
outside are clamped into the edge bins), q_j = sample fraction, p_j = exact target mass of the bin;
KL_hat = sum_j q_j log(q_j / p_j) estimates KL(q_binned || p_binned) <= KL(q || p) (binning loses
information: biased LOW by the within-bin discrepancy), and the finite sample biases it HIGH by about
(m - 1) / (2 N) (m = bins with mass; Miller-Madow). Experiments report KL_hat together with the same
estimator on N exact-target samples (the floor), the value a perfect sampler would get.

Grids: ``u`` (n,) equally spaced over [-L, L]; densities ``dens`` (n, n) indexed [iy, ix].
"""
from __future__ import annotations

import math

import torch

__all__ = ["bin_mass", "grid_kl", "sample_target"]


def bin_mass(u: torch.Tensor, dens: torch.Tensor, bins: int) -> torch.Tensor:
    """Exact target mass per histogram bin (sum of grid densities * du^2), (bins, bins) [iy, ix]."""
    n = u.numel()
    lim = float(u[-1])
    du = float(u[1] - u[0])
    idx = torch.clamp(((u + lim) / (2 * lim) * bins).long(), 0, bins - 1)
    M = torch.zeros(bins, bins, dtype=torch.float64)
    M.index_put_((idx[:, None].expand(n, n).flatten(), idx[None, :].expand(n, n).flatten()),
                 dens.flatten() * du**2, accumulate=True)
    return M / M.sum()


def grid_kl(x: torch.Tensor, u: torch.Tensor, dens: torch.Tensor, bins: int) -> float:
    """KL_hat(q_hist || p_binned) of samples x (N, 2) to the exact target (see module docstring)."""
    if not bool(torch.isfinite(x).all()):
        return math.inf
    lim = float(u[-1])
    P = bin_mass(u, dens, bins)
    ij = torch.clamp(((x.double() + lim) / (2 * lim) * bins).long(), 0, bins - 1)
    Q = torch.zeros(bins, bins, dtype=torch.float64)
    Q.index_put_((ij[:, 1], ij[:, 0]), torch.ones(x.shape[0], dtype=torch.float64), accumulate=True)
    Q = Q / Q.sum()
    m = Q > 0
    return float((Q[m] * (Q[m].log() - P[m].clamp(min=1e-300).log())).sum())


def sample_target(u: torch.Tensor, dens: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n exact-target samples: a grid cell by its mass, then uniform jitter within the cell (the KL floor)."""
    du = float(u[1] - u[0])
    idx = torch.multinomial(dens.flatten(), n, replacement=True, generator=generator)
    iy, ix = idx // u.numel(), idx % u.numel()
    jit = (torch.rand(n, 2, generator=generator, dtype=torch.float64) - 0.5) * du
    return torch.stack([u[ix], u[iy]], 1) + jit
