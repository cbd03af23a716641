"""The pre-trained model of the DRaFT toy: an ``EpsMLP`` fitted by denoising score matching to a ring of
eight Gaussians in 2-D, cached as safetensors (``theory.nets.cached``), sampled with 50 DDIM steps.

The data law is exact (``theory.exact.GaussianMixture``), so the pre-trained samples can be checked
against it and mode coverage measured by nearest component.
"""
from __future__ import annotations

import math
from dataclasses import asdict

import torch

from theory.exact import GaussianMixture
from theory.nets import EpsMLP, cached, train_dsm
from theory.schedules import LinearVP
from theory.solvers import time_grid

from .configs import PretrainConfig

__all__ = ["data_law", "schedule", "grid", "pretrained"]


def data_law(cfg: PretrainConfig = PretrainConfig()) -> GaussianMixture:
    """Ring of ``n_modes`` equal-weight isotropic Gaussians: mean_k = R (cos 2 pi k/K, sin 2 pi k/K),
    covariance std^2 I (float64, exact)."""
    if cfg.n_modes < 2:
        raise ValueError(f"n_modes: need >= 2 for a multi-modal law, got {cfg.n_modes}")
    ang = torch.arange(cfg.n_modes, dtype=torch.float64) * (2 * math.pi / cfg.n_modes)
    means = cfg.radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
    covs = (cfg.mode_std**2) * torch.eye(2, dtype=torch.float64).expand(cfg.n_modes, 2, 2).clone()
    return GaussianMixture(torch.ones(cfg.n_modes), means, covs, schedule=schedule(cfg))


def schedule(cfg: PretrainConfig = PretrainConfig()) -> LinearVP:
    """The VP schedule of the pre-trained model (DDPM's linear beta, continuous time on [0, 1])."""
    return LinearVP(cfg.beta_min, cfg.beta_max, T=1.0)


def grid(cfg: PretrainConfig = PretrainConfig(), n_steps: int | None = None) -> torch.Tensor:
    """The sampling grid: ``n_steps`` (default cfg.n_steps = 50) uniform DDIM steps from T to t_min."""
    return time_grid(schedule(cfg), cfg.n_steps if n_steps is None else n_steps, t_min=cfg.t_min)


def pretrained(cfg: PretrainConfig = PretrainConfig()) -> EpsMLP:
    """The trained, frozen eps MLP (float32, eval mode), trained once and then loaded from the cache."""
    law = data_law(cfg)
    sch = schedule(cfg)

    def build():
        return EpsMLP(2, hidden=cfg.hidden, depth=cfg.depth, T=1.0)

    def train(model):
        def draw(n, g):
            return law.sample(n, generator=g).float(), None

        torch.manual_seed(cfg.dsm.seed)
        train_dsm(model, sch, draw, cfg.dsm)

    key = {k: v for k, v in asdict(cfg).items() if k not in ("n_steps", "t_min")}  # sampling-only fields
    model = cached("draft_toy_eps", key, build, train)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
