"""Every strategy's gradient against references (theory.engine; docs/theory.md §6.6-6.7).

References are written out by hand here, independently of ``theory.solvers``: the DDIM(eta) step
(Song et al. 2021, eq. 12) x_s = a_s x0_hat + sqrt(s_s^2 - c^2) eps + c z, c^2 = eta^2 s_s^2/s_t^2 (1 - a_t^2/a_s^2),
with the early ("no gradient") steps evaluated by a frozen copy of the parameters theta_0 - which is what
a stop-gradient means: the truncated objective J_K(theta) = r(chain whose first n-K steps use theta_0).
Two checks per strategy, in float64 on a tiny model: (1) autograd of the hand-written objective equals the
engine's gradient to round-off (rel. 1e-9); (2) the central finite difference of the hand-written objective
along random directions, step h = 1e-5, equals the directional derivative (truncation error O(h^2) ~ 1e-10
relative to O(1) derivatives; tolerance 1e-6 relative). The random stream is the engine's documented
order on CPU (strategy draws, then the sampler's noise, step by step), replayed from the same seed.
"""
import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from theory.engine import (
    DDPO,
    Adjoint,
    DRaFT,
    DRaFTK,
    DRaFTLV,
    FinetuneConfig,
    ReFL,
    SteeredModel,
    normalise_per_condition,
    objective,
    ppo_loss,
)
from theory.nets import EpsMLP
from theory.schedules import LinearVP
from theory.solvers import time_grid

SCH = LinearVP(0.1, 20.0, T=1.0)
D, B = 2, 5


class SmoothReward:
    """r(x) = sin(w . x) - 0.1 |x|^2 (smooth, non-linear)."""

    differentiable = True

    def __call__(self, x0, cond=None):
        w = torch.tensor([0.7, -1.3], dtype=x0.dtype)
        return torch.sin(x0 @ w) - 0.1 * (x0**2).sum(1)


def tiny_model(seed=0, rank=2, lora_std=0.3):
    torch.manual_seed(seed)
    base = EpsMLP(D, hidden=8, depth=2).double()
    m = SteeredModel(base, lora_rank=rank)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:  # away from B = 0 so that every LoRA parameter has a gradient
                p.copy_(lora_std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def params_of(m):
    return [p for p in m.parameters() if p.requires_grad]


def cfg(n, lam=0.0, eta=1.0, t_min=0.02, **kw):
    return FinetuneConfig(steps=1, batch_size=B, n_steps=n, method="ddim", eta=eta, lam=lam, t_min=t_min,
                          progress=False, **kw)


# ----------------------------------------------------------------------------- hand-written references


def ddim_hand(eps_fn, x, t, s, eta):
    a_t, a_s = SCH.alpha(t), SCH.alpha(s)
    s2_t, s2_s = SCH.sigma2(t), SCH.sigma2(s)
    e = eps_fn(x, torch.full((x.shape[0],), float(t), dtype=x.dtype))
    x0 = (x - s2_t.sqrt() * e) / a_t
    c2 = torch.clamp(eta**2 * s2_s / s2_t * (1 - (a_t / a_s) ** 2), min=0.0)
    mean = a_s * x0 + torch.sqrt(torch.clamp(s2_s - c2, min=0.0)) * e
    return mean, c2.sqrt()


def chain_hand(model, frozen, ref, x, ts, gen, eta, use_theta, lam):
    """Runs the DDIM(eta) chain; ``use_theta(i) -> (B,) bool``: whether step i uses theta (else theta_0).
    Returns (x_end, path KL per sample)."""
    kl = torch.zeros(x.shape[0], dtype=x.dtype)
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        z = torch.randn(x.shape, dtype=x.dtype, generator=gen)
        m_th, sd = ddim_hand(lambda y, u: model(y, u, None), x, t, s, eta)
        with torch.no_grad():
            m_0, _ = ddim_hand(lambda y, u: frozen(y, u, None), x, t, s, eta)
        sel = use_theta(i)[:, None]
        mean = torch.where(sel, m_th, m_0)
        if lam > 0:  # the reference's mean depends on theta through x_i (pathwise derivative)
            m_ref, _ = ddim_hand(lambda y, u: ref(y, u, None), x, t, s, eta)
            kl = kl + ((mean - m_ref) ** 2).sum(1) / (2 * sd**2)
        x = mean + sd * z
    return x, kl


def renoise_hand(x0, t0, t1, z):
    a = SCH.alpha(t1) / SCH.alpha(t0)
    return a * x0 + torch.sqrt(SCH.sigma2(t1) - a**2 * SCH.sigma2(t0)) * z


def hand_objective(strategy, model, frozen, x_T, ts, seed, lam, eta):
    """The strategy's objective J(theta) written out by hand (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    ref = model.reference
    r = SmoothReward()
    n = len(ts) - 1
    Bn = x_T.shape[0]
    if isinstance(strategy, (DRaFT, DRaFTK)):
        if isinstance(strategy, DRaFT):
            K = torch.full((Bn,), n)
        elif isinstance(strategy.k, int):
            K = torch.full((Bn,), strategy.k)
        else:
            lo, hi = strategy.k
            K = torch.full((Bn,), lo) if lo == hi else torch.randint(lo, hi + 1, (Bn,), generator=gen)
        x0, kl = chain_hand(model, frozen, ref, x_T, ts, gen, eta, lambda i: i >= n - K, lam)
        return r(x0).mean() - lam * kl.mean()
    if isinstance(strategy, DRaFTLV):
        with torch.no_grad():
            x0, _ = chain_hand(frozen, frozen, ref, x_T, ts, gen, eta, lambda i: torch.zeros(Bn, dtype=bool), 0.0)
        xr = x0.repeat(strategy.n, 1)
        z = torch.randn(xr.shape, dtype=xr.dtype, generator=gen)
        x1 = renoise_hand(xr, ts[-1], ts[-2], z)
        xl, kl = chain_hand(model, frozen, ref, x1, ts[-2:], gen, eta, lambda i: torch.ones(len(xr), dtype=bool), lam)
        return (r(xl) - lam * kl).view(strategy.n, Bn).sum(0).mean()
    if isinstance(strategy, ReFL):
        lo, hi = strategy.steps
        m = lo if lo == hi else int(torch.randint(lo, hi + 1, (1,), generator=gen))
        with torch.no_grad():
            x, _ = chain_hand(frozen, frozen, ref, x_T, ts[: n - m + 1], gen, eta,
                              lambda i: torch.zeros(Bn, dtype=bool), 0.0)
        t = ts[n - m]
        e = model(x, torch.full((Bn,), float(t), dtype=x.dtype), None)
        return r((x - SCH.sigma(t) * e) / SCH.alpha(t)).mean()
    raise AssertionError(strategy)


def flat_grad(model):
    return torch.cat([p.grad.flatten() for p in params_of(model)])


STRATEGIES = [
    (DRaFT(), 0.0), (DRaFT(), 0.3), (DRaFTK(2), 0.0), (DRaFTK(2), 0.3), (DRaFTK((1, 4)), 0.3),
    (DRaFTLV(2), 0.0), (DRaFTLV(3), 0.3), (ReFL((1, 3)), 0.0), (ReFL((2, 2)), 0.0),
]


@pytest.mark.parametrize("strategy,lam", STRATEGIES, ids=[f"{s}-lam{l}" for s, l in STRATEGIES])
def test_strategy_gradient_equals_hand_autograd_and_finite_differences(strategy, lam):
    n, eta, seed = 5, 1.0, 7
    model = tiny_model()
    frozen = copy.deepcopy(model)
    ts = time_grid(SCH, n, t_min=0.02)
    x_T = torch.randn(B, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    c = cfg(n, lam=lam, eta=eta)
    J, _, _ = objective(model, SCH, SmoothReward(), strategy, c, x_T, ts=ts,
                        generator=torch.Generator().manual_seed(seed))
    J.backward()
    g_engine = flat_grad(model)
    model.zero_grad()
    J_hand = hand_objective(strategy, model, frozen, x_T, ts, seed, lam, eta)
    assert torch.allclose(J.detach(), J_hand.detach(), rtol=1e-10, atol=0)
    J_hand.backward()
    g_hand = flat_grad(model)
    assert g_engine.norm() > 1e-3  # a gradient that could be wrong
    assert torch.allclose(g_engine, g_hand, rtol=1e-9, atol=1e-12 * g_hand.abs().max())

    # central finite differences of the hand objective along 3 random directions
    h = 1e-5
    gd = torch.Generator().manual_seed(11)
    ps = params_of(model)
    for _ in range(3):
        vs = [torch.randn(p.shape, generator=gd, dtype=p.dtype) for p in ps]
        vflat = torch.cat([v.flatten() for v in vs])
        vals = []
        for sgn in (1, -1):
            with torch.no_grad():
                for p, v in zip(ps, vs):
                    p.add_(sgn * h * v)
                vals.append(float(hand_objective(strategy, model, frozen, x_T, ts, seed, lam, eta)))
                for p, v in zip(ps, vs):
                    p.sub_(sgn * h * v)
        fd = (vals[0] - vals[1]) / (2 * h)
        dd = float(g_engine @ vflat)
        assert abs(fd - dd) <= 1e-6 * max(1.0, abs(dd)), (fd, dd)


# ----------------------------------------------------------------------------- (b) identities


def _grad(strategy, ts, lam=0.0, eta=1.0, seed=5):
    model = tiny_model()
    x_T = torch.randn(B, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    J, _, _ = objective(model, SCH, SmoothReward(), strategy, cfg(len(ts) - 1, lam=lam, eta=eta, t_min=float(ts[-1])),
                        x_T, ts=ts, generator=torch.Generator().manual_seed(seed))
    J.backward()
    return flat_grad(model)


@settings(max_examples=6, deadline=None)
@given(n=st.integers(1, 6), lam=st.sampled_from([0.0, 0.5]), seed=st.integers(0, 1000))
def test_draftk_with_k_equal_n_is_draft(n, lam, seed):
    """DRaFT-K with K = n steps (fixed, or the range (n, n)) has exactly DRaFT's gradient."""
    ts = time_grid(SCH, n, t_min=0.02)
    g = _grad(DRaFT(), ts, lam, seed=seed)
    assert torch.equal(_grad(DRaFTK(n), ts, lam, seed=seed), g)
    assert torch.equal(_grad(DRaFTK((n, n)), ts, lam, seed=seed), g)


@settings(max_examples=6, deadline=None)
@given(n=st.integers(2, 6), eta=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 1000))
def test_refl_at_last_step_is_draft1_on_grid_ending_at_zero(n, eta, seed):
    """On a grid ending at t = 0 the last DDIM step returns x0_hat exactly (a_0 = 1, c = 0), so ReFL stopped
    one step before the end (m = 1) has DRaFT-1's gradient (round-off only, rel. 1e-12)."""
    ts = time_grid(SCH, n, t_min=0.0)
    g1 = _grad(DRaFTK(1), ts, eta=eta, seed=seed)
    gr = _grad(ReFL((1, 1)), ts, eta=eta, seed=seed)
    assert g1.norm() > 0
    assert torch.allclose(gr, g1, rtol=1e-12, atol=1e-14 * g1.abs().max())


def test_draftk_range_draws_k_once_per_sample():
    """DRaFTK((lo, hi)): K_b ~ U{lo..hi} drawn once per sample from the engine generator; per-sample
    reference: each sample's gradient is its own DRaFT-K_b gradient (hand chain above with that K_b)."""
    n, lo, hi = 6, 1, 5
    ts = time_grid(SCH, n, t_min=0.02)
    seed = 9
    K = torch.randint(lo, hi + 1, (B,), generator=torch.Generator().manual_seed(seed))
    assert len(set(K.tolist())) > 1  # the check below is not trivial
    g_range = _grad(DRaFTK((lo, hi)), ts, seed=seed)
    # per-sample objective: mean_b r_b, so the gradient is the mean over b of each sample's own gradient
    model = tiny_model()
    frozen = copy.deepcopy(model)
    x_T = torch.randn(B, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    torch.randint(lo, hi + 1, (B,), generator=gen)  # the engine's draw of K
    x0, _ = chain_hand(model, frozen, model.reference, x_T, ts, gen, 1.0, lambda i: i >= n - K, 0.0)
    SmoothReward()(x0).mean().backward()
    assert torch.allclose(g_range, flat_grad(model), rtol=1e-9)


# ----------------------------------------------------------------------------- adjoint vs DRaFT


def _em_vs_adjoint(dt, seed=0, n=4):
    """Gradients of mean r(x0) w.r.t. the LoRA parameters, Euler-Maruyama on the same Brownian path:
    (discrete chain through torchsde's Euler = DRaFT on sample(method='em'), stochastic adjoint)."""
    from theory.sde import brownian, refine_grid, sdeint

    ts = time_grid(SCH, n, t_min=0.05)
    x_T = torch.randn(B, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fine, _ = refine_grid(ts, dt)
    out = []
    for adj in (False, True):
        model = tiny_model(lora_std=0.1)
        bm = brownian(x_T, fine.numel() - 1, entropy=1234 + seed)
        x0 = sdeint(model, SCH, x_T, ts, dt=dt, adjoint=adj, bm=bm)
        SmoothReward()(x0).mean().backward()
        out.append(flat_grad(model))
    return out


def test_adjoint_gradient_matches_draft_within_solver_tolerance():
    """The adjoint solves a backward SDE on the same Brownian path; its gradient equals the discrete
    (DRaFT) one up to the solver's discretisation error, which must shrink as the sub-step dt shrinks:
    relative error e(dt) with e(dt/4) < e(dt) / 1.5 (Euler's strong order 1/2 for the adjoint's own solve
    gives a factor 2 per 4x refinement in the worst case; additive noise gives order 1) and e < 0.05 at the
    finest dt. The same-path discrete gradient equals DRaFT's on sample(method='em') (theory.sde test h)."""
    errs = []
    for dt in (0.02, 0.005):
        g_d, g_a = _em_vs_adjoint(dt)
        errs.append(float((g_a - g_d).norm() / g_d.norm()))
    assert errs[1] < errs[0] / 1.5, errs
    assert errs[1] < 0.05, errs


def test_engine_adjoint_strategy_is_sdeint_adjoint():
    """Adjoint() in the engine = sdeint(adjoint=True) with the Brownian motion seeded from the engine
    generator (same loss, same gradient)."""
    from theory.sde import brownian, sdeint

    n = 4
    ts = time_grid(SCH, n, t_min=0.05)
    x_T = torch.randn(B, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    m1 = tiny_model(lora_std=0.1)
    J, _, _ = objective(m1, SCH, SmoothReward(), Adjoint(), cfg(n, t_min=0.05), x_T, ts=ts,
                        generator=torch.Generator().manual_seed(4))
    J.backward()
    m2 = tiny_model(lora_std=0.1)
    bm = brownian(x_T, n, torch.Generator().manual_seed(4))
    x0 = sdeint(m2, SCH, x_T, ts, adjoint=True, bm=bm)
    J2 = SmoothReward()(x0).mean()
    J2.backward()
    assert torch.allclose(J.detach(), J2.detach(), rtol=1e-12)
    assert torch.allclose(flat_grad(m1), flat_grad(m2), rtol=1e-9)


# ----------------------------------------------------------------------------- DDPO


class _Recorder:
    """Stands in for the optimiser: records the gradient at each step, never moves the parameters."""

    def __init__(self, params):
        self.params, self.grads = params, []

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.grads.append(torch.cat([p.grad.flatten().clone() for p in self.params]))


def test_ddpo_first_inner_step_is_the_policy_gradient_and_ratio_is_one():
    """With the parameters unchanged, every PPO ratio is exactly 1 and the clipped surrogate's gradient is
    the REINFORCE gradient -mean_{i,b} A_b grad log p_theta(x_{i+1,b} | x_{i,b}) (DDPO eq. 3), the
    log-probabilities written out by hand (Gaussian of the hand DDIM step)."""
    from theory.engine import StepContext as _Ctx

    n = 4
    model = tiny_model()
    ts = time_grid(SCH, n, t_min=0.02)
    x_T = torch.randn(8, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cond = None
    c = FinetuneConfig(steps=1, batch_size=8, n_steps=n, eta=1.0, progress=False)
    gen = torch.Generator().manual_seed(2)
    ctx = _Ctx(model=model, reference=None, kl_reference=None, schedule=SCH, reward=SmoothReward(), ts=ts, x_T=x_T,
               cond=cond, config=c, gen=gen, noise_gen=gen, step=1)
    params = params_of(model)
    rec = _Recorder(params)
    out = DDPO(clip=0.2, inner_steps=2, minibatches=1).run_step(ctx, rec, params, grad_clip=0.0)
    assert out["ppo_ratio_dev_first"] == 0.0
    # hand: replay the chain, compute log-probs with grad
    gen = torch.Generator().manual_seed(2)
    x, lp = x_T, 0.0
    xs = [x]
    for i in range(n):
        z = torch.randn(x.shape, dtype=x.dtype, generator=gen)
        with torch.no_grad():
            m, sd = ddim_hand(lambda y, u: model(y, u, None), x, ts[i], ts[i + 1], 1.0)
        x = m + sd * z
        xs.append(x)
    r = SmoothReward()(x)
    A = (r - r.mean()) / (r.std() + 1e-8)
    model.zero_grad()
    for i in range(n):
        m, sd = ddim_hand(lambda y, u: model(y, u, None), xs[i], ts[i], ts[i + 1], 1.0)
        logp = (-0.5 * ((xs[i + 1] - m) / sd) ** 2 - torch.log(sd) - 0.5 * math.log(2 * math.pi)).sum(1)
        lp = lp + (A * logp).sum()
    (-lp / (n * 8)).backward()
    g_hand = flat_grad(model)
    assert len(rec.grads) == 2
    for g in rec.grads:  # parameters never moved: both inner steps see ratio 1
        assert torch.allclose(g, g_hand, rtol=1e-9, atol=1e-12 * g_hand.abs().max())


def test_ppo_loss_clips_and_normalisation_per_condition():
    """PPO (Schulman et al. 2017, eq. 7) on hand values; advantages z-scored within each condition."""
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    lp_old = torch.zeros(4, dtype=torch.float64)
    lp_new = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5], dtype=torch.float64)).requires_grad_(True)
    loss, ratio = ppo_loss(lp_new, lp_old, adv, clip=0.2)
    # terms: max(-A rho, -A clip(rho)): A=1,rho=1.5 -> -1.2 ; A=-1,rho=1.5 -> 1.5 ; A=1,rho=.5 -> -.5 ; A=-1,rho=.5 -> .8
    assert float(loss.detach()) == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4, rel=1e-12)
    loss.backward()
    # gradient flows only through the unclipped branches (2nd and 3rd): d/dlp (-A rho) = -A rho
    assert torch.allclose(lp_new.grad, torch.tensor([0.0, 1.5, -0.5, 0.0], dtype=torch.float64) / 4)

    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 5.0], dtype=torch.float64)
    cond = torch.tensor([0, 0, 0, 1, 1, 2])
    a = normalise_per_condition(r, cond)
    z0 = (r[:3] - 2.0) / r[:3].std()
    assert torch.allclose(a[:3], z0, atol=1e-6)
    assert torch.allclose(a[3:5], (r[3:5] - 15.0) / r[3:5].std(), atol=1e-6)
    assert torch.allclose(a[5], (r[5] - r.mean()) / r.std(), atol=1e-6)  # a single sample: batch statistics
