"""The sphere front of gradient guidance with the EXACT score of the sphere data (docs/theory.md §2, §7).

The gg_sphere experiment uses data x0 = xi/|xi|, xi ~ N(0, I_D): the uniform law on the unit sphere
S^{D-1} (the zero-width limit of a thin Gaussian shell, a von Mises-Fisher law with concentration 0).
Its noised marginal p_t(x) = E_{u ~ U(S)} N(x; alpha u, sigma^2 I) depends on r = |x| only:

    p_t(x) = (2 pi sigma^2)^{-D/2} exp(-(r^2 + alpha^2) / (2 sigma^2)) M_D(kappa),   kappa = alpha r / sigma^2,
    M_D(kappa) = E_u exp(kappa u_1) = c_D int_0^pi sin^{D-2}(phi) exp(kappa cos phi) dphi
               = Gamma(D/2) (2/kappa)^{nu} I_nu(kappa),   nu = D/2 - 1                            (S.1)

(the 1-D radial/angular quadrature, and its closed form by the modified Bessel function I_nu). The
posterior of X_0 given X_t = x is von Mises-Fisher with mean direction x/r and concentration kappa, so
Tweedie's formula (docs/theory.md (2.2)) gives the exact posterior mean and score

    x0_hat(x, t) = A_D(kappa) x / r,    A_D(kappa) = I_{D/2}(kappa) / I_{D/2-1}(kappa)              (S.2)
    score(x, t) = (alpha x0_hat - x) / sigma^2,   eps(x, t) = (x - alpha x0_hat) / sigma          (2.1), (2.3)

with dA_D/dkappa = 1 - A_D^2 - (D - 1) A_D / kappa (the Bessel recurrences), used for autograd so that
G_loss's vector-Jacobian product through the eps model is exact too.

``UniformSphereEps`` is that eps model; ``log_density_quadrature`` evaluates (S.1) by Gauss-Legendre
quadrature in phi (independent of the Bessel closed form; the tests differentiate it by autograd and
compare with (S.2)). ``run_exact`` re-runs gg_sphere's G vs G_loss sweep (its ``SphereConfig``: same
objective theta.x, deltas, rounds, chains, sampler) with this score, all configurations in one batched
network call per step (``theory.gradient_guidance.optimize_batched``).
"""
from __future__ import annotations

import functools
import math
import time

import numpy as np
import torch
from scipy import special
from torch import nn

from sims.gradguide.config import Setup, SphereConfig
from sims.gradguide.data import schedule_of
from sims.gradguide.objectives import Linear
from theory.gradient_guidance import Run, default_grid, optimize_batched
from theory.schedules import NoiseSchedule, as_time

__all__ = ["bessel_ratio", "UniformSphereEps", "log_density_quadrature", "theta_of", "run_exact", "compare", "verdict"]


def _ratio_np(D: int, kappa: np.ndarray) -> np.ndarray:
    """A_D(kappa) = I_{D/2}(kappa) / I_{D/2-1}(kappa) (S.2) in float64. The exponentially scaled ``ive``
    has the same ratio and does not overflow; where the denominator underflows (kappa << D) Gauss's
    continued fraction A_D = kappa / (D + kappa^2 / (D + 2 + kappa^2 / (D + 4 + ...))) is used (it converges
    fastest exactly there; 40 levels are exact to round-off for kappa^2 < D)."""
    nu = D / 2 - 1
    num, den = special.ive(nu + 1, kappa), special.ive(nu, kappa)
    small = ~(den > 1e-250)
    k2 = kappa * kappa
    tail = np.full_like(kappa, D + 80.0)
    for j in range(39, -1, -1):
        tail = D + 2.0 * j + k2 / tail
    cf = kappa / tail
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(small, cf, num / np.where(small, 1.0, den))
    return out


class _BesselRatio(torch.autograd.Function):
    """A_D(kappa) with its derivative 1 - A^2 - (D - 1) A / kappa (-> 1/D at kappa = 0). scipy has the
    Bessel functions of any order; torch only orders 0 and 1, hence this hand-written Function."""

    @staticmethod
    def forward(ctx, kappa, D):
        a = torch.from_numpy(_ratio_np(D, kappa.detach().cpu().double().numpy())).to(kappa)
        ctx.save_for_backward(kappa, a)
        ctx.D = D
        return a

    @staticmethod
    def backward(ctx, grad):
        kappa, a = ctx.saved_tensors
        D = ctx.D
        safe = kappa.clamp_min(1e-12)
        d = torch.where(kappa > 1e-6, 1 - a * a - (D - 1) * a / safe, torch.full_like(a, 1.0 / D))
        return grad * d, None


def bessel_ratio(D: int, kappa: torch.Tensor) -> torch.Tensor:
    """A_D(kappa) = I_{D/2}(kappa) / I_{D/2-1}(kappa), the mean resultant length of a von Mises-Fisher law
    on S^{D-1} with concentration kappa (S.2); differentiable in kappa."""
    if int(D) != D or D < 2:
        raise ValueError(f"D: the sphere's ambient dimension must be an int >= 2, got {D!r}")
    kappa = torch.as_tensor(kappa)
    if (kappa < 0).any():
        raise ValueError("kappa: concentrations must be >= 0")
    return _BesselRatio.apply(kappa, int(D))


class UniformSphereEps(nn.Module):
    """The exact eps model of the uniform law on the sphere of radius ``radius`` in R^D under ``schedule``:
    eps(x, t) = (x - alpha x0_hat) / sigma with x0_hat = radius A_D(alpha radius |x| / sigma^2) x / |x|
    ((S.2); docs/theory.md (2.2), (2.3)). float64; differentiable in x."""

    def __init__(self, D: int, schedule: NoiseSchedule, radius: float = 1.0):
        super().__init__()
        if int(D) != D or D < 2:
            raise ValueError(f"D: the sphere's ambient dimension must be an int >= 2, got {D!r}")
        if not radius > 0:
            raise ValueError(f"radius: must be > 0, got {radius}")
        self.D, self.schedule, self.radius = int(D), schedule, float(radius)
        self.register_buffer("_dtype_anchor", torch.zeros((), dtype=torch.float64))

    @property
    def dim(self) -> int:
        return self.D

    def _check(self, x):
        if x.ndim != 2 or x.shape[1] != self.D:
            raise ValueError(f"x: expected shape (B, {self.D}), got {tuple(x.shape)}")

    def posterior_mean(self, x: torch.Tensor, t) -> torch.Tensor:
        """x0_hat = radius A_D(kappa) x / |x|, kappa = alpha radius |x| / sigma^2 (S.2)."""
        self._check(x)
        tt = as_time(t, x)
        a = self.schedule.alpha(tt).to(x.dtype)[:, None]
        s2 = self.schedule.sigma2(tt).to(x.dtype)[:, None]
        r = x.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        kappa = a * self.radius * r / s2
        return self.radius * bessel_ratio(self.D, kappa) * x / r

    def score(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """(alpha x0_hat - x) / sigma^2 (docs/theory.md (2.2) solved for the score)."""
        tt = as_time(t, x)
        a = self.schedule.alpha(tt).to(x.dtype)[:, None]
        s2 = self.schedule.sigma2(tt).to(x.dtype)[:, None]
        return (a * self.posterior_mean(x, tt) - x) / s2

    def forward(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """eps = -sigma score (docs/theory.md (2.1))."""
        tt = as_time(t, x)
        return -self.schedule.sigma(tt).to(x.dtype)[:, None] * self.score(x, tt)

    def sample(self, n: int, generator=None) -> torch.Tensor:
        """Data: radius xi / |xi|, xi ~ N(0, I_D)."""
        xi = torch.randn(n, self.D, dtype=torch.float64, generator=generator)
        return self.radius * xi / xi.norm(dim=-1, keepdim=True)


def log_density_quadrature(x: torch.Tensor, t, D: int, schedule: NoiseSchedule, nodes: int = 400) -> torch.Tensor:
    """log p_t(x) of the uniform unit sphere by (S.1) with an n-node Gauss-Legendre rule in phi on [0, pi]
    (log-sum-exp of log weights, so large kappa does not overflow); differentiable in x by autograd. This
    does not use the Bessel closed form, so it checks it."""
    tt = as_time(t, x)
    a = schedule.alpha(tt).to(x.dtype)
    s2 = schedule.sigma2(tt).to(x.dtype)
    r = x.norm(dim=-1)
    kappa = a * r / s2
    z, w = np.polynomial.legendre.leggauss(nodes)
    phi = torch.as_tensor((z + 1) * math.pi / 2, dtype=x.dtype)
    logw = torch.as_tensor(np.log(w * math.pi / 2), dtype=x.dtype)
    log_sin = (D - 2) * torch.log(torch.sin(phi))
    # c_D = 1 / int_0^pi sin^{D-2} = Gamma(D/2) / (sqrt(pi) Gamma((D-1)/2))
    log_c = math.lgamma(D / 2) - 0.5 * math.log(math.pi) - math.lgamma((D - 1) / 2)
    log_m = torch.logsumexp(logw + log_sin + kappa[:, None] * torch.cos(phi), dim=-1) + log_c
    return -(r * r + a * a) / (2 * s2) - D / 2 * torch.log(2 * math.pi * s2) + log_m


def theta_of(cfg: SphereConfig) -> torch.Tensor:
    """gg_sphere's objective direction (unit theta from ``cfg.seed``, as in sims.gradguide.run_sphere)."""
    g = torch.Generator().manual_seed(cfg.seed)
    theta = torch.randn(cfg.D, dtype=torch.float64, generator=g)
    return theta / theta.norm()


def _metrics(x, fx):
    dev = x.norm(dim=-1) - 1
    return {"reward": float(fx.mean()), "dev_abs": float(dev.abs().mean()), "dev": float(dev.mean()),
            "reward_sd": float(fx.std()), "dev_abs_sd": float(dev.abs().std())}


@functools.lru_cache(maxsize=None)
def run_exact(cfg: SphereConfig) -> dict:
    """gg_sphere's sweep (G and G_loss x cfg.deltas, Algorithm 1, cfg.rounds rounds of cfg.n chains, DDPM
    on cfg.n_steps steps of the cosine schedule) with the exact score ``UniformSphereEps``. Each run is
    seeded by cfg.seed, as gg_sphere's. Returns per run the per-round reward and mean ||x| - 1|."""
    setup = Setup(D=cfg.D, n_timesteps=cfg.setup.n_timesteps, schedule=cfg.setup.schedule)
    sch = schedule_of(setup)
    model = UniformSphereEps(cfg.D, sch)
    f = Linear(theta_of(cfg))
    ts = default_grid(sch, cfg.n_steps)
    keys = [(kind, d) for kind in ("G", "G_loss") for d in cfg.deltas]
    runs = [Run(guidance=kind, delta=d, sigma_y=cfg.sigma_y, seed=cfg.seed, n=cfg.n) for kind, d in keys]
    t0 = time.perf_counter()
    res = optimize_batched(model, sch, f, runs, dim=cfg.D, rounds=cfg.rounds, ts=ts, metrics=_metrics)
    out = {"runs": {f"{kind}@{d}": {k: [m[k] for m in r.metrics] for k in r.metrics[0]}
                    for (kind, d), r in zip(keys, res)}}
    out["wall_s"] = time.perf_counter() - t0
    out["pretrained"] = {k: out["runs"][f"G@{cfg.deltas[0]}"][k][0] for k in ("reward", "dev_abs", "dev_abs_sd")}
    return out


def compare(runs: dict, deltas) -> dict:
    """Final reward and mean ||x| - 1| of G and G_loss per delta (with their sample standard deviations where
    the runs record them), G_loss's reward gain over G in percent and its off-sphere ratio dev(G_loss) / dev(G)."""
    keys = [k for k in ("reward", "dev_abs", "reward_sd", "dev_abs_sd") if k in runs[f"G@{deltas[0]}"]]
    fin = {kind: {k: [runs[f"{kind}@{d}"][k][-1] for d in deltas] for k in keys} for kind in ("G", "G_loss")}
    gain = [100 * (gl - g) / abs(g) for g, gl in zip(fin["G"]["reward"], fin["G_loss"]["reward"])]
    ratio = [gl / g for g, gl in zip(fin["G"]["dev_abs"], fin["G_loss"]["dev_abs"])]
    return {"final": fin, "reward_gain_pct": gain, "dev_ratio": ratio}


def verdict(cmp_exact: dict, deltas, min_gain_pct: float = 0.5, min_ratio: float = 1.05) -> tuple[str, str]:
    """Does "G_loss gains reward but lands further off the sphere than G" hold with the exact score?
    Per delta the trade-off is present when G_loss's reward gain is >= min_gain_pct percent AND its
    off-sphere ratio is >= min_ratio. 'holds' at every delta, 'does not hold' at none, else 'holds only
    when delta in {...}'. Returns (verdict, the numbers in words)."""
    gain, ratio = cmp_exact["reward_gain_pct"], cmp_exact["dev_ratio"]
    yes = [d for d, g, q in zip(deltas, gain, ratio) if g >= min_gain_pct and q >= min_ratio]
    words = "; ".join(f"delta {d:g}: reward {g:+.1f} %, off-sphere x{q:.2f}" for d, g, q in zip(deltas, gain, ratio))
    if len(yes) == len(deltas):
        return "holds", words
    if not yes:
        return "does not hold", words
    return f"holds only when delta in {{{', '.join(f'{d:g}' for d in yes)}}}", words
