"""G and G_loss (docs/theory.md §7) against closed forms, Algorithms 1/2 and their input checks.

Closed forms used (float64, exact score):
- N(0, I) data: p_t = N(0, I) for a VP process, so x0_hat = alpha x and grad_x(g.x0_hat) = alpha g, which
  makes G_loss = 2 beta_loss alpha (y - g.x0_hat) g = alpha / (sigma_y^2 + h |g|^2) (y - g.x0_hat) g = G.
- subspace data N(0, A A^T): x0_hat = alpha P x (P = A A^T, in-span variance alpha^2 + sigma^2 = 1), so
  grad_x(g.x0_hat) = alpha P g: G_loss = 2 beta_loss alpha (y - g.x0_hat) P g lies in span(A), while
  G's off-span part is beta_G (y - g.x0_hat) (I - P) g, proportional to g's.
"""
import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from theory.exact import gaussian, random_orthonormal, subspace_gaussian
from theory.gradient_guidance import (
    FineTune,
    algorithm1,
    algorithm2,
    lookahead_guidance,
    make_guidance,
    naive_guidance,
    objective_and_grad,
    optimize,
    r_off,
)
from theory.nets import EpsMLP
from theory.schedules import ConstantBeta, DiscreteVP

D, d = 12, 4
SCHEDULES = [DiscreteVP.cosine(200), ConstantBeta(1.0, 10.0)]


def _instance(seed, B=5, dim=D):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, dim, dtype=torch.float64, generator=g) * 2
    gv = torch.randn(B, dim, dtype=torch.float64, generator=g)
    y = torch.randn(B, dtype=torch.float64, generator=g)
    return x, gv, y


def _t(schedule, u, B):
    """A time at fraction u of the horizon, away from t = 0 where h = 0."""
    return torch.full((B,), float(max(u * schedule.T, 1e-2 * schedule.T)), dtype=torch.float64)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), u=st.floats(0.01, 0.95), si=st.integers(0, 1), sy=st.floats(0.05, 2.0))
def test_G_loss_equals_G_for_standard_gaussian(seed, u, si, sy):
    sch = SCHEDULES[si]
    model = gaussian(torch.zeros(D), torch.eye(D), schedule=sch)
    x, gv, y = _instance(seed)
    t = _t(sch, u, x.shape[0])
    eps = model(x, t)
    G = naive_guidance(sch, gv, y, sy)(x, t, eps)
    GL = lookahead_guidance(model, sch, gv, y, sy)(x, t, eps)
    # x0_hat = (x - sigma eps)/alpha cancels to alpha x: float64 round-off of relative size
    # ~1e-16 / alpha^2 in both fields (the only error source); 1e-12 / alpha^2 leaves a 1e4 margin
    tol = 1e-12 / float(sch.alpha(t[0])) ** 2
    assert torch.allclose(GL, G, rtol=tol, atol=tol * float(G.abs().max()))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), u=st.floats(0.01, 0.95), si=st.integers(0, 1))
def test_subspace_G_loss_in_span_G_not(seed, u, si):
    sch = SCHEDULES[si]
    A = random_orthonormal(D, d, torch.Generator().manual_seed(seed + 1))
    P = A @ A.T
    model = subspace_gaussian(A, sch)
    x, gv, y = _instance(seed)
    t = _t(sch, u, x.shape[0])
    eps = model(x, t)
    G = naive_guidance(sch, gv, y, 0.1)(x, t, eps)
    GL = lookahead_guidance(model, sch, gv, y, 0.1)(x, t, eps)
    off = lambda v: v - v @ P  # (I - P) v, rows
    rel_GL = off(GL).norm(dim=-1) / GL.norm(dim=-1)
    assert float(rel_GL.max()) < 1e-6  # the threshold; round-off gives ~1e-15
    rel_G = off(G).norm(dim=-1) / G.norm(dim=-1)
    assert float(rel_G.min()) > 0.1  # g is a generic direction: most of its norm is off span(A)
    # off-span part of G is c * off-span part of g, c = beta_G (y - g.x0_hat) per sample (closed form)
    a, h = sch.alpha(t), sch.sigma2(t)
    x0 = a[:, None] * (x @ P)
    c = a / (0.01 + h * (gv * gv).sum(-1)) * (y - (gv * x0).sum(-1))
    assert torch.allclose(off(G), c[:, None] * off(gv), rtol=1e-10, atol=1e-12)
    # G_loss in closed form: 2 beta_loss (y - g.x0_hat) alpha P g
    Pg = gv @ P
    beta = (a**2 / 2) / (a**2 * 0.01 + h * a**2 * (Pg * Pg).sum(-1))
    assert torch.allclose(GL, (2 * beta * (y - (gv * x0).sum(-1)) * a)[:, None] * Pg, rtol=1e-9, atol=1e-12)


def test_G_loss_vjp_matches_full_jacobian_for_a_network():
    """The one-VJP G_loss equals -beta grad (y - g.x0_hat)^2 with each sample's own Jacobian (full
    Jacobian by autograd.functional); samples do not leak into each other."""
    torch.manual_seed(0)
    sch = DiscreteVP.cosine(200)
    net = EpsMLP(D, hidden=16, depth=2, T=200.0).double()
    x, gv, y = _instance(3, B=3)
    t = torch.tensor([5.0, 50.0, 150.0], dtype=torch.float64)
    GL = lookahead_guidance(net, sch, gv, y, 0.1)(x, t, net(x, t))
    for i in range(3):
        ti = t[i:i + 1]
        a, h = float(sch.alpha(ti)), float(sch.sigma2(ti))

        def loss(xi):
            x0 = (xi[None] - math.sqrt(h) * net(xi[None], ti)) / a
            return (y[i] - (gv[i] * x0[0]).sum()) ** 2

        def u(xi):
            return (gv[i] * ((xi[None] - math.sqrt(h) * net(xi[None], ti)) / a)[0]).sum()

        grad_loss = torch.autograd.functional.jacobian(loss, x[i])
        J = torch.autograd.functional.jacobian(u, x[i])
        beta = (a**2 / 2) / (a**2 * 0.01 + h * float(J @ J))
        assert torch.allclose(GL[i], -beta * grad_loss, rtol=1e-9, atol=1e-12)


def test_r_off_closed_form():
    A = random_orthonormal(D, d, torch.Generator().manual_seed(0))
    z = torch.randn(4, d, dtype=torch.float64)
    w = torch.randn(4, D, dtype=torch.float64)
    v = w - (w @ A) @ A.T
    v = v / v.norm(dim=-1, keepdim=True)
    c = torch.tensor([0.0, 0.1, 1.0, 7.0], dtype=torch.float64)
    x = z @ A.T + c[:, None] * v
    assert torch.allclose(r_off(x, A), c / (z.norm(dim=-1) + 1e-8), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="A:"):
        r_off(x, A[:5])


def _linear(theta):
    f = lambda x: x @ theta.to(x.dtype)
    f.dim = theta.shape[0]
    return f


def test_algorithm1_exact_subspace_G_loss_stays_on_span_G_leaves():
    """Exact subspace score: every G_loss round keeps r_off at round-off (< 1e-10), G does not (its
    last step adds sigma_1^2/alpha_1 G, whose off-span part is proportional to g's)."""
    sch = DiscreteVP.cosine(200)
    A = random_orthonormal(D, d, torch.Generator().manual_seed(1))
    model = subspace_gaussian(A, sch)
    theta = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    f = _linear(theta / theta.norm())
    ts = sch.step_times(20)
    out = {}
    for kind in ("G", "G_loss"):
        res = algorithm1(model, sch, f, n=8, rounds=4, delta=0.5, guidance=kind, ts=ts,
                         generator=torch.Generator().manual_seed(3),
                         metrics=lambda x, fx: float(r_off(x, A).max()))
        out[kind] = res
    assert max(out["G_loss"].metrics) < 1e-10
    assert max(out["G"].metrics[1:]) > 1e-3
    # both increase the linear reward (delta = 0.5 per round asked; more than 0.5 in total achieved)
    for kind in ("G", "G_loss"):
        assert out[kind].mean[-1] - out[kind].mean[0] > 0.5
    # round 0 is the same unguided draw for both (same generator)
    assert torch.equal(out["G"].values[0], out["G_loss"].values[0])


def test_algorithm2_finetunes_a_copy_and_checks_weights():
    sch = DiscreteVP.cosine(200)
    torch.manual_seed(0)
    net = EpsMLP(D, hidden=16, depth=2, T=200.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    theta = torch.ones(D) / math.sqrt(D)
    f = _linear(theta)
    res = algorithm2(net, sch, f, finetune=FineTune(start=1, lr=1e-3), n=4, rounds=3, delta=0.1,
                     ts=sch.step_times(5), generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # pre-trained untouched
    assert any(not torch.equal(before[k], v) for k, v in res.model.state_dict().items())
    # weighted samples (the paper's option) run; bad weights are refused
    ok = algorithm2(net, sch, f, finetune=FineTune(start=0, lr=1e-3, weights=lambda x, fx: torch.softmax(fx, 0)),
                    n=4, rounds=1, delta=0.1, ts=sch.step_times(5))
    assert len(ok.values) == 2
    with pytest.raises(ValueError, match="weights"):
        algorithm2(net, sch, f, finetune=FineTune(start=0, weights=lambda x, fx: -torch.ones(4)), n=4, rounds=1,
                   delta=0.1, ts=sch.step_times(5))
    with pytest.raises(ValueError, match="finetune"):
        algorithm2(subspace_gaussian(random_orthonormal(D, d), sch), sch, f, n=4, rounds=1, delta=0.1)


def test_bad_inputs_give_clear_errors():
    sch = DiscreteVP.cosine(200)
    model = gaussian(torch.zeros(D), torch.eye(D), schedule=sch)
    f = _linear(torch.ones(D, dtype=torch.float64))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="delta"):
            optimize(model, sch, f, n=2, rounds=1, delta=bad)
    with pytest.raises(ValueError, match="dimension"):
        optimize(model, sch, _linear(torch.ones(D + 1, dtype=torch.float64)), n=2, rounds=1, delta=0.1)
    nodim = lambda x: x @ torch.ones(D + 3, dtype=x.dtype)  # no dim attribute: fails on the data
    with pytest.raises(ValueError, match="dimension"):
        objective_and_grad(nodim, torch.zeros(2, D, dtype=torch.float64))
    # |x| (as sqrt(sum x^2)) has a NaN gradient at x = 0 (0/0)
    norm = lambda x: torch.sqrt((x**2).sum(-1))
    with pytest.raises(ValueError, match="gradient is NaN"):
        objective_and_grad(norm, torch.zeros(3, D, dtype=torch.float64))
    nan_grad = lambda x: torch.sqrt(0.0 * x[:, 0] ** 2)  # value 0 everywhere, gradient 0/0 = NaN
    with pytest.raises(ValueError, match="gradient is NaN"):
        optimize(model, sch, nan_grad, n=2, rounds=1, delta=0.1, ts=sch.step_times(3))
    with pytest.raises(ValueError, match="one value per sample"):
        objective_and_grad(lambda x: x, torch.zeros(3, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="guidance"):
        optimize(model, sch, f, n=2, rounds=1, delta=0.1, guidance="naive")
    with pytest.raises(ValueError, match="sigma_y"):
        make_guidance("G", model, sch, torch.ones(2, D), torch.ones(2), sigma_y=0.0)
    with pytest.raises(ValueError, match="g, y"):
        make_guidance("G_loss", model, sch, torch.full((2, D), float("nan")), torch.ones(2))
    field = make_guidance("G", model, sch, torch.ones(2, D), torch.ones(2))
    with pytest.raises(ValueError, match="x:"):
        field(torch.zeros(3, D), torch.ones(3), torch.zeros(3, D))


def test_default_grid_skips_the_degenerate_first_time():
    """The clipped cosine schedule's t = T has alpha_bar = 4e-8; the DDPM step from there multiplies the
    eps error by alpha_{T-1}/alpha_T = 39 (measured: a trained net's samples blew up to |x|^2 ~ 2600).
    ``default_grid`` starts one time later instead. The first step's amplification alpha_s / alpha_t is
    then 2, and the dropped start costs KL(p_{T-1} || N(0, I)) <= alpha_bar_{T-1} E|x0|^2 / 2 < 1e-3 for
    data with E|x0|^2 = 16. Grids of fewer steps ('leading' spacing) never reach T and are unchanged."""
    from theory.gradient_guidance import DEGENERATE_ALPHA_BAR, default_grid
    from theory.schedules import DiscreteVP

    sch = DiscreteVP.cosine(200)
    assert float(sch.alpha(torch.tensor(200.0))) ** 2 < DEGENERATE_ALPHA_BAR
    ts = default_grid(sch)
    assert float(ts[0]) == 199.0 and ts.numel() == 200 and float(ts[-1]) == 0.0
    a = sch.alpha(ts[:2])
    assert float(a[1] / a[0]) < 2.1
    assert float(sch.alpha(ts[0])) ** 2 * 16 / 2 < 1e-3
    for n in (20, 50, 100):
        assert torch.equal(default_grid(sch, n), sch.step_times(n))
    lin = DiscreteVP.linear(1000)  # no degenerate knot: the full grid is kept
    assert torch.equal(default_grid(lin), lin.step_times(1000))


# ----------------------------------------------------------------------------- one network evaluation per step


class _Counting(torch.nn.Module):
    """An eps network that counts its forward passes."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x, t, cond=None):
        self.calls += 1
        return self.net(x, t, cond)


def _two_eval_G_loss(model, schedule, g, y, sigma_y):
    """G_loss as computed before the solver shared its forward pass: a field with no attributes, so the solver
    hands it a detached eps and it runs the network a second time, with a graph, at the schedule's own times."""

    def field(x, t, eps):
        a, h = schedule.alpha(t).to(x.dtype), schedule.sigma2(t).to(x.dtype)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            x0 = (xg - h.sqrt()[:, None] * model(xg, t)) / a[:, None]
            u = (g * x0).sum(-1)
            (J,) = torch.autograd.grad(u.sum(), xg)
        beta = (a**2 / 2) / (a**2 * sigma_y**2 + h * (J * J).sum(-1))
        return (2 * beta * (y - u.detach()))[:, None] * J

    return field


@pytest.mark.parametrize("with_grad", [False, True])
def test_G_loss_step_evaluates_the_network_once_and_equals_the_two_evaluation_step(with_grad):
    """Inside ``sample`` a G_loss step runs the network once (the field differentiates the solver's own eps),
    where the former computation ran it twice; samples (and, with gradients through the chain, the parameter
    gradients) equal the two-evaluation ones. Both do the same float32 arithmetic on the same values, so
    they agree to round-off: 1e-6 relative (measured: bit-equal)."""
    from theory.solvers import sample

    sch = DiscreteVP.cosine(200)
    torch.manual_seed(0)
    net = _Counting(EpsMLP(D, hidden=32, depth=2, T=200.0))
    gen = torch.Generator().manual_seed(1)
    x_T = torch.randn(6, D, generator=gen)
    gv, y = torch.randn(6, D, generator=gen), torch.randn(6, generator=gen)
    ts = sch.step_times(30)
    out = {}
    for name, field in (("one", lookahead_guidance(net, sch, gv, y, 0.2)),
                        ("two", _two_eval_G_loss(net, sch, gv, y, 0.2))):
        net.calls = 0
        net.zero_grad()
        with torch.set_grad_enabled(with_grad):
            x0 = sample(net, sch, x_T, ts, method="ddpm", guidance=field, generator=torch.Generator().manual_seed(2)).x0
        grads = None
        if with_grad:
            (x0**2).sum().backward()
            grads = torch.cat([p.grad.flatten() for p in net.parameters()])
        out[name] = (x0.detach(), grads, net.calls)
    assert out["one"][2] == 30 and out["two"][2] == 60
    torch.testing.assert_close(out["one"][0], out["two"][0], rtol=1e-6, atol=1e-6)
    if with_grad:
        torch.testing.assert_close(out["one"][1], out["two"][1], rtol=1e-6, atol=1e-6 * float(out["two"][1].abs().max()))


def test_mixed_field_is_G_and_G_loss_chain_by_chain():
    """``gradient_guidance`` with a per-chain ``lookahead`` mask and per-chain sigma_y gives, row by row, what
    the pure G and G_loss fields give (float64, same arithmetic: 1e-12 relative)."""
    from theory.gradient_guidance import gradient_guidance

    sch = DiscreteVP.cosine(200)
    torch.manual_seed(0)
    net = EpsMLP(D, hidden=16, depth=2, T=200.0).double()
    x, gv, y = _instance(5, B=6)
    t = torch.full((6,), 40.0, dtype=torch.float64)
    look = torch.tensor([True, False, True, False, False, True])
    sy = torch.tensor([0.1, 0.2, 0.3, 0.1, 0.5, 0.7], dtype=torch.float64)
    mixed = gradient_guidance(sch, gv, y, sy, lookahead=look, model=net)(x, t, net(x, t))
    for i in range(6):
        sl = slice(i, i + 1)
        f = (lookahead_guidance(net, sch, gv[sl], y[sl], float(sy[i])) if look[i]
             else naive_guidance(sch, gv[sl], y[sl], float(sy[i])))
        torch.testing.assert_close(mixed[sl], f(x[sl], t[sl], net(x[sl], t[sl])), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="lookahead"):
        gradient_guidance(sch, gv, y, 0.1, lookahead=look[:3], model=net)
    with pytest.raises(ValueError, match="model"):
        gradient_guidance(sch, gv, y, 0.1, lookahead=True)


def test_optimize_batched_equals_the_runs_one_at_a_time():
    """Algorithm 1 for three configurations (G and G_loss, two deltas, two sigma_y, three seeds) in one batch
    equals each configuration run alone: same x_T and noise (each run's own generator), one network call per
    step for all chains. Exact subspace score in float64: only the round-off of a larger batch differs
    (1e-10 relative allowed). Bad runs are refused."""
    from theory.gradient_guidance import Run, optimize_batched

    sch = DiscreteVP.cosine(200)
    A = random_orthonormal(D, d, torch.Generator().manual_seed(1))
    model = _Counting(subspace_gaussian(A, sch))
    model.dim = D
    theta = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    f = _linear(theta / theta.norm())
    ts = sch.step_times(10)
    runs = [Run("G", 0.5, 0.1, seed=3, n=4), Run("G_loss", 0.2, 0.3, seed=4, n=5), Run("G_loss", 0.5, 0.1, seed=5, n=3)]
    model.calls = 0
    batched = optimize_batched(model, sch, f, runs, rounds=2, ts=ts, keep_rounds=(1,))
    assert model.calls == 3 * 10  # rounds 0..2, one call per step for all 12 chains
    for run, res in zip(runs, batched):
        alone = optimize(model, sch, f, n=run.n, rounds=2, delta=run.delta, guidance=run.guidance,
                         sigma_y=run.sigma_y, ts=ts, generator=torch.Generator().manual_seed(run.seed),
                         keep_rounds=(1,))
        for a, b in zip(res.values, alone.values):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res.x, alone.x, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res.samples[1], alone.samples[1], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="guidance"):
        Run("naive")
    with pytest.raises(ValueError, match="runs"):
        optimize_batched(model, sch, f, [], rounds=1)


def test_algorithm2_batched_copies_equal_the_runs_one_at_a_time():
    """Algorithm 2 over three runs: each run fine-tunes its own copy of the network, the copies evaluated in
    one call over stacked parameters (functional_call + vmap); samples and fine-tuned parameters equal each
    run alone (float32, same arithmetic per copy: 1e-6 relative; measured bit-equal), the copies moved away
    from the pre-trained network, which is untouched. Runs of unequal n are refused."""
    from theory.gradient_guidance import Run, optimize_batched

    sch = DiscreteVP.cosine(200)
    torch.manual_seed(0)
    net = EpsMLP(D, hidden=16, depth=2, T=200.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    f = _linear(torch.ones(D) / math.sqrt(D))
    runs = [Run("G_loss", 0.1, 0.1, seed=0, n=4), Run("G_loss", 0.1, 0.1, seed=1, n=4), Run("G", 0.3, 0.2, seed=2, n=4)]
    ft = FineTune(start=1, lr=1e-3)
    batched = optimize_batched(net, sch, f, runs, rounds=3, ts=sch.step_times(5), finetune=ft)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    for run, res in zip(runs, batched):
        alone = algorithm2(net, sch, f, finetune=ft, n=run.n, rounds=3, delta=run.delta, guidance=run.guidance,
                           sigma_y=run.sigma_y, ts=sch.step_times(5), generator=torch.Generator().manual_seed(run.seed))
        torch.testing.assert_close(res.x, alone.x, rtol=1e-6, atol=1e-6)
        for (k, p), q in zip(alone.model.state_dict().items(), res.model.state_dict().values()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
            if k.endswith("weight"):
                assert not torch.equal(p, before[k])
    with pytest.raises(ValueError, match="same n"):
        optimize_batched(net, sch, f, [Run(n=2), Run(n=3)], rounds=1, finetune=ft, ts=sch.step_times(5))


def test_copies_batched_matmul_path_equals_the_vmap_path():
    """``_Copies`` evaluates an unconditional EpsMLP with one baddbmm per layer; it must be the same function
    as the generic vmap(functional_call) path (forced by clearing ``_linear``) for copies with different
    parameters, values and input gradients (float64: the two paths differ only by summation order, so 1e-12
    relative). A label-conditional EpsMLP keeps the vmap path."""
    from theory.gradient_guidance import _Copies

    torch.manual_seed(0)
    net = EpsMLP(D, hidden=8, depth=3, T=200.0).double()
    fast = _Copies(net, 3)
    assert fast._linear == [0, 2, 4, 6]
    with torch.no_grad():
        for p in fast.stacked:
            p.add_(0.1 * torch.randn_like(p))
    slow = copy.deepcopy(fast)
    slow._linear = None
    x = torch.randn(6, D, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(1.0, 200.0, 6, dtype=torch.float64)
    a, b = fast(x, t), slow(x, t)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    ga, = torch.autograd.grad(a.square().sum(), x)
    gb, = torch.autograd.grad(b.square().sum(), x)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)
    # copy j of the stacked evaluation is copy j alone
    torch.testing.assert_close(a[2:4], fast.copy(1)(x[2:4], t[2:4]), rtol=1e-12, atol=1e-12)
    assert _Copies(EpsMLP(D, hidden=8, depth=2, n_classes=3), 2)._linear is None
