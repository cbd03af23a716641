"""Data of the CTRL toy: the 2-D mixture law (exact), its labels with known likelihoods, the pre-trained
models (exact eps and a cached EpsMLP), offline (x, y) sets, and exact targets on a grid.

    target for label y at strength gamma:  p_gamma(x | y) = p(y | x)^gamma p(x) / Z     (CTRL eq. 2)

normalised numerically on a ``grid_n`` x ``grid_n`` grid over [-L, L]^2 (docs/theory.md §5).
"""
from __future__ import annotations

import math
from dataclasses import asdict
from functools import lru_cache

import torch

from sims.grid2d import sample_target  # shared with sims.fig_theory
from theory.classifiers import check_offline
from theory.exact import GaussianMixture
from theory.nets import EpsMLP, cached, train_dsm
from theory.schedules import LinearVP
from theory.solvers import time_grid

from .configs import LABELS, ToyConfig

__all__ = ["schedule", "law", "grid_times", "TrueLabel", "true_label", "pretrained_mlp", "offline_set",
           "split", "exact_target", "sample_target", "check_gamma"]


def check_gamma(gamma: float) -> float:
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma: the guidance strength must be a finite number > 0, got {gamma!r}")
    return float(gamma)


def schedule(cfg: ToyConfig = ToyConfig()) -> LinearVP:
    """DDPM's linear VP schedule in continuous time on [0, 1] (alpha(1) ~ 0.0066: X_T nearly
    independent of X_0, so the initial-value bias of docs/theory.md §4 is negligible)."""
    return LinearVP(cfg.beta_min, cfg.beta_max, T=1.0)


def grid_times(cfg: ToyConfig = ToyConfig(), n_steps: int | None = None) -> torch.Tensor:
    return time_grid(schedule(cfg), cfg.n_steps if n_steps is None else n_steps, t_min=cfg.t_min)


def law(cfg: ToyConfig = ToyConfig()) -> GaussianMixture:
    """sum_k pi_k N(mu_k, s^2 I), mu_k = R (cos 2 pi k / K, sin 2 pi k / K); component k has label k."""
    K = cfg.n_modes
    if len(cfg.weights) != K:
        raise ValueError(f"weights: need {K} mixture weights (n_modes), got {len(cfg.weights)}")
    ang = torch.arange(K, dtype=torch.float64) * (2 * math.pi / K)
    means = cfg.radius * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    covs = cfg.mode_std**2 * torch.eye(2, dtype=torch.float64).expand(K, 2, 2).clone()
    return GaussianMixture(torch.tensor(cfg.weights, dtype=torch.float64), means, covs, schedule=schedule(cfg))


class TrueLabel:
    """A label with a known likelihood p(y | x) (x clean, float64).

    kind 'component': y = mixture component, p(y = k | x) = responsibility (so with gamma = 1 the target
    is component k exactly); 'soft': p(y = k | x) ∝ exp(-|x - mu_k|^2 / (2 s^2)) (multinomial logistic in
    x); 'halfplane': p(y = 1 | x) = sigmoid((n.x - c) / w), a second label conditionally independent of
    the first given x."""

    def __init__(self, kind: str, cfg: ToyConfig = ToyConfig()):
        if kind not in LABELS:
            raise ValueError(f"kind: unknown label {kind!r}, use one of {LABELS}")
        self.kind, self.cfg = kind, cfg
        self.law = law(cfg)
        self.n_classes = 2 if kind == "halfplane" else cfg.n_modes

    def log_prob(self, x: torch.Tensor, t=None) -> torch.Tensor:
        """log p(y = c | x), shape (B, n_classes). For 'component' a time t gives the exact NOISY
        classifier log p(y | X_t = x) (responsibilities under p_t)."""
        x = x.to(torch.float64)
        if self.kind == "component":
            return self.law.class_log_prob(x, 0.0 if t is None else t)
        if t is not None:
            raise ValueError(f"t: the exact noisy classifier is only known for the 'component' label, not {self.kind!r}")
        if self.kind == "soft":
            d2 = ((x[:, None, :] - self.law.means[None]) ** 2).sum(-1)
            return torch.log_softmax(-d2 / (2 * self.cfg.soft_scale**2), -1)
        n = torch.tensor(self.cfg.plane_normal, dtype=torch.float64)
        z = (x @ n - self.cfg.plane_offset) / self.cfg.plane_width
        return torch.stack([torch.nn.functional.logsigmoid(-z), torch.nn.functional.logsigmoid(z)], -1)

    def __call__(self, x, t=None):
        return self.log_prob(x, t)

    def sample(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """y ~ p(y | x), shape (B,)."""
        return torch.multinomial(self.log_prob(x).exp(), 1, generator=generator).squeeze(-1)


def true_label(kind: str, cfg: ToyConfig = ToyConfig()) -> TrueLabel:
    return TrueLabel(kind, cfg)


def pretrained_mlp(cfg: ToyConfig = ToyConfig()) -> EpsMLP:
    """The pre-trained model: an EpsMLP fitted by denoising score matching to fresh samples of the law
    (a large unlabelled data set), cached as safetensors; frozen, float32."""
    lw, sch = law(cfg), schedule(cfg)

    def build():
        return EpsMLP(2, hidden=cfg.hidden, depth=cfg.depth, T=1.0)

    def train(model):
        train_dsm(model, sch, lambda n, g: (lw.sample(n, generator=g).float(), None), cfg.dsm)

    key = dict(law=[cfg.n_modes, cfg.radius, cfg.mode_std, list(cfg.weights)], hidden=cfg.hidden, depth=cfg.depth,
               beta=[cfg.beta_min, cfg.beta_max], dsm=asdict(cfg.dsm))
    model = cached("ctrl_toy_eps", key, build, train)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def offline_set(kind: str, n: int, seed: int = 0, cfg: ToyConfig = ToyConfig()):
    """n offline pairs (x, y): x ~ p(x), y ~ p(y | x) (for 'component', y is the component that drew x).
    float32 x, long y. Raises if a class is missing (ask for more pairs)."""
    if n < 2:
        raise ValueError(f"n: an offline set needs >= 2 pairs, got {n}")
    g = torch.Generator().manual_seed(10_000 + seed)
    lab = TrueLabel(kind, cfg)
    x, k = lab.law.sample(n, generator=g, return_components=True)
    y = k if kind == "component" else lab.sample(x, g)
    check_offline(x, y, lab.n_classes)
    return x.float(), y


def split(x, y, val_frac: float, n_classes: int, seed: int = 0):
    """Train / held-out split (stratified: every class keeps >= 1 pair on each side when it has >= 2)."""
    if not 0 < val_frac < 1:
        raise ValueError(f"val_frac: need 0 < val_frac < 1, got {val_frac}")
    g = torch.Generator().manual_seed(20_000 + seed)
    tr, va = [], []
    for c in range(n_classes):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        nv = int(round(val_frac * idx.numel()))
        nv = min(max(nv, 1), idx.numel() - 1) if idx.numel() >= 2 else 0
        va.append(idx[:nv])
        tr.append(idx[nv:])
    tr, va = torch.cat(tr), torch.cat(va)
    return (x[tr], y[tr]), (x[va], y[va])


@lru_cache(maxsize=64)
def _grid(cfg: ToyConfig):
    u = torch.linspace(-cfg.grid_lim, cfg.grid_lim, cfg.grid_n, dtype=torch.float64)
    X, Y = torch.meshgrid(u, u, indexing="xy")
    pts = torch.stack([X.flatten(), Y.flatten()], 1)
    logp = law(cfg).log_prob(pts, 0.0)
    return u, pts, logp


def exact_target(label_log_prob, gamma: float, cfg: ToyConfig = ToyConfig()):
    """Exact p_gamma(x | y) ∝ p(y | x)^gamma p(x) on the grid: ``label_log_prob(pts) -> (P,)`` is
    log p(y | x) (a sum of several for conditionally independent labels). Returns (axis u (n,),
    density (n, n) indexed [iy, ix], normalised so that sum * du^2 = 1)."""
    gamma = check_gamma(gamma)
    u, pts, logp = _grid(cfg)
    lt = logp + gamma * label_log_prob(pts)
    du = float(u[1] - u[0])
    w = torch.softmax(lt, 0) / du**2
    return u, w.reshape(cfg.grid_n, cfg.grid_n)
