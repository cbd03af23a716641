"""Value functions of KL-regularised steering (docs/theory.md §4), exact and Monte Carlo.

    h_t(x) = E[exp(r(X_0)/lam) | X_t = x],    v_t(x) = lam log h_t(x)          (Feynman-Kac)
    optimal guidance (Doob h-transform, CTRL Lemma 2):  g(x, t) = grad_x log h_t(x) = grad v / lam
    HJB in noising time t (generative drift b = 1/2 beta x + beta score, run from t = T to 0):
        -d_t v + b . grad v + 1/2 beta (Lap v + |grad v|^2 / lam) = 0,     v_0 = r
    path KL (Girsanov):  KL(P^u || P^pre) = E 1/2 int |u|^2 / beta dt,   u = beta g   (+ initial KL)

Closed forms come from ``theory.exact`` (Gaussian / mixture data, linear / quadratic rewards: the
posterior X_0 | X_t is a Gaussian mixture, so h is a sum of Gaussian integrals); this module adds the
Monte Carlo estimator for any eps model and reward (sampling through ``theory.solvers.sample``), the
h-transform as a guidance field, the HJB residual, the discretised and continuous path KL, and the
initial-value bias of docs/theory.md §4 in closed form for Gaussian data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .exact import GaussianMixture, Reward
from .guidance import log_density_gradient
from .schedules import NoiseSchedule, as_time
from .solvers import check_grid, gaussian_log_prob, replay, sample, time_grid

__all__ = [
    "exact_log_h",
    "exact_value",
    "exact_grad_value",
    "quadrature_log_h",
    "h_transform_guidance",
    "hjb_residual",
    "FKEstimate",
    "mc_value",
    "gaussian_kl",
    "path_kl",
    "girsanov_kl",
    "tilted_initial",
    "biased_terminal_gaussian",
    "tilted_density_grid",
    "chain_moments",
]


def _check_lam(lam: float) -> float:
    if not lam > 0:
        raise ValueError(f"lam: the KL weight must be > 0, got {lam}")
    return float(lam)


# ----------------------------------------------------------------------------- closed forms


def exact_log_h(model: GaussianMixture, x: torch.Tensor, t, reward: Reward, lam: float) -> torch.Tensor:
    """log h_t(x) in closed form (docs/theory.md §4-5; ``GaussianMixture.log_h``), shape (B,)."""
    return model.log_h(x, t, reward, _check_lam(lam))


def exact_value(model: GaussianMixture, x: torch.Tensor, t, reward: Reward, lam: float) -> torch.Tensor:
    """v_t(x) = lam log h_t(x) in closed form (docs/theory.md §4), shape (B,)."""
    return model.value(x, t, reward, _check_lam(lam))


def exact_grad_value(model: GaussianMixture, x: torch.Tensor, t, reward: Reward, lam: float) -> torch.Tensor:
    """grad_x v_t(x) of the closed form, by autograd, shape (B, D)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(exact_value(model, xg, t, reward, lam).sum(), xg)
    return g


def quadrature_log_h(model: GaussianMixture, x: torch.Tensor, t, log_r: Callable, lam: float,
                     n_nodes: int = 12) -> torch.Tensor:
    """log h_t(x) = log E[exp(r(X_0)/lam) | X_t = x] for ANY reward, by Gauss-Hermite quadrature over
    the exact Gaussian-mixture posterior X_0 | X_t = x (docs/theory.md §4; Feynman-Kac with the posterior
    written out):

        h_t(x) = sum_k w_k(x) E_{N(m_k(x), C_k)}[exp(r/lam)]
               ~ sum_k w_k(x) sum_j W_j exp(r(m_k(x) + C_k^{1/2} z_j) / lam),

    with (z_j, W_j) the tensor-product probabilists' Gauss-Hermite rule of ``n_nodes`` per dimension
    (``numpy.polynomial.hermite_e.hermegauss``, weights normalised to sum 1). Exact for polynomials of
    degree < 2 n_nodes; for exp(c z) the error is about c^(2n) n! / (2n)!, so it is accurate while the
    tilt moves the posterior by few of its standard deviations (c = |C^(1/2) grad r| / lam <= 2: round-off
    at n = 20) and degrades for strong tilts (c = 6: 4e-3 at n = 20). Cost
    n_nodes^D evaluations of r per component, so for low dimension only (D <= 3). Differentiable in x
    (the nodes move with m_k(x)), so ``h_transform_guidance`` on it gives the optimal drift for rewards
    with no closed form, e.g. r = log p(y | x0) at gamma = 1/lam != 1 for a labelled mixture.

    ``log_r(x0) -> (N,)`` is the reward r (the tilt is r / lam). Shape (B,)."""
    import numpy as np

    lam = _check_lam(lam)
    if not (isinstance(n_nodes, int) and n_nodes >= 1):
        raise ValueError(f"n_nodes: need a positive integer, got {n_nodes!r}")
    D = model.dim
    if n_nodes**D > 20000:
        raise ValueError(f"n_nodes: {n_nodes}^{D} = {n_nodes**D} nodes per component is too many; the tensor "
                         "rule is for D <= 3 (use mc_value in higher dimension)")
    z1, w1 = np.polynomial.hermite_e.hermegauss(n_nodes)
    grids = np.meshgrid(*([z1] * D), indexing="ij")
    z = torch.as_tensor(np.stack([g.ravel() for g in grids], -1), dtype=x.dtype, device=x.device)  # (N, D)
    wg = np.meshgrid(*([w1 / w1.sum()] * D), indexing="ij")
    logW = torch.as_tensor(np.log(np.prod(np.stack([g.ravel() for g in wg], -1), -1)), dtype=x.dtype,
                           device=x.device)  # (N,)
    logw, m, C = model.posterior(x, t)  # (B, K), (B, K, D), (B, K, D, D)
    e, V = torch.linalg.eigh(0.5 * (C + C.transpose(-1, -2)).detach())
    L = V * e.clamp(min=0).sqrt()[..., None, :]  # C^{1/2} with columns V_j sqrt(e_j) (singular C allowed)
    pts = m[:, :, None, :] + torch.einsum("bkij,nj->bkni", L, z)  # (B, K, N, D)
    B, K, N = pts.shape[:3]
    r = log_r(pts.reshape(-1, D))
    if r.shape != (B * K * N,):
        raise ValueError(f"log_r: returned shape {tuple(r.shape)} for {B * K * N} points, expected ({B * K * N},)")
    lt = logw[:, :, None] + logW[None, None, :] + r.reshape(B, K, N) / lam
    return torch.logsumexp(lt.reshape(B, -1), dim=-1)


def h_transform_guidance(log_h: Callable, *, lam: Optional[float] = None, reward: Optional[Reward] = None):
    """The optimal control as a guidance field (Doob h-transform, docs/theory.md §4; CTRL Lemma 2):
    g(x, t) = grad_x log h_t(x), added to the score by the solver (drift + beta g).

    ``log_h`` is either a function ``log_h(x, t) -> (B,)`` (e.g. ``model.class_log_prob(x, t)[:, y]``), or
    an exact ``GaussianMixture``; then ``reward`` and ``lam`` are required and the closed form is used.
    Field signature ``field(x, t, eps)`` as ``theory.solvers.sample`` expects."""
    if isinstance(log_h, GaussianMixture):
        if reward is None or lam is None:
            raise ValueError("reward, lam: an exact model needs the reward and the KL weight lam")
        model, lam = log_h, _check_lam(lam)
        fn = lambda x, t: model.log_h(x, t, reward, lam)  # noqa: E731
    elif callable(log_h):
        fn = log_h
    else:
        raise ValueError("log_h: pass a function log_h(x, t) -> (B,) or an exact GaussianMixture")

    def field(x, t, eps):
        return log_density_gradient(fn, x, as_time(t, x), "log_h")

    field.kind = "h-transform"
    return field


def hjb_residual(model: GaussianMixture, x: torch.Tensor, t, reward: Reward, lam: float) -> torch.Tensor:
    """Residual of the HJB equation of docs/theory.md §4 at (x, t), in noising time t:

        R = -d_t v + (1/2 beta x + beta score) . grad v + 1/2 beta (Lap v + |grad v|^2 / lam),

    with v the closed-form value, the exact score, all derivatives by autograd (float64 advised).
    Shape (B,). Zero for the exact value."""
    lam = _check_lam(lam)
    s = model._need_schedule()
    x = x.detach().requires_grad_(True)
    t = as_time(t, x).detach().clone().requires_grad_(True)
    with torch.enable_grad():
        v = model.value(x, t, reward, lam)
        gx, gt = torch.autograd.grad(v.sum(), (x, t), create_graph=True)
        lap = torch.zeros_like(v)
        for i in range(x.shape[1]):
            lap = lap + torch.autograd.grad(gx[:, i].sum(), x, retain_graph=True)[0][:, i]
    with torch.no_grad():
        beta = s.beta(t.detach()).to(x.dtype)
        score = model.score(x.detach(), t.detach())
        b = 0.5 * beta[:, None] * x.detach() + beta[:, None] * score
        return (-gt + (b * gx).sum(1) + 0.5 * beta * (lap + (gx**2).sum(1) / lam)).detach()


# ----------------------------------------------------------------------------- Monte Carlo Feynman-Kac


@dataclass
class FKEstimate:
    """Monte Carlo estimates at P points: v (P,), grad v (P, D) and their standard errors (delta method)."""

    v: torch.Tensor
    v_se: torch.Tensor
    grad: Optional[torch.Tensor] = None
    grad_se: Optional[torch.Tensor] = None
    log_h: Optional[torch.Tensor] = None


def mc_value(model, schedule: NoiseSchedule, x: torch.Tensor, t: float, reward: Callable, lam: float, *,
             n_samples: int = 1000, n_steps: int = 200, method: str = "ddpm", grad: bool = True,
             estimator: str = "pathwise", cond=None, generator: Optional[torch.Generator] = None,
             t_min: float = 0.0) -> FKEstimate:
    """Monte Carlo Feynman-Kac estimate of v_t(x) = lam log E[exp(r(X_0)/lam) | X_t = x] and of grad v
    (docs/theory.md §4), for any eps model and reward: from each of the P points x (P, ...) at time t,
    ``n_samples`` runs of the pre-trained generative process through ``theory.solvers.sample`` (a
    uniform grid of ``n_steps`` steps from t to t_min) give X_0 and weights w = exp(r(X_0)/lam).

    v = lam log mean(w); the standard error by the delta method, lam * sd(w) / (mean(w) sqrt(n)).
    grad v = lam E[w G] / E[w], a self-normalised (ratio) estimate with G the x-derivative of log w:
      - 'pathwise': G = grad_x r(X_0) / lam through the sampler with its noise held fixed (needs a
        differentiable reward and eps model);
      - 'score': the likelihood ratio of the first transition, G = grad_x log q(X_s | x) (any reward).
    Their standard errors come from the delta method for ratios. The estimate carries the sampler's
    discretisation bias, O(1/n_steps) for 'ddpm' and 'em'."""
    lam = _check_lam(lam)
    if estimator not in ("pathwise", "score"):
        raise ValueError(f"estimator: unknown '{estimator}', use 'pathwise' or 'score'")
    if n_samples < 2:
        raise ValueError(f"n_samples: need >= 2, got {n_samples}")
    schedule.check_time(torch.tensor(float(t)), "t")
    if not float(t) > t_min:
        raise ValueError(f"t: must exceed t_min={t_min}, got {t}")
    P = x.shape[0]
    ts = time_grid(schedule, n_steps, t_min=t_min, t_max=float(t))
    xr = x.detach().repeat_interleave(n_samples, dim=0)
    condr = None if cond is None else torch.as_tensor(cond).repeat_interleave(n_samples, dim=0)
    need_grad = grad
    with torch.set_grad_enabled(need_grad):
        xg = xr.clone().requires_grad_(need_grad)
        if estimator == "pathwise" or not need_grad:
            traj = sample(model, schedule, xg, ts, method=method, cond=condr, generator=generator)
            x0 = traj.x0
            logw = reward(x0, condr) / lam
            G = None
            if need_grad:
                (G,) = torch.autograd.grad(logw.sum(), xg)
        else:  # likelihood ratio of the first transition; the rest without gradients
            traj = sample(model, schedule, xg, ts[:2], method=method, cond=condr, generator=generator,
                          return_transitions=True)
            x1 = traj.x0.detach()
            lq = gaussian_log_prob(x1, traj.means[0], traj.stds[0])
            (G,) = torch.autograd.grad(lq.sum(), xg)
            with torch.no_grad():
                x0 = sample(model, schedule, x1, ts[1:], method=method, cond=condr, generator=generator).x0 \
                    if ts.numel() > 2 else x1
                logw = reward(x0, condr) / lam
    logw = logw.detach().reshape(P, n_samples).to(torch.float64)
    m = logw.max(dim=1, keepdim=True).values
    w = torch.exp(logw - m)  # rescaled weights, ratio estimates are invariant
    wbar = w.mean(1)
    log_h = m.squeeze(1) + torch.log(wbar)
    v = lam * log_h
    v_se = lam * w.std(1) / (wbar * math.sqrt(n_samples))
    out = FKEstimate(v=v, v_se=v_se, log_h=log_h)
    if grad:
        G = G.detach().reshape((P, n_samples, -1)).to(torch.float64)
        num = (w[..., None] * G).mean(1)  # E[w G]
        ratio = num / wbar[:, None]
        # delta method for a ratio of means: Var(mean(w (G - ratio))) / wbar^2
        resid = w[..., None] * (G - ratio[:, None, :])
        se = resid.std(1) / (wbar[:, None] * math.sqrt(n_samples))
        out.grad = (lam * ratio).reshape(x.shape)
        out.grad_se = (lam * se).reshape(x.shape)
    return out


# ----------------------------------------------------------------------------- path KL


def gaussian_kl(mean_p: torch.Tensor, std_p, mean_q: torch.Tensor, std_q) -> torch.Tensor:
    """KL(N(mean_p, std_p^2 I) || N(mean_q, std_q^2 I)) summed over all but the batch dimension (B,):
    sum_i [log(s_q/s_p) + (s_p^2 + (m_p - m_q)^2) / (2 s_q^2) - 1/2] (exact per Gaussian transition)."""
    std_p = torch.broadcast_to(torch.as_tensor(std_p, dtype=mean_p.dtype), mean_p.shape)
    std_q = torch.broadcast_to(torch.as_tensor(std_q, dtype=mean_p.dtype), mean_p.shape)
    if mean_q.shape != mean_p.shape:
        raise ValueError(f"mean_q: shape {tuple(mean_q.shape)} must match mean_p {tuple(mean_p.shape)}")
    if (std_p <= 0).any() or (std_q <= 0).any():
        raise ValueError("std_p, std_q: transition standard deviations must be > 0 (use a stochastic solver)")
    kl = torch.log(std_q / std_p) + (std_p**2 + (mean_p - mean_q) ** 2) / (2 * std_q**2) - 0.5
    return kl.flatten(1).sum(1)


def path_kl(model, reference, schedule: NoiseSchedule, xs: list, ts, *, method: str = "ddpm", eta: float = 1.0,
            cond=None, guidance=None) -> torch.Tensor:
    """The discretised path KL of a stored trajectory xs (len(ts) states, as ``sample(keep_states=True)``
    returns) of the steered chain to the pre-trained chain: sum over steps of the exact KL between their
    Gaussian transitions from the same state, summed over dimensions (docs/theory.md §4); deterministic
    steps are skipped. Both chains are re-evaluated by ``theory.solvers.replay``. Equals
    ``sample(..., reference=...).kl`` (which accumulates the same sum while sampling). Shape (B,)."""
    p = replay(model, schedule, xs, ts, method=method, eta=eta, cond=cond, guidance=guidance)
    q = replay(reference, schedule, xs, ts, method=method, eta=eta, cond=cond)
    total = torch.zeros(p.means.shape[1], dtype=p.means.dtype, device=p.means.device)
    for i in range(p.means.shape[0]):
        if not bool((p.stds[i] > 0).any()) and not bool((q.stds[i] > 0).any()):
            continue  # a deterministic step (DDPM's last step into t = 0) carries no KL term, as in ``sample``
        total = total + gaussian_kl(p.means[i], p.stds[i], q.means[i], q.stds[i])
    return total


def girsanov_kl(guidance_sq: Callable, schedule: NoiseSchedule, t0: float, t1: float, n: int = 4096) -> torch.Tensor:
    """The continuous path KL 1/2 int_{t1}^{t0} |u|^2 / beta dt = 1/2 int beta(t) |g(t)|^2 dt (u = beta g;
    docs/theory.md §4) for a control whose squared norm ``guidance_sq(t) -> (n,)`` (|g|^2, e.g. an expectation
    along the law) depends on t only; composite Simpson rule on n (even) intervals."""
    if n % 2:
        n += 1
    t = torch.linspace(float(t1), float(t0), n + 1, dtype=torch.float64)
    f = 0.5 * schedule.beta(t) * guidance_sq(t)
    wts = torch.ones(n + 1, dtype=torch.float64)
    wts[1:-1:2], wts[2:-1:2] = 4.0, 2.0
    return (f * wts).sum() * (float(t0) - float(t1)) / (3 * n)


# ----------------------------------------------------------------------------- initial-value bias


def tilted_initial(model: GaussianMixture, reward: Reward, lam: float, T: Optional[float] = None) -> GaussianMixture:
    """The tilted initial law h_T(x) p_T(x) / Z (docs/theory.md §4) as an exact model at time 0 of its own:
    it is the marginal at T of the tilted data law, p*_T, returned here as a GaussianMixture in x_T
    (components N(alpha mu*_k, alpha^2 S*_k + sigma^2 I)); sample it to start the optimal chain."""
    s = model._need_schedule()
    T = s.T if T is None else float(T)
    star = model.tilted(reward, _check_lam(lam))
    a = float(s.alpha(T))
    s2 = float(s.sigma2(T))
    eye = torch.eye(model.dim, dtype=star.covs.dtype)
    return GaussianMixture(star.weights, a * star.means, a**2 * star.covs + s2 * eye, labels=star.labels,
                           dtype=star.means.dtype)


def biased_terminal_gaussian(model: GaussianMixture, reward: Reward, lam: float, T: Optional[float] = None):
    """The terminal law of the optimally steered chain started from the UNTILTED p_T (docs/theory.md §4), in
    closed form for Gaussian data N(mu, S) and a reward with a Gaussian-conjugate tilt (linear, quadratic).

    From X_T = y the h-transformed chain ends in the tilted posterior p(x0 | y) e^{r/lam} / h_T(y). The
    posterior is N(m_T(y), C_T) with m_T(y) = mu + G (y - alpha mu) (exact.py), and its tilt is
    N(A m_T(y) + c, C') with A, c, C' from ``reward.tilt`` (affine in the mean). Averaging over
    y ~ p_T = N(alpha mu, Sigma_T), with G Sigma_T G^T = S - C_T:

        terminal law = N(A mu + c,  C' + A (S - C_T) A^T),

    which equals the target p* = N(mu*, S*) as alpha(T) -> 0 (C_T -> S). Returns (mean, cov)."""
    if model.n_components != 1:
        raise ValueError("model: the closed-form bias is for Gaussian data (one component)")
    s = model._need_schedule()
    lam = _check_lam(lam)
    T = s.T if T is None else float(T)
    mu, S = model.means[0], model.covs[0]
    D = model.dim
    x = mu[None]
    _, _, C = model.posterior(x, torch.tensor(T, dtype=mu.dtype))
    C_T = C[0, 0]
    C_T = 0.5 * (C_T + C_T.T)
    basis = torch.cat([torch.zeros(1, D, dtype=mu.dtype), torch.eye(D, dtype=mu.dtype)])  # mean 0, e_1..e_D
    means_t, cov_t, _ = reward.tilt(basis, C_T.expand(D + 1, D, D), lam)
    c = means_t[0]
    A = (means_t[1:] - c).T  # column j = tilt(e_j) - tilt(0)
    mean = A @ mu + c
    cov = cov_t[0] + A @ (S - C_T) @ A.T
    return mean, 0.5 * (cov + cov.T)


def tilted_density_grid(log_p0: Callable, log_r_over_lam: Callable, grid: torch.Tensor):
    """A tilted law p0 e^{r/lam} / Z normalised numerically on a regular 2-D grid (docs/theory.md §5, labelled
    mixture with gamma != 1). grid: (G, G, 2) points; returns (density (G, G), log Z). The cell area is
    taken from the grid spacing."""
    if grid.ndim != 3 or grid.shape[-1] != 2:
        raise ValueError(f"grid: expected (G, G, 2) points of a regular 2-D grid, got {tuple(grid.shape)}")
    pts = grid.reshape(-1, 2)
    lp = log_p0(pts) + log_r_over_lam(pts)
    dx = float(grid[1, 0, 0] - grid[0, 0, 0])
    dy = float(grid[0, 1, 1] - grid[0, 0, 1])
    area = abs(dx * dy)
    logZ = torch.logsumexp(lp, 0) + math.log(area)
    return torch.exp(lp - logZ).reshape(grid.shape[:2]), logZ


# ----------------------------------------------------------------------------- exact law of a discretised chain


def chain_moments(model, schedule: NoiseSchedule, mean0: torch.Tensor, cov0: torch.Tensor, ts, *,
                  method: str = "ddpm", eta: float = 0.0, cond=None, guidance=None, check: bool = True):
    """Exact mean and covariance of the law the solver ``method`` produces on the grid ``ts`` when every
    step is affine in x (exact Gaussian data, guidance affine in x: linear or quadratic rewards), started
    from N(mean0, cov0) at ts[0]: each step x_s = A x_t + c + std z (``theory.solvers.transition``) maps
    (m, P) to (A m + c, A P A^T + diag(std^2)). Used to measure weak orders and biases without Monte
    Carlo noise. With ``check`` the step is verified affine at a random point (ValueError otherwise)."""
    ts = check_grid(ts, schedule)
    D = mean0.shape[0]
    if cov0.shape != (D, D):
        raise ValueError(f"cov0: expected shape ({D}, {D}) to match mean0, got {tuple(cov0.shape)}")
    m, P = mean0.clone(), cov0.clone()
    pts = torch.cat([torch.zeros(1, D, dtype=mean0.dtype), torch.eye(D, dtype=mean0.dtype),
                     torch.randn(1, D, dtype=mean0.dtype)])
    # the same points at every grid time: one replay gives every step's map
    steps = replay(model, schedule, pts.expand((ts.numel(),) + pts.shape), ts, method=method, eta=eta, cond=cond,
                   guidance=guidance)
    for mu, std in zip(steps.means.detach(), steps.stds.detach()):
        c = mu[0]
        A = (mu[1 : D + 1] - c).T
        if check:
            pred = A @ pts[-1] + c
            if not torch.allclose(pred, mu[-1], rtol=1e-6, atol=1e-8 * (1 + float(mu.abs().max()))):
                raise ValueError("model: the solver step is not affine in x (chain_moments needs Gaussian data "
                                 "and an affine guidance field)")
        var = std[0] ** 2
        m = A @ m + c
        P = A @ P @ A.T + torch.diag(var)
        P = 0.5 * (P + P.T)
    return m, P
