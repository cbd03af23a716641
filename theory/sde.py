"""The reverse SDE of ``theory.solvers`` (method 'em') run through torchsde (docs/theory.md §3).

    dX = [-1/2 beta X - beta (score(X, t) + guidance(X, t))] dt + sqrt(beta) dW-bar      (t: T -> 0)

torchsde integrates forward in its own time, so the SDE is written in the grid's index variable:
tau in [0, n] with t(tau) piecewise linear through the (refined) grid, t(i) = ts[i], dt/dtau = -h_i on
(i, i+1), h_i = ts[i] - ts[i+1] > 0. By the time change of Brownian motion (W_t = sqrt(h_i) W_tau on
each piece) the same process reads

    dX = h_i [1/2 beta X + beta (score + guidance)] dtau + sqrt(h_i beta) dW_tau,

and torchsde's Euler scheme with dtau = 1 is exactly ``solvers.em_step`` on the same grid (the drift is
``solvers.reverse_drift``, the one drift of the package): identical in law to ``sample(..., method='em')``. ``adjoint=True`` uses ``torchsde.sdeint_adjoint`` (Li et
al. 2020, stochastic adjoint): gradients w.r.t. the model's trainable parameters (and x_T) come from a
backward SDE solve on the same Brownian path, so memory does not grow with the number of steps; they
are the continuous-time adjoint's gradients, equal to the discrete ones only as the grid refines.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torchsde
from torch import nn

from .schedules import NoiseSchedule
from .solvers import check_grid, guided_eps, reverse_drift, schedule_at

__all__ = ["ReverseSDE", "sdeint", "refine_grid", "brownian"]


def refine_grid(ts: torch.Tensor, dt: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Split each step of the descending grid ``ts`` into ceil(h_i / dt) equal sub-steps.

    Returns (fine grid, indices of the original grid points in the fine grid). dt = None keeps ts."""
    if dt is None:
        return ts, torch.arange(ts.numel())
    if not dt > 0:
        raise ValueError(f"dt: must be > 0 (a step size in t), got {dt}")
    pieces, idx, k = [ts[:1]], [0], 0
    for a, b in zip(ts[:-1].tolist(), ts[1:].tolist()):
        m = max(1, math.ceil((a - b) / dt - 1e-9))
        pieces.append(torch.linspace(a, b, m + 1, dtype=ts.dtype)[1:])
        k += m
        idx.append(k)
    return torch.cat(pieces), torch.tensor(idx)


class ReverseSDE(nn.Module):
    """The reverse-time VP SDE in the index time tau of a descending grid (module docstring).

    A torchsde SDE (noise_type 'diagonal', sde_type 'ito') on flattened states (B, D); ``shape`` is the
    per-sample shape the eps model sees. The model (and guidance, if a module) are submodules, so
    ``adjoint_params`` defaults to their trainable parameters."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, model, schedule: NoiseSchedule, ts: torch.Tensor, shape: Sequence[int], cond=None,
                 guidance=None, reference=None):
        super().__init__()
        self.model = model if isinstance(model, nn.Module) else None
        self.guidance_module = guidance if isinstance(guidance, nn.Module) else None
        self._eps_fn = guided_eps(model, cond, guidance)
        self._ref_fn = guided_eps(reference, cond) if reference is not None else None
        self.shape = tuple(shape)
        self.D = int(math.prod(self.shape))
        self.schedule = schedule
        self.register_buffer("ts", ts, persistent=False)
        self.h = ts[:-1] - ts[1:]
        self.n = ts.numel() - 1

    def _piece(self, tau: torch.Tensor, dtype):
        i = torch.clamp(torch.floor(tau.detach().to(torch.float64)).long(), 0, self.n - 1)
        h = self.h[i]
        t = self.ts[i] - (tau.to(torch.float64) - i) * h
        return torch.clamp(t, min=0.0).to(dtype), h.to(dtype)

    def f(self, tau, y):
        """Drift h_i beta (x/2 + score_total) (``solvers.reverse_drift``; docs/theory.md §3, reversed). With a
        reference model the state carries one more coordinate, the Girsanov path KL (docs/theory.md §4),
        whose rate is h_i * 1/2 |u|^2 / beta = h_i * 1/2 beta |score_total - score_ref|^2."""
        t, h = self._piece(tau, y.dtype)
        B = y.shape[0]
        x = y[:, : self.D].reshape((B,) + self.shape)
        at = schedule_at(self.schedule, t.expand(B))
        eps = self._eps_fn(x, at)
        drift = reverse_drift(x, eps, at, h).reshape(B, -1)
        if self._ref_fn is None:
            return drift
        per_sample = (B,) + (1,) * len(self.shape)
        du = (self._ref_fn(x, at) - eps) / at.sigma.reshape(per_sample)  # score_total - score_ref
        b = at.beta.reshape(per_sample)
        kl_rate = 0.5 * h * (b * du**2).reshape(B, -1).sum(1, keepdim=True)
        return torch.cat([drift, kl_rate], dim=1)

    def g(self, tau, y):
        """Diagonal diffusion sqrt(h_i beta(t)) (zero on the KL coordinate)."""
        t, h = self._piece(tau, y.dtype)
        b = self.schedule.beta(t).to(y.dtype)
        out = torch.sqrt(h * b).expand(y.shape[0], self.D)
        if self._ref_fn is None:
            return out
        return torch.cat([out, torch.zeros_like(y[:, self.D:])], dim=1)


def brownian(x_T: torch.Tensor, n_steps: int, generator: Optional[torch.Generator] = None,
             entropy: Optional[int] = None, extra: int = 0) -> torchsde.BrownianInterval:
    """A torchsde Brownian motion over the internal time [0, n_steps] for a batch like x_T (flattened,
    plus ``extra`` coordinates: 1 when a reference model adds the path-KL coordinate)."""
    if entropy is None:
        entropy = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    B = x_T.shape[0]
    return torchsde.BrownianInterval(t0=0.0, t1=float(n_steps), size=(B, x_T[0].numel() + extra), dtype=x_T.dtype,
                                     device=x_T.device, entropy=entropy)


def sdeint(
    model,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    ts: Union[torch.Tensor, Sequence[float]],
    *,
    cond=None,
    guidance=None,
    dt: Optional[float] = None,
    adjoint: bool = False,
    bm=None,
    generator: Optional[torch.Generator] = None,
    method: str = "euler",
    adjoint_method: Optional[str] = None,
    reference=None,
    return_states: bool = False,
):
    """Integrate the reverse SDE from x_T at ts[0] down to ts[-1] with torchsde.

    Args:
        model, schedule, x_T, ts, cond, guidance: as in ``theory.solvers.sample``.
        dt: sub-step size in t; each grid step is split into ceil(h/dt) equal sub-steps. None: one
            Euler step per grid step (then identical in law to ``sample(method='em')``).
        adjoint: use ``torchsde.sdeint_adjoint``; gradients flow to the trainable parameters of
            ``model`` (and of ``guidance`` if it is a module) and to x_T, memory independent of steps.
        bm: a torchsde Brownian motion over the internal time [0, n_fine] of shape (B, D) (see
            ``brownian``/``refine_grid``); default a ``BrownianInterval`` seeded from ``generator``.
        method: torchsde method for diagonal Ito noise ('euler', 'milstein', 'srk').
        reference: eps model of the pre-trained process; then the continuous path KL
            1/2 int |u|^2 / beta dt (Girsanov, docs/theory.md §4) is integrated alongside (an extra state
            coordinate with zero noise) and ``(x0, kl)`` is returned, kl of shape (B,) (with
            ``return_states``: (states, kl at every time of ts)). Gradients flow through it under the
            adjoint too.
        return_states: return the states at every time of ``ts`` (len(ts), B, ...) instead of x0.
    """
    ts = check_grid(ts, schedule).to(device=x_T.device)
    fine, idx = refine_grid(ts, dt)
    n = fine.numel() - 1
    B = x_T.shape[0]
    sde = ReverseSDE(model, schedule, fine, x_T.shape[1:], cond=cond, guidance=guidance, reference=reference)
    extra = 0 if reference is None else 1
    if bm is None:
        bm = brownian(x_T, n, generator, extra=extra)
    taus = torch.arange(n + 1, dtype=x_T.dtype, device=x_T.device)
    y0 = x_T.reshape(B, -1)
    if extra:
        y0 = torch.cat([y0, torch.zeros(B, 1, dtype=y0.dtype, device=y0.device)], dim=1)
    # The output times are every fine step, also when only x0 is returned: the adjoint keeps the solution
    # there (B x D numbers a step, no activations) and re-anchors its backward solve of the state at each,
    # which keeps the gradient close to the discrete chain's. Asking for the two ends only would make
    # memory strictly constant but was measured to double the gradient error (2.9 % -> 5.4 % against
    # discrete Euler-Maruyama at 30 steps); benchmarks/bench_memory.py measures what is kept.
    if adjoint:
        params = tuple(p for p in sde.parameters() if p.requires_grad)
        ys = torchsde.sdeint_adjoint(sde, y0, taus, bm=bm, dt=1.0, method=method, adjoint_method=adjoint_method,
                                     adjoint_params=params)
    else:
        ys = torchsde.sdeint(sde, y0, taus, bm=bm, dt=1.0, method=method)
    ys = ys[idx.to(ys.device)]
    D = sde.D
    states = ys[..., :D].reshape((len(idx),) + tuple(x_T.shape))
    out = states if return_states else states[-1]
    if reference is None:
        return out
    kl = ys[..., D]
    return out, (kl if return_states else kl[-1])
