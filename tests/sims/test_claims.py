"""Tests of sims.claims: the exact uniform-sphere score (docs/theory.md §2; closed form (S.2) of
sims.claims.sphere_exact) against an independent quadrature of the log-density and Monte Carlo Tweedie,
and small runs of both claims experiments and their figures' JSON round trip."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sims.claims import dimension as dim
from sims.claims.sphere_exact import UniformSphereEps, bessel_ratio, compare, log_density_quadrature, run_exact, verdict
from sims.gradguide.config import Setup, SphereConfig
from sims.gradguide.data import schedule_of
from theory.registry import to_jsonable

SCH = schedule_of(Setup(D=8))


@pytest.mark.parametrize("D", [2, 3, 8, 64])
@pytest.mark.parametrize("t", [3.0, 40.0, 120.0, 190.0])
def test_score_is_gradient_of_quadrature_log_density(D, t):
    """(S.2) against autograd of (S.1) evaluated by 400-node Gauss-Legendre quadrature (no Bessel function);
    both are float64, the quadrature converges geometrically here, so agreement to 1e-7 relative."""
    g = torch.Generator().manual_seed(D)
    x = torch.randn(6, D, dtype=torch.float64, generator=g) * 0.7
    xx = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(log_density_quadrature(xx, t, D, SCH).sum(), xx)
    score = UniformSphereEps(D, SCH).score(x, t)
    assert torch.allclose(score, grad, rtol=1e-7, atol=1e-7 * float(score.abs().max()))


def test_score_matches_finite_differences_of_quadrature():
    D, t = 5, 60.0
    x = torch.tensor([[0.3, -0.2, 0.5, 0.1, 0.4]], dtype=torch.float64)
    h = 1e-5
    fd = torch.stack([(log_density_quadrature(x + h * e, t, D, SCH) - log_density_quadrature(x - h * e, t, D, SCH))
                      / (2 * h) for e in torch.eye(D, dtype=torch.float64)], dim=-1)
    assert torch.allclose(UniformSphereEps(D, SCH).score(x, t), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("D,t", [(3, 50.0), (8, 100.0)])
def test_posterior_mean_matches_monte_carlo_tweedie(D, t):
    """x0_hat(x) = E[X_0 | X_t = x] by self-normalised importance sampling with X_0 ~ U(S^{D-1}) and weights
    N(x; alpha u, sigma^2 I); its standard error by the delta method. Within 5 SE per coordinate
    (a false alarm has probability < 1e-5 per coordinate)."""
    g = torch.Generator().manual_seed(1)
    model = UniformSphereEps(D, SCH)
    x = 0.6 * torch.randn(2, D, dtype=torch.float64, generator=g)
    u = model.sample(400_000, g)
    a, s2 = float(SCH.alpha(t)), float(SCH.sigma2(t))
    for i in range(x.shape[0]):
        logw = a * (u @ x[i]) / s2
        w = torch.exp(logw - logw.max())
        w = w / w.sum()
        est = (w[:, None] * u).sum(0)
        se = torch.sqrt(((w[:, None] * (u - est)) ** 2).sum(0))
        exact = model.posterior_mean(x[i:i + 1], t)[0]
        assert ((est - exact).abs() <= 5 * se + 1e-12).all(), (est, exact, se)


@settings(max_examples=40, deadline=None)
@given(D=st.integers(2, 300), kappa=st.floats(1e-9, 1e4))
def test_bessel_ratio_bounds_and_derivative(D, kappa):
    """Identities of A_D: 0 <= A_D < 1, A_D(kappa) ~ kappa / D as kappa -> 0, and the autograd derivative
    (the recurrence 1 - A^2 - (D - 1) A / kappa) equals a central difference of A_D."""
    k = torch.tensor([kappa], dtype=torch.float64, requires_grad=True)
    a = bessel_ratio(D, k)
    assert 0 <= float(a.detach()) < 1
    assert float(a.detach()) <= kappa / D * (1 + 1e-9) + 1e-300  # A_D(kappa) <= kappa / D (Amos bound, nu >= 0)
    (d,) = torch.autograd.grad(a.sum(), k)
    h = 1e-6 * max(kappa, 1e-3)
    lo = bessel_ratio(D, torch.tensor([max(kappa - h, 0.0)], dtype=torch.float64))
    hi = bessel_ratio(D, torch.tensor([kappa + h], dtype=torch.float64))
    fd = float(hi - lo) / (kappa + h - max(kappa - h, 0.0))
    assert math.isclose(float(d), fd, rel_tol=1e-4, abs_tol=1e-9)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="D:"):
        UniformSphereEps(1, SCH)
    with pytest.raises(ValueError, match="x:"):
        UniformSphereEps(4, SCH)(torch.zeros(2, 3, dtype=torch.float64), 10.0)
    with pytest.raises(ValueError, match="kappa:"):
        bessel_ratio(4, torch.tensor([-1.0]))


def test_exact_sphere_run_and_verdict():
    """A tiny sweep: the unguided exact-score samples lie close to the sphere (DDPM discretisation only),
    and guidance raises the reward at the larger delta."""
    cfg = SphereConfig(D=16, n=32, rounds=3, deltas=(0.05, 0.3), n_steps=20)
    res = run_exact(cfg)
    assert res["pretrained"]["dev_abs"] < 0.05
    c = compare(res["runs"], cfg.deltas)
    assert c["final"]["G"]["reward"][1] > res["pretrained"]["reward"] + 0.3
    v, words = verdict(c, cfg.deltas)
    assert v in ("holds", "does not hold") or v.startswith("holds only when")
    assert "delta 0.3" in words


def test_std_normal_eps_is_exact_and_dimension_run(tmp_path):
    """The pre-trained model of the dimension sweep is the exact eps sigma x of N(0, I); one small run of
    each method trains and reports finite rewards; the summary names every method and D."""
    cfg = replace(dim.quick(), dims=(2, 4), seeds=(0,), lrs=(3e-3,), budget=64, eval_every=32, n_eval=32,
                  n_steps=3, batch_size=16, hidden=16)
    model, sch = dim._model(cfg, 4, 0)
    x = torch.randn(3, 4)
    assert torch.allclose(model(x, torch.full((3,), 0.3)), sch.sigma(torch.tensor(0.3)).float() * x, atol=1e-7)
    res = dim.sweep(cfg)
    assert all(np.isfinite(r["reward"]).all() for r in res["runs"].values())
    s = dim.summarise(cfg, res)
    assert set(s["table"]) == {"DRaFT-1", "DRaFT-LV", "DDPO"} and set(s["ddpo_over_best_gradient"]) == {"2", "4"}
    json.dumps(to_jsonable(s))
