"""Generic guidance fields (docs/theory.md §6), in the solver's protocol ``field(x, t, eps) -> tensor``
ADDED TO THE SCORE, plus a classifier-free-guidance eps wrapper.

    classifier guidance   g(x, t) = gamma * grad_x log p_phi(y | x_t = x, t)
    DPS / reconstruction  g(x, t) = zeta_t * grad_{x_t} log p(y | x0_hat(x_t, t))
    CFG (an eps model)    eps(x, t, y) = eps(x, t, null) + w (eps(x, t, y) - eps(x, t, null))
    composition           g = sum_i g_i   (conditionally independent labels add their log-likelihoods)

Every field is made for a label tensor ``y`` of shape (B,) (one label per sample) and checks the batch.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from .param import eps_to_x0
from .schedules import NoiseSchedule, as_time
from .solvers import differentiable_eps

__all__ = ["log_density_gradient", "classifier_guidance", "dps_guidance", "cfg_combine", "CFGEps", "sum_fields", "check_labels"]

Field = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_labels(y, n_classes: int, batch: Optional[int] = None, name: str = "y", allow_null: bool = False):
    """Labels as a (B,) long tensor in [0, n_classes) (or -1 = null when ``allow_null``); ValueError otherwise."""
    y = torch.as_tensor(y).long().reshape(-1)
    if batch is not None and y.numel() == 1 and batch > 1:
        y = y.expand(batch)
    if batch is not None and y.shape != (batch,):
        raise ValueError(f"{name}: expected one label per sample, shape ({batch},), got {tuple(y.shape)}")
    lo = -1 if allow_null else 0
    if y.numel() and (int(y.min()) < lo or int(y.max()) >= n_classes):
        raise ValueError(f"{name}: labels must be in [{lo}, {n_classes}) (the classifier's classes), "
                         f"got values in [{int(y.min())}, {int(y.max())}]")
    return y


def _log_lik(log_probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return log_probs.gather(-1, y.to(log_probs.device)[:, None]).squeeze(-1)


def log_density_gradient(fn: Callable, x: torch.Tensor, t: torch.Tensor, name: str = "log_h") -> torch.Tensor:
    """grad_x of a per-sample log-density ``fn(x, t) -> (B,)`` by one backward pass, detached: the guidance
    of classifier guidance (log p(y | x_t)) and of the h-transform (log h_t) (docs/theory.md §4, §6)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out = fn(xg, t)
        if out.shape != (x.shape[0],):
            raise ValueError(f"{name}: returned shape {tuple(out.shape)}, expected ({x.shape[0]},)")
        (g,) = torch.autograd.grad(out.sum(), xg)
    return g.detach()


def classifier_guidance(classifier: Callable, y, gamma: float = 1.0, n_classes: Optional[int] = None) -> Field:
    """Classifier guidance (Dhariwal & Nichol 2021; docs/theory.md §6): g = gamma * grad_x log p_phi(y | x, t).

    ``classifier(x, t) -> log-probabilities or logits (B, C)`` of the NOISY x_t (log_softmax is applied,
    so logits are fine). With the exact responsibilities of a labelled mixture and gamma = 1 this is the
    h-transform of CTRL Lemma 2 (docs/theory.md §4)."""
    if not gamma > 0:
        raise ValueError(f"gamma: the guidance strength must be > 0, got {gamma}")

    def log_lik(xg, t):
        lp = torch.log_softmax(classifier(xg, t), dim=-1)
        return _log_lik(lp, check_labels(y, n_classes if n_classes is not None else lp.shape[-1], xg.shape[0]))

    def field(x, t, eps):
        return gamma * log_density_gradient(log_lik, x, as_time(t, x), "classifier")

    field.kind = "classifier"
    return field


def dps_guidance(model, schedule: NoiseSchedule, log_lik: Callable, y, zeta: Union[float, Callable] = 1.0,
                 cond=None) -> Field:
    """DPS / reconstruction guidance (Chung et al. 2022; Ho et al. 2022; docs/theory.md §6):
    g = zeta_t * grad_{x_t} log p(y | x0_hat(x_t, t)),  x0_hat = (x_t - sigma eps(x_t, t)) / alpha.

    ``log_lik(x0, y) -> (B,)`` is the clean-data label log-likelihood (e.g. a clean classifier's
    log p_phi(y | x0)); the gradient goes through the model's eps (one vector-Jacobian product). Inside
    ``theory.solvers.sample`` with the same ``model`` the field differentiates the solver's own eps (its
    ``eps_model``; see ``solvers.guided_eps``), so a step runs the network once.
    ``zeta`` is a number or a function ``zeta(t) -> (B,)``."""
    if not callable(zeta) and not zeta > 0:
        raise ValueError(f"zeta: the DPS strength must be > 0, got {zeta}")

    def field(x, t, eps):
        t = as_time(t, x)
        a, s = schedule.alpha(t).to(x.dtype), schedule.sigma(t).to(x.dtype)
        with torch.enable_grad():
            xg, e, retain = differentiable_eps(model, x, t, cond, eps)
            x0 = eps_to_x0(xg, e, a, s)
            ll = log_lik(x0, y)
            if ll.shape != (x.shape[0],):
                raise ValueError(f"log_lik: returned shape {tuple(ll.shape)}, expected ({x.shape[0]},)")
            (grad,) = torch.autograd.grad(ll.sum(), xg, retain_graph=retain)
        z = zeta(t) if callable(zeta) else torch.full_like(t, float(zeta))
        return z.to(x.dtype).view((-1,) + (1,) * (x.ndim - 1)) * grad.detach()

    field.kind = "dps"
    field.eps_model, field.eps_cond = model, cond  # inside ``sample``: one forward pass, VJP on the solver's eps
    return field


def cfg_combine(eps_uncond: torch.Tensor, eps_cond, w) -> torch.Tensor:
    """The classifier-free guidance mix (Ho & Salimans 2022, eq. 6; docs/theory.md §6), the only place it is
    written: eps_w = eps_uncond + w (eps_cond - eps_uncond). w = 1 gives eps_cond, w = 0 eps_uncond.
    Several conditions (``eps_cond`` and ``w`` sequences of equal length, CTRL appendix B):
    eps_uncond + sum_i w_i (eps_cond_i - eps_uncond)."""
    if not isinstance(eps_cond, (list, tuple)):
        return eps_uncond + w * (eps_cond - eps_uncond)
    if len(eps_cond) != len(w):
        raise ValueError(f"w: one weight per condition, got {len(w)} weights for {len(eps_cond)} conditions")
    out = eps_uncond
    for e, wi in zip(eps_cond, w):
        out = out + wi * (e - eps_uncond)
    return out


class CFGEps(torch.nn.Module):
    """Classifier-free guidance as an eps model (Ho & Salimans 2022; CTRL appendix B):
    eps_w(x, t, y) = eps(x, t, null) + w (eps(x, t, y) - eps(x, t, null)); for m conditions (cond (B, m),
    one weight each) eps_null + sum_i w_i (eps(x, t, y_i alone) - eps_null) (CTRL appendix B).

    ``model(x, t, cond)`` must accept ``cond = -1`` for the null label (``theory.nets.EpsMLP`` with
    ``n_classes`` does). w = 1 is the conditional model, w = 0 the unconditional one; for a label
    trained with strength gamma_0 the weight w rescales it to about w * gamma_0 (appendix B)."""

    def __init__(self, model, w: Union[float, Sequence[float]], null=-1):
        super().__init__()
        ws = tuple(float(v) for v in w) if isinstance(w, (tuple, list)) else (float(w),)
        if not ws or not all(v >= 0 for v in ws):
            raise ValueError(f"w: the guidance weight(s) must be >= 0, got {w}")
        self.model, self.w, self.null = model, (ws if isinstance(w, (tuple, list)) else ws[0]), null

    def forward(self, x, t, cond=None):
        if cond is None:
            raise ValueError("cond: CFGEps needs labels (one per sample); use the model itself for unconditional samples")
        if isinstance(self.w, tuple):  # several conditions, cond (B, m): eps_null + sum_i w_i (eps(y_i alone) - eps_null)
            c = torch.as_tensor(cond, device=x.device).long()
            if c.shape != (x.shape[0], len(self.w)):
                raise ValueError(f"cond: expected ({x.shape[0]}, {len(self.w)}) labels, one column per weight, "
                                 f"got {tuple(c.shape)}")
            null = torch.full_like(c, self.null)
            e_cond = []
            for i in range(len(self.w)):
                only = null.clone()
                only[:, i] = c[:, i]
                e_cond.append(self.model(x, t, only))
            return cfg_combine(self.model(x, t, null), e_cond, self.w)
        null = torch.full((x.shape[0],), self.null, dtype=torch.long, device=x.device)
        e_null = self.model(x, t, null)
        if self.w == 0.0:
            return e_null
        return cfg_combine(e_null, self.model(x, t, cond), self.w)


def sum_fields(*fields: Field) -> Field:
    """The sum of guidance fields (composition by addition; docs/theory.md §6: conditionally independent
    labels add their log-likelihoods, hence their guidance)."""
    fs = [f for f in fields if f is not None]
    if not fs:
        raise ValueError("fields: give at least one guidance field")

    def call(f, x, t, eps, at):
        return f(x, t, eps, at=at) if at is not None and getattr(f, "accepts_at", False) else f(x, t, eps)

    def field(x, t, eps, at=None):
        out = call(fs[0], x, t, eps, at)
        for f in fs[1:]:
            out = out + call(f, x, t, eps, at)
        return out

    # the fields that differentiate a network share the solver's forward pass when they name the same one
    nets = {(id(f.eps_model), id(getattr(f, "eps_cond", None))): (f.eps_model, getattr(f, "eps_cond", None))
            for f in fs if getattr(f, "eps_model", None) is not None}
    field.eps_model, field.eps_cond = next(iter(nets.values())) if len(nets) == 1 else (None, None)
    field.accepts_at = True
    field.kind = "+".join(getattr(f, "kind", "field") for f in fs)
    return field
