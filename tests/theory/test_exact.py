"""Exact models (docs/theory.md §5), the exact scores and the closed-form tilts."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from theory.exact import GaussianMixture, LinearReward, QuadraticReward, gaussian, random_orthonormal, subspace_gaussian
from theory.schedules import ConstantBeta, LinearVP

SET = settings(max_examples=12, deadline=None)
F64 = torch.float64


def _spd(D, g, singular=False):
    L = torch.randn(D, D if not singular else max(1, D - 1), generator=g, dtype=F64)
    return L @ L.T + (0.0 if singular else 0.05) * torch.eye(D, dtype=F64)


def _model(kind, D, seed, schedule):
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return gaussian(torch.randn(D, generator=g, dtype=F64), _spd(D, g, singular=seed % 2 == 0), schedule)
    if kind == "subspace":
        return subspace_gaussian(random_orthonormal(D, max(1, D // 2), g), schedule)
    K = 3
    return GaussianMixture(torch.rand(K, generator=g, dtype=F64) + 0.2, 2 * torch.randn(K, D, generator=g, dtype=F64),
                           torch.stack([_spd(D, g, singular=k == 0) for k in range(K)]), schedule, labels=[0, 1, 1])


@SET
@given(st.sampled_from(["gaussian", "mixture", "subspace"]), st.integers(1, 4), st.integers(0, 10_000),
       st.floats(0.02, 0.98))
def test_exact_score_is_autograd_of_log_pt(kind, D, seed, u):
    """(a) score(x, t) = grad_x log p_t(x) for Gaussian (singular S included), mixture and subspace data."""
    sch = LinearVP()
    m = _model(kind, D, seed, sch)
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(seed + 1), dtype=F64) * 2
    t = torch.full((6,), u, dtype=F64)
    xg = x.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(m.log_prob(xg, t).sum(), xg)
    assert torch.allclose(m.score(x, t), auto, rtol=1e-8, atol=1e-10)
    # the eps model is -sigma * score, and its Tweedie x0_hat equals the posterior mean
    from theory.param import model_x0_hat

    assert torch.allclose(model_x0_hat(m, sch, x, t), m.posterior_mean(x, t), rtol=1e-8, atol=1e-9)


@SET
@given(st.integers(1, 3), st.integers(0, 10_000), st.floats(0.05, 0.95))
def test_labelled_mixture_class_posterior_sums_responsibilities_and_conditional_score(D, seed, u):
    """p(y | x_t) sums to 1 over labels; score(x, t, y) = grad log p_t(x) + grad log p(y | x_t) (Bayes)."""
    sch = ConstantBeta(1.0, 5.0)
    m = _model("mixture", D, seed, sch)
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(seed), dtype=F64)
    t = torch.full((5,), u * sch.T, dtype=F64)
    lp = m.class_log_prob(x, t)
    assert torch.allclose(lp.exp().sum(1), torch.ones(5, dtype=F64))
    y = torch.tensor([0, 1, 1, 0, 1])
    xg = x.clone().requires_grad_(True)
    (gy,) = torch.autograd.grad(m.class_log_prob(xg, t).gather(1, y[:, None]).sum(), xg)
    assert torch.allclose(m.score(x, t, y), m.score(x, t) + gy, rtol=1e-8, atol=1e-10)


@SET
@given(st.integers(1, 3), st.integers(0, 10_000), st.floats(0.3, 3.0))
def test_tilts_match_theory_closed_forms(D, seed, lam):
    """docs/theory.md §5: linear tilt N(mu + S b / lam, S); quadratic tilt precision S^-1 + Q / lam and mean
    (S^-1 + Q/lam)^-1 (S^-1 mu + Q m / lam); log Z against a Monte Carlo estimate is in test_values."""
    g = torch.Generator().manual_seed(seed)
    mu, S = torch.randn(D, generator=g, dtype=F64), _spd(D, g)
    m = gaussian(mu, S)
    b = torch.randn(D, generator=g, dtype=F64)
    lin = m.tilted(LinearReward(b), lam)
    assert torch.allclose(lin.means[0], mu + S @ b / lam)
    assert torch.allclose(lin.covs[0], S)
    Q, c = _spd(D, g), torch.randn(D, generator=g, dtype=F64)
    quad = m.tilted(QuadraticReward(Q, c), lam)
    prec = torch.linalg.inv(S) + Q / lam
    assert torch.allclose(torch.linalg.inv(quad.covs[0]), prec, rtol=1e-7, atol=1e-8)
    assert torch.allclose(quad.means[0], torch.linalg.solve(prec, torch.linalg.solve(S, mu) + Q @ c / lam), rtol=1e-7)
    # mixture: linear tilt reweights by pi_k exp(b.mu_k/lam + b.S_k b/(2 lam^2))
    mix = _model("mixture", D, seed, None)
    tm = mix.tilted(LinearReward(b), lam)
    logw = mix.log_pi + mix.means @ b / lam + torch.einsum("i,kij,j->k", b, mix.covs, b) / (2 * lam**2)
    assert torch.allclose(tm.weights, torch.softmax(logw, 0))


def test_samples_have_the_model_moments():
    """sample(): mean within 5 standard errors of the exact mean (n = 20000)."""
    m = _model("mixture", 2, 3, None)
    x = m.sample(20000, generator=torch.Generator().manual_seed(0))
    mu, cov = m.mean_cov()
    se = (torch.diagonal(cov) / x.shape[0]).sqrt()
    assert ((x.mean(0) - mu).abs() < 5 * se).all()
