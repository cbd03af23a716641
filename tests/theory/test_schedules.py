"""Schedules and parameterisations (docs/theory.md §1-2): alpha, sigma, beta consistent with each other;
eps / score / x0_hat conversions inverse to each other."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from theory.param import eps_to_score, eps_to_x0, score_to_eps, x0_to_eps
from theory.schedules import ConstantBeta, CosineVP, DiscreteVP, LinearVP

SET = settings(max_examples=15, deadline=None)


def _schedules():
    return st.one_of(
        st.builds(ConstantBeta, st.floats(0.2, 3.0), st.floats(1.0, 10.0)),
        st.builds(LinearVP, st.floats(0.05, 1.0), st.floats(2.0, 25.0), st.floats(0.5, 2.0)),
        st.builds(CosineVP, st.floats(0.001, 0.05), st.floats(0.5, 2.0)),
    )


@SET
@given(_schedules(), st.floats(0.01, 0.95))
def test_beta_is_minus_twice_dlogalpha(schedule, u):
    """beta(t) = -2 d/dt log alpha(t) (docs/theory.md §1), derivative by autograd; alpha^2 + sigma^2 = 1."""
    t = torch.tensor(u * schedule.T, dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad(schedule.log_alpha(t), t)
    assert float(-2 * d) == pytest.approx(float(schedule.beta(t.detach())), rel=1e-10)
    tt = t.detach()
    assert float(schedule.alpha(tt) ** 2 + schedule.sigma2(tt)) == pytest.approx(1.0, abs=1e-14)


def test_named_schedules_match_their_closed_forms():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    ou = ConstantBeta(1.0, T=1.0)
    assert torch.allclose(ou.alpha(t), torch.exp(-t / 2))
    assert torch.allclose(ou.sigma2(t), 1 - torch.exp(-t))
    lin = LinearVP(0.1, 20.0)
    assert torch.allclose(lin.alpha(t) ** 2, torch.exp(-(0.1 * t + 19.9 * t**2 / 2)))
    cos = CosineVP()
    f = lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    tt = t[:-1]  # alpha_bar(T) = 0 is capped
    assert torch.allclose(cos.alpha(tt) ** 2, f(tt) / f(torch.zeros(1, dtype=torch.float64)), rtol=1e-9)


def test_discrete_schedule_hits_alphas_cumprod_and_beta_is_its_rate():
    """DiscreteVP: alpha(k + 1)^2 = alphas_cumprod[k]; beta piecewise constant = -log(1 - betas[k])."""
    d = DiscreteVP.linear(50)
    k = torch.arange(50)
    assert torch.allclose(d.alpha(k.double() + 1) ** 2, d.alphas_cumprod, rtol=1e-12)
    betas = 1 - d.alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), d.alphas_cumprod[:-1]])
    mid = k.double() + 0.5
    assert torch.allclose(d.beta(mid), -torch.log(1 - betas), rtol=1e-10)
    assert d.alpha(0.0) == 1.0
    # the continuous integrated rate has the derivative beta inside every interval
    h = 1e-6
    assert torch.allclose((d.integral(mid + h) - d.integral(mid - h)) / (2 * h), d.beta(mid), rtol=1e-6)


def test_discrete_from_a_diffusers_scheduler():
    from diffusers import DDPMScheduler

    sch = DDPMScheduler(num_train_timesteps=100)
    d = DiscreteVP.from_scheduler(sch)
    assert d.T == 100
    assert torch.allclose(d.alpha(torch.tensor([1.0, 50.0, 100.0], dtype=torch.float64)) ** 2,
                          sch.alphas_cumprod[[0, 49, 99]].double(), rtol=1e-6)


@SET
@given(st.floats(0.05, 0.999), st.integers(0, 10_000))
def test_conversions_are_inverse(alpha, seed):
    """score = -eps / sigma, x0_hat = (x - sigma eps) / alpha (docs/theory.md §2): each pair round-trips."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 3, generator=g, dtype=torch.float64)
    sigma = math.sqrt(1 - alpha**2)
    a = torch.full((5,), alpha, dtype=torch.float64)
    s = torch.full((5,), sigma, dtype=torch.float64)
    assert torch.allclose(score_to_eps(eps_to_score(eps, s), s), eps)
    assert torch.allclose(x0_to_eps(x, eps_to_x0(x, eps, a, s), a, s), eps)
    # Tweedie through the score: x0_hat = (x + sigma^2 score) / alpha
    assert torch.allclose(eps_to_x0(x, eps, a, s), (x + sigma**2 * eps_to_score(eps, s)) / alpha)


@SET
@given(_schedules(), st.lists(st.floats(0.01, 0.95), min_size=1, max_size=5), st.integers(0, 10_000))
def test_schedule_at_carries_tweedies_coefficients(schedule, us, seed):
    """``schedule_at``'s derived coefficients are what their names say (docs/theory.md §2): x / alpha -
    (sigma / alpha) eps is Tweedie's x0_hat (``eps_to_x0``), alpha2 = alpha^2, inv_alpha alpha = 1; float64,
    so 1e-12 relative is round-off of a few operations."""
    from theory.solvers import schedule_at

    t = torch.tensor(us, dtype=torch.float64) * schedule.T
    at = schedule_at(schedule, t)
    gen = torch.Generator().manual_seed(seed)
    x, eps = (torch.randn(len(us), 3, dtype=torch.float64, generator=gen) for _ in range(2))
    x0 = at.inv_alpha[:, None] * x - at.sigma_over_alpha[:, None] * eps
    assert torch.allclose(x0, eps_to_x0(x, eps, at.alpha, at.sigma), rtol=1e-12, atol=1e-12 * float(x0.abs().max()))
    assert torch.allclose(at.alpha2, at.alpha**2, rtol=1e-14, atol=0)
    assert torch.allclose(at.inv_alpha * at.alpha, torch.ones_like(t), rtol=1e-14, atol=0)
