"""Solvers on exact models (docs/theory.md §3): laws, weak orders, torchsde.

With exact Gaussian data every solver step is affine in x, so ``theory.values.chain_moments`` gives the
exact law of the discretised chain: the Monte Carlo runs of ``sample`` / ``sdeint`` are compared with
it within 5 standard errors (mean: sqrt(P_ii / n); covariance entry: sqrt((P_ii P_jj + P_ij^2) / n), the
Gaussian standard error of a sample covariance), and the exact discretisation bias against the data law
is measured separately, without Monte Carlo noise (weak orders).
"""

import pytest
import torch

from theory.exact import gaussian, random_orthonormal, subspace_gaussian
from theory.schedules import ConstantBeta, LinearVP
from theory.sde import sdeint
from theory.solvers import sample, time_grid
from theory.values import chain_moments

F64 = torch.float64
N_MC = 20000


def _problem(seed, D=2, schedule=None):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(D, D, generator=g, dtype=F64)
    S = L @ L.T / D + 0.2 * torch.eye(D, dtype=F64)
    mu = torch.randn(D, generator=g, dtype=F64)
    return gaussian(mu, S, schedule or LinearVP())


def _pT(m, sch, T=None):
    T = sch.T if T is None else T
    a, s2 = float(sch.alpha(T)), float(sch.sigma2(T))
    mu, S = m.means[0], m.covs[0]
    return a * mu, a**2 * S + s2 * torch.eye(m.dim, dtype=F64)


def _draw(mean, cov, n, seed):
    L = torch.linalg.cholesky(cov)
    z = torch.randn(n, mean.shape[0], generator=torch.Generator().manual_seed(seed), dtype=F64)
    return mean + z @ L.T


def assert_law(x, mean, cov, k=5.0):
    """Sample mean and covariance of x within k standard errors of (mean, cov)."""
    n = x.shape[0]
    d = torch.diagonal(cov)
    se_m = (d / n).sqrt()
    assert ((x.mean(0) - mean).abs() <= k * se_m).all(), (x.mean(0), mean, se_m)
    se_c = ((d[:, None] * d[None, :] + cov**2) / n).sqrt()
    assert ((torch.cov(x.T) - cov).abs() <= k * se_c).all(), (torch.cov(x.T), cov, se_c)


SOLVER_CASES = [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 1.0), ("em", 0.0), ("heun", 0.0)]


@pytest.mark.parametrize("method,eta", SOLVER_CASES)
def test_each_solver_reproduces_the_data_law(method, eta):
    """sample() on exact Gaussian data reproduces the data law within error bounds: the MC law is
    within 5 SE of the exact law of the discretised chain, whose distance to the data law (the
    discretisation bias, computed exactly) halves when the steps double (quarters for Heun)."""
    sch = LinearVP()
    m = _problem(1, D=3, schedule=sch)
    ts = time_grid(sch, 100)
    m0, P0 = _pT(m, sch)
    x_T = _draw(m0, P0, N_MC, seed=2)
    x0 = sample(m, sch, x_T, ts, method=method, eta=eta, generator=torch.Generator().manual_seed(3)).x0
    cm, cP = chain_moments(m, sch, m0, P0, ts, method=method, eta=eta)
    assert_law(x0, cm, cP)
    mu, S = m.means[0], m.covs[0]
    bias = []
    for n in (100, 200):
        cm, cP = chain_moments(m, sch, m0, P0, time_grid(sch, n), method=method, eta=eta)
        bias.append(float((cm - mu).norm() + (cP - S).norm()))
    ratio = bias[1] / bias[0]
    expected = 0.25 if method == "heun" else 0.5
    assert abs(ratio - expected) < 0.1 * expected + 0.02, (bias, ratio)


def test_singular_subspace_data_stays_on_its_subspace():
    """Subspace data (singular S = A A^T): the law at t_min is N(0, alpha^2 S + sigma^2 I); the MC law
    is within 5 SE of the exact discretised law, whose bias against it halves when the steps double."""
    sch = LinearVP()
    A = random_orthonormal(4, 2, torch.Generator().manual_seed(0))
    m = subspace_gaussian(A, sch)
    ts = time_grid(sch, 200, t_min=1e-3)
    m0, P0 = _pT(m, sch)
    x0 = sample(m, sch, _draw(m0, P0, N_MC, 4), ts, method="ddpm", generator=torch.Generator().manual_seed(5)).x0
    cm, cP = chain_moments(m, sch, m0, P0, ts, method="ddpm", eta=1.0)
    assert_law(x0, cm, cP)
    a, s2 = float(sch.alpha(1e-3)), float(sch.sigma2(1e-3))
    target = a**2 * A @ A.T + s2 * torch.eye(4, dtype=F64)
    bias = [float((chain_moments(m, sch, m0, P0, time_grid(sch, n, t_min=1e-3), method="ddpm", eta=1.0)[1]
                   - target).norm()) for n in (200, 400)]
    assert 0.4 < bias[1] / bias[0] < 0.6, bias


def weak_errors(method, eta=0.0, ns=(40, 80, 160, 320), schedule=None, seed=0, t_min=0.0):
    """Exact weak errors |E X - m| + ||Cov X - P|| of the discretised chain against the law of X_{t_min}
    (no Monte Carlo: ``chain_moments``)."""
    sch = schedule or LinearVP()
    m = _problem(seed, D=2, schedule=sch)
    m0, P0 = _pT(m, sch)
    mt, Pt = _pT(m, sch, T=t_min)
    out = []
    for n in ns:
        cm, cP = chain_moments(m, sch, m0, P0, time_grid(sch, n, t_min=t_min), method=method, eta=eta)
        out.append(float((cm - mt).norm() + (cP - Pt).norm()))
    return out


def fit_order(ns, errs):
    """Least-squares slope of log(err) against log(h), h = T / n."""
    lh = torch.log(1.0 / torch.tensor(ns, dtype=F64))
    le = torch.log(torch.tensor(errs, dtype=F64))
    lh, le = lh - lh.mean(), le - le.mean()
    return float((lh * le).sum() / (lh**2).sum())


@pytest.mark.parametrize("method,eta,order", [("em", 0.0, 1.0), ("ddpm", 1.0, 1.0), ("ddim", 0.0, 1.0), ("heun", 0.0, 2.0)])
@pytest.mark.parametrize("schedule", [LinearVP(), ConstantBeta(1.0, 8.0)], ids=["linear", "ou"])
def test_weak_order(method, eta, order, schedule):
    """Weak order on a Gaussian, fit on step size over n = 80..640 on a uniform grid ending at
    t_min = 0.05: EM, DDPM, DDIM about 1, Heun 2 (within 10%). Measured values: README.md, theory section."""
    ns = (80, 160, 320, 640)
    p = fit_order(ns, weak_errors(method, eta, ns, schedule, t_min=0.05))
    assert abs(p - order) < 0.1 * order, p


def test_ddpm_down_to_t0_has_a_log_factor():
    """Down to t = 0 (OU schedule, sigma^2 ~ t near the data) the DDPM error is O(h log(1/h)), not O(h):
    n * err grows by the same amount each time n doubles (increments equal within 10%), while EM's
    n * err converges (increments shrink below 5% of the level)."""
    ns = (80, 160, 320, 640, 1280)
    sch = ConstantBeta(1.0, 8.0)
    ne = [n * e for n, e in zip(ns, weak_errors("ddpm", 1.0, ns, sch))]
    inc = [b - a for a, b in zip(ne[:-1], ne[1:])]
    assert min(inc) > 0 and max(inc) / min(inc) < 1.1, inc
    ne_em = [n * e for n, e in zip(ns, weak_errors("em", 0.0, ns, sch))]
    assert abs(ne_em[-1] - ne_em[-2]) < 0.05 * ne_em[-1], ne_em


# ----------------------------------------------------------------------------- torchsde


@pytest.mark.parametrize("dt", [None, 0.01])
def test_torchsde_and_native_em_agree_in_law(dt):
    """sdeint (torchsde Euler, Ito, diagonal) and sample(method='em') on the same grid: both within
    5 SE of the exact law of the EM chain (with dt: the chain on the refined grid)."""
    from theory.sde import refine_grid

    sch = LinearVP()
    m = _problem(7, D=2, schedule=sch)
    ts = time_grid(sch, 50 if dt is None else 25)
    m0, P0 = _pT(m, sch)
    x_T = _draw(m0, P0, N_MC, 8)
    xs = sdeint(m, sch, x_T, ts, dt=dt, generator=torch.Generator().manual_seed(9))
    fine, _ = refine_grid(ts, dt)
    cm, cP = chain_moments(m, sch, m0, P0, fine, method="em")
    assert_law(xs, cm, cP)
    if dt is None:
        xn = sample(m, sch, x_T, ts, method="em", generator=torch.Generator().manual_seed(10)).x0
        assert_law(xn, cm, cP)


def test_torchsde_states_at_every_grid_time():
    sch = LinearVP()
    m = _problem(7, D=2, schedule=sch)
    ts = time_grid(sch, 20, kind="quadratic")
    x_T = torch.randn(16, 2, dtype=F64)
    st_ = sdeint(m, sch, x_T, ts, dt=0.01, return_states=True, generator=torch.Generator().manual_seed(0))
    assert st_.shape == (21, 16, 2)
    assert torch.equal(st_[0], x_T)


class _Scaled(torch.nn.Module):
    """The exact eps scaled by a trainable theta (a model with parameters for the adjoint)."""

    def __init__(self, m):
        super().__init__()
        self.m = m
        self.theta = torch.nn.Parameter(torch.tensor(0.9, dtype=F64))

    def forward(self, x, t, cond=None):
        return self.theta * self.m(x, t, cond)


def test_adjoint_gradient_converges_to_the_discrete_gradient():
    """sdeint_adjoint's gradient (continuous adjoint, same Brownian path) approaches the gradient
    through the discrete chain as the grid refines: relative gap at 400 steps < gap at 50 steps, < 2%."""
    sch = LinearVP()
    net = _Scaled(_problem(2, D=2, schedule=sch))
    x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    gaps = []
    for n in (50, 400):
        ts = time_grid(sch, n, t_min=1e-3)
        grads = []
        for adj in (False, True):
            net.zero_grad()
            x = sdeint(net, sch, x_T, ts, adjoint=adj, generator=torch.Generator().manual_seed(1))
            (x**2).sum().backward()
            grads.append(float(net.theta.grad))
        gaps.append(abs(grads[1] - grads[0]) / abs(grads[0]))
    assert gaps[1] < gaps[0] and gaps[1] < 0.02, gaps


# ----------------------------------------------------------------------------- solver records, replay, coefficients


def test_solver_records_declare_order_and_noise():
    from theory.solvers import SOLVERS, is_stochastic, solver

    assert {k: v.order for k, v in SOLVERS.items()} == {"ddim": 1.0, "ddpm": 1.0, "em": 1.0, "heun": 2.0}
    assert [is_stochastic("ddim", e) for e in (0.0, 0.5)] == [False, True]
    assert is_stochastic("ddpm") and is_stochastic("em") and not is_stochastic("heun", 1.0)
    with pytest.raises(ValueError, match="method"):
        solver("rk4")


def test_grid_points_equal_the_schedule_at_each_time():
    """The coefficients computed once per grid are the per-step schedule calls' values, to the bit (the same
    elementwise float32 arithmetic)."""
    from theory.schedules import DiscreteVP
    from theory.solvers import grid_points

    sch = DiscreteVP.cosine(200)
    ts = sch.step_times(50)
    pts = grid_points(sch, ts, 3, torch.float32)
    for i in (0, 7, 50):
        t = ts[i].to(torch.float32).expand(3)
        assert torch.equal(pts[i].t, t)
        for name, want in (("alpha", sch.alpha(t)), ("sigma2", sch.sigma2(t)), ("sigma", sch.sigma(t)), ("beta", sch.beta(t))):
            assert torch.equal(getattr(pts[i], name).expand(3), want.to(torch.float32)), name
        # the derived coefficients (Tweedie's 1/alpha and sigma/alpha, alpha^2), from the float32 values above
        # by the same elementwise operations a field would do per step
        a, sig = pts[i].alpha, pts[i].sigma
        for name, want in (("inv_alpha", 1 / a), ("sigma_over_alpha", sig * (1 / a)), ("alpha2", a * a)):
            assert torch.equal(getattr(pts[i], name), want), name


@pytest.mark.parametrize("method,eta", SOLVER_CASES)
@pytest.mark.parametrize("chunk", [None, 3])
def test_replay_reproduces_the_sampled_transitions(method, eta, chunk):
    """``replay`` of a stored trajectory (all steps in one batched call, or ``chunk`` steps per call) gives
    the transitions ``sample`` used (float64; a larger batch changes only round-off: 1e-12 relative), with
    a per-sample label tiled across the steps; its log-probabilities are gaussian_log_prob's per step."""
    from theory.nets import EpsMLP
    from theory.solvers import gaussian_log_prob, is_stochastic, replay

    sch = LinearVP()
    torch.manual_seed(0)
    net = EpsMLP(2, hidden=16, depth=2, n_classes=3).double()
    y = torch.tensor([0, 2, 1, -1])
    ts = time_grid(sch, 8, t_min=0.0)  # the last step reaches t = 0 (Heun's Euler step there)
    tr = sample(net, sch, torch.randn(4, 2, dtype=F64), ts, method=method, eta=eta, cond=y, keep_states=True,
                return_transitions=True, generator=torch.Generator().manual_seed(1))
    rp = replay(net, sch, tr.xs, ts, method=method, eta=eta, cond=y, chunk=chunk)
    torch.testing.assert_close(rp.means, torch.stack(tr.means), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rp.stds, torch.stack(tr.stds), rtol=1e-12, atol=1e-12)
    if is_stochastic(method, eta):
        lp = rp.log_prob(tr.xs)[:-1]  # DDPM/DDIM's last step into t = 0 has std 0
        want = torch.stack([gaussian_log_prob(tr.xs[i + 1], tr.means[i], tr.stds[i]) for i in range(7)])
        torch.testing.assert_close(lp, want, rtol=1e-12, atol=1e-10)


def test_replay_with_guidance_and_the_path_kl_equal_the_solvers():
    """With a guidance field (built for one batch) replay goes step by step; the path KL of two replays equals
    the KL ``sample(reference=...)`` accumulates (same formula, float64: 1e-12)."""
    from theory.solvers import replay

    sch = LinearVP()
    m = _problem(3, D=2, schedule=sch)
    ref = _problem(4, D=2, schedule=sch)
    field = lambda x, t, eps: 0.3 * torch.ones_like(x) + 0.1 * x  # noqa: E731
    ts = time_grid(sch, 12, t_min=1e-3)
    tr = sample(m, sch, torch.randn(5, 2, dtype=F64), ts, method="ddpm", guidance=field, reference=ref,
                keep_states=True, generator=torch.Generator().manual_seed(0))
    p = replay(m, sch, tr.xs, ts, method="ddpm", guidance=field)
    q = replay(ref, sch, torch.stack(tr.xs), ts, method="ddpm")
    torch.testing.assert_close(p.kl_to(q), tr.kl, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="xs"):
        replay(m, sch, tr.xs[:-1], ts, method="ddpm")
    with pytest.raises(ValueError, match="chunk"):
        replay(m, sch, tr.xs, ts, method="ddpm", chunk=0)


def test_em_heun_and_torchsde_share_one_drift():
    """One Euler-Maruyama step, torchsde's ReverseSDE drift over one grid piece, and Heun's predictor are the
    same ``reverse_drift`` (the SDE drift minus the probability-flow drift is beta score / 2)."""
    from theory.sde import ReverseSDE
    from theory.solvers import em_step, guided_eps, heun_step, reverse_drift, schedule_at

    sch = LinearVP()
    m = _problem(5, D=2, schedule=sch)
    x = torch.randn(3, 2, dtype=F64)
    ts = torch.tensor([0.6, 0.5, 0.0], dtype=F64)
    at_t, at_s = schedule_at(sch, ts[0].expand(3)), schedule_at(sch, ts[1].expand(3))
    fn = guided_eps(m)
    mean, _ = em_step(x, fn, at_t, at_s)
    sde = ReverseSDE(m, sch, ts, (2,))
    assert torch.equal(mean, x + sde.f(torch.tensor(0.0, dtype=F64), x))
    eps = m(x, at_t.t)
    pf = reverse_drift(x, eps, at_t, ode=True)
    torch.testing.assert_close(reverse_drift(x, eps, at_t) - pf, 0.5 * at_t.beta[:, None] * (-eps / at_t.sigma[:, None]))
    at_0 = schedule_at(sch, ts[2].expand(3))
    assert torch.equal(heun_step(x, fn, at_s, at_0)[0], x + 0.5 * reverse_drift(x, m(x, at_s.t), at_s, ode=True))


def test_log_prob_of_a_deterministic_last_step_is_zero_not_nan():
    """A chain whose last step is deterministic (std = 0) has a finite log-probability: the stochastic
    steps' Gaussian log-densities (computed here by hand from their definition), plus 0 for the last step."""
    import math

    from theory.solvers import Transitions

    g = torch.Generator().manual_seed(0)
    xs = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)          # 3 steps, batch 3, dim 2
    means = torch.randn(3, 3, 2, generator=g, dtype=torch.float64)
    stds = torch.tensor([0.5, 0.2, 0.0], dtype=torch.float64)[:, None, None].expand(3, 3, 2)
    lp = Transitions(means, stds).log_prob(xs)
    assert torch.isfinite(lp).all()
    by_hand = torch.zeros(3, 3, dtype=torch.float64)
    for i in range(2):
        s = float(stds[i, 0, 0])
        by_hand[i] = (-0.5 * ((xs[i + 1] - means[i]) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)).sum(-1)
    torch.testing.assert_close(lp, by_hand, rtol=1e-12, atol=1e-12)
