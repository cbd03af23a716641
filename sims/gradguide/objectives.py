"""The paper's objectives (docs/theory.md §7), as callables
``f(x) -> (B,)`` with a ``dim`` attribute (checked against the data by theory.gradient_guidance)."""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["Quadratic", "Distance", "Linear", "theta_in_span", "theta_off_span", "b_ones", "b_random"]


class Quadratic:
    """f1(x) = 10 - (theta.x - 3)^2, |theta| = 1; maximum 10 on the hyperplane theta.x = 3."""

    max_value = 10.0

    def __init__(self, theta: torch.Tensor, center: float = 3.0, top: float = 10.0):
        self.theta = torch.as_tensor(theta, dtype=torch.float64)
        if self.theta.ndim != 1:
            raise ValueError(f"theta: expected a vector, got shape {tuple(self.theta.shape)}")
        self.dim, self.center, self.top = self.theta.shape[0], float(center), float(top)
        self.max_value = self.top

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.top - (x @ self.theta.to(x.dtype) - self.center) ** 2

    def best_on_span(self, A: torch.Tensor, radius: float = math.inf) -> float:
        """sup of f1 over {A z : |z| <= radius}: theta.x ranges over [-|A^T theta| r, |A^T theta| r]."""
        reach = float((torch.as_tensor(A, dtype=torch.float64).T @ self.theta).norm()) * radius
        return self.top - max(0.0, self.center - reach) ** 2


class Distance:
    """f2(x) = 5 - 0.5 |x - b|; maximum 5 at b, on span(A) 5 - 0.5 |b_perp| (at x = A A^T b)."""

    def __init__(self, b: torch.Tensor, top: float = 5.0, scale: float = 0.5):
        self.b = torch.as_tensor(b, dtype=torch.float64)
        if self.b.ndim != 1:
            raise ValueError(f"b: expected a vector, got shape {tuple(self.b.shape)}")
        self.dim, self.top, self.scale = self.b.shape[0], float(top), float(scale)
        self.max_value = self.top

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.top - self.scale * (x - self.b.to(x.dtype)).norm(dim=-1)

    def best_on_span(self, A: torch.Tensor) -> float:
        A = torch.as_tensor(A, dtype=torch.float64)
        b_perp = self.b - A @ (A.T @ self.b)
        return self.top - self.scale * float(b_perp.norm())


class Linear:
    """theta.x (the unit-sphere objective), |theta| = 1."""

    def __init__(self, theta: torch.Tensor):
        self.theta = torch.as_tensor(theta, dtype=torch.float64)
        if self.theta.ndim != 1:
            raise ValueError(f"theta: expected a vector, got shape {tuple(self.theta.shape)}")
        self.dim = self.theta.shape[0]
        self.max_value = float(self.theta.norm())  # on the unit sphere

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.theta.to(x.dtype)


def theta_in_span(A: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """theta_1 = A beta / |beta|, beta uniform on the sphere of R^d (in span(A), unit norm)."""
    A = torch.as_tensor(A, dtype=torch.float64)
    beta = torch.randn(A.shape[1], dtype=torch.float64, generator=generator)
    return A @ (beta / beta.norm())


def theta_off_span(A: torch.Tensor, ratio: float = 9.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """theta_2: unit norm with |theta_perp| / |theta_par| = ratio (|theta_par| = 1/sqrt(1 + ratio^2))."""
    A = torch.as_tensor(A, dtype=torch.float64)
    u = theta_in_span(A, generator)
    w = torch.randn(A.shape[0], dtype=torch.float64, generator=generator)
    v = w - A @ (A.T @ w)
    v = v / v.norm()
    return (u + ratio * v) / math.sqrt(1 + ratio**2)


def b_ones(D: int, value: float = 4.0) -> torch.Tensor:
    """b_1 = 4 * ones."""
    return torch.full((D,), float(value), dtype=torch.float64)


def b_random(D: int, generator: Optional[torch.Generator] = None, mean: float = 4.0, std: float = 3.0) -> torch.Tensor:
    """b_2 ~ N(4, 9 I)."""
    return mean + std * torch.randn(D, dtype=torch.float64, generator=generator)
