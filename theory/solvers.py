"""The one sampler of the package: the generative process of a VP model plus a guidance field,
discretised on any descending time grid (THEORY.md section 3).

    dX = [-1/2 beta X - beta (score(X, t) + guidance(X, t))] dt + sqrt(beta) dW-bar      (t: T -> 0)

Every step is a Gaussian transition x_s ~ N(mean(x_t), std^2 I) (std = 0 for ODE steps); the step
functions below return (mean, std) and ``sample`` is the only loop. Guidance enters through the score,
i.e. eps_total = eps(x, t, cond) - sigma(t) * guidance(x, t, eps). The two knobs fine-tuning needs are
arguments of the loop: ``grad_steps`` (gradients only through the last K steps; the earlier ones run
under ``torch.no_grad``) and ``checkpoint`` (re-materialise each step in the backward pass). With a
``reference`` eps model the loop also accumulates the discretised path KL to it (THEORY.md 4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from .param import eps_to_x0
from .schedules import DiscreteVP, NoiseSchedule, append_dims, as_time

__all__ = [
    "SOLVERS",
    "Trajectory",
    "sample",
    "time_grid",
    "transition",
    "gaussian_log_prob",
    "ddim_step",
    "em_step",
    "heun_step",
    "check_grid",
]

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- step functions
# Each maps (x_t, t, s, eps_fn) -> (mean, std) of the transition to time s < t. t, s are (B,) tensors.


def ddim_step(x, t, s, eps_fn: EpsFn, schedule: NoiseSchedule, eta: float = 0.0):
    """DDIM(eta) (Song et al. 2021, eq. 12): x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps + c z,
    c = eta sqrt(sigma_s^2/sigma_t^2 (1 - alpha_t^2/alpha_s^2)). eta = 1 is DDPM's ancestral step
    (the mean is the posterior mean of q(x_s | x_t, x0_hat)); eta = 0 the exponential integrator of
    the probability-flow ODE."""
    eps = eps_fn(x, t)
    a_t, a_s = schedule.alpha(t).to(x.dtype), schedule.alpha(s).to(x.dtype)
    s2_t, s2_s = schedule.sigma2(t).to(x.dtype), schedule.sigma2(s).to(x.dtype)
    x0 = eps_to_x0(x, eps, a_t, s2_t.sqrt())
    c2 = eta**2 * s2_s / s2_t * (1 - (a_t / a_s) ** 2)
    c2 = torch.clamp(c2, min=0.0)
    mean = append_dims(a_s, x) * x0 + append_dims(torch.sqrt(torch.clamp(s2_s - c2, min=0.0)), x) * eps
    return mean, append_dims(torch.sqrt(c2), x).expand_as(mean) if eta > 0 else torch.zeros_like(mean)


def em_step(x, t, s, eps_fn: EpsFn, schedule: NoiseSchedule):
    """Euler-Maruyama on the reverse SDE (THEORY.md 3), step h = t - s > 0:
    x_s = x_t + h [beta/2 x_t + beta score_total] + sqrt(beta h) z."""
    eps = eps_fn(x, t)
    b = schedule.beta(t).to(x.dtype)
    h = (t - s).to(x.dtype)
    score = -eps / append_dims(schedule.sigma(t).to(x.dtype), x)
    mean = x + append_dims(h * b, x) * (0.5 * x + score)
    return mean, append_dims(torch.sqrt(b * h), x).expand_as(mean)


def heun_step(x, t, s, eps_fn: EpsFn, schedule: NoiseSchedule):
    """Heun's method on the probability-flow ODE dx/dt = -1/2 beta (x + score) (Karras et al. 2022,
    Alg. 1); an Euler step when s reaches 0, where the score of singular data is undefined."""
    def f(y, u):
        score = -eps_fn(y, u) / append_dims(schedule.sigma(u).to(y.dtype), y)
        return -0.5 * append_dims(schedule.beta(u).to(y.dtype), y) * (y + score)

    dt = append_dims((s - t).to(x.dtype), x)
    d1 = f(x, t)
    x_e = x + dt * d1
    if bool((s > 0).all()):
        x_e = x + dt * 0.5 * (d1 + f(x_e, s))
    return x_e, torch.zeros_like(x_e)


#: solver name -> (step function, stochastic?, declared weak order); torchsde-style declaration.
SOLVERS = {
    "ddim": (ddim_step, None, 1.0),  # stochastic iff eta > 0
    "ddpm": (ddim_step, True, 1.0),
    "em": (em_step, True, 1.0),
    "heun": (heun_step, False, 2.0),
}


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


def _make_eps_fn(model, schedule, cond, guidance):
    def eps_fn(x, t):
        eps = model(x, t, cond)
        if eps.shape != x.shape:
            raise ValueError(
                f"model: {getattr(model, '__name__', type(model).__name__)} returned shape {tuple(eps.shape)} "
                f"for input {tuple(x.shape)}; an eps model must return x's shape"
            )
        if guidance is not None:
            g = guidance(x, t, eps)
            if g.shape != x.shape:
                raise ValueError(f"guidance: returned shape {tuple(g.shape)}, expected {tuple(x.shape)}")
            eps = eps - append_dims(schedule.sigma(t).to(x.dtype), x) * g
        return eps

    return eps_fn


def transition(model, schedule: NoiseSchedule, x: torch.Tensor, t, s, *, method: str = "ddim",
               eta: float = 0.0, cond=None, guidance=None):
    """The Gaussian transition (mean, std) of one step from t to s < t of the named solver; used by
    ``sample`` and by policy-gradient methods to re-evaluate log-probabilities of stored transitions."""
    if method not in SOLVERS:
        raise ValueError(f"method: unknown solver '{method}', choose from {sorted(SOLVERS)}")
    step_fn = SOLVERS[method][0]
    t, s = as_time(t, x), as_time(s, x)
    eps_fn = _make_eps_fn(model, schedule, cond, guidance)
    if method == "ddim":
        return step_fn(x, t, s, eps_fn, schedule, eta=eta)
    if method == "ddpm":
        return step_fn(x, t, s, eps_fn, schedule, eta=1.0)
    return step_fn(x, t, s, eps_fn, schedule)


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
    """Integrate the generative process from x_T at ts[0] down to ts[-1].

    Args:
        model: eps model ``model(x, t, cond) -> eps`` with continuous time t of shape (B,).
        schedule: the VP schedule.
        x_T: (B, ...) initial state at time ts[0].
        ts: strictly decreasing time grid in [0, T] (see ``time_grid``).
        method: 'ddim' (with ``eta``), 'ddpm' (ancestral = DDIM eta 1), 'em' (Euler-Maruyama), 'heun' (ODE).
        guidance: optional field ``guidance(x, t, eps) -> tensor`` added to the score.
        generator / noise: the randomness; ``noise`` (n_steps, B, ...) pre-drawn, so that solvers can be
            compared on the same Brownian increments.
        grad_steps: gradients only through the last K steps (DRaFT-K): an int, or a (B,) tensor of
            per-sample K (drawn once per sample by the caller). None: through every step.
        checkpoint: gradient checkpointing of every step with gradients.
        reference: eps model of the pre-trained process; accumulates the per-sample discretised path KL
            sum_steps |mean - mean_ref|^2 / (2 std^2), summed over dimensions (THEORY.md 4); deterministic
            steps (std = 0, e.g. DDPM's last step into t = 0) contribute nothing.
        keep_states / return_transitions: also return every state / every (mean, std).
    """
    if method not in SOLVERS:
        raise ValueError(f"method: unknown solver '{method}', choose from {sorted(SOLVERS)}")
    if method == "ddim" and not 0.0 <= eta:
        raise ValueError(f"eta: must be >= 0, got {eta}")
    ts = check_grid(ts, schedule).to(device=x_T.device)
    n = ts.numel() - 1
    stochastic = SOLVERS[method][1]
    stochastic = (eta > 0) if stochastic is None else stochastic
    if reference is not None and not stochastic:
        raise ValueError("reference: the path KL needs stochastic transitions (method 'ddpm', 'em', or 'ddim' with eta > 0)")
    if noise is not None and noise.shape != (n,) + tuple(x_T.shape):
        raise ValueError(f"noise: expected shape {(n,) + tuple(x_T.shape)}, got {tuple(noise.shape)}")
    B = x_T.shape[0]
    per_sample_k = None
    if grad_steps is None:
        first_grad = 0
    elif isinstance(grad_steps, int):
        if not 0 <= grad_steps <= n:
            raise ValueError(f"grad_steps: K must be in [0, {n}], got {grad_steps}")
        first_grad = n - grad_steps
    else:
        per_sample_k = torch.as_tensor(grad_steps, device=x_T.device).long()
        if per_sample_k.shape != (B,) or (per_sample_k < 0).any() or (per_sample_k > n).any():
            raise ValueError(f"grad_steps: per-sample K must have shape ({B},) with values in [0, {n}]")
        first_grad = int(n - per_sample_k.max())

    eps_fn = _make_eps_fn(model, schedule, cond, guidance)
    ref_fn = _make_eps_fn(reference, schedule, cond, None) if reference is not None else None
    step_fn = SOLVERS[method][0]
    kw = {"eta": eta} if method == "ddim" else ({"eta": 1.0} if method == "ddpm" else {})

    def one_step(x, t, s, z):
        mean, std = step_fn(x, t, s, eps_fn, schedule, **kw)
        kl = None
        if ref_fn is not None:
            mean_ref, _ = step_fn(x, t, s, ref_fn, schedule, **kw)
            # a deterministic step (std = 0: DDPM/DDIM's last step into t = 0) has no density; it carries
            # no KL term, so the sum is the path KL of the chain up to its last stochastic state
            safe = torch.where(std > 0, std, torch.ones_like(std))
            kl = (torch.where(std > 0, (mean - mean_ref) / safe, torch.zeros_like(mean)) ** 2).flatten(1).sum(1) / 2
        x_next = mean + std * z if stochastic else mean
        return x_next, mean, std, kl

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
        t = ts[i].to(x.dtype).expand(B)
        s = ts[i + 1].to(x.dtype).expand(B)
        if noise is not None:
            z = noise[i]
        elif stochastic:
            z = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        else:
            z = torch.zeros_like(x)
        if i < first_grad:
            with torch.no_grad():
                out = one_step(x, t, s, z)
        else:
            if per_sample_k is not None:  # stop-gradient on the state entering each sample's window
                # (i <= n - K_b: also cuts the dependence of x_i on the parameters through step i - 1)
                keep = (i > n - per_sample_k).view((B,) + (1,) * (x.ndim - 1))
                x = torch.where(keep, x, x.detach())
            if i == first_grad and grad_steps is not None:  # truncation; the full chain keeps d/dx_T
                x = x.detach()
            if checkpoint and torch.is_grad_enabled():
                out = _checkpoint(one_step, x, t, s, z, use_reentrant=False)
            else:
                out = one_step(x, t, s, z)
        x, mean, std, kl = out
        if keep_states:
            xs.append(x)
        if return_transitions:
            means.append(mean)
            stds.append(std)
        if kl is not None:
            if per_sample_k is not None:  # truncated samples: their early KL terms carry no gradient either
                kl = torch.where(i >= n - per_sample_k, kl, kl.detach())
            kl_total = kl_total + kl
            kl_steps.append(kl)
    return Trajectory(x0=x, ts=ts, xs=xs, means=means, stds=stds, kl=kl_total, kl_steps=kl_steps)
