"""Fine-tuning strategies: where gradients flow through ``theory.solvers.sample`` (docs/theory.md §6).

Objective (CTRL eq. 5 / DRaFT eq. 2; docs/theory.md §6), per optimisation step over a batch of B samples:

    J(theta) = mean_b r(x0_b, c_b) - lam * mean_b KL_path,b        KL_path = sum_steps |m - m_ref|^2 / (2 std^2)

with x0 the end of the generative chain and KL_path the discretised path KL to the pre-trained model
(docs/theory.md §4). lam = 0 is DRaFT's objective. Every strategy has ONE interface:
``step(ctx) -> StepResult``, which computes a loss and hands it to ``ctx.update`` (the engine's only
zero_grad / backward / clip / optimiser step), and ``queries(batch_size)``, the reward evaluations one
step costs. Gradient strategies implement ``objective(ctx) -> (J, rewards, kl)`` and make one update of
-J; DDPO makes one update per PPO minibatch.

- ``DRaFT()``: through the whole chain (Clark et al. 2024, Alg. 1).
- ``DRaFTK(k)``: through the last K steps; K fixed, or drawn once per sample from the inclusive range.
- ``DRaFTLV(n)``: the chain without gradient, n re-noisings of x0 to the last step's start and the last step
  with gradient; the n rewards summed (DRaFT Alg. 2).
- ``ReFL(steps)``: the reward of Tweedie's x0_hat m steps before the end (Xu et al. 2023, sec. 4).
- ``Adjoint()``: the whole chain through torchsde's stochastic adjoint (memory O(1) in the steps).
- ``DDPO(clip, inner_steps, minibatches)``: PPO on the sampler's Gaussian transitions (Black et al. 2024).

``STRATEGIES`` maps names to classes; ``make_strategy(name, **options)`` builds one.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from ..param import eps_to_x0
from ..schedules import NoiseSchedule
from ..solvers import Transitions, replay, sample
from .config import FinetuneConfig
from .distributed import SingleProcess

__all__ = ["StepContext", "StepResult", "Strategy", "DRaFT", "DRaFTK", "DRaFTLV", "ReFL", "Adjoint", "DDPO",
           "STRATEGIES", "make_strategy", "strategy_name", "NonFiniteRewardError", "normalise_per_condition",
           "ppo_loss", "renoise", "callable_name"]


class NonFiniteRewardError(FloatingPointError):
    """A reward returned NaN or inf; the message names the optimisation step and the sample indices."""


def callable_name(f) -> str:
    return getattr(f, "__name__", None) or type(f).__name__


def call_reward(reward, x0, cond, step: int) -> torch.Tensor:
    """``reward(x0, cond)``, checked: shape (B,) and finite (else an error naming step and samples)."""
    r = reward(x0, cond)
    B = x0.shape[0]
    if not isinstance(r, torch.Tensor) or r.shape != (B,):
        shape = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
        raise ValueError(f"reward: {callable_name(reward)} returned {shape} for {B} samples; a reward must return a "
                         f"tensor of shape ({B},), one value per sample")
    bad = ~torch.isfinite(r.detach())
    if bool(bad.any()):
        idx = torch.nonzero(bad).flatten().tolist()
        raise NonFiniteRewardError(f"reward: {callable_name(reward)} returned non-finite values at optimisation step "
                                   f"{step} for samples {idx[:20]}{' ...' if len(idx) > 20 else ''} "
                                   f"(values {r.detach()[bad][:5].tolist()})")
    return r


def _repeat_cond(cond, n: int):
    if cond is None:
        return None
    if hasattr(cond, "repeat") and not isinstance(cond, torch.Tensor):
        return cond.repeat(n)
    c = torch.as_tensor(cond)
    return c.repeat((n,) + (1,) * (c.ndim - 1))


def _index_cond(cond, idx):
    if cond is None:
        return None
    if not isinstance(cond, torch.Tensor) and hasattr(cond, "__getitem__") and hasattr(cond, "key"):
        return cond[idx]
    c = torch.as_tensor(cond)
    return c[idx.to(c.device)]


def renoise(schedule: NoiseSchedule, x: torch.Tensor, s, t, z: torch.Tensor) -> torch.Tensor:
    """A draw of the forward process q(x_t | x_s) for s < t (docs/theory.md §1):
    x_t = (alpha_t/alpha_s) x_s + sqrt(sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2) z (s = 0: alpha_t x0 + sigma_t z)."""
    s = torch.as_tensor(s, dtype=torch.float64)
    t = torch.as_tensor(t, dtype=torch.float64)
    a = schedule.alpha(t) / schedule.alpha(s)
    v = torch.clamp(schedule.sigma2(t) - a**2 * schedule.sigma2(s), min=0.0)
    return a.to(x.dtype) * x + v.sqrt().to(x.dtype) * z


@dataclass
class StepContext:
    """What a strategy sees in one optimisation step: the models, the reward, this step's batch and
    generators, and ``update(loss) -> grad norm`` (the engine's optimiser step)."""

    model: nn.Module
    reference: Optional[nn.Module]  # the pre-trained eps model (eps penalty), or None
    kl_reference: Optional[nn.Module]  # passed to ``sample`` for the path KL, or None (not needed)
    schedule: NoiseSchedule
    reward: Callable
    ts: torch.Tensor
    x_T: torch.Tensor
    cond: Any
    config: FinetuneConfig
    gen: torch.Generator  # CPU generator (strategy draws: K, m)
    noise_gen: Optional[torch.Generator]  # generator on x's device (sampler noise)
    step: int  # the optimisation step being made, counted from 1
    dist: Any = field(default_factory=SingleProcess)
    update: Optional[Callable[[torch.Tensor], float]] = None

    @property
    def n(self) -> int:
        return self.ts.numel() - 1

    def own(self, draw: Callable[[int], torch.Tensor], copies: int = 1) -> torch.Tensor:
        """``draw(n)`` for this process's samples (``copies`` blocks of the batch, copy-major): with k ranks,
        draws the combined batch (n = copies k b) and keeps this rank's slice of every block, so every rank
        consumes the generator as a single process with the combined batch would (``Distributed``)."""
        k, b = self.dist.world_size, self.x_T.shape[0]
        if k == 1:
            return draw(copies * b)
        full = draw(copies * k * b)
        r = self.dist.rank
        return full.view((copies, k * b) + tuple(full.shape[1:]))[:, r * b:(r + 1) * b].reshape(
            (copies * b,) + tuple(full.shape[1:]))

    def sample(self, x_T, ts=None, **kw):
        c = self.config
        ts = self.ts if ts is None else ts
        if self.dist.world_size > 1 and c.stochastic and "noise" not in kw:
            # the combined batch's noise, step by step in the order ``sample`` would draw it, sliced
            copies = x_T.shape[0] // self.x_T.shape[0]  # DRaFT-LV samples n copies per sample

            def draw_step(m):
                return torch.randn((m,) + tuple(x_T.shape[1:]), dtype=x_T.dtype, device=x_T.device,
                                   generator=self.noise_gen)

            kw["noise"] = torch.stack([self.own(draw_step, copies) for _ in range(ts.numel() - 1)])
        return sample(self.model, self.schedule, x_T, ts, method=c.method, eta=c.eta,
                      cond=kw.pop("cond", self.cond), generator=self.noise_gen, checkpoint=c.checkpoint, **kw)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """The combined batch's values (k b, ...) of a per-sample tensor (b, ...) of this rank, through the
        group's mean all-reduce: each rank contributes k t in its own rows and zeros elsewhere, in float64,
        so the mean returns every rank's values exactly (k t and the sum are exact; (k t) / k = t)."""
        k, b = self.dist.world_size, t.shape[0]
        if k == 1:
            return t
        full = torch.zeros((k * b,) + tuple(t.shape[1:]), dtype=torch.float64, device=t.device)
        full[self.dist.rank * b:(self.dist.rank + 1) * b] = t.double() * k
        self.dist.all_reduce_mean_([full])
        return full.to(t.dtype)

    def call_reward(self, x0, cond=None):
        return call_reward(self.reward, x0, self.cond if cond is None else cond, self.step)

    def eps_penalty(self, xs: list, first: int, ts=None, cond=None):
        """DRaFT+ regulariser (NeMo-Aligner DRaFT+): mean over the steps i >= first with gradient of
        |eps_theta(x_i, t_i) - eps_ref(x_i, t_i)|^2 summed over dimensions, averaged over the batch."""
        ts = self.ts if ts is None else ts
        cond = self.cond if cond is None else cond
        tot, cnt = 0.0, 0
        for i in range(first, ts.numel() - 1):
            x = xs[i].detach()
            t = ts[i].to(x.dtype).expand(x.shape[0])
            with torch.no_grad():
                e_ref = self.reference(x, t, cond)
            d = self.model(x, t, cond) - e_ref
            tot = tot + (d**2).flatten(1).sum(1).mean()
            cnt += 1
        return tot / max(cnt, 1)


@dataclass
class StepResult:
    """One optimisation step's outcome (the history row's raw material)."""

    rewards: torch.Tensor
    kl: Optional[torch.Tensor]
    loss: float
    grad_norm: float
    extras: dict = field(default_factory=dict)


class Strategy:
    """Base of every strategy: ``validate``, ``queries`` and ``step``. A gradient strategy defines
    ``objective(ctx) -> (J, rewards, kl)`` (J maximised) and inherits ``step``: one update of -J."""

    needs_gradient_reward = True

    def validate(self, n_steps: int, config: FinetuneConfig) -> None:
        pass

    def queries(self, batch_size: int) -> int:
        """Reward evaluations per optimisation step: one per sample."""
        return batch_size

    def grad_steps(self, ctx: StepContext):
        return None

    def objective(self, ctx: StepContext):
        c = ctx.config
        gs = self.grad_steps(ctx)
        traj = ctx.sample(ctx.x_T, grad_steps=gs, reference=ctx.kl_reference, keep_states=c.eps_penalty > 0)
        r = ctx.call_reward(traj.x0)
        J = r.mean()
        if c.lam > 0:
            J = J - c.lam * traj.kl.mean()
        if c.eps_penalty > 0:
            if gs is None:
                first = 0
            elif isinstance(gs, int):
                first = ctx.n - gs
            else:
                first = ctx.n - int(gs.max())
            J = J - c.eps_penalty * ctx.eps_penalty(traj.xs, first)
        return J, r.detach(), (traj.kl.detach() if traj.kl is not None else None)

    def step(self, ctx: StepContext) -> StepResult:
        J, r, kl = self.objective(ctx)
        loss = -J
        gnorm = ctx.update(loss)
        return StepResult(rewards=r, kl=kl, loss=float(loss.detach()), grad_norm=gnorm)


@dataclass(frozen=True)
class DRaFT(Strategy):
    """Gradients through the whole sampling chain (DRaFT, Clark et al. 2024, Alg. 1; CTRL Alg. 1)."""


@dataclass(frozen=True)
class DRaFTK(Strategy):
    """Gradients through the last K steps only (DRaFT-K, Clark et al. 2024 sec. 3.2). ``k``: an int, or an
    inclusive range (lo, hi) from which K is drawn once per sample (uniform), per optimisation step."""

    k: Union[int, tuple] = 1

    def validate(self, n_steps, config):
        if isinstance(self.k, (tuple, list)):
            if len(self.k) != 2 or not all(isinstance(v, int) for v in self.k):
                raise ValueError(f"k: give an int or an inclusive range (lo, hi) of ints, got {self.k}")
            lo, hi = self.k
            if not 1 <= lo <= hi <= n_steps:
                raise ValueError(f"k: need 1 <= lo <= hi <= n_steps={n_steps}, got {self.k}")
        elif not (isinstance(self.k, int) and 1 <= self.k <= n_steps):
            raise ValueError(f"k: need an int in [1, n_steps={n_steps}], got {self.k!r}")

    def grad_steps(self, ctx):
        if isinstance(self.k, int):
            return self.k
        lo, hi = self.k
        B = ctx.x_T.shape[0]
        if lo == hi:  # nothing to draw (keeps the random stream of DRaFTK(k) = DRaFTK((k, k)))
            return torch.full((B,), lo, dtype=torch.long, device=ctx.x_T.device)
        return ctx.own(lambda m: torch.randint(lo, hi + 1, (m,), generator=ctx.gen)).to(ctx.x_T.device)


@dataclass(frozen=True)
class DRaFTLV(Strategy):
    """DRaFT-LV (Clark et al. 2024, Alg. 2): x0 from the chain without gradient, then n re-noisings
    x_{t1}^i ~ q(x_{t1} | x0) to the last step's start time t1 = ts[-2], and the last step from each with
    gradient; J = sum_i mean_b [r(x0^i_b) - lam KL_last,b^i] (the n reward gradients summed)."""

    n: int = 2

    def validate(self, n_steps, config):
        if not (isinstance(self.n, int) and self.n >= 1):
            raise ValueError(f"n: the number of re-noisings must be an int >= 1, got {self.n!r}")

    def queries(self, batch_size: int) -> int:
        """n per sample: the n re-noised copies (the un-noised sample's reward is not needed)."""
        return self.n * batch_size

    def objective(self, ctx):
        c = ctx.config
        with torch.no_grad():
            traj = ctx.sample(ctx.x_T, grad_steps=0, reference=ctx.kl_reference)
        x0 = traj.x0.detach()
        B = x0.shape[0]
        t1, t0 = ctx.ts[-2], ctx.ts[-1]
        xr = x0.repeat((self.n,) + (1,) * (x0.ndim - 1))
        z = ctx.own(lambda m: torch.randn((m,) + tuple(xr.shape[1:]), dtype=xr.dtype, device=xr.device,
                                          generator=ctx.noise_gen), copies=self.n)
        x_t1 = renoise(ctx.schedule, xr, t0, t1, z)
        cond = _repeat_cond(ctx.cond, self.n)
        last = ctx.sample(x_t1, ts=ctx.ts[-2:], cond=cond, reference=ctx.kl_reference if c.lam > 0 else None,
                          keep_states=c.eps_penalty > 0)
        r = ctx.call_reward(last.x0, cond)
        per = r.view(self.n, B)
        if c.lam > 0:
            per = per - c.lam * last.kl.view(self.n, B)
        J = per.sum(0).mean()
        if c.eps_penalty > 0:
            J = J - c.eps_penalty * ctx.eps_penalty(last.xs, 0, ts=ctx.ts[-2:], cond=cond)
        kl = traj.kl.detach() if traj.kl is not None else None
        return J, r.detach(), kl


@dataclass(frozen=True)
class ReFL(Strategy):
    """ReFL (Xu et al. 2023, sec. 4): run the chain without gradient to the state m steps before the end
    (m uniform in the inclusive range ``steps`` = (lo, hi), once per optimisation step), then reward
    Tweedie's x0_hat(x_t, t) = (x_t - sigma_t eps(x_t, t)) / alpha_t (docs/theory.md §2) with gradient
    through that one model call. With m = 1 on a grid ending at t = 0 this is DRaFT-1. No KL term."""

    steps: tuple = (1, 10)

    def validate(self, n_steps, config):
        if len(self.steps) != 2 or not all(isinstance(v, int) for v in self.steps):
            raise ValueError(f"steps: give an inclusive range (lo, hi) of ints, got {self.steps}")
        lo, hi = self.steps
        if not 1 <= lo <= hi:
            raise ValueError(f"steps: need 1 <= lo <= hi, got {self.steps}")
        if hi > n_steps:
            raise ValueError(f"steps: hi={hi} exceeds the number of sampler steps n_steps={n_steps}; lower it")
        if config.lam > 0 or config.eps_penalty > 0:
            raise ValueError("lam: ReFL has no path-KL / eps penalty term; set lam = 0 and eps_penalty = 0 or use DRaFT-K")

    def objective(self, ctx):
        lo, hi = self.steps
        m = lo if lo == hi else int(torch.randint(lo, hi + 1, (1,), generator=ctx.gen))
        n = ctx.n
        if m < n:
            with torch.no_grad():
                x_t = ctx.sample(ctx.x_T, ts=ctx.ts[: n - m + 1], grad_steps=0).x0.detach()
        else:
            x_t = ctx.x_T.detach()
        t = ctx.ts[n - m].to(x_t.dtype).expand(x_t.shape[0])
        eps = ctx.model(x_t, t, ctx.cond)
        if eps.shape != x_t.shape:
            raise ValueError(f"model: {callable_name(ctx.model)} returned shape {tuple(eps.shape)} for input "
                             f"{tuple(x_t.shape)}")
        x0_hat = eps_to_x0(x_t, eps, ctx.schedule.alpha(t).to(x_t.dtype), ctx.schedule.sigma(t).to(x_t.dtype))
        r = ctx.call_reward(x0_hat)
        return r.mean(), r.detach(), None


@dataclass(frozen=True)
class Adjoint(Strategy):
    """The whole-chain gradient through torchsde's stochastic adjoint (Li et al. 2020): the reverse SDE
    integrated by Euler-Maruyama (``theory.sde.sdeint(..., adjoint=True)``; ``config.method`` is not used),
    memory O(1) in the number of steps. ``dt``: optional sub-step in t. No KL term (lam must be 0)."""

    dt: Optional[float] = None
    method: str = "euler"

    def validate(self, n_steps, config):
        if config.lam > 0 or config.eps_penalty > 0:
            raise ValueError("lam: the adjoint strategy has no path-KL term; set lam = 0 (or use DRaFT with checkpoint=True)")

    def objective(self, ctx):
        from ..sde import sdeint

        if ctx.dist.world_size > 1:
            raise ValueError("strategy: Adjoint draws its Brownian motion inside torchsde and cannot share the "
                             "combined batch's noise across processes; use DRaFT with checkpoint=True")
        x0 = sdeint(ctx.model, ctx.schedule, ctx.x_T, ctx.ts, cond=ctx.cond, dt=self.dt, adjoint=True,
                    generator=ctx.gen, method=self.method)
        r = ctx.call_reward(x0)
        return r.mean(), r.detach(), None


def _cond_key(cond, B: int) -> torch.Tensor:
    """(B, k) rows identifying each sample's condition (for per-condition statistics)."""
    c = cond.key() if hasattr(cond, "key") else torch.as_tensor(cond)
    return c.reshape(B, -1)


def normalise_per_condition(r: torch.Tensor, cond, eps: float = 1e-8) -> torch.Tensor:
    """Advantages A_b = (r_b - mean_c) / (std_c + eps) over the samples sharing b's condition c (DDPO sec. 4,
    per-prompt normalisation). Conditions seen once (or cond None) use the batch's mean and std."""
    r = r.detach()

    def z(v):
        if v.numel() < 2:
            return None
        return (v - v.mean()) / (v.std() + eps)

    glob = z(r)
    if glob is None:
        return torch.zeros_like(r)
    if cond is None:
        return glob
    c = _cond_key(cond, r.shape[0]).to(r.device)
    out = glob.clone()
    uniq, inv = torch.unique(c, dim=0, return_inverse=True)
    for u in range(uniq.shape[0]):
        sel = inv == u
        zz = z(r[sel])
        if zz is not None:
            out[sel] = zz
    return out


def ppo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, clip: float):
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7; DDPO eq. 4), to be minimised:
    mean max(-A rho, -A clip(rho, 1 - c, 1 + c)), rho = exp(logp_new - logp_old). Returns (loss, rho)."""
    ratio = torch.exp(logp_new - logp_old)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return torch.maximum(unclipped, clipped).mean(), ratio


@dataclass(frozen=True)
class DDPO(Strategy):
    """DDPO with PPO clipping (Black et al. 2024, sec. 4.3): sample without gradient, storing every
    Gaussian transition x_{i+1} ~ N(m_i, s_i^2 I) (``sample(return_transitions=True)``); advantages are
    the rewards normalised per condition; with lam > 0 the return is r - lam * sum_i log p(x_{i+1}|x_i) /
    p_ref(x_{i+1}|x_i) (an unbiased estimate of the path KL whose score-function gradient is the KL's).
    Then ``inner_steps`` passes over ``minibatches`` chunks of the samples, each one engine update on the
    clipped surrogate averaged over steps and samples, log-probabilities recomputed with ``solvers.replay``.
    The old log-probabilities are computed by the same code on the same chunks before the first update, so
    the ratio is exactly 1 at the first inner step (first chunk). With k processes the advantages are those
    of the combined batch, and minibatch j is the union of the ranks' j-th chunks (with minibatches=1 a
    k-process run equals one process with the combined batch up to the all-reduce's float order)."""

    clip: float = 0.2
    inner_steps: int = 4
    minibatches: int = 1
    needs_gradient_reward = False

    def validate(self, n_steps, config):
        if not self.clip > 0:
            raise ValueError(f"clip: must be > 0, got {self.clip}")
        if not (isinstance(self.inner_steps, int) and self.inner_steps >= 1):
            raise ValueError(f"inner_steps: must be an int >= 1, got {self.inner_steps!r}")
        if not (isinstance(self.minibatches, int) and 1 <= self.minibatches <= config.batch_size):
            raise ValueError(f"minibatches: must be an int in [1, batch_size={config.batch_size}], got {self.minibatches!r}")
        if not config.stochastic:
            raise ValueError("method/eta: DDPO needs a stochastic sampler ('ddpm', 'em', or 'ddim' with eta > 0)")
        if config.eps_penalty > 0:
            raise ValueError("eps_penalty: not defined for DDPO; set it to 0")

    def objective(self, ctx):
        raise ValueError("strategy: DDPO has no differentiable objective; use finetune")

    @staticmethod
    def _replay(ctx, model, X, cond):
        """The transitions of the stored states X (n + 1, b, ...) under ``model`` (``solvers.replay``: all
        steps in one network call; a condition that is not a tensor, e.g. a ``PromptLabel``, step by step)."""
        c = ctx.config
        chunk = None if cond is None or torch.is_tensor(cond) else 1
        return replay(model, ctx.schedule, X, ctx.ts, method=c.method, eta=c.eta, cond=cond, chunk=chunk)

    def _logps(self, ctx, X, idx):
        """Per-step log-probabilities (n, b) of the stored transitions of samples ``idx``."""
        Xi = X[:, idx]
        return self._replay(ctx, ctx.model, Xi, _index_cond(ctx.cond, idx)).log_prob(Xi)

    def step(self, ctx: StepContext) -> StepResult:
        c = ctx.config
        with torch.no_grad():
            traj = ctx.sample(ctx.x_T, keep_states=True, return_transitions=True, reference=ctx.kl_reference)
            r = ctx.call_reward(traj.x0)
        X = torch.stack([x.detach() for x in traj.xs])
        ret = r.detach()
        if c.lam > 0:  # the single-path log-ratio log p_theta / p_ref of the whole chain, (6.14)
            with torch.no_grad():
                own = Transitions(torch.stack(traj.means), torch.stack(traj.stds)).log_prob(X)
                ref = self._replay(ctx, ctx.reference, X, ctx.cond).log_prob(X)
            ret = ret - c.lam * (own - ref).sum(0)
        B = ctx.x_T.shape[0]
        if ctx.dist.world_size > 1:  # advantages over the combined batch, as one process would have them
            key = None if ctx.cond is None else ctx.gather(_cond_key(ctx.cond, B))
            adv = normalise_per_condition(ctx.gather(ret), key)
            adv = adv[ctx.dist.rank * B:(ctx.dist.rank + 1) * B]
        else:
            adv = normalise_per_condition(ret, ctx.cond)
        chunks = torch.arange(B, device=ctx.x_T.device).chunk(self.minibatches)
        with torch.no_grad():
            old = [self._logps(ctx, X, idx) for idx in chunks]
        norms, losses, first_dev = [], [], None
        for k in range(self.inner_steps):
            for j, idx in enumerate(chunks):
                new = self._logps(ctx, X, idx)
                loss, ratio = ppo_loss(new, old[j], adv[idx][None], self.clip)
                if k == 0 and j == 0:
                    first_dev = float((ratio.detach() - 1).abs().max())
                norms.append(ctx.update(loss))
                losses.append(float(loss.detach()))
        kl = traj.kl.detach() if traj.kl is not None else None
        return StepResult(rewards=r.detach(), kl=kl, loss=float(np.mean(losses)), grad_norm=float(np.mean(norms)),
                          extras={"ppo_ratio_dev_first": first_dev})

    def run_step(self, ctx: StepContext, optimizer, params, grad_clip: float) -> dict:
        """``step`` with the engine's update on ``optimizer`` (for analyses outside ``finetune``)."""
        from .loop import Update

        ctx = replace(ctx, update=Update(optimizer, params, grad_clip, step=ctx.step))
        out = self.step(ctx)
        return dict(rewards=out.rewards, kl=out.kl, loss=out.loss, grad_norm=out.grad_norm,
                    queries=self.queries(ctx.x_T.shape[0]), **out.extras)


#: name -> strategy class (the names of the CLI's ``--method`` and of the toys' configs)
STRATEGIES = {"draft": DRaFT, "draftk": DRaFTK, "draftlv": DRaFTLV, "refl": ReFL, "adjoint": Adjoint, "ddpo": DDPO}


def make_strategy(name: str, **options) -> Strategy:
    """The strategy called ``name`` (a key of ``STRATEGIES``), built from the ``options`` that are its
    fields (others are ignored, so one pool of settings serves every name), e.g.
    ``make_strategy('draftk', k=2, n=4)`` = ``DRaFTK(k=2)``."""
    if name not in STRATEGIES:
        raise ValueError(f"method: unknown '{name}', choose from {', '.join(STRATEGIES)}")
    cls = STRATEGIES[name]
    own = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in options.items() if k in own and v is not None})


def strategy_name(strategy) -> str:
    """The registry name of ``strategy``'s class."""
    for k, cls in STRATEGIES.items():
        if type(strategy) is cls:
            return k
    return type(strategy).__name__
