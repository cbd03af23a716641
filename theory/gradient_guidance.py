"""Gradient guidance as optimisation (Guo et al., NeurIPS 2024; docs/theory.md §7).

Two guidance fields, both ``(x, t, eps) -> tensor`` ADDED TO THE SCORE (the protocol of
:func:`theory.solvers.sample`), for a per-sample linear target ``y`` along a gradient ``g``:

    naive G:       G      = beta_t (y - g.x0_hat) g,            beta_t = alpha_t / (sigma_y^2 + h_t |g|^2)
    look-ahead:    G_loss = -beta_t grad_{x_t} (y - g.x0_hat(x_t))^2,
                   beta_t = (alpha_t^2 / 2) / (alpha_t^2 sigma_y^2 + h_t |grad_{x_t}(g.x0_hat)|^2)

with Tweedie's ``x0_hat = (x_t + h_t score) / alpha_t`` and ``h_t = sigma_t^2`` (docs/theory.md §2, §7).
G uses x0_hat without back-propagation; G_loss costs ONE vector-Jacobian product through the score model
per step, on the solver's own forward pass (``gradient_guidance``).

Algorithm 1 (guided diffusion as an optimiser) and Algorithm 2 (the same with score fine-tuning on the
previous round's samples) are :func:`optimize`; :func:`algorithm1` / :func:`algorithm2` name the two.
Every sampling pass goes through :func:`theory.solvers.sample`.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .engine import update
from .nets import EpsMLP, dsm_loss
from .schedules import DiscreteVP, NoiseSchedule, as_time
from .solvers import ScheduleAt, differentiable_eps, is_stochastic, sample, schedule_at

__all__ = [
    "GUIDANCES",
    "gradient_guidance",
    "naive_guidance",
    "lookahead_guidance",
    "make_guidance",
    "r_off",
    "objective_and_grad",
    "FineTune",
    "OptimResult",
    "Run",
    "optimize",
    "optimize_batched",
    "algorithm1",
    "algorithm2",
    "default_grid",
]

GUIDANCES = ("G", "G_loss")


def _check_target(g: torch.Tensor, y: torch.Tensor, sigma_y):
    if g.ndim != 2:
        raise ValueError(f"g: expected per-sample gradients of shape (B, D), got {tuple(g.shape)}")
    y = torch.as_tensor(y, dtype=g.dtype, device=g.device)
    if y.ndim == 0:
        y = y.expand(g.shape[0])
    if y.shape != (g.shape[0],):
        raise ValueError(f"y: expected one target per sample, shape ({g.shape[0]},), got {tuple(y.shape)}")
    if torch.is_tensor(sigma_y):
        if sigma_y.shape not in ((), (g.shape[0],)) or not bool((sigma_y > 0).all()):
            raise ValueError(f"sigma_y: the reward-noise levels must be > 0, one number or one per sample "
                             f"({g.shape[0]},), got shape {tuple(sigma_y.shape)}")
    elif not sigma_y > 0:
        raise ValueError(f"sigma_y: the reward-noise level must be > 0, got {sigma_y}")
    if not bool(torch.isfinite(g).all()) or not bool(torch.isfinite(y).all()):
        raise ValueError("g, y: gradient and target must be finite (check the objective's gradient)")
    return g, y


def _check_batch(x: torch.Tensor, g: torch.Tensor) -> None:
    if x.shape != g.shape:
        raise ValueError(f"x: samples of shape {tuple(x.shape)} do not match the guidance gradient g "
                         f"{tuple(g.shape)}; build the guidance for this batch (same B and D)")


def gradient_guidance(schedule: NoiseSchedule, g: torch.Tensor, y, sigma_y=0.1, lookahead=False, model=None,
                      cond=None) -> Callable:
    """G and G_loss (docs/theory.md §7) as one guidance field for the targets (g, y), chain by chain:

        G       = beta_t (y - g.x0_hat) g,                  beta_t = alpha_t / (sigma_y^2 + h_t |g|^2)
        G_loss  = 2 beta_t (y - g.x0_hat) J,  J = grad_{x_t}(g.x0_hat),
                  beta_t = (alpha_t^2 / 2) / (alpha_t^2 sigma_y^2 + h_t |J|^2)   (= -beta_t grad (y - g.x0_hat)^2)

    with x0_hat = (x_t - sigma_t eps) / alpha_t (Tweedie, docs/theory.md §2) and h_t = sigma_t^2.
    ``lookahead``: False (G), True (G_loss) or a (B,) bool tensor choosing per chain, so that chains of
    both kinds share one network call per step; ``sigma_y``: a number or one per chain (B,).

    J is ONE vector-Jacobian product through ``model`` (samples are independent, so the gradient of the
    batch sum is every sample's own gradient). The field names ``model`` and ``cond`` (``eps_model``,
    ``eps_cond``): inside ``theory.solvers.sample`` with them it is handed the eps the solver computed, with
    its graph from x, so a G_loss step costs one forward pass and one VJP. Called with a detached eps (or by hand) it evaluates the
    model itself (a second forward pass). It takes the solver's precomputed schedule coefficients
    (``accepts_at``) and falls back to the schedule off the solver."""
    g, y = _check_target(g, y, sigma_y)
    look = torch.as_tensor(lookahead, dtype=torch.bool, device=g.device)
    if look.shape not in ((), (g.shape[0],)):
        raise ValueError(f"lookahead: one bool or one per chain ({g.shape[0]},), got shape {tuple(look.shape)}")
    any_look, all_look = bool(look.any()), bool(look.all())
    if any_look and model is None:
        raise ValueError("model: G_loss differentiates the eps model; pass it")
    mixed = look.reshape(-1, 1) if any_look and not all_look else None
    per_dtype = {}

    def targets(dt):
        """g, |g|^2, y, sigma_y^2 in the working dtype, cast once (the field is built in the objective's dtype)."""
        if dt not in per_dtype:
            gg = g.to(dt)
            s2 = sigma_y**2 if not torch.is_tensor(sigma_y) else (sigma_y.to(torch.float64) ** 2).to(dt)
            per_dtype[dt] = (gg, (gg * gg).sum(-1), y.to(dt), s2)
        return per_dtype[dt]

    def col(v):  # a 0-d or (B,) coefficient against the (B, D) samples (cheaper than append_dims per step)
        return v if v.ndim == 0 else v[:, None]

    def field(x, t, eps, at=None):
        _check_batch(x, g)
        if at is None:  # off the solver: the schedule at t, with the same derived coefficients
            at = ScheduleAt._make(v.to(x.dtype) for v in schedule_at(schedule, t))
        a, h, sig = at.alpha, at.sigma2, at.sigma
        gg, gsq, yy, s2 = targets(x.dtype)
        if not any_look:  # G: g . x0_hat = (g . x - sigma g . eps) / alpha, without back-propagation
            resid = yy - (torch.linalg.vecdot(gg, x) - sig * torch.linalg.vecdot(gg, eps.detach())) / a
            beta = a / (s2 + h * gsq)
            return (beta * resid)[:, None] * gg
        # J = grad_x (g . x0_hat) = g / alpha + VJP_eps(-sigma g / alpha) (x0_hat = (x - sigma eps) / alpha):
        # the network's one VJP. With 1/alpha, sigma/alpha and alpha^2 of the step (``ScheduleAt``, computed
        # once per grid by the solver): residual y - g . x0_hat = y - (g . x)/alpha + (sigma/alpha) g . eps, and
        # 2 beta (y - g . x0_hat) = alpha^2 (y - g . x0_hat) / (alpha^2 sigma_y^2 + h |J|^2)
        ia, sa, a2 = at.inv_alpha, at.sigma_over_alpha, at.alpha2
        with torch.enable_grad():
            xg, e, retain = differentiable_eps(model, x, t, cond, eps)
            (v,) = torch.autograd.grad(e, xg, grad_outputs=gg * col(-sa), retain_graph=retain)
        J = torch.addcmul(v, gg, col(ia))
        resid = torch.addcmul(torch.addcmul(yy, torch.linalg.vecdot(gg, x.detach()), ia, value=-1),
                              torch.linalg.vecdot(gg, e.detach()), sa)
        coef = resid.div(torch.addcmul(a2 * s2, h, torch.linalg.vecdot(J, J))).mul_(a2)
        out = coef[:, None] * J
        if mixed is None:
            return out
        beta_g = a / (s2 + h * gsq)
        return torch.where(mixed, out, (beta_g * resid)[:, None] * gg)

    field.kind = "G_loss" if all_look else ("G" if not any_look else "G+G_loss")
    field.accepts_at = True
    field.eps_model, field.eps_cond = (model, cond) if any_look else (None, None)
    return field


def naive_guidance(schedule: NoiseSchedule, g: torch.Tensor, y, sigma_y: float = 0.1) -> Callable:
    """The naive gradient guidance G (docs/theory.md §7): G = beta_t (y - g.x0_hat) g,
    beta_t = alpha_t / (sigma_y^2 + h_t |g|^2), x0_hat from the eps the solver passes (no back-prop)."""
    return gradient_guidance(schedule, g, y, sigma_y, lookahead=False)


def lookahead_guidance(model, schedule: NoiseSchedule, g: torch.Tensor, y, sigma_y: float = 0.1,
                       cond=None) -> Callable:
    """The look-ahead guidance G_loss (docs/theory.md §7, the paper's eq. for G_loss):
    G_loss = -beta_t grad_{x_t} (y - g.x0_hat(x_t))^2 = 2 beta_t (y - g.x0_hat) grad_{x_t}(g.x0_hat),
    beta_t = (alpha_t^2/2) / (alpha_t^2 sigma_y^2 + h_t |grad_{x_t}(g.x0_hat)|^2) per sample; one VJP
    through ``model`` and, inside ``sample``, no forward pass of its own (see ``gradient_guidance``)."""
    return gradient_guidance(schedule, g, y, sigma_y, lookahead=True, model=model, cond=cond)


def make_guidance(kind: str, model, schedule: NoiseSchedule, g, y, sigma_y: float = 0.1, cond=None):
    """G (``kind='G'``) or G_loss (``kind='G_loss'``) for targets (g, y)."""
    if kind == "G":
        return naive_guidance(schedule, g, y, sigma_y)
    if kind == "G_loss":
        return lookahead_guidance(model, schedule, g, y, sigma_y, cond)
    raise ValueError(f"guidance: unknown kind {kind!r}, use one of {GUIDANCES}")


def r_off(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Off-support ratio per sample (docs/theory.md §5, §7):
    r_off = |x_perp| / (|x_par| + 1e-8), x_par = A A^T x, x_perp = x - x_par. Shape (B,)."""
    A = torch.as_tensor(A, dtype=x.dtype, device=x.device)
    if x.ndim != 2 or A.ndim != 2 or x.shape[1] != A.shape[0]:
        raise ValueError(f"A: expected a ({x.shape[-1]}, d) basis for samples of shape (B, {x.shape[-1]}), "
                         f"got {tuple(A.shape)}")
    par = (x @ A) @ A.T
    return (x - par).norm(dim=-1) / (par.norm(dim=-1) + 1e-8)


def objective_and_grad(objective: Callable, x: torch.Tensor):
    """Values f(x) (B,) and per-sample gradients grad f(x) (B, D) by autograd, with clear errors for a
    dimension mismatch, a wrong output shape and non-finite values or gradients."""
    dim = getattr(objective, "dim", None)
    if dim is not None and int(dim) != x.shape[-1]:
        raise ValueError(f"objective: defined on dimension {dim} but the data have dimension {x.shape[-1]}; "
                         "build the objective for the data's dimension")
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        try:
            f = objective(xg)
        except RuntimeError as err:  # e.g. matmul shape errors
            raise ValueError(f"objective: failed on samples of shape {tuple(x.shape)} ({err}); check that "
                             "its dimension matches the data") from err
        if f.shape != (x.shape[0],):
            raise ValueError(f"objective: must return one value per sample, shape ({x.shape[0]},), "
                             f"got {tuple(f.shape)}")
        (grad,) = torch.autograd.grad(f.sum(), xg)
    if not bool(torch.isfinite(f).all()):
        raise ValueError("objective: returned non-finite values (NaN or inf); it must be finite on the samples")
    if not bool(torch.isfinite(grad).all()):
        bad = int((~torch.isfinite(grad)).any(-1).sum())
        raise ValueError(f"objective: its gradient is NaN or inf for {bad} of {x.shape[0]} samples "
                         "(e.g. |x - b| at x = b); use an objective differentiable on the data")
    return f.detach(), grad.detach()


@dataclass(frozen=True)
class FineTune:
    """Algorithm 2's score fine-tuning (docs/theory.md §7): from round ``start`` on, before sampling,
    take ``steps`` Adam(``betas``) steps of lr ``lr`` on the denoising score-matching loss
    (``theory.nets.dsm_loss``) of the previous round's samples, t ~ U[t_min, T]. Sample weights come from
    ``weights(x, f) -> (B,)`` (normalised here); None = uniform, as the authors' code (no replay)."""

    start: int = 40
    steps: int = 1
    lr: float = 1e-6
    betas: tuple = (0.9, 0.99)
    t_min: Optional[float] = None  # None: 1.0 on a DiscreteVP (its first timestep), else 1e-3 T
    weights: Optional[Callable] = None

    def __post_init__(self):
        if self.start < 0 or self.steps < 1 or not self.lr > 0:
            raise ValueError(f"FineTune: need start >= 0, steps >= 1, lr > 0; got {self.start}, {self.steps}, {self.lr}")


@dataclass
class OptimResult:
    """Per-round record of :func:`optimize`. Round 0 is the unguided pre-trained samples."""

    values: list  # (B,) objective values per round, rounds 0..K
    metrics: list  # metrics(x, f) dicts per round
    x: torch.Tensor  # final samples
    samples: dict  # round -> samples kept (``keep_rounds``)
    round_times: list  # wall seconds per round (guidance + sampling + fine-tuning)
    model: object  # the (fine-tuned) eps model used in the last round

    @property
    def mean(self) -> list:
        return [float(v.mean()) for v in self.values]


#: a grid time whose alpha_bar is below this is dropped from the start of ``default_grid`` (see there)
DEGENERATE_ALPHA_BAR = 1e-6


def default_grid(schedule: NoiseSchedule, n_steps: Optional[int] = None) -> torch.Tensor:
    """The paper's grid: every discrete timestep of a DiscreteVP (T = 200 for the cosine schedule),
    or ``n_steps`` of them ('leading' spacing); a uniform grid of n_steps (default 200) otherwise.

    A first time with alpha_bar < ``DEGENERATE_ALPHA_BAR`` is dropped, so the chain starts from N(0, I)
    one grid time later. The clipped cosine schedule's last knot (beta = 0.999) has alpha_bar = 4e-8.
    Its DDPM step to T - 1 multiplies the eps error by alpha_{T-1} / alpha_T = 39. With a trained eps
    network that left 38 % of the samples at |x|^2 > 200 (data: 16) after all 200 steps; from T - 1 it
    gives 15.8. The exact model is unaffected either way. Starting at T - 1 costs
    KL(p_{T-1} || N(0, I)) ~ alpha_bar_{T-1} E|x0|^2 / 2 = 5e-4 for this data.
    Grids of fewer steps ('leading' spacing) never visit T and are unchanged."""
    if isinstance(schedule, DiscreteVP):
        ts = schedule.step_times(int(schedule.T) if n_steps is None else n_steps)
        while ts.numel() > 2 and float(schedule.alpha(ts[0])) ** 2 < DEGENERATE_ALPHA_BAR:
            ts = ts[1:]
        return ts
    from .solvers import time_grid

    return time_grid(schedule, 200 if n_steps is None else n_steps, t_min=min(1e-3, schedule.T / 1e3))


def _dtype_of(model) -> torch.dtype:
    for p in list(getattr(model, "parameters", lambda: [])()) + list(getattr(model, "buffers", lambda: [])()):
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.get_default_dtype()


@dataclass(frozen=True)
class Run:
    """One configuration of Algorithm 1 in :func:`optimize_batched`: ``n`` chains guided by ``guidance``
    ('G' or 'G_loss') with per-round increase ``delta`` and reward-noise level ``sigma_y``, their
    randomness from ``torch.Generator().manual_seed(seed)`` (so each run reproduces
    ``optimize(..., generator=torch.Generator().manual_seed(seed))``)."""

    guidance: str = "G_loss"
    delta: float = 0.1
    sigma_y: float = 0.1
    seed: int = 0
    n: int = 32

    def __post_init__(self):
        if self.guidance not in GUIDANCES:
            raise ValueError(f"guidance: unknown kind {self.guidance!r}, use one of {GUIDANCES}")
        if not (isinstance(self.delta, (int, float)) and math.isfinite(self.delta) and self.delta > 0):
            raise ValueError(f"delta: the per-round increase must be a finite number > 0, got {self.delta}")
        if not self.sigma_y > 0:
            raise ValueError(f"sigma_y: the reward-noise level must be > 0, got {self.sigma_y}")
        if not (isinstance(self.n, int) and self.n >= 1):
            raise ValueError(f"n: the number of chains must be an int >= 1, got {self.n!r}")


def _dim_of(model, objective, dim):
    dim = dim if dim is not None else getattr(model, "dim", None)
    if dim is None:
        raise ValueError("dim: the model does not say its dimension; pass dim=D")
    odim = getattr(objective, "dim", None)
    if odim is not None and int(odim) != int(dim):
        raise ValueError(f"objective: defined on dimension {odim} but the data (model) have dimension {dim}; "
                         "build the objective for the data's dimension")
    return dim


def _same_or_per_chain(values, sizes, dtype):
    """One number if every run has the same, else one per chain (B,)."""
    if len(set(values)) == 1:
        return values[0]
    return torch.cat([torch.full((n,), float(v), dtype=dtype) for v, n in zip(values, sizes)])


def _finetune_loss(model, finetune: FineTune, schedule, x, f, cond, gen):
    """One step's loss of Algorithm 2's score fine-tuning on the previous round's samples (docs/theory.md
    §7): denoising score matching (``theory.nets.dsm_loss``) at t ~ U[t_min, T], sample-weighted if asked."""
    n = x.shape[0]
    w = None
    if finetune.weights is not None:
        w = torch.as_tensor(finetune.weights(x, f), dtype=x.dtype).reshape(-1)
        if w.shape != (n,) or (w < 0).any() or not float(w.sum()) > 0:
            raise ValueError(f"weights: must return ({n},) non-negative weights with a positive sum")
        w = w / w.sum()
    t_min = finetune.t_min if finetune.t_min is not None else (
        1.0 if isinstance(schedule, DiscreteVP) else 1e-3 * schedule.T)
    tt = t_min + (schedule.T - t_min) * torch.rand(n, generator=gen, dtype=x.dtype)
    if w is None:
        return dsm_loss(model, schedule, x, tt, cond, gen)
    # weighted DSM: sum_i w_i |eps_theta(x_t,i) - eps_i|^2 (the paper's weighted samples)
    return sum(w[i] * dsm_loss(model, schedule, x[i:i + 1], tt[i:i + 1], cond, gen) for i in range(n))


def _plain_mlp_layers(model):
    """The indices of the ``nn.Linear`` layers of ``model.net`` when ``model`` is an unconditional
    ``theory.nets.EpsMLP`` whose net alternates Linear and SiLU (then ``_Copies`` evaluates it with batched
    matrix products), else None (the generic vmap path)."""
    if type(model) is not EpsMLP or model.label is not None:
        return None
    mods = list(model.net)
    kinds = [type(m) for m in mods]
    want = [torch.nn.Linear, torch.nn.SiLU] * (len(mods) // 2) + [torch.nn.Linear]
    return [i for i, k in enumerate(kinds) if k is torch.nn.Linear] if kinds == want else None


class _Copies(torch.nn.Module):
    """Algorithm 2's per-run copies of one eps network, each fine-tuned on its own run's samples, evaluated
    in ONE call over stacked parameters (``torch.func.functional_call`` under ``vmap`` over the copies; for an
    unconditional ``EpsMLP``, the same function as batched matrix products, ``_forward_bmm``): chains
    [j n, (j + 1) n) use copy j. ``copy(j)`` is copy j alone (for its fine-tuning loss), ``module(j)`` a
    standalone network with its parameters. Parameters are independent slices, so one Adam over the stacked
    tensors is one Adam per copy."""

    def __init__(self, model, copies: int):
        from torch.func import stack_module_state

        super().__init__()
        params, buffers = stack_module_state([copy.deepcopy(model) for _ in range(copies)])
        self.names = list(params)
        self.stacked = torch.nn.ParameterList([torch.nn.Parameter(params[k].detach()) for k in self.names])
        self.stacked_buffers = buffers
        self.base = copy.deepcopy(model)
        self.copies = copies
        self.dim = getattr(model, "dim", None)
        self._linear = _plain_mlp_layers(model)

    def _state(self, j=None):
        p = dict(zip(self.names, self.stacked))
        if j is None:
            return p, self.stacked_buffers
        return {k: v[j] for k, v in p.items()}, {k: v[j] for k, v in self.stacked_buffers.items()}

    def forward(self, x, t, cond=None):
        from torch.func import functional_call, vmap

        S = self.copies
        if x.shape[0] % S:
            raise ValueError(f"x: {x.shape[0]} chains do not split into {S} copies of equal size")
        if cond is None and self._linear is not None:
            return self._forward_bmm(x, t)

        def one(p, b, xx, tt):
            return functional_call(self.base, (p, b), (xx, tt, cond))

        xs = x.reshape((S, x.shape[0] // S) + x.shape[1:])
        out = vmap(one)(*self._state(), xs, torch.as_tensor(t).expand(x.shape[0]).reshape(S, -1))
        return out.reshape(x.shape)

    def _forward_bmm(self, x, t):
        """The same function as the vmap path for an unconditional ``theory.nets.EpsMLP``, evaluated layer by
        layer with one ``torch.baddbmm`` over the stacked (copies, out, in) weights. vmap dispatches every
        operator per call; on CPU with small layers that overhead is most of the step
        (``benchmarks/bench_gg_batched.py --vmap``: 1.4x over one copy at a time, bitwise equal to it, where
        vmap gives 1.07x)."""
        S, base = self.copies, self.base
        if x.ndim != 2 or x.shape[1] != base.dim:
            raise ValueError(f"x: EpsMLP expects shape (B, {base.dim}), got {tuple(x.shape)}")
        p, _ = self._state()
        h = torch.cat([x, base.time(as_time(t, x)).to(x.dtype)], dim=-1).reshape(S, x.shape[0] // S, -1)
        for j, i in enumerate(self._linear):
            h = torch.baddbmm(p[f"net.{i}.bias"].unsqueeze(1), h, p[f"net.{i}.weight"].transpose(1, 2))
            if j < len(self._linear) - 1:
                h = torch.nn.functional.silu(h)
        return h.reshape(x.shape)

    def copy(self, j: int):
        return lambda x, t, cond=None: torch.func.functional_call(self.base, self._state(j), (x, t, cond))

    def module(self, j: int):
        m = copy.deepcopy(self.base)
        p, b = self._state(j)
        m.load_state_dict({k: v.detach().clone() for k, v in {**p, **b}.items()}, strict=False)
        return m


def _iterate(model, schedule, objective, runs, gens, *, dim, rounds, ts, method, metrics, keep_rounds, cond, dtype,
             finetune=None):
    """The loop of Algorithms 1 and 2 (docs/theory.md §7) for one or more runs sharing ``model``: every
    round samples all runs' chains in one ``sample`` call (one network call per step), each run's x_T and
    noise drawn from its own generator in the order a run alone would draw them."""
    sizes = [r.n for r in runs]
    bounds = [sum(sizes[:j]) for j in range(len(runs) + 1)]
    ts = default_grid(schedule) if ts is None else ts
    n_steps = torch.as_tensor(ts).numel() - 1
    stochastic = is_stochastic(method)
    delta = _same_or_per_chain([r.delta for r in runs], sizes, dtype)
    sigma_y = _same_or_per_chain([r.sigma_y for r in runs], sizes, torch.float64)  # squared in float64, as a number is
    kinds = [r.guidance for r in runs]
    lookahead = kinds[0] == "G_loss" if len(set(kinds)) == 1 else torch.cat(
        [torch.full((r.n,), r.guidance == "G_loss") for r in runs])
    opt = None
    if finetune is not None:
        if not any(True for _ in getattr(model, "parameters", lambda: [])()):
            raise ValueError("finetune: Algorithm 2 needs a model with trainable parameters (a network, "
                             "not the exact score)")
        if len(runs) == 1:
            model = copy.deepcopy(model)
            tuned = [model]
        else:  # one copy per run, all sampled in one call
            if len(set(sizes)) != 1:
                raise ValueError("runs: Algorithm 2 over several runs needs the same n in every run")
            model = _Copies(model, len(runs))
            tuned = [model.copy(j) for j in range(len(runs))]
        params = list(model.parameters())
        opt = torch.optim.Adam(params, lr=finetune.lr, betas=tuple(finetune.betas))

    def draw(field):
        xT, noise = [], []
        for r, gen in zip(runs, gens):
            xT.append(torch.randn(r.n, dim, dtype=dtype, generator=gen))
            if stochastic:
                noise.append(torch.stack([torch.randn(r.n, dim, dtype=dtype, generator=gen) for _ in range(n_steps)]))
        with torch.no_grad():
            return sample(model, schedule, torch.cat(xT), ts, method=method, cond=cond, guidance=field,
                          noise=torch.cat(noise, dim=1) if stochastic else None).x0

    values, mets, kept, times = [[] for _ in runs], [[] for _ in runs], [{} for _ in runs], []

    def record(k, x, f):
        for j in range(len(runs)):
            xj, fj = x[bounds[j]:bounds[j + 1]], f[bounds[j]:bounds[j + 1]]
            values[j].append(fj)
            mets[j].append(metrics(xj, fj) if metrics is not None else {})
            if k in keep_rounds:
                kept[j][k] = xj.clone()

    t0 = time.perf_counter()
    x = draw(None)
    f, g = objective_and_grad(objective, x)
    times.append(time.perf_counter() - t0)
    record(0, x, f)
    for k in range(rounds):
        t0 = time.perf_counter()
        if finetune is not None and k >= finetune.start:
            model.train()
            for _ in range(finetune.steps):
                losses = [_finetune_loss(m, finetune, schedule, x[bounds[j]:bounds[j + 1]], f[bounds[j]:bounds[j + 1]],
                                         cond, gen) for j, (m, gen) in enumerate(zip(tuned, gens))]
                # the engine's one optimiser step (finite values checked); copies' losses add, their
                # parameters are disjoint slices
                update(losses[0] if len(losses) == 1 else sum(losses), opt, params)
            model.eval()
        y = (g * x).sum(-1) + delta
        field = gradient_guidance(schedule, g, y, sigma_y, lookahead=lookahead, model=model, cond=cond)
        x = draw(field)
        f, g = objective_and_grad(objective, x)
        times.append(time.perf_counter() - t0)
        record(k + 1, x, f)
    models = [model.module(j) for j in range(len(runs))] if isinstance(model, _Copies) else [model] * len(runs)
    return [OptimResult(values=values[j], metrics=mets[j], x=x[bounds[j]:bounds[j + 1]], samples=kept[j],
                        round_times=list(times), model=models[j]) for j in range(len(runs))]


def optimize(
    model,
    schedule: NoiseSchedule,
    objective: Callable,
    *,
    n: int = 32,
    dim: Optional[int] = None,
    rounds: int = 100,
    delta: float = 0.1,
    guidance: str = "G_loss",
    sigma_y: float = 0.1,
    ts=None,
    method: str = "ddpm",
    finetune: Optional[FineTune] = None,
    generator: Optional[torch.Generator] = None,
    metrics: Optional[Callable] = None,
    keep_rounds: Sequence[int] = (),
    cond=None,
    dtype: Optional[torch.dtype] = None,
) -> OptimResult:
    """Algorithm 1 of the paper (``finetune=None``), Algorithm 2 with a :class:`FineTune` (docs/theory.md §7).

    B = ``n`` independent chains: x_0 = unguided samples; for k = 0..K-1: g_k = grad f(x_k),
    y_k = g_k.x_k + delta, x_{k+1} = a sample of the model guided by G or G_loss toward (g_k, y_k).
    ``delta`` is the expected increase of the reward per round (> 0). Every pass is
    ``theory.solvers.sample(model, schedule, x_T, ts, method, guidance=...)``. Several configurations
    sharing a model: :func:`optimize_batched`.
    """
    if guidance not in GUIDANCES:
        raise ValueError(f"guidance: unknown kind {guidance!r}, use one of {GUIDANCES}")
    if not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta > 0):
        raise ValueError(f"delta: the per-round increase must be a finite number > 0, got {delta}")
    if rounds < 0 or n < 1:
        raise ValueError(f"rounds, n: need rounds >= 0 and n >= 1, got {rounds}, {n}")
    run = Run(guidance=guidance, delta=delta, sigma_y=sigma_y, n=n)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    return _iterate(model, schedule, objective, [run], [gen], dim=_dim_of(model, objective, dim), rounds=rounds,
                    ts=ts, method=method, metrics=metrics, keep_rounds=keep_rounds, cond=cond,
                    dtype=dtype or _dtype_of(model), finetune=finetune)[0]


def optimize_batched(model, schedule: NoiseSchedule, objective: Callable, runs: Sequence[Run], *,
                     dim: Optional[int] = None, rounds: int = 100, ts=None, method: str = "ddpm",
                     finetune: Optional[FineTune] = None, metrics: Optional[Callable] = None,
                     keep_rounds: Sequence[int] = (), cond=None, dtype: Optional[torch.dtype] = None) -> list:
    """Algorithm 1 for several configurations sharing one model (G and G_loss, several deltas, sigma_y,
    seeds: a list of :class:`Run`), all chains in ONE network call per step (docs/theory.md §7). With a
    :class:`FineTune`, Algorithm 2: every run fine-tunes its own copy of the network (runs of equal n), and
    the copies are evaluated together over stacked parameters (``torch.func.functional_call`` + ``vmap``).
    Returns one :class:`OptimResult` per run, equal to what ``optimize`` gives for that run alone up to the
    round-off of a larger batch; ``round_times`` are the batch's. ``metrics(x, f)`` is called per run."""
    runs = list(runs)
    if not runs or not all(isinstance(r, Run) for r in runs):
        raise ValueError("runs: give a non-empty list of gradient_guidance.Run")
    if rounds < 0:
        raise ValueError(f"rounds: need rounds >= 0, got {rounds}")
    gens = [torch.Generator().manual_seed(int(r.seed)) for r in runs]
    return _iterate(model, schedule, objective, runs, gens, dim=_dim_of(model, objective, dim), rounds=rounds,
                    ts=ts, method=method, metrics=metrics, keep_rounds=keep_rounds, cond=cond,
                    dtype=dtype or _dtype_of(model), finetune=finetune)


def algorithm1(model, schedule, objective, **kw) -> OptimResult:
    """Algorithm 1: iterated gradient guidance with a fixed pre-trained score."""
    kw.pop("finetune", None)
    return optimize(model, schedule, objective, **kw)


def algorithm2(model, schedule, objective, finetune: FineTune = FineTune(), **kw) -> OptimResult:
    """Algorithm 2: iterated gradient guidance with adaptive score fine-tuning on the generated samples."""
    return optimize(model, schedule, objective, finetune=finetune, **kw)
