"""Noise schedules of a variance-preserving (VP) forward process, continuous in t (docs/theory.md §1).

    dX_t = -1/2 beta(t) X_t dt + sqrt(beta(t)) dW_t
    alpha(t) = exp(-1/2 B(t)),  B(t) = int_0^t beta(u) du      (signal scale)
    sigma(t)^2 = 1 - alpha(t)^2                                 (noise variance)
    X_t | X_0 = x0 ~ N(alpha(t) x0, sigma(t)^2 I)

Every schedule is defined by its integrated rate ``B(t)`` and its rate ``beta(t) = B'(t)``; alpha and
sigma are derived once in the base class, so the three are consistent by construction.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = [
    "NoiseSchedule",
    "ConstantBeta",
    "LinearVP",
    "CosineVP",
    "DiscreteVP",
    "append_dims",
    "as_time",
]


def append_dims(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample tensor (B,) or a scalar so that it broadcasts against ``x`` (B, ...)."""
    if not (torch.is_tensor(v) and v.dtype == x.dtype and v.device == x.device):  # (a per-step hot path)
        v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if v.ndim == 0:
        return v
    if v.ndim > x.ndim:
        raise ValueError(f"append_dims: value of shape {tuple(v.shape)} has more dims than x {tuple(x.shape)}")
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def as_time(t, x: torch.Tensor) -> torch.Tensor:
    """A time as a (B,) tensor of x's dtype and device (scalars are broadcast to the batch)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t: expected a scalar or shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t


class NoiseSchedule:
    """A VP schedule on [0, T]. Subclasses implement ``integral(t) = B(t)`` and ``beta(t)``.

    All methods take a float or a tensor ``t`` and return a tensor (float64 for Python floats).
    """

    T: float = 1.0
    #: True for schedules that come from a discrete model (a diffusers scheduler): the network's
    #: own timestep for continuous time t is ``model_timestep(t)``.
    discrete: bool = False

    # --- to implement -------------------------------------------------------------------------
    def integral(self, t: torch.Tensor) -> torch.Tensor:  # B(t) = int_0^t beta
        raise NotImplementedError

    def beta(self, t) -> torch.Tensor:
        raise NotImplementedError

    # --- derived, written once ----------------------------------------------------------------
    @staticmethod
    def _t(t) -> torch.Tensor:
        return t if torch.is_tensor(t) else torch.tensor(float(t), dtype=torch.float64)

    def check_time(self, t, name: str = "t") -> None:
        """Raise ValueError if any t lies outside [0, T]."""
        tt = self._t(t)
        if torch.isnan(tt).any() or (tt < -1e-12).any() or (tt > self.T * (1 + 1e-9) + 1e-12).any():
            raise ValueError(
                f"{name}: times must lie in [0, T={self.T}], got range "
                f"[{float(tt.min()):.4g}, {float(tt.max()):.4g}]"
            )

    def log_alpha(self, t) -> torch.Tensor:
        """log alpha(t) = -B(t)/2 (docs/theory.md §1)."""
        return -0.5 * self.integral(self._t(t))

    def alpha(self, t) -> torch.Tensor:
        """alpha(t) = exp(-B(t)/2)."""
        return torch.exp(self.log_alpha(t))

    def sigma2(self, t) -> torch.Tensor:
        """sigma(t)^2 = 1 - alpha(t)^2 = -expm1(-B(t)), accurate near t = 0."""
        return -torch.expm1(-self.integral(self._t(t)))

    def sigma(self, t) -> torch.Tensor:
        return torch.sqrt(self.sigma2(t))

    def snr(self, t) -> torch.Tensor:
        """alpha^2 / sigma^2."""
        return self.alpha(t) ** 2 / self.sigma2(t)

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The time a network was trained with for continuous time t (identity for continuous schedules)."""
        return t

    def marginal_prob(self, x0: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of X_t | X_0 = x0 (score_sde's name)."""
        t = as_time(t, x0)
        return append_dims(self.alpha(t), x0) * x0, append_dims(self.sigma(t), x0)

    def add_noise(self, x0: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps."""
        mean, std = self.marginal_prob(x0, t)
        return mean + std * eps

    def __repr__(self) -> str:
        return f"{type(self).__name__}(T={self.T})"


class ConstantBeta(NoiseSchedule):
    """beta(t) = beta0 (with beta0 = 1 the OU process of the gradient-guidance paper: alpha = exp(-t/2))."""

    def __init__(self, beta0: float = 1.0, T: float = 10.0):
        if beta0 <= 0 or T <= 0:
            raise ValueError(f"ConstantBeta: beta0 and T must be > 0, got beta0={beta0}, T={T}")
        self.beta0, self.T = float(beta0), float(T)

    def integral(self, t):
        return self.beta0 * t

    def beta(self, t):
        t = self._t(t)
        return torch.full_like(t, self.beta0)

    def __repr__(self):
        return f"ConstantBeta(beta0={self.beta0}, T={self.T})"


class LinearVP(NoiseSchedule):
    """DDPM's linear VP: beta(t) = b0 + (b1 - b0) t / T, B(t) = b0 t + (b1 - b0) t^2 / (2T)."""

    def __init__(self, b0: float = 0.1, b1: float = 20.0, T: float = 1.0):
        if b0 <= 0 or b1 <= 0 or T <= 0:
            raise ValueError(f"LinearVP: b0, b1, T must be > 0, got b0={b0}, b1={b1}, T={T}")
        self.b0, self.b1, self.T = float(b0), float(b1), float(T)

    def integral(self, t):
        return self.b0 * t + (self.b1 - self.b0) * t**2 / (2 * self.T)

    def beta(self, t):
        t = self._t(t)
        return self.b0 + (self.b1 - self.b0) * t / self.T

    def __repr__(self):
        return f"LinearVP(b0={self.b0}, b1={self.b1}, T={self.T})"


class CosineVP(NoiseSchedule):
    """Nichol & Dhariwal's cosine schedule in continuous time.

    alpha_bar(t) = f(t) / f(0), f(t) = cos^2(pi/2 (t/T + s)/(1 + s)); B = -log alpha_bar;
    beta(t) = B'(t) = pi/(T (1+s)) tan(pi/2 (t/T + s)/(1+s)). alpha_bar(T) = 0 exactly, so beta is capped
    at ``beta_max`` (the discrete schedule clips its betas at 0.999 for the same reason) and B is
    integrated consistently with the cap.
    """

    def __init__(self, s: float = 0.008, T: float = 1.0, beta_max: float = 999.0):
        if s <= 0 or T <= 0 or beta_max <= 0:
            raise ValueError("CosineVP: s, T and beta_max must be > 0")
        self.s, self.T, self.beta_max = float(s), float(T), float(beta_max)
        c = math.pi / (2 * (1 + s))
        # time after which beta would exceed beta_max: tan(c (u + s)) = beta_max T / (2c)
        u_cap = math.atan(beta_max * T / (2 * c)) / c - s
        self._t_cap = min(max(u_cap, 0.0), 1.0) * T
        self._B_cap = float(self._B_uncapped(torch.tensor(self._t_cap, dtype=torch.float64)))

    def _B_uncapped(self, t):
        c = math.pi / (2 * (1 + self.s))
        return -2 * (torch.log(torch.cos(c * (t / self.T + self.s))) - math.log(math.cos(c * self.s)))

    def integral(self, t):
        t = self._t(t)
        tc = torch.clamp(t, max=self._t_cap)
        return self._B_uncapped(tc) + self.beta_max * torch.clamp(t - self._t_cap, min=0.0)

    def beta(self, t):
        t = self._t(t)
        c = math.pi / (2 * (1 + self.s))
        b = 2 * c / self.T * torch.tan(c * (torch.clamp(t, max=self._t_cap) / self.T + self.s))
        return torch.where(t > self._t_cap, torch.full_like(b, self.beta_max), b)

    def __repr__(self):
        return f"CosineVP(s={self.s}, T={self.T})"


class DiscreteVP(NoiseSchedule):
    """A schedule from a discrete model's ``alphas_cumprod`` (diffusers' convention), made continuous.

    Continuous time is measured in steps: t = 0 is data (alpha = 1) and t = k + 1 carries
    ``alphas_cumprod[k]`` (the network's timestep k), so T = N. B(t) = -log alpha_bar is interpolated
    linearly between knots, so beta is piecewise constant, beta = -log(1 - betas[k]) on (k, k+1].
    The network's timestep for continuous t is ``model_timestep(t) = t - 1``.
    """

    discrete = True

    def __init__(self, alphas_cumprod: Sequence[float] | torch.Tensor):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ac.numel() < 2 or not torch.all((ac > 0) & (ac <= 1)):
            raise ValueError("alphas_cumprod: need >= 2 values in (0, 1]")
        if not torch.all(ac[1:] <= ac[:-1]):
            raise ValueError("alphas_cumprod: must be non-increasing")
        self.alphas_cumprod = ac
        self._B = torch.cat([torch.zeros(1, dtype=torch.float64), -torch.log(ac)])  # knots at t = 0..N
        self.T = float(ac.numel())

    @classmethod
    def from_scheduler(cls, scheduler) -> "DiscreteVP":
        """From any diffusers scheduler with an ``alphas_cumprod`` buffer (DDPM, DDIM, PNDM, ...)."""
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(f"scheduler: {type(scheduler).__name__} has no alphas_cumprod; use a VP scheduler")
        return cls(scheduler.alphas_cumprod)

    @classmethod
    def cosine(cls, n_steps: int = 200, s: float = 0.008, max_beta: float = 0.999) -> "DiscreteVP":
        """The discrete cosine schedule (betas clipped at max_beta), as the gradient-guidance code uses."""
        k = torch.arange(n_steps + 1, dtype=torch.float64)
        f = torch.cos((k / n_steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = torch.clamp(1 - f[1:] / f[:-1], max=max_beta)
        return cls(torch.cumprod(1 - betas, 0))

    @classmethod
    def linear(cls, n_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "DiscreteVP":
        """DDPM's discrete linear schedule."""
        betas = torch.linspace(beta_start, beta_end, n_steps, dtype=torch.float64)
        return cls(torch.cumprod(1 - betas, 0))

    def integral(self, t):
        t = self._t(t)
        B = self._B.to(dtype=t.dtype, device=t.device)
        tc = torch.clamp(t, 0.0, self.T)
        k = torch.clamp(torch.floor(tc).long(), max=int(self.T) - 1)
        w = tc - k.to(t.dtype)
        return B[k] * (1 - w) + B[k + 1] * w

    def beta(self, t):
        t = self._t(t)
        B = self._B.to(dtype=t.dtype, device=t.device)
        k = torch.clamp(torch.ceil(torch.clamp(t, 0.0, self.T)).long() - 1, 0, int(self.T) - 1)
        return B[k + 1] - B[k]

    def model_timestep(self, t):
        return t - 1.0

    def step_times(self, n: int, spacing: str = "leading") -> torch.Tensor:
        """Continuous times of an n-step sampler that visits the model's discrete timesteps, descending,
        ending at t = 0 (data). ``spacing`` follows diffusers ('leading', 'trailing', 'linspace')."""
        N = int(self.T)
        if not 1 <= n <= N:
            raise ValueError(f"n: number of steps must be in [1, {N}], got {n}")
        if spacing == "leading":
            k = torch.arange(0, n) * (N // n)
        elif spacing == "trailing":
            k = torch.round(torch.arange(N, 0, -N / n)).long().flip(0) - 1
        elif spacing == "linspace":
            k = torch.round(torch.linspace(0, N - 1, n)).long()
        else:
            raise ValueError(f"spacing: unknown '{spacing}', use 'leading', 'trailing' or 'linspace'")
        t = (k.to(torch.float64) + 1.0).flip(0)
        return torch.cat([t, torch.zeros(1, dtype=torch.float64)])

    def __repr__(self):
        return f"DiscreteVP(N={int(self.T)})"
