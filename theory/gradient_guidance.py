"""Gradient guidance as optimisation (Guo et al., NeurIPS 2024; GRADIENT_GUIDANCE.md, THEORY.md 7).

Two guidance fields, both ``(x, t, eps) -> tensor`` ADDED TO THE SCORE (the protocol of
:func:`theory.solvers.sample`), for a per-sample linear target ``y`` along a gradient ``g``:

    naive G:       G      = beta_t (y - g.x0_hat) g,            beta_t = alpha_t / (sigma_y^2 + h_t |g|^2)
    look-ahead:    G_loss = -beta_t grad_{x_t} (y - g.x0_hat(x_t))^2,
                   beta_t = (alpha_t^2 / 2) / (alpha_t^2 sigma_y^2 + h_t |grad_{x_t}(g.x0_hat)|^2)

with Tweedie's ``x0_hat = (x_t + h_t score) / alpha_t`` and ``h_t = sigma_t^2`` (GRADIENT_GUIDANCE.md,
"Guidance fields"). G uses x0_hat without back-propagation; G_loss costs ONE vector-Jacobian product
through the score model per step (and one forward pass with a graph).

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

from .nets import dsm_loss
from .param import eps_to_x0
from .schedules import DiscreteVP, NoiseSchedule, append_dims
from .solvers import sample

__all__ = [
    "GUIDANCES",
    "naive_guidance",
    "lookahead_guidance",
    "make_guidance",
    "r_off",
    "objective_and_grad",
    "FineTune",
    "OptimResult",
    "optimize",
    "algorithm1",
    "algorithm2",
    "default_grid",
]

GUIDANCES = ("G", "G_loss")


def _check_target(g: torch.Tensor, y: torch.Tensor, sigma_y: float):
    if g.ndim != 2:
        raise ValueError(f"g: expected per-sample gradients of shape (B, D), got {tuple(g.shape)}")
    y = torch.as_tensor(y, dtype=g.dtype, device=g.device)
    if y.ndim == 0:
        y = y.expand(g.shape[0])
    if y.shape != (g.shape[0],):
        raise ValueError(f"y: expected one target per sample, shape ({g.shape[0]},), got {tuple(y.shape)}")
    if not sigma_y > 0:
        raise ValueError(f"sigma_y: the reward-noise level must be > 0, got {sigma_y}")
    if not bool(torch.isfinite(g).all()) or not bool(torch.isfinite(y).all()):
        raise ValueError("g, y: gradient and target must be finite (check the objective's gradient)")
    return g, y


def _check_batch(x: torch.Tensor, g: torch.Tensor) -> None:
    if x.shape != g.shape:
        raise ValueError(f"x: samples of shape {tuple(x.shape)} do not match the guidance gradient g "
                         f"{tuple(g.shape)}; build the guidance for this batch (same B and D)")


def naive_guidance(schedule: NoiseSchedule, g: torch.Tensor, y, sigma_y: float = 0.1) -> Callable:
    """The naive gradient guidance G (GRADIENT_GUIDANCE.md): G = beta_t (y - g.x0_hat) g,
    beta_t = alpha_t / (sigma_y^2 + h_t |g|^2), x0_hat from the eps the solver passes (no back-prop)."""
    g, y = _check_target(g, y, sigma_y)

    def field(x, t, eps):
        _check_batch(x, g)
        a = schedule.alpha(t).to(x.dtype)
        h = schedule.sigma2(t).to(x.dtype)
        gg = g.to(x.dtype)
        x0 = eps_to_x0(x, eps.detach(), a, h.sqrt())
        resid = y.to(x.dtype) - (gg * x0).sum(-1)
        beta = a / (sigma_y**2 + h * (gg * gg).sum(-1))
        return append_dims(beta * resid, x) * gg

    field.kind = "G"
    return field


def lookahead_guidance(model, schedule: NoiseSchedule, g: torch.Tensor, y, sigma_y: float = 0.1,
                       cond=None) -> Callable:
    """The look-ahead guidance G_loss (GRADIENT_GUIDANCE.md, the paper's eq. for G_loss):
    G_loss = -beta_t grad_{x_t} (y - g.x0_hat(x_t))^2 = 2 beta_t (y - g.x0_hat) grad_{x_t}(g.x0_hat),
    beta_t = (alpha_t^2/2) / (alpha_t^2 sigma_y^2 + h_t |grad_{x_t}(g.x0_hat)|^2) per sample.
    grad_{x_t}(g.x0_hat) is ONE vector-Jacobian product through the model (samples are independent, so
    the gradient of the batch sum is every sample's own gradient)."""
    g, y = _check_target(g, y, sigma_y)

    def field(x, t, eps):
        _check_batch(x, g)
        a = schedule.alpha(t).to(x.dtype)
        h = schedule.sigma2(t).to(x.dtype)
        gg = g.to(x.dtype)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            x0 = eps_to_x0(xg, model(xg, t, cond), a, h.sqrt())
            u = (gg * x0).sum(-1)  # g . x0_hat, (B,)
            (J,) = torch.autograd.grad(u.sum(), xg)  # the one VJP: grad_x (g . x0_hat) per sample
        u, J = u.detach(), J.detach()
        resid = y.to(x.dtype) - u
        beta = (a**2 / 2) / (a**2 * sigma_y**2 + h * (J * J).sum(-1))
        return append_dims(2 * beta * resid, x) * J

    field.kind = "G_loss"
    return field


def make_guidance(kind: str, model, schedule: NoiseSchedule, g, y, sigma_y: float = 0.1, cond=None):
    """G (``kind='G'``) or G_loss (``kind='G_loss'``) for targets (g, y)."""
    if kind == "G":
        return naive_guidance(schedule, g, y, sigma_y)
    if kind == "G_loss":
        return lookahead_guidance(model, schedule, g, y, sigma_y, cond)
    raise ValueError(f"guidance: unknown kind {kind!r}, use one of {GUIDANCES}")


def r_off(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Off-support ratio per sample (GRADIENT_GUIDANCE.md, THEORY.md 5):
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
    """Algorithm 2's score fine-tuning (GRADIENT_GUIDANCE.md): from round ``start`` on, before sampling,
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
    """Algorithm 1 of the paper (``finetune=None``), Algorithm 2 with a :class:`FineTune`.

    B = ``n`` independent chains: x_0 = unguided samples; for k = 0..K-1: g_k = grad f(x_k),
    y_k = g_k.x_k + delta, x_{k+1} = a sample of the model guided by G or G_loss toward (g_k, y_k).
    ``delta`` is the expected increase of the reward per round (> 0). Every pass is
    ``theory.solvers.sample(model, schedule, x_T, ts, method, guidance=...)``.
    """
    if guidance not in GUIDANCES:
        raise ValueError(f"guidance: unknown kind {guidance!r}, use one of {GUIDANCES}")
    if not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta > 0):
        raise ValueError(f"delta: the per-round increase must be a finite number > 0, got {delta}")
    if rounds < 0 or n < 1:
        raise ValueError(f"rounds, n: need rounds >= 0 and n >= 1, got {rounds}, {n}")
    dim = dim if dim is not None else getattr(model, "dim", None)
    if dim is None:
        raise ValueError("dim: the model does not say its dimension; pass dim=D")
    odim = getattr(objective, "dim", None)
    if odim is not None and int(odim) != int(dim):
        raise ValueError(f"objective: defined on dimension {odim} but the data (model) have dimension {dim}; "
                         "build the objective for the data's dimension")
    dtype = dtype or _dtype_of(model)
    ts = default_grid(schedule) if ts is None else ts
    gen = generator if generator is not None else torch.Generator().manual_seed(0)

    opt = None
    if finetune is not None:
        if not any(True for _ in getattr(model, "parameters", lambda: [])()):
            raise ValueError("finetune: Algorithm 2 needs a model with trainable parameters (a network, "
                             "not the exact score)")
        model = copy.deepcopy(model)
        opt = torch.optim.Adam(model.parameters(), lr=finetune.lr, betas=tuple(finetune.betas))

    def draw(field):
        xT = torch.randn(n, dim, dtype=dtype, generator=gen)
        with torch.no_grad():
            return sample(model, schedule, xT, ts, method=method, cond=cond, guidance=field, generator=gen).x0

    t0 = time.perf_counter()
    x = draw(None)
    values, mets, kept, times = [], [], {}, []
    f, g = objective_and_grad(objective, x)
    times.append(time.perf_counter() - t0)

    def record(k, x, f):
        values.append(f)
        mets.append(metrics(x, f) if metrics is not None else {})
        if k in keep_rounds:
            kept[k] = x.clone()

    record(0, x, f)
    for k in range(rounds):
        t0 = time.perf_counter()
        if finetune is not None and k >= finetune.start:
            model.train()
            w = None
            if finetune.weights is not None:
                w = torch.as_tensor(finetune.weights(x, f), dtype=x.dtype).reshape(-1)
                if w.shape != (n,) or (w < 0).any() or not float(w.sum()) > 0:
                    raise ValueError(f"weights: must return ({n},) non-negative weights with a positive sum")
                w = w / w.sum()
            t_min = finetune.t_min if finetune.t_min is not None else (
                1.0 if isinstance(schedule, DiscreteVP) else 1e-3 * schedule.T)
            for _ in range(finetune.steps):
                tt = t_min + (schedule.T - t_min) * torch.rand(n, generator=gen, dtype=x.dtype)
                if w is None:
                    loss = dsm_loss(model, schedule, x, tt, cond, gen)
                else:  # weighted DSM: sum_i w_i |eps_theta(x_t,i) - eps_i|^2 (the paper's weighted samples)
                    loss = sum(w[i] * dsm_loss(model, schedule, x[i:i + 1], tt[i:i + 1], cond, gen)
                               for i in range(n))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            model.eval()
        y = (g * x).sum(-1) + delta
        field = make_guidance(guidance, model, schedule, g, y, sigma_y, cond)
        x = draw(field)
        f, g = objective_and_grad(objective, x)
        times.append(time.perf_counter() - t0)
        record(k + 1, x, f)
    return OptimResult(values=values, metrics=mets, x=x, samples=kept, round_times=times, model=model)


def algorithm1(model, schedule, objective, **kw) -> OptimResult:
    """Algorithm 1: iterated gradient guidance with a fixed pre-trained score."""
    kw.pop("finetune", None)
    return optimize(model, schedule, objective, **kw)


def algorithm2(model, schedule, objective, finetune: FineTune = FineTune(), **kw) -> OptimResult:
    """Algorithm 2: iterated gradient guidance with adaptive score fine-tuning on the generated samples."""
    return optimize(model, schedule, objective, finetune=finetune, **kw)
