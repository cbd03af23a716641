"""Data, schedule and pre-trained models of the gradient-guidance experiments (docs/theory.md §7).

- subspace data x = A z, z ~ N(0, I_d), A = first d columns of a random orthogonal matrix;
- unit-sphere data x = xi / |xi|, xi ~ N(0, I_D);
- the pre-trained model as the exact subspace score (theory.exact.subspace_gaussian) or as an EpsMLP
  trained by denoising score matching and cached (theory.nets.cached, outside git).
"""
from __future__ import annotations

import functools

import torch

from theory.exact import random_orthonormal, subspace_gaussian
from theory.nets import DSMConfig, EpsMLP, cached, dsm_loss, train_dsm
from theory.schedules import DiscreteVP

from .config import NetConfig, Setup
from .objectives import Distance, Quadratic, b_ones, b_random, theta_in_span, theta_off_span

__all__ = ["schedule_of", "basis", "exact_model", "subspace_data", "sphere_data", "trained_model",
           "objective", "dsm_eval", "pretrained"]


def schedule_of(setup: Setup) -> DiscreteVP:
    """The paper's discrete DDPM schedule: cosine (s = 0.008, betas clipped at 0.999) or linear, T steps."""
    if setup.schedule == "cosine":
        return DiscreteVP.cosine(setup.n_timesteps)
    if setup.schedule == "linear":
        return DiscreteVP.linear(setup.n_timesteps, 1e-4, 0.02 * 1000 / setup.n_timesteps)
    raise ValueError(f"schedule: unknown {setup.schedule!r}, use 'cosine' or 'linear'")


def basis(setup: Setup) -> torch.Tensor:
    """A (D x d, orthonormal columns), reproducible from ``setup.data_seed``."""
    return random_orthonormal(setup.D, setup.d, torch.Generator().manual_seed(setup.data_seed))


def exact_model(setup: Setup):
    """The exact eps of N(0, A A^T) under the schedule (float64)."""
    return subspace_gaussian(basis(setup), schedule_of(setup))


def subspace_data(setup: Setup, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, setup.d, dtype=torch.float64, generator=g) @ basis(setup).T


def sphere_data(D: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xi = torch.randn(n, D, dtype=torch.float64, generator=g)
    return xi / xi.norm(dim=-1, keepdim=True)


def _train_data(setup: Setup, net: NetConfig) -> torch.Tensor:
    if net.data == "subspace":
        return subspace_data(setup, net.n_data, net.seed + 1).float()
    if net.data == "sphere":
        return sphere_data(setup.D, net.n_data, net.seed + 1).float()
    raise ValueError(f"data: unknown {net.data!r}, use 'subspace' or 'sphere'")


@functools.lru_cache(maxsize=None)
def trained_model(setup: Setup, net: NetConfig) -> EpsMLP:
    """An EpsMLP trained by DSM on the data (float32, t ~ U[1, T] in the schedule's steps), cached as
    safetensors under $DIFFSTEER_CACHE keyed by (setup, net); reproducible from ``net.seed``."""
    sch = schedule_of(setup)
    cfg = DSMConfig(steps=net.steps, batch_size=net.batch_size, lr=net.lr, t_min=1.0, seed=net.seed)
    key = {"setup": repr(setup), "net": repr(net), "dsm": repr(cfg), "v": 1}

    def build():
        torch.manual_seed(net.seed)
        return EpsMLP(setup.D, hidden=net.hidden, depth=net.depth, T=float(sch.T))

    def train(model):
        train_dsm(model, sch, _train_data(setup, net), cfg)

    model = cached(f"gradguide-{net.data}", key, build, train)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def pretrained(kind: str, setup: Setup, net: NetConfig):
    if kind == "exact":
        return exact_model(setup)
    if kind == "trained":
        return trained_model(setup, net)
    raise ValueError(f"model: unknown {kind!r}, use 'exact' or 'trained'")


def dsm_eval(model, setup: Setup, data: torch.Tensor, seed: int = 7) -> float:
    """Denoising score-matching loss on held-out data (same t and noise for every model compared)."""
    sch = schedule_of(setup)
    g = torch.Generator().manual_seed(seed)
    dtype = next(iter(list(model.parameters()) + list(model.buffers()))).dtype
    x = data.to(dtype)
    t = 1.0 + (sch.T - 1.0) * torch.rand(x.shape[0], generator=g, dtype=dtype)
    with torch.no_grad():
        return float(dsm_loss(model, sch, x, t, None, g))


def objective(name: str, setup: Setup):
    """f1 (theta_1 in span, theta_2 with off/in-span ratio 9) or f2 (b_1 = 4 ones, b_2 ~ N(4, 9 I)); the
    random directions come from ``setup.data_seed`` so that every seed optimises the same objective."""
    A = basis(setup)
    g = torch.Generator().manual_seed(setup.data_seed + 100)
    if name == "f1_theta1":
        return Quadratic(theta_in_span(A, g))
    if name == "f1_theta2":
        return Quadratic(theta_off_span(A, 9.0, g))
    if name == "f2_b1":
        return Distance(b_ones(setup.D))
    if name == "f2_b2":
        return Distance(b_random(setup.D, g))
    raise ValueError(f"objective: unknown {name!r}, use 'f1_theta1', 'f1_theta2', 'f2_b1' or 'f2_b2'")
