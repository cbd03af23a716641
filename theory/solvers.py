"""The one sampler of the package: the generative process of a VP model plus a guidance field,
discretised on any descending time grid (docs/theory.md §3).

    dX = [-1/2 beta X - beta (score(X, t) + guidance(X, t))] dt + sqrt(beta) dW-bar      (t: T -> 0)

Every step is a Gaussian transition x_s ~ N(mean(x_t), std^2 I) (std = 0 for ODE steps). A solver is a
record (:class:`Solver`: its step function, whether it is stochastic for a given eta, its declared weak
order); :func:`sample` is the only loop, :func:`replay` re-evaluates the transitions of a stored
trajectory in one batched call (path KL, policy-gradient log-probabilities). Guidance enters through the
score, eps_total = eps(x, t, cond) - sigma(t) * guidance(x, t, eps) (docs/theory.md §2, §6). Schedule
coefficients along a grid, and the solver's per-step coefficients, are computed once per grid in the
working dtype and kept for the next pass on the same grid (:func:`grid_points`).
The two knobs fine-tuning needs are arguments of the loop: ``grad_steps`` (gradients only through the
last K steps; the earlier ones run under ``torch.no_grad``) and ``checkpoint`` (re-materialise each step
in the backward pass). With a ``reference`` eps model the loop also accumulates the discretised path KL
to it (docs/theory.md §4).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from .schedules import DiscreteVP, NoiseSchedule, as_time

__all__ = [
    "Solver",
    "SOLVERS",
    "solver",
    "is_stochastic",
    "ScheduleAt",
    "schedule_at",
    "grid_points",
    "reverse_drift",
    "guided_eps",
    "differentiable_eps",
    "Trajectory",
    "Transitions",
    "sample",
    "replay",
    "step_kl",
    "time_grid",
    "transition",
    "gaussian_log_prob",
    "ddim_coefs",
    "ddim_step",
    "ddpm_step",
    "em_step",
    "heun_step",
    "check_grid",
]


# ----------------------------------------------------------------------------- schedule coefficients


class ScheduleAt(NamedTuple):
    """The schedule at time t, in the working dtype (docs/theory.md §1): t (B,) as the network sees it,
    and alpha, sigma, sigma^2, beta either 0-d (one time for the whole batch, as on a grid) or (B,), with
    Tweedie's coefficients (docs/theory.md §2: x0_hat = x / alpha - (sigma / alpha) eps) and alpha^2, so
    that fields reading them (G_loss, ``theory.gradient_guidance``) get them once per grid, not per step."""

    t: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    sigma2: torch.Tensor
    beta: torch.Tensor
    inv_alpha: torch.Tensor  # 1 / alpha
    sigma_over_alpha: torch.Tensor  # sigma / alpha
    alpha2: torch.Tensor  # alpha^2

    def where(self, cond: torch.Tensor, other: "ScheduleAt") -> "ScheduleAt":
        """Per sample: ``other`` where ``cond`` (B,) holds, else self."""
        return ScheduleAt._make(torch.where(cond, b, a) for a, b in zip(self, other))


def schedule_at(schedule: NoiseSchedule, t: torch.Tensor) -> ScheduleAt:
    """:class:`ScheduleAt` for the (B,) times ``t``, computed in t's dtype (off-grid use: torchsde's
    intermediate times, single transitions)."""
    s2 = schedule.sigma2(t).to(t.dtype)
    return _with_derived(t, schedule.alpha(t).to(t.dtype), torch.sqrt(s2), s2, schedule.beta(t).to(t.dtype))


def _with_derived(t, alpha, sigma, sigma2, beta) -> ScheduleAt:
    """The :class:`ScheduleAt` with its derived coefficients 1/alpha, sigma/alpha, alpha^2 (elementwise)."""
    ia = alpha.reciprocal()
    return ScheduleAt(t, alpha, sigma, sigma2, beta, ia, sigma * ia, alpha * alpha)


def grid_points(schedule: NoiseSchedule, ts: torch.Tensor, batch: int, dtype: torch.dtype,
                device=None) -> list:
    """The schedule at every time of the grid ``ts``, computed once per grid in the working dtype
    (the same elementwise arithmetic as per-step calls; no per-step float64 interpolation): a list of
    len(ts) :class:`ScheduleAt` with t expanded to (batch,) and 0-d coefficients."""
    return _grid(schedule, ts, batch, dtype, device)[1]


def _grid(schedule, ts, batch, dtype, device):
    t = ts.to(dtype=dtype, device=device)
    at = schedule_at(schedule, t)
    cols = [c.unbind(0) for c in at[1:]]
    return at, [ScheduleAt(t[i].expand(batch), *(c[i] for c in cols)) for i in range(t.numel())]


_GRID_CACHE: "OrderedDict" = OrderedDict()


def _grid_for(schedule, ts, batch, dtype, device, sv, eta):
    """(grid points, per-step solver coefficients) of a sampling pass, computed once per grid and kept for
    the next passes on the same grid (Algorithm 1 runs hundreds); a few grids are kept, least recent out.
    Nothing here is modified in place by the solver."""
    key = (id(schedule), ts.detach().cpu().numpy().tobytes(), ts.numel(), batch, dtype, str(device), sv.name,
           float(eta))
    hit = _GRID_CACHE.get(key)
    if hit is not None and hit[0] is schedule:
        _GRID_CACHE.move_to_end(key)
        return hit[1], hit[2]
    with torch.inference_mode(False), torch.no_grad():  # plain constants, usable in any later grad mode
        along, points = _grid(schedule, ts, batch, dtype, device)
        coefs = _step_coefs(sv, along, eta)
    _GRID_CACHE[key] = (schedule, points, coefs)
    while len(_GRID_CACHE) > 16:
        _GRID_CACHE.popitem(last=False)
    return points, coefs


def _step_coefs(sv, at: ScheduleAt, eta: float) -> list:
    """Per step i of a grid (``at`` along the grid), the solver's coefficients as 0-d tensors, or Nones."""
    n = at.t.numel() - 1
    if sv.coefs is None:
        return [None] * n
    head = ScheduleAt._make(v[:-1] for v in at)
    tail = ScheduleAt._make(v[1:] for v in at)
    per = [c.unbind(0) for c in sv.coefs(head, tail, eta)]
    return [tuple(c[i] for c in per) for i in range(n)]


def _bc(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A 0-d or (B,) coefficient shaped to broadcast against x (B, ...)."""
    return v if v.ndim == 0 else v.reshape(v.shape + (1,) * (x.ndim - 1))


# ----------------------------------------------------------------------------- the guided eps and the drift

EpsFn = Callable[[torch.Tensor, ScheduleAt], torch.Tensor]


def _call_model(model, x, t, cond):
    eps = model(x, t, cond)
    if eps.shape != x.shape:
        raise ValueError(
            f"model: {getattr(model, '__name__', type(model).__name__)} returned shape {tuple(eps.shape)} "
            f"for input {tuple(x.shape)}; an eps model must return x's shape"
        )
    return eps


def _call_field(field, x, at: ScheduleAt, eps):
    g = field(x, at.t, eps, at=at) if getattr(field, "accepts_at", False) else field(x, at.t, eps)
    if g.shape != x.shape:
        raise ValueError(f"guidance: returned shape {tuple(g.shape)}, expected {tuple(x.shape)}")
    return g


def guided_eps(model, cond=None, guidance=None) -> EpsFn:
    """eps_total(x, at) = eps(x, t, cond) - sigma(t) guidance(x, t, eps) (docs/theory.md §2, §6): the
    only place a guidance field meets the network.

    The field protocol is ``guidance(x, t, eps) -> tensor`` added to the score; a field may also take
    the keyword ``at`` (:class:`ScheduleAt`, the schedule at t) when it sets ``field.accepts_at = True``.
    A field that differentiates the network at x (G_loss, DPS) names that network and its condition in
    ``field.eps_model`` and ``field.eps_cond``: when they are this ``model`` and ``cond`` (the same
    objects), the network is evaluated ONCE, with a graph from x, and the field is handed that eps (so a
    step costs one forward pass plus the field's one vector-Jacobian product); every other field is handed
    eps detached (and evaluates its own network if it needs one). Gradients through the chain are unchanged: under
    ``torch.no_grad`` the graph is built only for the field and dropped; with gradients enabled eps
    keeps its graph to the parameters (and to x) as without guidance."""
    share = (guidance is not None and getattr(guidance, "eps_model", None) is model
             and getattr(guidance, "eps_cond", None) is cond)

    def eps_fn(x, at: ScheduleAt):
        if share:
            outer = torch.is_grad_enabled()
            with torch.enable_grad():
                xg = x if x.requires_grad else x.detach().requires_grad_(True)
                eps = _call_model(model, xg, at.t, cond)
                g = _call_field(guidance, xg, at, eps)
            if not outer:
                eps, g = eps.detach(), g.detach()
        else:
            eps = _call_model(model, x, at.t, cond)
            if guidance is None:
                return eps
            g = _call_field(guidance, x, at, eps.detach())
        return torch.addcmul(eps, _bc(-at.sigma, x), g)  # eps - sigma g

    return eps_fn


def differentiable_eps(model, x: torch.Tensor, t: torch.Tensor, cond, eps: Optional[torch.Tensor]):
    """For a field that differentiates the network at x (call under ``torch.enable_grad``): (x_g, eps, retain)
    with eps a function of x_g. The eps the solver handed the field when it carries a graph from x
    (``guided_eps`` with the field's ``eps_model``: no second forward pass; ``retain``: keep that graph for
    the solver), else a fresh evaluation at a detached copy of x."""
    if eps is not None and eps.requires_grad and x.requires_grad:
        return x, eps, True
    xg = x.detach().requires_grad_(True)
    return xg, model(xg, t, cond), False


def reverse_drift(x: torch.Tensor, eps: torch.Tensor, at: ScheduleAt, h=1.0, ode: bool = False) -> torch.Tensor:
    """h times the drift of the generative process in reversed time (docs/theory.md §3), score = -eps / sigma:

        reverse SDE         dx/d(-t) = beta (x/2 + score)            (``ode=False``)
        probability flow    dx/d(-t) = beta (x/2 + score/2)          (``ode=True``)

    the one drift of Euler-Maruyama, Heun and torchsde's ``ReverseSDE``. ``h`` (0-d, (B,) or a float)
    scales it: a step t -> s = t - h adds h times the drift."""
    score = -eps / _bc(at.sigma, x)
    hb = _bc(h * at.beta, x)
    return hb * (0.5 * x + 0.5 * score) if ode else hb * (0.5 * x + score)


# ----------------------------------------------------------------------------- step functions
# Each maps (x_t, eps_fn, at_t, at_s, eta, coefs) -> (mean, std) of the transition to time s < t; std is one
# number per sample (0-d or (B, 1, ...)), broadcast against mean (``transition``, ``replay`` and ``sample``
# return it expanded to mean's shape).


def ddim_coefs(at_t: ScheduleAt, at_s: ScheduleAt, eta: float):
    """DDIM(eta)'s step t -> s as x_s = c_x x_t + c_eps eps + c z (docs/theory.md §3; Song et al. 2021, eq. 12):
    c = eta sqrt(sigma_s^2/sigma_t^2 (1 - alpha_t^2/alpha_s^2)), and alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps
    with Tweedie's x0_hat = (x_t - sigma_t eps) / alpha_t gives c_x = alpha_s / alpha_t,
    c_eps = sqrt(sigma_s^2 - c^2) - alpha_s sigma_t / alpha_t. Computed once per grid by ``sample``."""
    a_t, a_s, s2_t, s2_s = at_t.alpha, at_s.alpha, at_t.sigma2, at_s.sigma2
    c2 = torch.clamp(eta**2 * s2_s / s2_t * (1 - (a_t / a_s) ** 2), min=0.0)
    c_x = a_s / a_t
    return c_x, torch.sqrt(torch.clamp(s2_s - c2, min=0.0)) - c_x * at_t.sigma, torch.sqrt(c2)


def ddim_step(x, eps_fn: EpsFn, at_t: ScheduleAt, at_s: ScheduleAt, eta: float = 0.0, coefs=None):
    """DDIM(eta) (Song et al. 2021, eq. 12; docs/theory.md §3): x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2)
    eps + c z (``ddim_coefs``). eta = 1 is DDPM's ancestral step (the mean is the posterior mean of
    q(x_s | x_t, x0_hat)); eta = 0 the exponential integrator of the probability-flow ODE."""
    c_x, c_e, c = ddim_coefs(at_t, at_s, eta) if coefs is None else coefs
    eps = eps_fn(x, at_t)
    return torch.addcmul(_bc(c_x, x) * x, _bc(c_e, x), eps), _bc(c, x)


def ddpm_step(x, eps_fn: EpsFn, at_t: ScheduleAt, at_s: ScheduleAt, eta: float = 1.0, coefs=None):
    """DDPM's ancestral step (Ho et al. 2020, eq. 11) = DDIM with eta = 1 (the ``eta`` argument is ignored)."""
    return ddim_step(x, eps_fn, at_t, at_s, 1.0, coefs)


def em_step(x, eps_fn: EpsFn, at_t: ScheduleAt, at_s: ScheduleAt, eta: float = 0.0, coefs=None):
    """Euler-Maruyama on the reverse SDE (docs/theory.md §3), step h = t - s > 0:
    x_s = x_t + h beta (x_t/2 + score_total) + sqrt(beta h) z."""
    h = at_t.t - at_s.t
    mean = x + reverse_drift(x, eps_fn(x, at_t), at_t, h)
    return mean, _bc(torch.sqrt(at_t.beta * h), x)


def heun_step(x, eps_fn: EpsFn, at_t: ScheduleAt, at_s: ScheduleAt, eta: float = 0.0, coefs=None):
    """Heun's method on the probability-flow ODE dx/d(-t) = beta (x + score) / 2 (Karras et al. 2022,
    Alg. 1; docs/theory.md §3); an Euler step where s reaches 0, where the score of singular data is undefined."""
    h = _bc(at_t.t - at_s.t, x)
    d1 = reverse_drift(x, eps_fn(x, at_t), at_t, ode=True)
    x_e = x + h * d1
    last = at_s.t <= 0
    if bool(last.all()):
        return x_e, torch.zeros((), dtype=x.dtype, device=x.device)
    mixed = bool(last.any())  # a batched replay over several steps: the corrector at t where s = 0, then dropped
    at_c = at_s.where(last, at_t) if mixed else at_s
    x_h = x + h * 0.5 * (d1 + reverse_drift(x_e, eps_fn(x_e, at_c), at_c, ode=True))
    if mixed:
        x_h = torch.where(_bc(last, x), x_e, x_h)
    return x_h, torch.zeros((), dtype=x.dtype, device=x.device)


@dataclass(frozen=True)
class Solver:
    """A solver (docs/theory.md §3), declared as torchsde declares its methods: the step function
    ``step(x, eps_fn, at_t, at_s, eta, coefs=None) -> (mean, std)``, whether the step is stochastic for a
    given eta, its declared weak order, and ``coefs(at_t, at_s, eta)``: the step's schedule coefficients,
    which ``sample`` computes once per grid for all steps (None: the step needs none beyond ``ScheduleAt``)."""

    name: str
    step: Callable
    stochastic: Callable[[float], bool]
    order: float
    coefs: Optional[Callable] = None

    def is_stochastic(self, eta: float = 0.0) -> bool:
        return bool(self.stochastic(eta))


SOLVERS = {
    "ddim": Solver("ddim", ddim_step, lambda eta: eta > 0, 1.0, ddim_coefs),
    "ddpm": Solver("ddpm", ddpm_step, lambda eta: True, 1.0, lambda at_t, at_s, eta: ddim_coefs(at_t, at_s, 1.0)),
    "em": Solver("em", em_step, lambda eta: True, 1.0),
    "heun": Solver("heun", heun_step, lambda eta: False, 2.0),
}


def solver(method: str) -> Solver:
    """The :class:`Solver` named ``method`` (ValueError naming the choices otherwise)."""
    if method not in SOLVERS:
        raise ValueError(f"method: unknown solver '{method}', choose from {sorted(SOLVERS)}")
    return SOLVERS[method]


def is_stochastic(method: str, eta: float = 0.0) -> bool:
    """Whether the named solver's steps are stochastic for this eta."""
    return solver(method).is_stochastic(eta)


# ----------------------------------------------------------------------------- grids and checks


def check_grid(ts: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Validate a time grid: 1-D, at least 2 points, strictly decreasing, inside [0, T]."""
    ts = torch.as_tensor(ts, dtype=torch.float64)
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(f"ts: time grid must be 1-D with >= 2 points, got shape {tuple(ts.shape)}")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError("ts: time grid must be strictly decreasing (from noise t ~ T to data t ~ 0)")
    schedule.check_time(ts, "ts")
    return ts


def time_grid(schedule: NoiseSchedule, n_steps: int, t_min: float = 0.0, t_max: Optional[float] = None,
              kind: str = "uniform") -> torch.Tensor:
    """A descending grid of n_steps + 1 times from t_max (default T) to t_min.

    kind: 'uniform' in t, 'quadratic' (denser near the data), or 'discrete' (a DiscreteVP's own
    timesteps with diffusers' 'leading' spacing; t_min and t_max are then ignored)."""
    if n_steps < 1:
        raise ValueError(f"n_steps: need >= 1, got {n_steps}")
    if kind == "discrete":
        if not isinstance(schedule, DiscreteVP):
            raise ValueError("kind: 'discrete' needs a DiscreteVP schedule")
        return schedule.step_times(n_steps)
    t_max = schedule.T if t_max is None else float(t_max)
    if not 0 <= t_min < t_max <= schedule.T:
        raise ValueError(f"t_min, t_max: need 0 <= t_min < t_max <= T={schedule.T}, got {t_min}, {t_max}")
    u = torch.linspace(1.0, 0.0, n_steps + 1, dtype=torch.float64)
    if kind == "uniform":
        pass
    elif kind == "quadratic":
        u = u**2
    else:
        raise ValueError(f"kind: unknown grid '{kind}', use 'uniform', 'quadratic' or 'discrete'")
    return t_min + (t_max - t_min) * u


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2 I) summed over all but the batch dimension, shape (B,)."""
    std = torch.broadcast_to(std, mean.shape)
    lp = -0.5 * ((x - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).sum(1)


def step_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL of one Gaussian transition to the reference's from the same state, same std (docs/theory.md §4):
    |mean - mean_ref|^2 / (2 std^2) summed over all but the batch dimension, (B,). A deterministic step
    (std = 0: DDPM/DDIM's last step into t = 0) has no density and carries no KL term, so a sum over
    steps is the path KL of the chain up to its last stochastic state."""
    safe = torch.where(std > 0, std, torch.ones_like(std))
    return (torch.where(std > 0, (mean - mean_ref) / safe, torch.zeros_like(mean)) ** 2).flatten(1).sum(1) / 2


# ----------------------------------------------------------------------------- one transition, a replay


def transition(model, schedule: NoiseSchedule, x: torch.Tensor, t, s, *, method: str = "ddim",
               eta: float = 0.0, cond=None, guidance=None):
    """The Gaussian transition (mean, std) of one step from t to s < t of the named solver (t, s: numbers
    or (B,) tensors). Stored trajectories are re-evaluated with :func:`replay`."""
    sv = solver(method)
    at_t, at_s = schedule_at(schedule, as_time(t, x)), schedule_at(schedule, as_time(s, x))
    mean, std = sv.step(x, guided_eps(model, cond, guidance), at_t, at_s, eta)
    return mean, std.expand_as(mean)


class Transitions(NamedTuple):
    """Per-step Gaussian transitions of a trajectory: ``means``, ``stds`` of shape (n_steps, B, ...)."""

    means: torch.Tensor
    stds: torch.Tensor

    def log_prob(self, xs) -> torch.Tensor:
        """log N(xs[i + 1]; means[i], stds[i]^2 I) per step and sample, (n_steps, B) (policy gradients).
        A deterministic step (std = 0: DDIM/DDPM's last step into t = 0 when alpha_bar there is 1) is no
        action of the policy: it has no density and contributes 0, as it carries no KL in :func:`step_kl`;
        the PPO ratio is then taken over the stochastic steps (DDPO, Black et al. 2024, sec. 4.2)."""
        nxt = _stack(xs)[1:]
        std = torch.broadcast_to(self.stds, self.means.shape)
        stoch = std > 0
        if bool(stoch.all()):
            n = nxt.shape[0]
            return gaussian_log_prob(nxt.flatten(0, 1), self.means.flatten(0, 1), std.flatten(0, 1)).view(n, -1)
        safe = torch.where(stoch, std, torch.ones_like(std))
        lp = -0.5 * ((nxt - self.means) / safe) ** 2 - torch.log(safe) - 0.5 * math.log(2 * math.pi)
        return torch.where(stoch, lp, torch.zeros_like(lp)).flatten(2).sum(2)

    def kl_to(self, ref: "Transitions") -> torch.Tensor:
        """Discretised path KL (B,) to the reference's transitions from the same states (:func:`step_kl`)."""
        n = self.means.shape[0]
        terms = step_kl(self.means.flatten(0, 1), ref.means.flatten(0, 1), self.stds.flatten(0, 1)).view(n, -1)
        return terms.sum(0)


def _stack(xs) -> torch.Tensor:
    return xs if torch.is_tensor(xs) else torch.stack(list(xs))


def _tile(cond, reps: int, batch: int):
    """cond for ``reps`` stacked copies of a batch (per-sample tensors are tiled, anything else kept)."""
    if torch.is_tensor(cond) and cond.ndim >= 1 and cond.shape[0] == batch:
        return cond.repeat((reps,) + (1,) * (cond.ndim - 1))
    return cond


def replay(model, schedule: NoiseSchedule, xs, ts, *, method: str = "ddim", eta: float = 0.0, cond=None,
           guidance=None, chunk: Optional[int] = None) -> Transitions:
    """Re-evaluate every transition of a stored trajectory under ``model``: the Gaussian (mean, std) of
    step i from state xs[i] at ts[i] to ts[i + 1], for all steps at once (docs/theory.md §3-4).

    The replay behind the path KL (``Transitions.kl_to`` of two replays, ``theory.values.path_kl``),
    policy-gradient log-probabilities (``Transitions.log_prob(xs)``, DDPO) and exact chain moments.

    Args:
        model: eps model ``model(x, t, cond)``; gradients flow to its parameters (call under
            ``torch.no_grad()`` for old log-probabilities).
        xs: the states, a (n + 1, B, ...) tensor or a list of n + 1 (B, ...) tensors, x at ts[0] first
            (``sample(keep_states=True).xs``). Only xs[:-1] enter the network.
        ts: the grid of the trajectory (n + 1 times).
        method, eta, cond: as in :func:`sample`; a per-sample ``cond`` (first dimension B) is tiled.
        guidance: a guidance field; fields are built for one batch of B samples, so with guidance the
            steps are evaluated one at a time (n network calls of B samples).
        chunk: without guidance, at most ``chunk`` steps per network call (None: all n steps in one
            call of n * B samples; set it to bound memory for large networks).

    Returns:
        :class:`Transitions` with means and stds of shape (n, B, ...).
    """
    sv = solver(method)
    X = _stack(xs)
    ts = check_grid(ts, schedule).to(device=X.device)
    n = ts.numel() - 1
    if X.shape[0] != n + 1:
        raise ValueError(f"xs: need one state per grid time ({n + 1}), got {X.shape[0]}")
    B = X.shape[1]
    if guidance is not None:
        chunk = 1
    elif chunk is None:
        chunk = n
    elif not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(f"chunk: steps per network call must be an int >= 1, got {chunk!r}")
    t = ts.to(X.dtype)
    means, stds = [], []
    for i0 in range(0, n, chunk):
        i1 = min(i0 + chunk, n)
        k = i1 - i0
        at_t = schedule_at(schedule, t[i0:i1].repeat_interleave(B))
        at_s = schedule_at(schedule, t[i0 + 1:i1 + 1].repeat_interleave(B))
        eps_fn = guided_eps(model, cond if k == 1 else _tile(cond, k, B), guidance)
        m, s = sv.step(X[i0:i1].flatten(0, 1), eps_fn, at_t, at_s, eta)
        means.append(m.view((k, B) + m.shape[1:]))
        stds.append(s.expand_as(m).reshape((k, B) + m.shape[1:]))
    return Transitions(torch.cat(means), torch.cat(stds))


# ----------------------------------------------------------------------------- the loop


@dataclass
class Trajectory:
    """What ``sample`` returns. ``x0`` is the state at the last grid time; the lists hold one entry per
    step (``xs`` one per grid time, x_T first) when asked for."""

    x0: torch.Tensor
    ts: torch.Tensor
    xs: Optional[list] = None
    means: Optional[list] = None
    stds: Optional[list] = None
    kl: Optional[torch.Tensor] = None  # (B,) discretised path KL to the reference model
    kl_steps: Optional[list] = None


@dataclass(frozen=True)
class _GradWindow:
    """Which steps carry gradients (DRaFT-K truncation, docs/theory.md §6): steps before ``first`` run
    under no_grad; a per-sample K (B,) stops the gradient at each sample's own window start."""

    first: int
    n: int
    truncated: bool
    per_sample_k: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, grad_steps, n: int, B: int, device) -> "_GradWindow":
        if grad_steps is None:
            return cls(0, n, False)
        if isinstance(grad_steps, int):
            if not 0 <= grad_steps <= n:
                raise ValueError(f"grad_steps: K must be in [0, {n}], got {grad_steps}")
            return cls(n - grad_steps, n, True)
        k = torch.as_tensor(grad_steps, device=device).long()
        if k.shape != (B,) or (k < 0).any() or (k > n).any():
            raise ValueError(f"grad_steps: per-sample K must have shape ({B},) with values in [0, {n}]")
        return cls(int(n - k.max()), n, True, k)

    def enter(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The state entering step i >= first, cut from the graph where that sample's window starts
        (i <= n - K_b: also cuts the dependence of x_i on the parameters through step i - 1)."""
        if not self.truncated:
            return x
        if self.per_sample_k is not None:
            keep = (i > self.n - self.per_sample_k).view((x.shape[0],) + (1,) * (x.ndim - 1))
            x = torch.where(keep, x, x.detach())
        if i == self.first and self.truncated:  # truncation; the full chain keeps d/dx_T
            x = x.detach()
        return x

    def kl(self, kl: torch.Tensor, i: int) -> torch.Tensor:
        """A step's KL term; truncated samples' early terms carry no gradient either."""
        if self.per_sample_k is None:
            return kl
        return torch.where(i >= self.n - self.per_sample_k, kl, kl.detach())


def sample(
    model,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    ts: Union[torch.Tensor, Sequence[float]],
    *,
    method: str = "ddim",
    eta: float = 0.0,
    cond=None,
    guidance=None,
    generator: Optional[torch.Generator] = None,
    noise: Optional[torch.Tensor] = None,
    grad_steps: Union[None, int, torch.Tensor] = None,
    checkpoint: bool = False,
    reference=None,
    keep_states: bool = False,
    return_transitions: bool = False,
    progress: bool = False,
) -> Trajectory:
    """Integrate the generative process from x_T at ts[0] down to ts[-1] (docs/theory.md §3): for each
    step i, x_{i+1} = mean_i(x_i) + std_i z_i with the solver's Gaussian transition of the guided eps.

    Args:
        model: eps model ``model(x, t, cond) -> eps`` with continuous time t of shape (B,).
        schedule: the VP schedule.
        x_T: (B, ...) initial state at time ts[0].
        ts: strictly decreasing time grid in [0, T] (see ``time_grid``).
        method: 'ddim' (with ``eta``), 'ddpm' (ancestral = DDIM eta 1), 'em' (Euler-Maruyama), 'heun' (ODE).
        guidance: optional field ``guidance(x, t, eps) -> tensor`` added to the score (see ``guided_eps``).
        generator / noise: the randomness; ``noise`` (n_steps, B, ...) pre-drawn, so that solvers can be
            compared on the same Brownian increments.
        grad_steps: gradients only through the last K steps (DRaFT-K): an int, or a (B,) tensor of
            per-sample K (drawn once per sample by the caller). None: through every step.
        checkpoint: gradient checkpointing of every step with gradients.
        reference: eps model of the pre-trained process; accumulates the per-sample discretised path KL
            sum_steps |mean - mean_ref|^2 / (2 std^2), summed over dimensions (docs/theory.md §4; ``step_kl``);
            deterministic steps (std = 0, e.g. DDPM's last step into t = 0) contribute nothing.
        keep_states / return_transitions: also return every state / every (mean, std).
    """
    sv = solver(method)
    if method == "ddim" and not 0.0 <= eta:
        raise ValueError(f"eta: must be >= 0, got {eta}")
    ts = check_grid(ts, schedule).to(device=x_T.device)
    n = ts.numel() - 1
    stochastic = sv.is_stochastic(eta)
    if reference is not None and not stochastic:
        raise ValueError("reference: the path KL needs stochastic transitions (method 'ddpm', 'em', or 'ddim' with eta > 0)")
    if noise is not None and noise.shape != (n,) + tuple(x_T.shape):
        raise ValueError(f"noise: expected shape {(n,) + tuple(x_T.shape)}, got {tuple(noise.shape)}")
    B = x_T.shape[0]
    window = _GradWindow.of(grad_steps, n, B, x_T.device)
    points, coefs = _grid_for(schedule, ts, B, x_T.dtype, x_T.device, sv, eta)
    eps_fn = guided_eps(model, cond, guidance)
    ref_fn = guided_eps(reference, cond) if reference is not None else None

    def one_step(x, i, z):
        mean, std = sv.step(x, eps_fn, points[i], points[i + 1], eta, coefs[i])
        kl = step_kl(mean, sv.step(x, ref_fn, points[i], points[i + 1], eta, coefs[i])[0], std) if ref_fn else None
        return (torch.addcmul(mean, std, z) if stochastic else mean), mean, std, kl

    x = x_T
    xs = [x] if keep_states else None
    means, stds = ([], []) if return_transitions else (None, None)
    kl_total = torch.zeros(B, dtype=x_T.dtype, device=x_T.device) if ref_fn is not None else None
    kl_steps = [] if ref_fn is not None else None
    iterator = range(n)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"sampling ({method})", leave=False)
    for i in iterator:
        if noise is not None:
            z = noise[i]
        elif stochastic:
            z = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        else:
            z = None
        if i < window.first:
            with torch.no_grad():
                out = one_step(x, i, z)
        else:
            x = window.enter(x, i)
            if checkpoint and torch.is_grad_enabled():
                out = _checkpoint(one_step, x, i, z, use_reentrant=False)
            else:
                out = one_step(x, i, z)
        x, mean, std, kl = out
        if keep_states:
            xs.append(x)
        if return_transitions:
            means.append(mean)
            stds.append(std.expand_as(mean))
        if kl is not None:
            kl = window.kl(kl, i)
            kl_total = kl_total + kl
            kl_steps.append(kl)
    return Trajectory(x0=x, ts=ts, xs=xs, means=means, stds=stds, kl=kl_total, kl_steps=kl_steps)
