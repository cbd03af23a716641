"""Rewards of the DRaFT toy, ``reward(x0, cond) -> (B,)`` with attribute ``differentiable`` (docs/api.md).

Two smooth rewards with different optima (``QuadraticBowl`` around c_A and around c_B) and the
non-differentiable threshold of the first, 1{|x - c_A| < rho}, for DDPO.
"""
from __future__ import annotations

import torch

from .configs import RewardConfig

__all__ = ["QuadraticBowl", "Threshold", "make_reward", "SumReward"]


class QuadraticBowl:
    """r(x) = -|x - c|^2 / 2, maximal (0) at c; gradient c - x. It is ``theory.exact.QuadraticReward``
    with Q = I and m = c (``.exact()``), whose closed-form tilts give the KL-regularised optimum
    (docs/theory.md §4-§5)."""

    differentiable = True

    def __init__(self, center, name: str = "r"):
        self.center = torch.as_tensor(center, dtype=torch.float64)
        if self.center.ndim != 1:
            raise ValueError(f"center: expected a (D,) point, got shape {tuple(self.center.shape)}")
        self.__name__ = name

    def __call__(self, x0: torch.Tensor, cond=None) -> torch.Tensor:
        if x0.ndim != 2 or x0.shape[1] != self.center.numel():
            raise ValueError(f"x0: {self.__name__} expects shape (B, {self.center.numel()}), got {tuple(x0.shape)}")
        return -0.5 * ((x0 - self.center.to(x0)) ** 2).sum(1)

    def exact(self):
        """The same reward as ``theory.exact.QuadraticReward(I, c)`` (closed-form tilts, float64)."""
        from theory.exact import QuadraticReward

        return QuadraticReward(torch.eye(self.center.numel(), dtype=torch.float64), self.center)


class Threshold:
    """r(x) = 1{|x - c| < rho} as a float: piecewise constant, so its gradient is zero almost everywhere
    and it is marked non-differentiable (DDPO only)."""

    differentiable = False

    def __init__(self, center, rho: float, name: str = "r_threshold"):
        if rho <= 0:
            raise ValueError(f"rho: threshold radius must be > 0, got {rho}")
        self.center = torch.as_tensor(center, dtype=torch.float64)
        self.rho = float(rho)
        self.__name__ = name

    def __call__(self, x0: torch.Tensor, cond=None) -> torch.Tensor:
        if x0.ndim != 2 or x0.shape[1] != self.center.numel():
            raise ValueError(f"x0: {self.__name__} expects shape (B, {self.center.numel()}), got {tuple(x0.shape)}")
        with torch.no_grad():
            d2 = ((x0 - self.center.to(x0)) ** 2).sum(1)
        return (d2 < self.rho**2).to(x0.dtype)


class SumReward:
    """r_A + r_B (the target of combining two adapters)."""

    differentiable = True

    def __init__(self, *rewards):
        self.rewards = rewards
        self.__name__ = "+".join(r.__name__ for r in rewards)

    def __call__(self, x0, cond=None):
        return sum(r(x0, cond) for r in self.rewards)


def make_reward(name: str, cfg: RewardConfig = RewardConfig()):
    """'a', 'b', 'a_threshold' or 'a+b' -> the reward callable."""
    if name == "a":
        return QuadraticBowl(cfg.center_a, "r_a")
    if name == "b":
        return QuadraticBowl(cfg.center_b, "r_b")
    if name == "a_threshold":
        return Threshold(cfg.center_a, cfg.rho, "r_a_threshold")
    if name == "a+b":
        return SumReward(make_reward("a", cfg), make_reward("b", cfg))
    raise ValueError(f"name: unknown reward {name!r}; use 'a', 'b', 'a_threshold' or 'a+b'")
