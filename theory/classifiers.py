"""Classifiers for conditioning (docs/theory.md §6.4; CTRL section 4): a clean classifier p_phi(y | x0),
a time-dependent noisy classifier p_phi(y | x_t, t) for classifier guidance, maximum-likelihood training,
temperature scaling on a held-out split, and the expected calibration error.

    MLE:                 phi = argmin  - 1/N sum_i log softmax(f_phi(x_i))[y_i]
    noisy MLE:           x_t = alpha(t) x0 + sigma(t) eps,  t ~ U[t_min, T]  (same loss on (x_t, t))
    temperature scaling: T = argmin_T  - sum_{held out} log softmax(f(x) / T)[y]   (Guo et al. 2017)
    ECE:                 sum_bins |B_b|/N * |acc(B_b) - conf(B_b)|, equal-width confidence bins
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .guidance import check_labels
from .schedules import NoiseSchedule, append_dims, as_time

__all__ = [
    "ClassifierMLP",
    "NoisyClassifierMLP",
    "FitConfig",
    "fit_mle",
    "fit_temperature",
    "expected_calibration_error",
    "check_offline",
    "ClassifierReward",
]


def check_offline(x: torch.Tensor, y: torch.Tensor, n_classes: int, name: str = "offline set") -> None:
    """An offline (x, y) set must be paired, have labels in [0, n_classes) and contain every class."""
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: expected x (N, D) and y (N,) with the same N, got {tuple(x.shape)}, {tuple(y.shape)}")
    if y.numel() == 0:
        raise ValueError(f"{name}: is empty")
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise ValueError(f"{name}: labels must be in [0, {n_classes}), got values in [{int(y.min())}, {int(y.max())}]")
    counts = torch.bincount(y, minlength=n_classes)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"{name}: class(es) {missing} missing from the data (counts {counts.tolist()}); "
                         "draw a larger offline set or merge classes")


class _Time(nn.Module):
    def __init__(self, dim: int, T: float):
        super().__init__()
        self.T = float(T)
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(100.0), dim // 2)), persistent=False)

    def forward(self, t):
        u = (t / self.T)[:, None] * self.freqs[None].to(t.dtype)
        return torch.cat([torch.sin(u), torch.cos(u)], dim=-1)


class ClassifierMLP(nn.Module):
    """Clean classifier: logits f_phi(x) (B, n_classes), an MLP with SiLU; ``temperature`` (a buffer,
    1 until ``fit_temperature``) divides the logits: ``log_prob(x) = log_softmax(f(x) / T)``."""

    def __init__(self, dim: int, n_classes: int, hidden: int = 64, depth: int = 2):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes: need >= 2, got {n_classes}")
        self.dim, self.n_classes = dim, n_classes
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(self._in_dim() if i == 0 else hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, n_classes))
        self.net = nn.Sequential(*layers)
        self.register_buffer("temperature", torch.ones(()))

    def _in_dim(self) -> int:
        return self.dim

    def _check(self, x):
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x: classifier expects shape (B, {self.dim}), got {tuple(x.shape)}")

    def logits(self, x, t=None):
        self._check(x)
        return self.net(x.to(self.net[0].weight.dtype)).to(x.dtype)

    def forward(self, x, t=None):
        """Calibrated log-probabilities log softmax(f(x) / T), shape (B, n_classes)."""
        return torch.log_softmax(self.logits(x, t) / self.temperature.to(x.dtype), dim=-1)

    log_prob = forward

    def log_lik(self, x, y):
        """log p_phi(y | x), shape (B,) (the CTRL reward for gamma = 1)."""
        y = torch.as_tensor(y, device=x.device).long().reshape(-1)
        if y.numel() == 1:
            y = y.expand(x.shape[0])
        if y.shape != (x.shape[0],) or int(y.min()) < 0 or int(y.max()) >= self.n_classes:
            raise ValueError(f"y: expected ({x.shape[0]},) labels in [0, {self.n_classes}) (the classifier's "
                             f"classes), got {y.tolist()[:8]}")
        return self(x).gather(-1, y[:, None]).squeeze(-1)


class NoisyClassifierMLP(ClassifierMLP):
    """Time-dependent classifier f_phi(x_t, t) for classifier guidance: the MLP sees [x, features(t/T)]."""

    def __init__(self, dim: int, n_classes: int, hidden: int = 64, depth: int = 2, T: float = 1.0, time_dim: int = 16):
        self._time_dim = time_dim
        super().__init__(dim, n_classes, hidden, depth)
        self.time = _Time(time_dim, T)

    def _in_dim(self) -> int:
        return self.dim + self._time_dim

    def logits(self, x, t=None):
        self._check(x)
        if t is None:
            raise ValueError("t: the noisy classifier needs a time t (B,)")
        t = as_time(t, x)
        dt = self.net[0].weight.dtype
        return self.net(torch.cat([x.to(dt), self.time(t.to(dt))], -1)).to(x.dtype)

    def forward(self, x, t=None):
        return torch.log_softmax(self.logits(x, t) / self.temperature.to(x.dtype), dim=-1)

    log_prob = forward

    def log_lik(self, x, y, t=None):
        y = torch.as_tensor(y, device=x.device).long().reshape(-1)
        if y.numel() == 1:
            y = y.expand(x.shape[0])
        if y.shape != (x.shape[0],) or int(y.min()) < 0 or int(y.max()) >= self.n_classes:
            raise ValueError(f"y: labels must be in [0, {self.n_classes}) (the classifier's classes)")
        return self(x, t).gather(-1, y[:, None]).squeeze(-1)


@dataclass(frozen=True)
class FitConfig:
    """Full-batch-free Adam MLE. ``noisy``: train on x_t at t ~ U[t_min, T] (needs a schedule)."""

    steps: int = 1500
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-4
    t_min: float = 1e-3
    seed: int = 0


def fit_mle(clf: ClassifierMLP, x: torch.Tensor, y: torch.Tensor, config: FitConfig = FitConfig(),
            schedule: Optional[NoiseSchedule] = None) -> list[float]:
    """Maximum likelihood (cross-entropy) on (x, y) with Adam minibatches; for a ``NoisyClassifierMLP``
    each minibatch is noised, x_t = alpha x0 + sigma eps with t ~ U[t_min, T] (docs/theory.md §6.4). Returns losses."""
    check_offline(x, y, clf.n_classes)
    noisy = isinstance(clf, NoisyClassifierMLP)
    if noisy and schedule is None:
        raise ValueError("schedule: a noisy classifier is trained on x_t; pass the VP schedule")
    g = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    dt = clf.net[0].weight.dtype
    x = x.to(dt)
    opt = torch.optim.AdamW(clf.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    losses = []
    for _ in range(config.steps):
        idx = torch.randint(0, x.shape[0], (config.batch_size,), generator=g)  # minibatch with replacement
        xb, yb = x[idx], y[idx]
        if noisy:
            t = config.t_min + (schedule.T - config.t_min) * torch.rand(xb.shape[0], generator=g, dtype=dt)
            e = torch.randn(xb.shape, generator=g, dtype=dt)
            xb = append_dims(schedule.alpha(t).to(dt), xb) * xb + append_dims(schedule.sigma(t).to(dt), xb) * e
            logits = clf.logits(xb, t)
        else:
            logits = clf.logits(xb)
        loss = nn.functional.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    clf.eval()
    for p in clf.parameters():
        p.requires_grad_(False)
    return losses


T_MIN, T_MAX = 0.1, 100.0


def fit_temperature(clf: ClassifierMLP, x_val: torch.Tensor, y_val: torch.Tensor) -> float:
    """Temperature scaling (Guo et al. 2017; the CTRL authors' code): one T > 0 minimising the held-out
    negative log-likelihood of softmax(f(x)/T), by LBFGS on log T, clamped to [T_MIN, T_MAX]. Sets
    ``clf.temperature``; returns T."""
    check_offline(x_val, y_val, clf.n_classes, name="held-out set")
    with torch.no_grad():
        z = clf.logits(x_val.to(clf.net[0].weight.dtype)).double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z / log_t.exp(), y_val)
        loss.backward()
        return loss

    opt.step(closure)
    # a held-out set that the classifier gets entirely right has its NLL minimised at T -> 0 (and one it gets
    # entirely wrong at T -> inf): keep T in [T_MIN, T_MAX] so a tiny split cannot make the classifier a step
    T = min(max(float(log_t.detach().exp()), T_MIN), T_MAX)
    clf.temperature.fill_(T)
    return T


def expected_calibration_error(log_probs: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> float:
    """ECE = sum_b |B_b|/N |acc(B_b) - conf(B_b)| over equal-width bins of the top-class confidence
    (Guo et al. 2017, eq. 3)."""
    if log_probs.ndim != 2 or y.shape != (log_probs.shape[0],):
        raise ValueError(f"log_probs, y: expected (N, C) and (N,), got {tuple(log_probs.shape)}, {tuple(y.shape)}")
    p = log_probs.detach().exp()
    conf, pred = p.max(-1)
    correct = (pred == y).to(p.dtype)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=p.dtype)
    idx = torch.clamp(torch.bucketize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    N = p.shape[0]
    for b in range(n_bins):
        m = idx == b
        if m.any():
            ece += float(m.sum()) / N * abs(float(correct[m].mean()) - float(conf[m].mean()))
    return ece


class ClassifierReward:
    """CTRL's reward (CTRL sec. 4; docs/theory.md §6): r(x0, y) = sum_i log softmax(f_i(x0) / T_i)[y_i], the
    calibrated log-likelihood of the label(s) (a sum over conditionally independent conditions, cond (B, m)).

    ``classifiers``: one per condition, each a calibrated ``ClassifierMLP`` (its forward is
    log softmax(logits / temperature)) or any callable x -> (B, C) log-probabilities (e.g. an exact
    likelihood). ``clamp``: optional (lo, hi) applied to x0 first, e.g. the pixel range (-1, 1) as an image
    decoder clamps: a classifier extrapolated far off the data would otherwise reward leaving the range."""

    differentiable = True

    def __init__(self, *classifiers: Callable, clamp: Optional[tuple] = None):
        if not classifiers:
            raise ValueError("classifiers: give at least one classifier")
        if clamp is not None and not (len(clamp) == 2 and clamp[0] < clamp[1]):
            raise ValueError(f"clamp: give (lo, hi) with lo < hi, got {clamp}")
        self.log_probs = classifiers
        self.clamp = clamp

    def __call__(self, x0, cond):
        if cond is None:
            raise ValueError("cond: the CTRL reward needs the label of every sample")
        c = torch.as_tensor(cond, device=x0.device).long()
        if c.ndim == 1:
            c = c[:, None]
        if c.shape != (x0.shape[0], len(self.log_probs)):
            raise ValueError(f"cond: expected ({x0.shape[0]}, {len(self.log_probs)}) labels, got {tuple(c.shape)}")
        x = x0.clamp(*self.clamp) if self.clamp is not None else x0
        r = 0.0
        for i, lp in enumerate(self.log_probs):
            L = lp(x)
            yi = check_labels(c[:, i], L.shape[-1], x0.shape[0], name="cond")
            r = r + L.gather(-1, yi[:, None]).squeeze(-1).to(x0.dtype)
        return r
