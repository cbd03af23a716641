"""Exact models: Gaussian mixtures (Gaussian, subspace and labelled cases included) in closed form
(docs/theory.md §5), and rewards whose Gaussian integrals are closed form (§4).

One class, ``GaussianMixture``, covers every exact model of the package:

    X_0 ~ sum_k pi_k N(mu_k, S_k)      (S_k may be singular: subspace data x = A z has S = A A^T)
    p_t  = sum_k pi_k N(alpha mu_k, alpha^2 S_k + sigma^2 I)
    X_0 | X_t = x ~ sum_k w_k(x) N(m_k(x), C_k)          w_k = responsibilities under p_t
        m_k = mu_k + alpha S_k (alpha^2 S_k + sigma^2 I)^-1 (x - alpha mu_k),
        C_k = S_k - alpha^2 S_k (alpha^2 S_k + sigma^2 I)^-1 S_k        (valid for singular S_k)

Each S_k is eigendecomposed once, S_k = U diag(l) U^T, so every quantity above is diagonal in U and
costs O(D^2) per sample whatever t is. The model is an eps model (``forward(x, t, cond)``), so every
algorithm of the package runs against it and can be compared with the exact answer.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .schedules import NoiseSchedule, append_dims, as_time

__all__ = [
    "GaussianMixture",
    "gaussian",
    "subspace_gaussian",
    "random_orthonormal",
    "LinearReward",
    "QuadraticReward",
    "Reward",
]

LOG2PI = math.log(2 * math.pi)


def _check_psd(covs: torch.Tensor, name: str = "covs") -> None:
    if not torch.allclose(covs, covs.transpose(-1, -2), atol=1e-8 * max(1.0, float(covs.abs().max()))):
        raise ValueError(f"{name}: covariance matrices must be symmetric")
    ev = torch.linalg.eigvalsh(covs)
    scale = max(1.0, float(ev.abs().max()))
    if (ev < -1e-8 * scale).any():
        raise ValueError(
            f"{name}: covariance is not positive semi-definite (smallest eigenvalue {float(ev.min()):.3g}); "
            "pass a symmetric PSD matrix, e.g. L @ L.T"
        )


class GaussianMixture(nn.Module):
    """An exact mixture-of-Gaussians data law, usable as an eps model once it has a schedule.

    Args:
        weights: (K,) mixture weights pi_k (normalised here).
        means: (K, D) component means.
        covs: (K, D, D) symmetric PSD covariances (singular allowed).
        schedule: the VP schedule that makes it an eps model (``with_schedule`` sets it later).
        labels: (K,) class of each component for the labelled mixture; default: component k has label k.
            ``p(y = c | x_t)`` sums the responsibilities of the components labelled c.
    """

    def __init__(self, weights, means, covs, schedule: Optional[NoiseSchedule] = None, labels=None,
                 dtype=torch.float64):
        super().__init__()
        weights = torch.as_tensor(weights, dtype=dtype)
        means = torch.as_tensor(means, dtype=dtype)
        covs = torch.as_tensor(covs, dtype=dtype)
        if means.ndim != 2:
            raise ValueError(f"means: expected shape (K, D), got {tuple(means.shape)}")
        K, D = means.shape
        if weights.shape != (K,):
            raise ValueError(f"weights: expected shape ({K},) to match means (K={K}), got {tuple(weights.shape)}")
        if covs.shape != (K, D, D):
            raise ValueError(f"covs: expected shape ({K}, {D}, {D}) to match means, got {tuple(covs.shape)}")
        if (weights < 0).any() or float(weights.sum()) <= 0:
            raise ValueError("weights: must be non-negative with a positive sum")
        _check_psd(covs)
        labels = torch.arange(K) if labels is None else torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (K,) or (labels < 0).any():
            raise ValueError(f"labels: expected ({K},) non-negative class indices, got {labels}")
        self.register_buffer("log_pi", torch.log(weights / weights.sum()))
        self.register_buffer("means", means)
        self.register_buffer("covs", covs)
        lam, U = torch.linalg.eigh(covs)
        self.register_buffer("eig", torch.clamp(lam, min=0.0))  # (K, D)
        self.register_buffer("U", U)  # (K, D, D)
        self.register_buffer("labels", labels)
        self.schedule = schedule

    # ------------------------------------------------------------------ basics
    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def n_classes(self) -> int:
        return int(self.labels.max()) + 1

    @property
    def weights(self) -> torch.Tensor:
        return self.log_pi.exp()

    def with_schedule(self, schedule: NoiseSchedule) -> "GaussianMixture":
        self.schedule = schedule
        return self

    def _need_schedule(self) -> NoiseSchedule:
        if self.schedule is None:
            raise ValueError("schedule: this exact model has none; call .with_schedule(schedule) first")
        return self.schedule

    def _check_x(self, x: torch.Tensor, name: str = "x") -> None:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{name}: expected shape (B, {self.dim}), got {tuple(x.shape)}")

    def sample(self, n: int, generator: Optional[torch.Generator] = None, component: Optional[int] = None,
               return_components: bool = False):
        """n samples of X_0 (and their component indices). ``component`` fixes the component."""
        if component is None:
            k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:
            k = torch.full((n,), int(component), dtype=torch.long)
        z = torch.randn(n, self.dim, dtype=self.means.dtype, generator=generator)
        # x = mu + U sqrt(l) z
        x = self.means[k] + torch.einsum("nij,nj->ni", self.U[k], self.eig[k].sqrt() * z)
        return (x, k) if return_components else x

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of the whole mixture at t = 0."""
        w = self.weights
        mu = w @ self.means
        d = self.means - mu
        cov = torch.einsum("k,kij->ij", w, self.covs) + torch.einsum("k,ki,kj->ij", w, d, d)
        return mu, cov

    # ------------------------------------------------------------------ marginals p_t
    def _coeffs(self, x: torch.Tensor, t):
        s = self._need_schedule()
        t = as_time(t, x)
        a = s.alpha(t).to(x.dtype)
        s2 = s.sigma2(t).to(x.dtype)
        return t, a, s2

    def component_log_prob(self, x: torch.Tensor, t) -> torch.Tensor:
        """log pi_k + log N(x; alpha mu_k, alpha^2 S_k + sigma^2 I), shape (B, K)."""
        self._check_x(x)
        _, a, s2 = self._coeffs(x, t)
        var = a[:, None, None] ** 2 * self.eig[None].to(x.dtype) + s2[:, None, None]  # (B, K, D)
        r = x[:, None, :] - a[:, None, None] * self.means[None].to(x.dtype)  # (B, K, D)
        proj = torch.einsum("kji,bkj->bki", self.U.to(x.dtype), r)  # U^T r
        quad = (proj**2 / var).sum(-1)
        logdet = torch.log(var).sum(-1)
        return self.log_pi.to(x.dtype) - 0.5 * (quad + logdet + self.dim * LOG2PI)

    def log_prob(self, x: torch.Tensor, t) -> torch.Tensor:
        """log p_t(x), shape (B,)."""
        return torch.logsumexp(self.component_log_prob(x, t), dim=-1)

    def responsibilities(self, x: torch.Tensor, t) -> torch.Tensor:
        """w_k(x) = P(component k | X_t = x), shape (B, K)."""
        return torch.softmax(self.component_log_prob(x, t), dim=-1)

    def class_log_prob(self, x: torch.Tensor, t) -> torch.Tensor:
        """The exact noisy classifier log p(y = c | X_t = x), shape (B, n_classes) (docs/theory.md §5)."""
        lp = torch.log_softmax(self.component_log_prob(x, t), dim=-1)
        out = []
        for c in range(self.n_classes):
            m = self.labels == c
            out.append(torch.logsumexp(lp[:, m], dim=-1) if m.any() else torch.full_like(lp[:, 0], -math.inf))
        return torch.stack(out, dim=-1)

    def score(self, x: torch.Tensor, t, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """grad_x log p_t(x) (or of p_t(x | y = cond) for a label per sample), shape (B, D).

        Mixture score by responsibilities: sum_k w_k(x) (alpha^2 S_k + sigma^2 I)^-1 (alpha mu_k - x).
        """
        self._check_x(x)
        _, a, s2 = self._coeffs(x, t)
        clp = self.component_log_prob(x, t)
        if cond is not None:
            cond = torch.as_tensor(cond, device=x.device).long().reshape(-1)
            if cond.shape != (x.shape[0],):
                raise ValueError(f"cond: expected one label per sample, shape ({x.shape[0]},), got {tuple(cond.shape)}")
            if (cond >= self.n_classes).any():
                raise ValueError(f"cond: labels must be < n_classes={self.n_classes} (use -1 for unconditional)")
            keep = (self.labels[None, :] == cond[:, None]) | (cond[:, None] < 0)
            clp = torch.where(keep, clp, torch.full_like(clp, -math.inf))
        w = torch.softmax(clp, dim=-1)  # (B, K)
        var = a[:, None, None] ** 2 * self.eig[None].to(x.dtype) + s2[:, None, None]
        U = self.U.to(x.dtype)
        r = a[:, None, None] * self.means[None].to(x.dtype) - x[:, None, :]
        proj = torch.einsum("kji,bkj->bki", U, r) / var
        comp = torch.einsum("kij,bkj->bki", U, proj)  # (B, K, D)
        return (w[..., None] * comp).sum(1)

    def forward(self, x: torch.Tensor, t, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The exact eps: eps(x, t) = -sigma(t) score(x, t) (docs/theory.md §2)."""
        _, _, s2 = self._coeffs(x, t)
        return -append_dims(s2.sqrt(), x) * self.score(x, t, cond)

    # ------------------------------------------------------------------ posterior X_0 | X_t
    def posterior(self, x: torch.Tensor, t):
        """Posterior X_0 | X_t = x: (log weights (B, K), means (B, K, D), covs (B, K, D, D))."""
        self._check_x(x)
        _, a, s2 = self._coeffs(x, t)
        lam = self.eig[None].to(x.dtype)  # (1, K, D)
        var = a[:, None, None] ** 2 * lam + s2[:, None, None]
        U = self.U.to(x.dtype)
        mu = self.means[None].to(x.dtype)
        r = x[:, None, :] - a[:, None, None] * mu
        gain = a[:, None, None] * lam / var  # m_k = mu_k + U diag(alpha l / var) U^T r
        m = mu + torch.einsum("kij,bkj->bki", U, gain * torch.einsum("kji,bkj->bki", U, r))
        cdiag = lam * s2[:, None, None] / var  # C_k = U diag(l sigma^2 / var) U^T
        C = torch.einsum("kij,bkj,klj->bkil", U, cdiag, U)
        logw = torch.log_softmax(self.component_log_prob(x, t), dim=-1)
        return logw, m, C

    def posterior_mean(self, x: torch.Tensor, t) -> torch.Tensor:
        """E[X_0 | X_t = x] (equals Tweedie's x0_hat of the exact eps)."""
        logw, m, _ = self.posterior(x, t)
        return (logw.exp()[..., None] * m).sum(1)

    # ------------------------------------------------------------------ rewards: values and tilts
    def log_h(self, x: torch.Tensor, t, reward: "Reward", lam: float) -> torch.Tensor:
        """Closed-form log h_t(x) = log E[exp(r(X_0)/lam) | X_t = x] (docs/theory.md §4-§5), shape (B,).

        The posterior is a Gaussian mixture and r is linear or quadratic, so
        h_t(x) = sum_k w_k(x) E_{N(m_k, C_k)}[exp(r/lam)], each term a Gaussian integral.
        """
        logw, m, C = self.posterior(x, t)
        return torch.logsumexp(logw + reward.log_mgf(m, C, lam), dim=-1)

    def value(self, x: torch.Tensor, t, reward: "Reward", lam: float) -> torch.Tensor:
        """v_t(x) = lam log h_t(x) (docs/theory.md §4)."""
        return lam * self.log_h(x, t, reward, lam)

    def tilted(self, reward: "Reward", lam: float) -> "GaussianMixture":
        """The tilted law p*(x0) ∝ p_0(x0) exp(r(x0)/lam) in closed form (docs/theory.md §4-§5): each component
        is tilted in closed form and reweighted by its normaliser, pi_k Z_k."""
        if lam <= 0:
            raise ValueError(f"lam: the KL weight must be > 0, got {lam}")
        m, C, logZ = reward.tilt(self.means, self.covs, lam)
        C = 0.5 * (C + C.transpose(-1, -2))
        out = GaussianMixture(torch.softmax(self.log_pi + logZ, 0), m, C, schedule=self.schedule,
                              labels=self.labels, dtype=self.means.dtype)
        return out

    def log_normaliser(self, reward: "Reward", lam: float) -> torch.Tensor:
        """log Z = log E_{p_0}[exp(r/lam)]."""
        return torch.logsumexp(self.log_pi + reward.log_mgf(self.means, self.covs, lam), 0)

    def conditional(self, label: int) -> "GaussianMixture":
        """The law of X_0 given y = label (the components with that label, renormalised)."""
        m = self.labels == int(label)
        if not m.any():
            raise ValueError(f"label: no component has label {label} (n_classes={self.n_classes})")
        return GaussianMixture(self.log_pi[m].exp(), self.means[m], self.covs[m], schedule=self.schedule,
                               labels=torch.zeros(int(m.sum()), dtype=torch.long), dtype=self.means.dtype)


def gaussian(mu, S, schedule: Optional[NoiseSchedule] = None, dtype=torch.float64) -> GaussianMixture:
    """Gaussian data N(mu, S) (S may be singular) as a one-component exact model."""
    mu = torch.as_tensor(mu, dtype=dtype)
    S = torch.as_tensor(S, dtype=dtype)
    if mu.ndim != 1 or S.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"S: expected shape ({mu.shape[0]}, {mu.shape[0]}) to match mu, got {tuple(S.shape)}")
    return GaussianMixture(torch.ones(1), mu[None], S[None], schedule=schedule, dtype=dtype)


def random_orthonormal(D: int, d: int, generator: Optional[torch.Generator] = None, dtype=torch.float64):
    """The first d columns of a random orthogonal D x D matrix (QR of a Gaussian matrix)."""
    if not 1 <= d <= D:
        raise ValueError(f"d: need 1 <= d <= D, got d={d}, D={D}")
    Q, R = torch.linalg.qr(torch.randn(D, d, generator=generator, dtype=dtype))
    return Q * torch.sign(torch.diagonal(R))[None, :]


def subspace_gaussian(A, schedule: Optional[NoiseSchedule] = None, dtype=torch.float64) -> GaussianMixture:
    """Subspace data X_0 = A z, z ~ N(0, I_d), A with orthonormal columns (docs/theory.md §5): N(0, A A^T)."""
    A = torch.as_tensor(A, dtype=dtype)
    if A.ndim != 2 or A.shape[1] > A.shape[0]:
        raise ValueError(f"A: expected a D x d matrix with d <= D, got {tuple(A.shape)}")
    if not torch.allclose(A.T @ A, torch.eye(A.shape[1], dtype=dtype), atol=1e-6):
        raise ValueError("A: columns must be orthonormal (use random_orthonormal or a QR factor)")
    model = gaussian(torch.zeros(A.shape[0], dtype=dtype), A @ A.T, schedule=schedule, dtype=dtype)
    model.register_buffer("A", A)
    return model


# ---------------------------------------------------------------------- rewards


class Reward:
    """A reward r(x0, cond) -> (B,). ``differentiable`` says whether autograd gradients are meaningful."""

    differentiable: bool = True

    def __call__(self, x0: torch.Tensor, cond=None) -> torch.Tensor:
        raise NotImplementedError

    def log_mgf(self, mean: torch.Tensor, cov: torch.Tensor, lam: float) -> torch.Tensor:
        """log E_{N(mean, cov)}[exp(r(X)/lam)] over batched (..., D) means and (..., D, D) covs."""
        raise NotImplementedError

    def tilt(self, mean: torch.Tensor, cov: torch.Tensor, lam: float):
        """Mean, covariance and log normaliser of N(mean, cov) tilted by exp(r/lam)."""
        raise NotImplementedError


class LinearReward(Reward):
    """r(x) = b . x (docs/theory.md §5): log E exp(r/lam) = b.m/lam + b.C b/(2 lam^2); tilt: mean + C b / lam."""

    def __init__(self, b):
        self.b = torch.as_tensor(b, dtype=torch.float64)
        if self.b.ndim != 1:
            raise ValueError(f"b: expected a vector, got shape {tuple(self.b.shape)}")

    def _b(self, x):
        if x.shape[-1] != self.b.shape[0]:
            raise ValueError(f"x: reward has dimension {self.b.shape[0]}, samples have {x.shape[-1]}")
        return self.b.to(dtype=x.dtype, device=x.device)

    def __call__(self, x0, cond=None):
        return x0 @ self._b(x0)

    def log_mgf(self, mean, cov, lam):
        b = self._b(mean)
        return mean @ b / lam + torch.einsum("i,...ij,j->...", b, cov, b) / (2 * lam**2)

    def tilt(self, mean, cov, lam):
        b = self._b(mean)
        return mean + cov @ b / lam, cov, self.log_mgf(mean, cov, lam)


class QuadraticReward(Reward):
    """r(x) = -1/2 (x - m).Q (x - m), Q symmetric PSD (docs/theory.md §5).

    With P = Q / lam, for N(mu, S): tilted covariance (S^-1 + P)^-1 = (I + S P)^-1 S, mean
    mu + S' P (m - mu), log normaliser -1/2 log det(I + S P) - 1/2 (m - mu).P (I + S P)^-1 (m - mu);
    every form is valid for singular S and singular Q.
    """

    def __init__(self, Q, m):
        self.Q = torch.as_tensor(Q, dtype=torch.float64)
        self.m = torch.as_tensor(m, dtype=torch.float64)
        D = self.m.shape[0]
        if self.m.ndim != 1 or self.Q.shape != (D, D):
            raise ValueError(f"Q: expected shape ({D}, {D}) to match m, got {tuple(self.Q.shape)}")
        _check_psd(self.Q[None], "Q")

    def _qm(self, x):
        if x.shape[-1] != self.m.shape[0]:
            raise ValueError(f"x: reward has dimension {self.m.shape[0]}, samples have {x.shape[-1]}")
        return self.Q.to(dtype=x.dtype, device=x.device), self.m.to(dtype=x.dtype, device=x.device)

    def __call__(self, x0, cond=None):
        Q, m = self._qm(x0)
        d = x0 - m
        return -0.5 * torch.einsum("bi,ij,bj->b", d, Q, d)

    def tilt(self, mean, cov, lam):
        Q, m = self._qm(mean)
        P = Q / lam
        eye = torch.eye(mean.shape[-1], dtype=mean.dtype, device=mean.device)
        M = eye + cov @ P  # I + S P
        cov_t = torch.linalg.solve(M, cov)  # (I + S P)^-1 S
        d = (m - mean).unsqueeze(-1)
        mean_t = mean + (cov_t @ P @ d).squeeze(-1)
        quad = (d.transpose(-1, -2) @ P @ torch.linalg.solve(M, d)).squeeze(-1).squeeze(-1)
        logZ = -0.5 * torch.linalg.slogdet(M)[1] - 0.5 * quad
        return mean_t, cov_t, logZ

    def log_mgf(self, mean, cov, lam):
        return self.tilt(mean, cov, lam)[2]
