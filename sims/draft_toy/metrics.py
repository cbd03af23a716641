"""Evaluation of an eps model of the DRaFT toy on fixed noise: mean rewards (with standard errors),
sample spread, mode coverage and the path KL to the pre-trained model.

All numbers come from ``theory.solvers.sample`` (DDIM, eta = 1 by default, 50 steps) on x_T and
Brownian increments drawn from ``seed``, so two models evaluated with the same seed see the same noise.
"""
from __future__ import annotations

import math

import torch

from theory.solvers import sample

from . import model as toy
from .configs import PretrainConfig, RewardConfig
from .rewards import make_reward

__all__ = ["fixed_noise", "evaluate", "spread", "mode_counts", "kl_regularised_optimum"]


def fixed_noise(n: int, n_steps: int, seed: int, dtype=torch.float32):
    """(x_T, noise) of shapes (n, 2) and (n_steps, n, 2) from one seeded generator."""
    g = torch.Generator().manual_seed(int(seed))
    x_T = torch.randn(n, 2, generator=g, dtype=dtype)
    noise = torch.randn(n_steps, n, 2, generator=g, dtype=dtype)
    return x_T, noise


def spread(x: torch.Tensor) -> float:
    """sqrt(trace Cov(x)): the root-mean-square distance of the samples to their mean (diversity)."""
    return float(torch.sqrt(((x - x.mean(0)) ** 2).sum(1).mean()))


def mode_counts(x: torch.Tensor, cfg: PretrainConfig = PretrainConfig()) -> torch.Tensor:
    """Fraction of samples whose nearest ring component is k, shape (n_modes,)."""
    means = toy.data_law(cfg).means.to(x)
    k = torch.cdist(x, means).argmin(1)
    return torch.bincount(k, minlength=cfg.n_modes).to(torch.float64) / x.shape[0]


def kl_regularised_optimum(lam: float, reward: str = "a", pretrain: PretrainConfig = PretrainConfig(),
                           rewards: RewardConfig = RewardConfig()) -> dict:
    """The exact optimum of max_p E_p[r] - lam KL(p || p_0) over laws of x0, for the ring law p_0 and a
    quadratic reward (docs/theory.md §4-§5): p* = p_0 exp(r/lam) / Z is again a Gaussian mixture
    (``GaussianMixture.tilted``), and

        E_{p*}[r] = sum_k w_k * (-1/2) ((m_k - c).Q(m_k - c) + tr(Q C_k)),
        KL(p* || p_0) = E_{p*}[r] / lam - log Z,     objective = E_{p*}[r] - lam KL = lam log Z,
        spread = sqrt(tr Cov_{p*}),  modes_2pct = #{k: w_k >= 0.02} (the tilted component weights).

    The fine-tuned sampler's objective uses the discretised path KL, which is >= the KL of its final
    marginal (data processing), and its reference is the trained model, not p_0; so lam log Z is an
    approximate upper bound of what a fine-tune can reach, and E_{p*}[r], KL(p*||p_0) the point it
    should approach."""
    if lam <= 0:
        raise ValueError(f"lam: the KL-regularised optimum needs lam > 0, got {lam}")
    r = make_reward(reward, rewards)
    if not hasattr(r, "exact"):
        raise ValueError(f"reward: {reward!r} has no closed-form tilt; use 'a' or 'b'")
    ex = r.exact()
    law = toy.data_law(pretrain)
    tilted = law.tilted(ex, lam)
    d = tilted.means - ex.m
    per_comp = -0.5 * (torch.einsum("ki,ij,kj->k", d, ex.Q, d) + torch.einsum("ij,kji->k", ex.Q, tilted.covs))
    mean_r = float(tilted.weights @ per_comp)
    log_z = float(law.log_normaliser(ex, lam))
    _, cov = tilted.mean_cov()
    return {"lam": float(lam), "reward": mean_r, "kl": mean_r / lam - log_z, "objective": lam * log_z,
            "log_z": log_z, "spread": float(torch.trace(cov).sqrt()),
            "modes_2pct": int((tilted.weights >= 0.02).sum()), "weights": tilted.weights.tolist(), "law": tilted}


@torch.no_grad()
def evaluate(eps_model, *, reference=None, n: int = 1024, seed: int = 12345, eta: float = 1.0,
             pretrain: PretrainConfig = PretrainConfig(), rewards: RewardConfig = RewardConfig(),
             reward_names=("a", "b", "a_threshold", "a+b"), keep_samples: bool = False) -> dict:
    """Sample ``n`` points from ``eps_model`` (x_T, noise from ``seed``) and measure them.

    Returns mean and standard error (std / sqrt(n)) of each reward, ``spread``, ``modes_covered``
    (components holding >= 2% of the samples, the uniform share being 12.5%), ``mode_entropy`` (nats;
    log 8 = 2.08 is uniform), and with ``reference`` the mean discretised path KL
    sum_steps |mu - mu_ref|^2 / (2 std^2) of the sampler's Gaussian transitions (docs/theory.md §4), which
    bounds the KL of the final marginals from above (data-processing inequality)."""
    if n < 2:
        raise ValueError(f"n: need >= 2 evaluation samples, got {n}")
    sch, ts = toy.schedule(pretrain), toy.grid(pretrain)
    x_T, noise = fixed_noise(n, ts.numel() - 1, seed)
    traj = sample(eps_model, sch, x_T, ts, method="ddim", eta=eta, noise=noise, reference=reference)
    x = traj.x0
    out = {}
    for name in reward_names:
        r = make_reward(name, rewards)(x).double()
        out[f"reward_{name}"] = float(r.mean())
        out[f"reward_{name}_se"] = float(r.std() / math.sqrt(n))
    p = mode_counts(x, pretrain)
    out["spread"] = spread(x)
    out["modes_covered"] = int((p >= 0.02).sum())
    out["mode_entropy"] = float(-(p[p > 0] * p[p > 0].log()).sum())
    if reference is not None:
        out["kl"] = float(traj.kl.mean())
        out["kl_se"] = float(traj.kl.std() / math.sqrt(n))
    if keep_samples:
        out["samples"] = x.cpu()
    return out
