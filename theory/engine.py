"""The fine-tuning engine: one loop for CTRL, DRaFT and DDPO (THEORY.md 4-6, ARCHITECTURE.md, ENGINE_API.md).

Objective (THEORY.md 4, CTRL eq. 5 / DRaFT eq. 2), per optimisation step over a batch of B samples:

    J(theta) = mean_b r(x0_b, c_b) - lam * mean_b KL_path,b        KL_path = sum_steps |m - m_ref|^2 / (2 std^2)

where x0 is the end of the generative chain of ``theory.solvers.sample`` and KL_path the discretised path
KL to the pre-trained model, exact per Gaussian transition and summed over dimensions (``sample(...,
reference=...)``). lam = 0 is DRaFT's objective. The strategies below only say where gradients flow through
``sample`` (they choose ``grad_steps``, the grid, where to stop); none has its own sampling loop:

- ``DRaFT()``: through the whole chain (Clark et al. 2024, Alg. 1).
- ``DRaFTK(k)``: through the last K steps (DRaFT-K); K fixed, or drawn once per sample uniformly from the
  inclusive range (lo, hi) (a per-sample ``grad_steps`` tensor; never re-drawn step by step).
- ``DRaFTLV(n)``: the chain without gradient, then n re-noisings x_{t1}^i ~ q(x_{t1} | x0) of the final
  sample to the last step's start time t1 and the last step with gradient; the rewards of the n copies
  are summed (DRaFT Alg. 2, the "low-variance" estimator).
- ``ReFL(steps=(lo, hi))``: the chain without gradient until m steps before the end (m uniform in
  [lo, hi], once per optimisation step), then the reward of Tweedie's x0_hat at that state with gradient
  through one model call (Xu et al. 2023, ImageReward sec. 4).
- ``Adjoint()``: the whole chain, Euler-Maruyama through torchsde's stochastic adjoint
  (``theory.sde.sdeint(..., adjoint=True)``), memory independent of the number of steps.
- ``DDPO(clip, inner_steps, minibatches)``: policy gradient with PPO clipping on the per-transition
  Gaussian log-probabilities of the stochastic sampler (Black et al. 2024, eqs. 3-4), advantages the
  rewards normalised per condition.

``finetune`` runs any of them with AdamW (per-group learning rates), gradient clipping, a history, atomic
checkpoints and exact resume.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np
import torch
from torch import nn

from .io import atomic_save_tensors
from .lora import add_lora, disabled_lora, lora_layers
from .param import eps_to_x0
from .schedules import NoiseSchedule, append_dims
from .solvers import SOLVERS, check_grid, gaussian_log_prob, sample, time_grid, transition

__all__ = [
    "SteeredModel",
    "DRaFT",
    "DRaFTK",
    "DRaFTLV",
    "ReFL",
    "Adjoint",
    "DDPO",
    "FinetuneConfig",
    "History",
    "NonFiniteRewardError",
    "finetune",
    "objective",
    "ppo_loss",
    "normalise_per_condition",
    "renoise",
    "Distributed",
    "SingleProcess",
]


# ============================================================================ data parallelism


@runtime_checkable
class Distributed(Protocol):
    """What ``finetune`` needs of a data-parallel launcher (e.g. accelerate, torch.distributed).

    Semantics of a k-rank run: ``config.batch_size`` is the PER-PROCESS batch b; every rank draws the
    combined batch's initial states, conditions, strategy draws and sampler noise (k b samples) from the
    shared generator (seeded identically on every rank) and keeps its own slice [rank b, (rank + 1) b);
    the engine's update all-reduces (mean) the trainable gradients before clipping. So a k-rank run equals
    a single-process run with batch k b up to the order of the float all-reduce, and the RNG / resume
    state is the same on every rank. Only ``is_main`` writes checkpoints and the history."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool: ...

    def all_reduce_mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace every tensor in place by its mean over the ranks."""

    def barrier(self) -> None:
        """Wait until every rank reaches this point."""


class SingleProcess:
    """The default ``Distributed``: one process, nothing to reduce or wait for."""

    rank = 0
    world_size = 1
    is_main = True

    def all_reduce_mean_(self, tensors) -> None:
        return None

    def barrier(self) -> None:
        return None


def _check_dist(dist) -> "Distributed":
    if dist is None:
        return SingleProcess()
    for a in ("rank", "world_size", "is_main", "all_reduce_mean_", "barrier"):
        if not hasattr(dist, a):
            raise ValueError(f"dist: {type(dist).__name__} lacks `{a}`; implement theory.engine.Distributed")
    if not (0 <= int(dist.rank) < int(dist.world_size)):
        raise ValueError(f"dist: rank {dist.rank} outside [0, world_size={dist.world_size})")
    return dist


# ============================================================================ the trainable model


class _Reference(nn.Module):
    """The pre-trained eps model inside a SteeredModel: LoRA disabled, no label embedding."""

    def __init__(self, steered: "SteeredModel"):
        super().__init__()
        object.__setattr__(self, "_steered", steered)  # not a submodule: no parameters of its own

    def forward(self, x, t, cond=None):
        s = self._steered
        with disabled_lora(s.base):
            return s.base(x, t, None if s.n_labels is not None else cond)


class _CFG(nn.Module):
    """eps_null + sum_i w_i (eps(y_i alone) - eps_null) (CTRL appendix B, classifier-free mixing)."""

    def __init__(self, steered: "SteeredModel", w):
        super().__init__()
        object.__setattr__(self, "_steered", steered)
        m = len(steered.n_labels_tuple)
        ws = tuple(float(v) for v in w) if isinstance(w, (tuple, list)) else (float(w),) * m
        if len(ws) != m:
            raise ValueError(f"w: need {m} guidance weights (one per condition), got {w}")
        self.ws = ws

    def forward(self, x, t, cond=None):
        s = self._steered
        c = s._labels(cond, x.shape[0], x.device)
        null = s(x, t, None)
        out = null
        for i, w in enumerate(self.ws):
            only = torch.full_like(c, -1)
            only[:, i] = c[:, i]
            out = out + w * (s(x, t, only if s.multi else only[:, 0]) - null)
        return out


class SteeredModel(nn.Module):
    """Pre-trained eps model (frozen) + LoRA (peft) + optional CTRL label embedding (ENGINE_API.md).

    eps(x, t, c) = eps_base+LoRA(x, t, c_base) + sum_j E_j[c_j]            (CTRL sec. 4, eq. 3 with an
    additive correction; label_mode 'output'). E_j is a zero-initialised table of ``n_labels[j]`` vectors of
    shape ``label_shape``; the NULL label (-1, or cond None) reads a fixed zero buffer, never trained. With
    an embedding the base model is called unconditionally (c_base = None); without, ``cond`` goes to the
    base (e.g. a prompt index for a UNet wrapper). At initialisation (LoRA B = 0, E = 0) the output equals
    the base model's bit for bit.

    ``label_mode='module'`` (an extension of the paper's design, see README): E[c] is added instead to the
    output of the base's submodule named ``label_module`` - e.g. ``'time'`` of an EpsMLP or
    ``'time_embedding'`` of a diffusers UNet, the usual entry of class labels - through a forward hook, so
    that the label reaches the network's nonlinearity and the correction can depend on x and t.
    ``label_shape`` is then that submodule's per-sample output shape. If the submodule sees a batch k times
    the model's (classifier-free guidance doubles it), the embedding is repeated k times.
    """

    def __init__(self, base: nn.Module, *, lora_rank: Optional[int] = None, lora_alpha: Optional[float] = None,
                 lora_targets: Optional[Sequence[str]] = None, n_labels: Union[None, int, Sequence[int]] = None,
                 label_shape: Optional[Sequence[int]] = None, label_mode: str = "output",
                 label_module: Optional[str] = None):
        super().__init__()
        if not isinstance(base, nn.Module):
            raise ValueError(f"base: must be an nn.Module eps model, got {type(base).__name__}")
        if label_mode not in ("output", "module"):
            raise ValueError(f"label_mode: 'output' (embedding added to eps) or 'module' (added to the output of "
                             f"the submodule `label_module`), got {label_mode!r}")
        if label_mode == "module":
            if n_labels is None:
                raise ValueError("n_labels: label_mode='module' needs labels")
            if label_module is None or label_shape is None:
                raise ValueError("label_module, label_shape: label_mode='module' needs the submodule's name (e.g. "
                                 "'time' of an EpsMLP, 'time_embedding' of a UNet) and its per-sample output shape")
            try:
                hooked = base.get_submodule(label_module)
            except AttributeError:
                raise ValueError(f"label_module: the base model has no submodule {label_module!r}") from None
        elif label_module is not None:
            raise ValueError("label_module: only used with label_mode='module'")
        self.label_mode = label_mode
        self._pending_labels = None
        for p in base.parameters():
            p.requires_grad_(False)
        if lora_rank is not None:
            add_lora(base, rank=lora_rank, alpha=lora_alpha, target_modules=lora_targets)
        elif lora_targets is not None or lora_alpha is not None:
            raise ValueError("lora_rank: give a rank to use lora_targets / lora_alpha")
        self.base = base
        self.n_labels = n_labels
        self.multi = n_labels is not None and not isinstance(n_labels, int)
        self.n_labels_tuple: tuple = ()
        if n_labels is not None:
            ks = tuple(int(k) for k in n_labels) if self.multi else (int(n_labels),)
            if not ks or any(k < 1 for k in ks):
                raise ValueError(f"n_labels: every condition needs >= 1 label, got {n_labels}")
            if label_shape is None:
                dim = getattr(base, "dim", None)
                if not isinstance(dim, int):
                    raise ValueError("label_shape: give the per-sample shape of x (the base has no int `.dim`)")
                label_shape = (dim,)
            self.label_shape = tuple(int(v) for v in label_shape)
            dtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), torch.get_default_dtype())
            self.n_labels_tuple = ks
            self.embeddings = nn.ParameterList([nn.Parameter(torch.zeros((k,) + self.label_shape, dtype=dtype))
                                                for k in ks])
            self.register_buffer("null_embedding", torch.zeros((1,) + self.label_shape, dtype=dtype))
        else:
            self.label_shape = None
            self.embeddings = None
        if label_mode == "module":
            hooked.register_forward_hook(self._module_hook)

    def _module_hook(self, module, inputs, out):
        """Adds the pending label embedding (set by ``forward``) to the hooked submodule's output."""
        e = self._pending_labels
        if e is None:
            return out
        if out.shape[0] % e.shape[0] or out.shape[1:] != e.shape[1:]:
            raise ValueError(f"label_shape: embedding of shape {tuple(e.shape[1:])} for batch {e.shape[0]} does not "
                             f"fit the output {tuple(out.shape)} of label_module")
        return out + e.repeat((out.shape[0] // e.shape[0],) + (1,) * (e.ndim - 1)).to(out.dtype)

    # -------------------------------------------------------------------------------------------- labels
    def _labels(self, cond, B: int, device) -> torch.Tensor:
        m = len(self.n_labels_tuple)
        if cond is None:
            return torch.full((B, m), -1, dtype=torch.long, device=device)
        c = torch.as_tensor(cond, device=device).long()
        if not self.multi:
            c = c.reshape(-1)
            if c.numel() == 1:
                c = c.expand(B)
            c = c[:, None]
        elif c.ndim == 1 and c.numel() == m:
            c = c[None].expand(B, m)
        if c.shape != (B, m):
            raise ValueError(f"cond: expected labels of shape ({B},{' ' + str(m) if self.multi else ''}) "
                             f"(-1 = NULL), got {tuple(c.shape)}")
        for j, k in enumerate(self.n_labels_tuple):
            if bool(((c[:, j] < -1) | (c[:, j] >= k)).any()):
                raise ValueError(f"cond: labels of condition {j} must lie in [-1, {k}), got {c[:, j].tolist()[:8]}")
        return c

    def label_embedding(self, cond, x: torch.Tensor) -> torch.Tensor:
        """sum_j E_j[c_j] (zero rows for NULL), shape (B, *label_shape) - x's shape in 'output' mode."""
        c = self._labels(cond, x.shape[0], x.device)
        out = 0
        for j, (k, E) in enumerate(zip(self.n_labels_tuple, self.embeddings)):
            table = torch.cat([E, self.null_embedding.to(E.dtype)], 0)
            idx = torch.where(c[:, j] < 0, torch.full_like(c[:, j], k), c[:, j])
            out = out + table[idx]
        if self.label_mode == "module":
            return out
        if out.shape != x.shape:
            raise ValueError(f"label_shape: embedding of shape {tuple(out.shape[1:])} does not match x's "
                             f"{tuple(x.shape[1:])}")
        return out.to(x.dtype)

    def forward(self, x, t, cond=None):
        if self.embeddings is None:
            return self.base(x, t, cond)
        if self.label_mode == "module":
            self._pending_labels = self.label_embedding(cond, x)
            try:
                return self.base(x, t, None)
            finally:
                self._pending_labels = None
        return self.base(x, t, None) + self.label_embedding(cond, x)

    # ------------------------------------------------------------------------------------ helpers
    @property
    def reference(self) -> nn.Module:
        """The pre-trained eps model (LoRA disabled, no embedding), for the path KL."""
        return _Reference(self)

    def lora_parameters(self) -> list:
        return [p for n, p in self.base.named_parameters() if "lora_" in n and p.requires_grad]

    def param_groups(self, lr_lora: float, lr_embed: Optional[float] = None) -> list[dict]:
        """AdamW groups: trainable LoRA parameters at ``lr_lora``, label embeddings at ``lr_embed``
        (default ``lr_lora``). Empty groups are left out."""
        groups = []
        lora = self.lora_parameters()
        if lora:
            groups.append({"params": lora, "lr": lr_lora, "name": "lora"})
        if self.embeddings is not None:
            groups.append({"params": list(self.embeddings), "lr": lr_lora if lr_embed is None else lr_embed,
                           "name": "embed"})
        return groups

    def cfg(self, w) -> nn.Module:
        """eps model eps_null + w (eps_cond - eps_null) (CTRL appendix B); w may be a per-condition tuple."""
        if self.embeddings is None:
            raise ValueError("w: classifier-free mixing needs a model built with n_labels")
        return _CFG(self, w)


# ============================================================================ rewards and checks


class NonFiniteRewardError(FloatingPointError):
    """A reward returned NaN or inf; the message names the optimisation step and the sample indices."""


def _name(f) -> str:
    return getattr(f, "__name__", None) or type(f).__name__


def _call_reward(reward, x0, cond, step: int) -> torch.Tensor:
    r = reward(x0, cond)
    B = x0.shape[0]
    if not isinstance(r, torch.Tensor) or r.shape != (B,):
        shape = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
        raise ValueError(f"reward: {_name(reward)} returned {shape} for {B} samples; a reward must return a "
                         f"tensor of shape ({B},), one value per sample")
    bad = ~torch.isfinite(r.detach())
    if bool(bad.any()):
        idx = torch.nonzero(bad).flatten().tolist()
        raise NonFiniteRewardError(f"reward: {_name(reward)} returned non-finite values at optimisation step "
                                   f"{step} for samples {idx[:20]}{' ...' if len(idx) > 20 else ''} "
                                   f"(values {r.detach()[bad][:5].tolist()}); the last checkpoint is intact")
    return r


def _repeat_cond(cond, n: int):
    if cond is None:
        return None
    c = torch.as_tensor(cond)
    return c.repeat((n,) + (1,) * (c.ndim - 1))


def renoise(schedule: NoiseSchedule, x: torch.Tensor, s, t, z: torch.Tensor) -> torch.Tensor:
    """A draw of the forward process q(x_t | x_s) for s < t (THEORY.md 2):
    x_t = (alpha_t/alpha_s) x_s + sqrt(sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2) z (s = 0: alpha_t x0 + sigma_t z)."""
    s = torch.as_tensor(s, dtype=torch.float64)
    t = torch.as_tensor(t, dtype=torch.float64)
    a = schedule.alpha(t) / schedule.alpha(s)
    v = torch.clamp(schedule.sigma2(t) - a**2 * schedule.sigma2(s), min=0.0)
    return a.to(x.dtype) * x + v.sqrt().to(x.dtype) * z


# ============================================================================ strategies


@dataclass
class _Ctx:
    """What a strategy sees in one optimisation step."""

    model: nn.Module
    reference: Optional[nn.Module]  # the pre-trained eps model (eps penalty), or None
    kl_reference: Optional[nn.Module]  # passed to ``sample`` for the path KL, or None (not needed)
    schedule: NoiseSchedule
    reward: Callable
    ts: torch.Tensor
    x_T: torch.Tensor
    cond: Any
    config: "FinetuneConfig"
    gen: torch.Generator  # CPU generator (strategy draws: K, m)
    noise_gen: Optional[torch.Generator]  # generator on x's device (sampler noise)
    step: int  # the optimisation step being made, counted from 1
    dist: Any = field(default_factory=SingleProcess)

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

    def call_reward(self, x0, cond=None):
        return _call_reward(self.reward, x0, self.cond if cond is None else cond, self.step)

    def eps_penalty(self, xs: list, first: int):
        """DRaFT+ regulariser (NeMo-Aligner DRaFT+): mean over the steps i >= first with gradient of
        |eps_theta(x_i, t_i) - eps_ref(x_i, t_i)|^2 summed over dimensions, averaged over the batch."""
        tot, cnt = 0.0, 0
        for i in range(first, self.n):
            x = xs[i].detach()
            t = self.ts[i].to(x.dtype).expand(x.shape[0])
            with torch.no_grad():
                e_ref = self.reference(x, t, self.cond)
            d = self.model(x, t, self.cond) - e_ref
            tot = tot + (d**2).flatten(1).sum(1).mean()
            cnt += 1
        return tot / max(cnt, 1)


class _GradStrategy:
    """A reward-gradient strategy: ``objective(ctx) -> (J, rewards, kl, queries)``; J is maximised."""

    needs_gradient_reward = True

    def validate(self, n_steps: int, config: "FinetuneConfig") -> None:
        pass

    def grad_steps(self, ctx: _Ctx):
        return None

    def objective(self, ctx: _Ctx):
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
        return J, r.detach(), (traj.kl.detach() if traj.kl is not None else None), r.numel()


@dataclass(frozen=True)
class DRaFT(_GradStrategy):
    """Gradients through the whole sampling chain (DRaFT, Clark et al. 2024, Alg. 1; CTRL Alg. 1)."""


@dataclass(frozen=True)
class DRaFTK(_GradStrategy):
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
class DRaFTLV(_GradStrategy):
    """DRaFT-LV (Clark et al. 2024, Alg. 2): x0 from the chain without gradient, then n re-noisings
    x_{t1}^i ~ q(x_{t1} | x0) to the last step's start time t1 = ts[-2], and the last step from each with
    gradient; J = sum_i mean_b [r(x0^i_b) - lam KL_last,b^i] (the n reward gradients summed)."""

    n: int = 2

    def validate(self, n_steps, config):
        if not (isinstance(self.n, int) and self.n >= 1):
            raise ValueError(f"n: the number of re-noisings must be an int >= 1, got {self.n!r}")

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
            J = J - c.eps_penalty * _replace_ctx(ctx, cond=cond, ts=ctx.ts[-2:]).eps_penalty(last.xs, 0)
        kl = traj.kl.detach() if traj.kl is not None else None
        return J, r.detach(), kl, r.numel()


def _replace_ctx(ctx: _Ctx, **kw) -> _Ctx:
    d = dict(ctx.__dict__)
    d.update(kw)
    return _Ctx(**d)


@dataclass(frozen=True)
class ReFL(_GradStrategy):
    """ReFL (Xu et al. 2023, sec. 4): run the chain without gradient to the state m steps before the end
    (m uniform in the inclusive range ``steps`` = (lo, hi), once per optimisation step), then reward
    Tweedie's x0_hat(x_t, t) = (x_t - sigma_t eps(x_t, t)) / alpha_t (THEORY.md 2) with gradient through
    that one model call. With m = 1 on a grid ending at t = 0 this is DRaFT-1 (DDIM's last step to t = 0
    returns x0_hat exactly). No KL term (lam must be 0)."""

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
            raise ValueError(f"model: {_name(ctx.model)} returned shape {tuple(eps.shape)} for input {tuple(x_t.shape)}")
        x0_hat = eps_to_x0(x_t, eps, ctx.schedule.alpha(t).to(x_t.dtype), ctx.schedule.sigma(t).to(x_t.dtype))
        r = ctx.call_reward(x0_hat)
        return r.mean(), r.detach(), None, r.numel()


@dataclass(frozen=True)
class Adjoint(_GradStrategy):
    """The whole-chain gradient through torchsde's stochastic adjoint (Li et al. 2020): the reverse SDE
    integrated by Euler-Maruyama (``theory.sde.sdeint(..., adjoint=True)``; ``config.method`` is not used),
    memory O(1) in the number of steps. ``dt``: optional sub-step in t. No KL term (lam must be 0)."""

    dt: Optional[float] = None
    method: str = "euler"

    def validate(self, n_steps, config):
        if config.lam > 0 or config.eps_penalty > 0:
            raise ValueError("lam: the adjoint strategy has no path-KL term; set lam = 0 (or use DRaFT with checkpoint=True)")

    def objective(self, ctx):
        from .sde import sdeint

        x0 = sdeint(ctx.model, ctx.schedule, ctx.x_T, ctx.ts, cond=ctx.cond, dt=self.dt, adjoint=True,
                    generator=ctx.gen, method=self.method)
        r = ctx.call_reward(x0)
        return r.mean(), r.detach(), None, r.numel()


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
    c = torch.as_tensor(cond, device=r.device)
    c = c.reshape(r.shape[0], -1)
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
class DDPO:
    """DDPO with PPO clipping (Black et al. 2024, sec. 4.3): sample without gradient, storing every
    Gaussian transition x_{i+1} ~ N(m_i, s_i^2 I) (``sample(return_transitions=True)``); advantages are
    the rewards normalised per condition; with lam > 0 the return is r - lam * sum_i log p(x_{i+1}|x_i) /
    p_ref(x_{i+1}|x_i) (an unbiased estimate of the path KL whose score-function gradient is the KL's).
    Then ``inner_steps`` passes over ``minibatches`` chunks of the samples, each one AdamW step on the
    clipped surrogate averaged over steps and samples, log-probabilities recomputed with
    ``solvers.transition``. The old log-probabilities are computed by the same code on the same chunks
    before the first update, so the ratio is exactly 1 at the first inner step (first chunk)."""

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
        stochastic = SOLVERS[config.method][1]
        if stochastic is None:
            stochastic = config.eta > 0
        if not stochastic:
            raise ValueError("method/eta: DDPO needs a stochastic sampler ('ddpm', 'em', or 'ddim' with eta > 0)")
        if config.eps_penalty > 0:
            raise ValueError("eps_penalty: not defined for DDPO; set it to 0")

    def _logps(self, ctx, xs, idx, ts):
        """Per-step log-probabilities (n, b) of the stored transitions of samples ``idx``."""
        c = ctx.config
        cond = None
        if ctx.cond is not None:
            cond = torch.as_tensor(ctx.cond)
            cond = cond[idx.to(cond.device)]
        out = []
        for i in range(ctx.n):
            x = xs[i][idx]
            t = ts[i].to(x.dtype).expand(x.shape[0])
            s = ts[i + 1].to(x.dtype).expand(x.shape[0])
            mean, std = transition(ctx.model, ctx.schedule, x, t, s, method=c.method, eta=c.eta, cond=cond)
            out.append(gaussian_log_prob(xs[i + 1][idx], mean, std))
        return torch.stack(out)

    def run_step(self, ctx: _Ctx, optimizer, params, grad_clip: float):
        c = ctx.config
        with torch.no_grad():
            traj = ctx.sample(ctx.x_T, keep_states=True, return_transitions=True, reference=ctx.kl_reference)
            r = ctx.call_reward(traj.x0)
        xs = [x.detach() for x in traj.xs]
        ret = r.detach()
        if c.lam > 0:
            with torch.no_grad():
                lr_ = 0
                for i in range(ctx.n):
                    t = ctx.ts[i].to(xs[i].dtype).expand(xs[i].shape[0])
                    s = ctx.ts[i + 1].to(xs[i].dtype).expand(xs[i].shape[0])
                    m_ref, sd = transition(ctx.reference, ctx.schedule, xs[i], t, s, method=c.method, eta=c.eta,
                                           cond=ctx.cond)
                    lr_ = lr_ + gaussian_log_prob(xs[i + 1], traj.means[i], traj.stds[i]) - \
                        gaussian_log_prob(xs[i + 1], m_ref, sd)
            ret = ret - c.lam * lr_
        adv = normalise_per_condition(ret, ctx.cond)
        B = ctx.x_T.shape[0]
        chunks = torch.arange(B, device=ctx.x_T.device).chunk(self.minibatches)
        with torch.no_grad():
            old = [self._logps(ctx, xs, idx, ctx.ts) for idx in chunks]
        norms, losses, first_dev = [], [], None
        for k in range(self.inner_steps):
            for j, idx in enumerate(chunks):
                optimizer.zero_grad(set_to_none=True)
                new = self._logps(ctx, xs, idx, ctx.ts)
                loss, ratio = ppo_loss(new, old[j], adv[idx][None], self.clip)
                if k == 0 and j == 0:
                    first_dev = float((ratio.detach() - 1).abs().max())
                loss.backward()
                norms.append(_clip(params, grad_clip, ctx.dist))
                optimizer.step()
                losses.append(float(loss.detach()))
        kl = traj.kl.detach() if traj.kl is not None else None
        return dict(rewards=r.detach(), kl=kl, loss=float(np.mean(losses)), grad_norm=float(np.mean(norms)),
                    queries=r.numel(), ppo_ratio_dev_first=first_dev)


def _clip(params, grad_clip: float, dist=None) -> float:
    if dist is not None and dist.world_size > 1:  # data parallel: the mean gradient over the ranks
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        dist.all_reduce_mean_([p.grad for p in params])
    gs = [p for p in params if p.grad is not None]
    if not gs:
        return 0.0
    mx = grad_clip if grad_clip and grad_clip > 0 else float("inf")
    return float(torch.nn.utils.clip_grad_norm_(gs, mx))


# ============================================================================ config, history, loop


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of ``finetune`` (ENGINE_API.md). ``lam``: KL weight (0 = DRaFT; CTRL: 1 / gamma).
    ``shape``: per-sample shape of x for the default x_T sampler. ``ckpt_every``: checkpoint period in
    optimisation steps (0 = only at the end when ``out_dir`` is set). ``log_kl``: also compute the path KL
    for the history when lam = 0 (costs a reference evaluation per step)."""

    steps: int
    batch_size: int
    n_steps: int
    method: str = "ddim"
    eta: float = 1.0
    lam: float = 0.0
    lr: float = 1e-3
    lr_embed: Optional[float] = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    checkpoint: bool = False
    seed: int = 0
    t_min: float = 0.0
    grid: str = "uniform"
    ckpt_every: int = 0
    out_dir: Optional[str] = None
    progress: bool = True
    eps_penalty: float = 0.0
    shape: Optional[tuple] = None
    log_kl: bool = False
    betas: tuple = (0.9, 0.999)
    lr_schedule: str = "constant"

    def validate(self) -> None:
        for k in ("steps", "batch_size", "n_steps"):
            v = getattr(self, k)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{k}: must be an int >= 1, got {v!r}")
        if self.method not in SOLVERS:
            raise ValueError(f"method: unknown solver '{self.method}', choose from {sorted(SOLVERS)}")
        if not self.eta >= 0:
            raise ValueError(f"eta: must be >= 0, got {self.eta}")
        if not self.lam >= 0:
            raise ValueError(f"lam: the KL weight must be >= 0, got {self.lam}")
        if not self.lr > 0 or (self.lr_embed is not None and not self.lr_embed > 0):
            raise ValueError(f"lr, lr_embed: learning rates must be > 0, got {self.lr}, {self.lr_embed}")
        if not self.eps_penalty >= 0 or not self.weight_decay >= 0:
            raise ValueError("eps_penalty, weight_decay: must be >= 0")
        if not (isinstance(self.ckpt_every, int) and self.ckpt_every >= 0):
            raise ValueError(f"ckpt_every: must be an int >= 0, got {self.ckpt_every!r}")
        if self.lr_schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"lr_schedule: 'constant', 'cosine' or 'linear' (decay to 0 over steps), got {self.lr_schedule!r}")
        if self.ckpt_every > 0 and self.out_dir is None:
            raise ValueError("out_dir: checkpoints (ckpt_every > 0) need an output folder")

    @property
    def stochastic(self) -> bool:
        st = SOLVERS[self.method][1] if self.method in SOLVERS else None
        return (self.eta > 0) if st is None else bool(st)


class History:
    """Per-step records (dicts with step, reward_mean, reward_std, kl, loss, grad_norm, wall_time,
    reward_queries, reward_queries_total, and strategy extras). Iterable, indexable, ``len``."""

    KEYS = ("step", "reward_mean", "reward_std", "kl", "loss", "grad_norm", "wall_time", "reward_queries",
            "reward_queries_total")

    def __init__(self, rows: Optional[list] = None):
        self.rows: list[dict] = [dict(r) for r in (rows or [])]

    def append(self, row: dict) -> None:
        self.rows.append(dict(row))

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def as_arrays(self) -> dict:
        """{key: np.ndarray over steps} for every key present in the records (NaN where missing)."""
        keys = list(self.KEYS) + sorted({k for r in self.rows for k in r} - set(self.KEYS))
        out = {}
        for k in keys:
            vals = [r.get(k) for r in self.rows]
            out[k] = np.array([np.nan if v is None else v for v in vals], dtype=float)
        return out

    def to_json(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.rows, indent=1, default=float))
        os.replace(tmp, path)

    @classmethod
    def from_json(cls, path) -> "History":
        return cls(json.loads(Path(path).read_text()))


def _lr_factor(config: FinetuneConfig) -> Callable[[int], float]:
    """Multiplier of every group's lr after ``k`` completed steps: 1, cosine 1/2 (1 + cos(pi k / steps)),
    or linear 1 - k / steps."""
    S = config.steps
    if config.lr_schedule == "cosine":
        return lambda k: 0.5 * (1.0 + math.cos(math.pi * min(k, S) / S))
    if config.lr_schedule == "linear":
        return lambda k: max(0.0, 1.0 - k / S)
    return lambda k: 1.0


def _trainable_named(model: nn.Module) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _param_groups(model, config: FinetuneConfig):
    if hasattr(model, "param_groups"):
        groups = model.param_groups(config.lr, config.lr_embed)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": config.lr}]
    groups = [g for g in groups if list(g["params"])]
    if not groups:
        raise ValueError("model: has no trainable parameters (param_groups returned none); add LoRA or labels")
    return groups


def _rng_state(gen: torch.Generator, noise_gen: Optional[torch.Generator]) -> dict:
    st = {"gen": gen.get_state(), "torch": torch.get_rng_state(), "numpy": np.random.get_state(),
          "python": random.getstate()}
    if noise_gen is not None:
        st["noise_gen"] = noise_gen.get_state()
        st["noise_device"] = str(noise_gen.device)
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict, gen: torch.Generator, noise_gen: Optional[torch.Generator]) -> None:
    gen.set_state(st["gen"])
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if noise_gen is not None and "noise_gen" in st:
        noise_gen.set_state(st["noise_gen"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _save_checkpoint(out_dir: Path, model, optimizer, scheduler, step, history, gen, noise_gen, config) -> None:
    """Atomic: write checkpoint.new/, then swap it in for checkpoint/ (the old one kept until the swap)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final, new, old = out_dir / "checkpoint", out_dir / "checkpoint.new", out_dir / "checkpoint.old"
    if new.exists():
        shutil.rmtree(new)
    new.mkdir()
    atomic_save_tensors(_trainable_named(model), new / "params.safetensors")
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(gen, noise_gen),
                "history": history.rows, "config": asdict(config)}, new / "state.pt")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(new, final)
    if old.exists():
        shutil.rmtree(old)


def _find_checkpoint(out_dir: Path) -> Optional[Path]:
    for name in ("checkpoint", "checkpoint.old"):  # .old only survives a crash in the middle of a swap
        p = out_dir / name
        if (p / "state.pt").exists() and (p / "params.safetensors").exists():
            return p
    return None


def _load_checkpoint(path: Path, model, optimizer, scheduler=None):
    from safetensors.torch import load_file

    tensors = load_file(str(path / "params.safetensors"))
    named = _trainable_named(model)
    if set(tensors) != set(named):
        raise ValueError(f"out_dir: checkpoint {path} holds parameters {sorted(tensors)[:3]}... that do not match "
                         f"the model's trainable ones {sorted(named)[:3]}...; use a fresh out_dir")
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(tensors[k].to(device=p.device, dtype=p.dtype))
    st = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(st["optimizer"])
    if scheduler is not None and "scheduler" in st:
        scheduler.load_state_dict(st["scheduler"])
    return st


def _check_strategy_inputs(model, reward, strategy, config, schedule, ts):
    config.validate()
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: must be an nn.Module eps model, got {type(model).__name__}")
    if not callable(reward):
        raise ValueError("reward: must be callable reward(x0, cond) -> (B,)")
    if not isinstance(strategy, (_GradStrategy, DDPO)):
        raise ValueError(f"strategy: expected DRaFT(), DRaFTK(k), DRaFTLV(n), ReFL(steps), Adjoint() or DDPO(), "
                         f"got {strategy!r}")
    ts = time_grid(schedule, config.n_steps, t_min=config.t_min, kind=config.grid) if ts is None else \
        check_grid(ts, schedule)
    if ts.numel() - 1 != config.n_steps:
        raise ValueError(f"ts: the grid has {ts.numel() - 1} steps but config.n_steps={config.n_steps}; make them agree")
    strategy.validate(config.n_steps, config)
    differentiable = getattr(reward, "differentiable", True)
    if getattr(strategy, "needs_gradient_reward", True) and not differentiable:
        raise ValueError(f"reward: {_name(reward)} is not differentiable (differentiable=False); use strategy DDPO()")
    kl_on = config.lam > 0 or config.log_kl
    if kl_on and not config.stochastic:
        raise ValueError("lam: the path KL needs stochastic transitions; use method 'ddpm'/'em' or 'ddim' with eta > 0")
    reference = getattr(model, "reference", None) if (kl_on or config.eps_penalty > 0) else None
    if (kl_on or config.eps_penalty > 0) and reference is None:
        raise ValueError("model: lam > 0 / eps_penalty need `model.reference`, the pre-trained eps model")
    return ts, kl_on, reference


def objective(model: nn.Module, schedule: NoiseSchedule, reward: Callable, strategy, config: FinetuneConfig,
              x_T: torch.Tensor, *, cond=None, ts=None, generator: Optional[torch.Generator] = None, step: int = 1):
    """One evaluation of a gradient strategy's objective J (the quantity ``finetune`` ascends), without an
    optimiser step: returns (J, rewards, kl). ``generator`` (CPU; default seeded with config.seed) supplies
    the strategy's draws and the sampler noise in the same order as ``finetune`` on CPU. For gradient
    checks and analyses (e.g. the gradient of DRaFT-K against K)."""
    ts, kl_on, reference = _check_strategy_inputs(model, reward, strategy, config, schedule, ts)
    if isinstance(strategy, DDPO):
        raise ValueError("strategy: DDPO has no differentiable objective; use finetune")
    gen = generator if generator is not None else torch.Generator().manual_seed(config.seed)
    ctx = _Ctx(model=model, reference=reference, kl_reference=reference if kl_on else None, schedule=schedule,
               reward=reward, ts=ts.to(x_T.device), x_T=x_T, cond=cond, config=config, gen=gen,
               noise_gen=gen if x_T.device.type == "cpu" else None, step=step)
    J, r, kl, _ = strategy.objective(ctx)
    return J, r, kl


def finetune(model: nn.Module, schedule: NoiseSchedule, reward: Callable, strategy, config: FinetuneConfig, *,
             x_T_sampler: Optional[Callable] = None, cond_sampler: Optional[Callable] = None, ts=None,
             callback: Optional[Callable] = None, shape: Optional[Sequence[int]] = None,
             dist: Optional[Distributed] = None) -> History:
    """Fine-tune ``model`` to maximise mean reward - lam * mean path KL (module docstring) with ``strategy``.

    ``model``: any eps module with trainable parameters, ``.reference`` (the pre-trained eps model, for
    the KL) and ideally ``.param_groups(lr_lora, lr_embed)`` (AdamW groups; else all trainable parameters
    at ``config.lr``). ``reward(x0, cond) -> (B,)``; attribute ``differentiable`` (default True).
    ``x_T_sampler(n, generator)``: the initial states (default N(0, I) of ``shape``/``config.shape``);
    ``cond_sampler(n, generator)``: the conditions (default None). ``ts``: the time grid (default
    ``time_grid(schedule, n_steps, t_min, kind=grid)``; must have n_steps + 1 points). ``callback(step, row)``
    after each completed optimisation step (step counted from 1). With ``config.out_dir`` the loop resumes
    from ``out_dir/checkpoint`` if present and checkpoints every ``ckpt_every`` steps and at the end; the
    history is also written to ``out_dir/history.json``. ``dist``: a ``Distributed`` for data-parallel
    runs (default one process); ``config.batch_size`` is then the per-process batch. Returns the ``History``.
    """
    ts, kl_on, reference = _check_strategy_inputs(model, reward, strategy, config, schedule, ts)
    dist = _check_dist(dist)
    if dist.world_size > 1 and isinstance(strategy, Adjoint):
        raise ValueError("strategy: Adjoint draws its Brownian motion inside torchsde and cannot share the "
                         "combined batch's noise across processes; use DRaFT with checkpoint=True")

    shape = tuple(shape) if shape is not None else (tuple(config.shape) if config.shape is not None else None)
    if x_T_sampler is None:
        if shape is None:
            dim = getattr(model, "dim", None) or getattr(getattr(model, "base", None), "dim", None)
            if not isinstance(dim, int):
                raise ValueError("shape: give x_T_sampler or the per-sample shape (argument or config.shape)")
            shape = (dim,)
        p0 = next(model.parameters())
        dev, dt = p0.device, (p0.dtype if p0.is_floating_point() else torch.get_default_dtype())

        def x_T_sampler(n, generator):
            return torch.randn((n,) + shape, generator=generator, dtype=dt).to(dev)

    groups = _param_groups(model, config)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config))

    # randomness: ``gen`` (CPU) draws x_T, cond and the strategies' choices (K, m); the sampler noise comes
    # from ``gen`` too on CPU, from a generator on the model's device otherwise. All saved in checkpoints.
    gen = torch.Generator().manual_seed(config.seed)
    dev = next(model.parameters()).device
    noise_gen = gen if dev.type == "cpu" else torch.Generator(device=dev).manual_seed(config.seed + 1)
    own_noise = noise_gen if noise_gen is not gen else None
    history = History()
    start = 0
    out_dir = Path(config.out_dir) if config.out_dir is not None else None
    if out_dir is not None:
        ck = _find_checkpoint(out_dir)
        if ck is not None:
            st = _load_checkpoint(ck, model, optimizer, scheduler)
            start, history = int(st["step"]), History(st["history"])
            _set_rng_state(st["rng"], gen, own_noise)
    wall0 = history.rows[-1]["wall_time"] if history.rows else 0.0
    total_q = history.rows[-1].get("reward_queries_total", 0) if history.rows else 0

    iterator = range(start + 1, config.steps + 1)
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(iterator, desc=f"finetune ({type(strategy).__name__})", initial=start, total=config.steps)
        iterator = bar
    t_start = time.perf_counter()
    K, b = dist.world_size, config.batch_size
    mine = slice(dist.rank * b, (dist.rank + 1) * b)  # this process's part of the combined batch
    for step in iterator:
        x_T = x_T_sampler(K * b, gen)
        if not isinstance(x_T, torch.Tensor) or x_T.shape[0] != K * b:
            raise ValueError(f"x_T_sampler: {_name(x_T_sampler)} must return a tensor with batch size "
                             f"{K * b}, got {getattr(x_T, 'shape', type(x_T).__name__)}")
        cond = cond_sampler(K * b, gen) if cond_sampler is not None else None
        if cond is not None and len(cond) != K * b:
            raise ValueError(f"cond_sampler: {_name(cond_sampler)} returned {len(cond)} conditions for "
                             f"batch size {K * b}")
        if K > 1:
            x_T = x_T[mine]
            cond = cond[mine] if cond is not None else None
        if isinstance(cond, torch.Tensor):
            cond = cond.to(x_T.device)
        ctx = _Ctx(model=model, reference=reference, kl_reference=reference if kl_on else None, schedule=schedule,
                   reward=reward, ts=ts.to(x_T.device), x_T=x_T, cond=cond, config=config, gen=gen,
                   noise_gen=noise_gen if noise_gen.device == x_T.device else None, step=step, dist=dist)
        extras: dict = {}
        if isinstance(strategy, DDPO):
            out = strategy.run_step(ctx, optimizer, params, config.grad_clip)
            r, kl, loss_v, gnorm, q = out["rewards"], out["kl"], out["loss"], out["grad_norm"], out["queries"]
            extras["ppo_ratio_dev_first"] = out["ppo_ratio_dev_first"]
        else:
            optimizer.zero_grad(set_to_none=True)
            J, r, kl, q = strategy.objective(ctx)
            loss = -J
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"loss: non-finite objective at optimisation step {step}")
            loss.backward()
            gnorm = _clip(params, config.grad_clip, dist)
            optimizer.step()
            loss_v = float(loss.detach())
        scheduler.step()
        total_q += int(q)
        row = {"step": step, "reward_mean": float(r.float().mean()),
               "reward_std": float(r.float().std()) if r.numel() > 1 else 0.0,
               "kl": float(kl.float().mean()) if kl is not None else float("nan"), "loss": loss_v,
               "grad_norm": float(gnorm), "wall_time": wall0 + time.perf_counter() - t_start,
               "reward_queries": int(q), "reward_queries_total": total_q, **extras}
        history.append(row)
        if bar is not None:
            bar.set_postfix(reward=f"{row['reward_mean']:.4g}", kl=f"{row['kl']:.3g}")
        if callback is not None:
            callback(step, row)
        if out_dir is not None and ((config.ckpt_every and step % config.ckpt_every == 0) or step == config.steps):
            if dist.is_main:
                _save_checkpoint(out_dir, model, optimizer, scheduler, step, history, gen, own_noise, config)
            dist.barrier()
    if bar is not None:
        bar.close()
    if out_dir is not None and dist.is_main:
        history.to_json(out_dir / "history.json")
    return history
