"""Guidance fields (theory.guidance) and classifiers (theory.classifiers) against closed forms.

Exactness checks run in float64 on exact mixtures (theory.exact); tolerances are float64 round-off
(1e-9 relative) unless a Monte Carlo standard error is stated.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from theory.classifiers import (
    ClassifierMLP,
    FitConfig,
    check_offline,
    expected_calibration_error,
    fit_mle,
    fit_temperature,
)
from theory.exact import GaussianMixture, gaussian
from theory.guidance import CFGEps, classifier_guidance, dps_guidance, sum_fields
from theory.schedules import LinearVP
from theory.solvers import sample, time_grid

SCH = LinearVP(0.1, 20.0, T=1.0)


def _mixture(seed, K=3, D=2):
    g = torch.Generator().manual_seed(seed)
    means = 2 * torch.randn(K, D, generator=g, dtype=torch.float64)
    L = 0.5 * torch.randn(K, D, D, generator=g, dtype=torch.float64)
    covs = L @ L.transpose(-1, -2) + 0.1 * torch.eye(D, dtype=torch.float64)
    w = torch.rand(K, generator=g, dtype=torch.float64) + 0.1
    return GaussianMixture(w, means, covs, schedule=SCH), g


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), t=st.floats(0.01, 0.99), gamma=st.floats(0.2, 3.0))
def test_classifier_guidance_is_bayes_and_cfg_with_exact_models(seed, t, gamma):
    """Exact noisy classifier: score + grad log p(y|x_t) = conditional score (Bayes), and the CFG eps of the
    exact model with weight w = gamma equals eps - sigma * gamma * grad log p(y|x_t) (both identities)."""
    law, g = _mixture(seed)
    x = 2 * torch.randn(6, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, law.n_classes, (6,), generator=g)
    tt = torch.full((6,), t, dtype=torch.float64)
    field = classifier_guidance(law.class_log_prob, y, gamma)
    G = field(x, tt, None)
    assert torch.allclose(law.score(x, tt) + G / gamma, law.score(x, tt, y), rtol=1e-9, atol=1e-9)
    cfg = CFGEps(law, gamma)(x, tt, y)
    assert torch.allclose(cfg, law(x, tt) - SCH.sigma(tt)[:, None] * G, rtol=1e-9, atol=1e-9)
    assert torch.allclose(CFGEps(law, 1.0)(x, tt, y), law(x, tt, y), rtol=1e-9, atol=1e-9)
    assert torch.allclose(CFGEps(law, 0.0)(x, tt, y), law(x, tt), rtol=1e-12, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), t=st.floats(0.02, 0.98), zeta=st.floats(0.1, 5.0))
def test_dps_closed_form_gaussian_linear(seed, t, zeta):
    """Gaussian data N(mu, S), log-likelihood b.x0: x0_hat = mu + alpha S (alpha^2 S + sigma^2 I)^-1 (x - alpha mu),
    so DPS = zeta * alpha (alpha^2 S + sigma^2 I)^-1 S b, constant in x (docs/theory.md §5)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(3, generator=g, dtype=torch.float64)
    L = torch.randn(3, 3, generator=g, dtype=torch.float64)
    S = L @ L.T + 0.05 * torch.eye(3, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    model = gaussian(mu, S, SCH)
    field = dps_guidance(model, SCH, lambda x0, y: x0 @ b, None, zeta)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    tt = torch.full((4,), t, dtype=torch.float64)
    a, s2 = float(SCH.alpha(tt[:1])), float(SCH.sigma2(tt[:1]))
    want = zeta * a * torch.linalg.solve(a**2 * S + s2 * torch.eye(3, dtype=torch.float64), S @ b)
    got = field(x, tt, None)
    assert torch.allclose(got, want.expand_as(got), rtol=1e-8, atol=1e-10)


def test_sum_fields_adds_and_guided_sampling_runs():
    law, g = _mixture(3)
    x = torch.randn(5, 2, generator=g, dtype=torch.float64)
    tt = torch.full((5,), 0.3, dtype=torch.float64)
    f1 = classifier_guidance(law.class_log_prob, torch.zeros(5, dtype=torch.long), 1.0)
    f2 = classifier_guidance(law.class_log_prob, torch.ones(5, dtype=torch.long), 2.0)
    assert torch.allclose(sum_fields(f1, f2)(x, tt, None), f1(x, tt, None) + f2(x, tt, None))
    out = sample(law, SCH, torch.randn(5, 2, generator=g, dtype=torch.float64), time_grid(SCH, 10, t_min=1e-3),
                 method="ddim", eta=1.0, guidance=sum_fields(f1, f2), generator=g)
    assert torch.isfinite(out.x0).all()


def test_guided_exact_sampling_reaches_conditional_component():
    """Exact classifier guidance (gamma = 1) on a two-component mixture samples component y: the fraction of
    samples closer to component 1 is within 4 standard errors of the conditional law's fraction."""
    law = GaussianMixture([0.7, 0.3], [[-2.0, 0.0], [2.0, 0.0]], 0.25 * torch.eye(2).expand(2, 2, 2).clone(),
                          schedule=SCH)
    n = 2000
    g = torch.Generator().manual_seed(0)
    y = torch.ones(n, dtype=torch.long)
    x = sample(law, SCH, torch.randn(n, 2, generator=g, dtype=torch.float64), time_grid(SCH, 100, t_min=1e-3),
               method="ddim", eta=1.0, guidance=classifier_guidance(law.class_log_prob, y, 1.0), generator=g).x0
    frac = float((x[:, 0] > 0).double().mean())
    # conditional law: component 1 only, P(x > 0) = Phi(2 / 0.5) ~ 1; SE of a fraction <= sqrt(0.25 / n)
    assert frac > 1 - 4 * math.sqrt(0.25 / n) - 1e-4
    assert abs(float(x[:, 0].mean()) - 2.0) < 4 * 0.5 / math.sqrt(n) + 0.05  # 0.05: 100-step discretisation


def test_bad_inputs_raise():
    law, _ = _mixture(1)
    x = torch.zeros(3, 2, dtype=torch.float64)
    tt = torch.full((3,), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="gamma"):
        classifier_guidance(law.class_log_prob, torch.zeros(3, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="gamma"):
        classifier_guidance(law.class_log_prob, torch.zeros(3, dtype=torch.long), -1.0)
    with pytest.raises(ValueError, match="classifier's classes"):
        classifier_guidance(law.class_log_prob, torch.tensor([0, 1, 7]), 1.0)(x, tt, None)
    with pytest.raises(ValueError, match="zeta"):
        dps_guidance(law, SCH, lambda a, b: a.sum(1), None, 0.0)
    with pytest.raises(ValueError, match="w"):
        CFGEps(law, -1.0)
    with pytest.raises(ValueError, match="missing"):
        check_offline(torch.zeros(4, 2), torch.tensor([0, 0, 2, 2]), 3)
    with pytest.raises(ValueError, match="labels must be in"):
        check_offline(torch.zeros(3, 2), torch.tensor([0, 1, 3]), 3)
    clf = ClassifierMLP(2, 3)
    with pytest.raises(ValueError, match="classifier's classes"):
        clf.log_lik(torch.zeros(2, 2), torch.tensor([0, 3]))


def test_ece_hand_example():
    """Two bins used: confidences 0.9 (3 samples, 2 right) and 0.6 (1 sample, right):
    ECE = 3/4 |2/3 - 0.9| + 1/4 |1 - 0.6| = 0.175 + 0.1 = 0.275."""
    p = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.6, 0.4]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    assert abs(expected_calibration_error(p.log(), y, n_bins=10) - 0.275) < 1e-12


def test_temperature_scaling_recovers_temperature_and_lowers_ece():
    """Labels drawn from softmax(z); a 'classifier' reporting 3 z is overconfident: temperature scaling on
    4000 held-out pairs recovers T = 3 (the MLE's SE is ~ 3 * 0.03 here; we allow 0.3, ~3 SE) and lowers the
    ECE on fresh pairs."""
    g = torch.Generator().manual_seed(0)

    class Fixed(ClassifierMLP):
        def logits(self, x, t=None):
            return 3.0 * x

    clf = Fixed(3, 3)

    def pairs(n):
        z = 1.5 * torch.randn(n, 3, generator=g, dtype=torch.float64)
        return z.float(), torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(-1)

    xv, yv = pairs(4000)
    xe, ye = pairs(4000)
    before = expected_calibration_error(clf(xe).double(), ye)
    T = fit_temperature(clf, xv, yv)
    after = expected_calibration_error(clf(xe).double(), ye)
    assert abs(T - 3.0) < 0.3
    assert after < before - 0.05  # before ~ 0.2 (overconfident); after ~ ECE estimator noise (~0.02)


def test_mle_classifier_learns_logistic_label():
    """A clean MLP classifier fitted by maximum likelihood on 2000 pairs of a logistic label reaches a held-out
    NLL within 0.05 nats of the true conditional entropy (the Bayes NLL; its MC SE on 4000 pairs is ~0.008)."""
    g = torch.Generator().manual_seed(1)

    def pairs(n):
        x = torch.randn(n, 2, generator=g)
        p1 = torch.sigmoid(2 * x[:, 0] - x[:, 1])
        return x, (torch.rand(n, generator=g) < p1).long(), p1

    x, y, _ = pairs(2000)
    clf = ClassifierMLP(2, 2, hidden=32)
    fit_mle(clf, x, y, FitConfig(steps=600, lr=1e-2))
    xe, ye, pe = pairs(4000)
    nll = float(-clf.log_lik(xe, ye).mean())
    bayes = float(-(torch.where(ye == 1, pe, 1 - pe)).log().mean())
    assert nll < bayes + 0.05


@settings(max_examples=25, deadline=None)
@given(w=st.floats(0.0, 10.0), seed=st.integers(0, 1000))
def test_cfg_combine_is_affine_in_w_with_its_two_ends(w, seed):
    """eps_u + w (eps_c - eps_u): w = 0 gives eps_u, w = 1 eps_c, and it is affine in w (float64 round-off:
    1e-12 relative to the inputs' scale)."""
    from theory.guidance import cfg_combine

    g = torch.Generator().manual_seed(seed)
    eu, ec = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    assert torch.equal(cfg_combine(eu, ec, 0.0), eu)
    torch.testing.assert_close(cfg_combine(eu, ec, 1.0), ec, rtol=1e-15, atol=1e-15)
    mid = (1 - w) * cfg_combine(eu, ec, 0.0) + w * cfg_combine(eu, ec, 1.0)
    torch.testing.assert_close(cfg_combine(eu, ec, w), mid, rtol=1e-12, atol=1e-12 * (1 + w))


def test_dps_inside_the_solver_runs_the_network_once_per_step():
    """DPS names its network (``eps_model``): inside ``sample`` it differentiates the solver's own eps, one
    forward pass per step, and gives the samples of the two-pass computation (the same field hidden behind a
    plain function, which the solver hands a detached eps). Same float64 arithmetic: 1e-12 relative."""
    from theory.nets import EpsMLP

    torch.manual_seed(0)
    net = EpsMLP(2, hidden=16, depth=2).double()
    calls = []

    def counted(x, t, cond=None):
        calls.append(1)
        return net(x, t, cond)

    y = torch.zeros(6, dtype=torch.long)
    field = dps_guidance(counted, SCH, lambda x0, yy: -((x0 - 1) ** 2).sum(-1), y, zeta=0.5)
    x_T = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ts = time_grid(SCH, 20, t_min=1e-3)
    out = []
    for f in (field, lambda x, t, eps: field(x, t, eps)):
        calls.clear()
        out.append(sample(counted, SCH, x_T, ts, method="ddpm", guidance=f, generator=torch.Generator().manual_seed(2)).x0)
        out.append(len(calls))
    assert out[1] == 20 and out[3] == 40
    torch.testing.assert_close(out[0], out[2], rtol=1e-12, atol=1e-12)
