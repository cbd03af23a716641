"""Conversions between the parameterisations of a denoiser (docs/theory.md §2), written once.

    score(x, t)  = -eps(x, t) / sigma(t)                       (eps-prediction, as diffusers)
    x0_hat(x, t) = (x + sigma^2 score) / alpha = (x - sigma eps) / alpha     (Tweedie)

Every function takes per-sample (B,) or scalar alpha / sigma and broadcasts with ``append_dims``.
"""
from __future__ import annotations

import torch

from .schedules import NoiseSchedule, append_dims, as_time

__all__ = [
    "eps_to_score",
    "score_to_eps",
    "eps_to_x0",
    "x0_to_eps",
    "model_score",
    "model_x0_hat",
]


def eps_to_score(eps: torch.Tensor, sigma) -> torch.Tensor:
    """score = -eps / sigma (docs/theory.md §2)."""
    return -eps / append_dims(sigma, eps)


def score_to_eps(score: torch.Tensor, sigma) -> torch.Tensor:
    """eps = -sigma * score."""
    return -append_dims(sigma, score) * score


def eps_to_x0(x: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """Tweedie: x0_hat = (x - sigma eps) / alpha."""
    return (x - append_dims(sigma, x) * eps) / append_dims(alpha, x)


def x0_to_eps(x: torch.Tensor, x0: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The eps that a denoiser predicting x0 implies: eps = (x - alpha x0) / sigma."""
    return (x - append_dims(alpha, x) * x0) / append_dims(sigma, x)


def model_score(model, schedule: NoiseSchedule, x: torch.Tensor, t, cond=None) -> torch.Tensor:
    """score of an eps model at (x, t)."""
    t = as_time(t, x)
    return eps_to_score(model(x, t, cond), schedule.sigma(t))


def model_x0_hat(model, schedule: NoiseSchedule, x: torch.Tensor, t, cond=None) -> torch.Tensor:
    """Tweedie's posterior mean E[X_0 | X_t = x] of an eps model."""
    t = as_time(t, x)
    return eps_to_x0(x, model(x, t, cond), schedule.alpha(t), schedule.sigma(t))
