"""Gradient guidance as an optimiser on an image pipeline (Guo et al., NeurIPS 2024; docs/theory.md §7, §8).

One experiment, a function of a frozen :class:`GuideConfig` and a diffusers SD-style pipeline (the digits
pipeline trained here by default; a user's local Stable Diffusion v1.5 with ``configs/guide_sd15.json``):

1. **Context** (``build_context``): the pipeline's UNet with one prompt and classifier-free guidance as an eps
   model over latents (``imaging.pipeline.LatentEps``), seen by the solvers as an eps model over FLAT latents
   (``FlatEps``: Algorithms 1 and 2 of ``theory.gradient_guidance`` work on (B, D) samples and per-sample
   gradients g (B, D)); the reward on latents through the VAE decoder, docs/theory.md (8.1).
2. **Reference** (``reference``): ``pca_n`` latents of the pre-trained pipeline (unguided, the config's
   sampler). Their reward mean and standard deviation standardise the objective,
   f(x) = (r(x) - mean_0) / sd_0, so guidance strengths (Algorithm 1's per-round increase delta) and the
   reward-noise level sigma_y are in units of the pre-trained reward's spread, whatever the reward's scale
   (G and G_loss are unchanged by this affine map when delta and sigma_y scale with sd_0). A PCA of the same
   latents gives the data subspace: the top k principal directions U holding ``pca_var`` of the variance.
3. **Algorithm 1** (``theory.gradient_guidance.optimize_batched``) for every (guidance, strength) pair, all
   chains in ONE network call per step, every configuration from the same x_T and noise (common random
   numbers: round 0 is the same pre-trained batch for all); or **Algorithm 2** (``algorithm=2``: score
   fine-tuning of a copy of the UNet per configuration on the previous round's samples, through the
   engine's optimiser step).
4. **Per round and configuration**: the reward (raw and standardised), the true JPEG size, the off-subspace
   energy fraction of each latent, |P_perp (x - m)|^2 / |x - m|^2 with P_perp = I - U U^T and m the
   reference mean (the image analogue of r_off, docs/theory.md (5.11): fraction = r^2 / (1 + r^2) for
   r = r_off of the centred latent), and, on the digits pipeline, the judge's probability of the prompt's
   digit (realism); samples of chosen rounds for the grids.
5. **Runtime** (``time_rounds``): one unguided pass, one round with G and one with G_loss (pass + the reward
   gradient), same chains, timed apart (minimum of 3 repeats): the runtime table's row for images.

Every result is plain JSON-serialisable data; ``run`` writes ``out/results.json`` and ``out/samples.safetensors``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .configfile import load_dataclass

__all__ = ["GuideConfig", "load_config", "FlatEps", "DigitLogProb", "build_context", "reference",
           "off_subspace_fraction", "standardised_objective", "time_rounds", "retime", "algorithm1_fixed_noise", "run",
           "CONFIG_DIR", "METHODS"]

CONFIG_DIR = Path(__file__).with_name("configs")
METHODS = ("G", "G_loss")
SAMPLERS = ("ddpm", "ddim", "em")
NOISE = ("fixed", "fresh")


# ============================================================================ configuration


@dataclass(frozen=True)
class GuideConfig:
    """One gradient-guidance experiment on an image pipeline. Defaults are the digits pipeline's quick-ish
    setting; the SD v1.5 setting is ``imaging/configs/guide_sd15.json``.

    Pipeline: ``model`` (local diffusers folder; None = the digits pipeline), ``prompt`` (one),
    ``guidance_scale`` (CFG), ``steps`` of ``method`` ('ddpm' = ancestral, the paper's sampler) on the
    scheduler's grid, ``dtype`` of the frozen weights, ``device``, ``image_size`` (None = the UNet's).
    Reward: ``reward`` (a name of ``imaging.rewards.make_reward``, or 'digit-logprob': :class:`DigitLogProb`)
    with ``reward_kwargs``.
    Algorithm: ``methods`` ('G', 'G_loss'), ``strengths`` (delta per round in units of the pre-trained
    reward's standard deviation), ``sigma_y`` (same units), ``rounds``, ``n`` chains per configuration,
    ``algorithm`` 1 or 2 (with ``ft_start``, ``ft_steps``, ``ft_lr``: Algorithm 2's score fine-tuning).
    ``noise``: 'fixed' - every chain keeps its x_T and sampler noise in every round (Algorithm 1 only), so a
    round changes a chain's image only through the guidance and the grid shows one image evolving; 'fresh' -
    new noise every round (``theory.gradient_guidance.optimize_batched``, Algorithms 1 and 2).
    Measures: ``pca_n`` reference latents, ``pca_var`` variance held by the top-k directions,
    ``jpeg_upscale`` for the true JPEG size, ``grid_n`` samples kept per configuration at ``grid_rounds``
    (None = 0, 1/3, 2/3 and the last round), ``batch`` for reference sampling and decoding,
    ``timing`` (the runtime row), ``seed``.
    """

    model: Optional[str] = None
    prompt: str = "a handwritten digit 3"
    guidance_scale: float = 3.0
    steps: int = 20
    method: str = "ddpm"
    dtype: str = "float32"
    device: Optional[str] = None
    image_size: Optional[int] = None
    reward: str = "diff-compressibility"
    reward_kwargs: dict = None  # type: ignore[assignment]
    methods: tuple = METHODS
    strengths: tuple = (0.25, 0.5, 1.0)
    sigma_y: float = 0.1
    rounds: int = 8
    n: int = 8
    algorithm: int = 1
    noise: str = "fixed"
    ft_start: int = 0
    ft_steps: int = 1
    ft_lr: float = 1e-5
    pca_n: int = 512
    pca_var: float = 0.95
    jpeg_upscale: int = 4
    grid_n: int = 4
    grid_rounds: Optional[tuple] = None
    batch: int = 128
    timing: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.reward_kwargs is None:
            object.__setattr__(self, "reward_kwargs", {})
        for k in ("methods", "strengths", "grid_rounds"):
            v = getattr(self, k)
            if isinstance(v, list):
                object.__setattr__(self, k, tuple(v))

    def validate(self) -> None:
        for k in ("steps", "rounds", "n", "pca_n", "batch", "jpeg_upscale", "ft_steps"):
            v = getattr(self, k)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{k}: must be an int >= 1, got {v!r}")
        if not isinstance(self.grid_n, int) or self.grid_n < 0:
            raise ValueError(f"grid_n: must be an int >= 0, got {self.grid_n!r}")
        if not self.prompt:
            raise ValueError("prompt: give one prompt (e.g. --prompt 'a handwritten digit 3')")
        if not self.methods or any(m not in METHODS for m in self.methods) or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods: one or both of {METHODS} (no repeats), got {list(self.methods)}")
        if not self.strengths or any(not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0)
                                     for s in self.strengths):
            raise ValueError(f"strengths: finite numbers > 0 (delta per round in pre-trained reward sds), "
                             f"got {list(self.strengths)}")
        if not self.sigma_y > 0:
            raise ValueError(f"sigma_y: must be > 0, got {self.sigma_y}")
        if self.algorithm not in (1, 2):
            raise ValueError(f"algorithm: 1 (fixed score) or 2 (score fine-tuning), got {self.algorithm!r}")
        if self.algorithm == 2 and (self.ft_start < 0 or not self.ft_lr > 0):
            raise ValueError(f"ft_start, ft_lr: need ft_start >= 0 and ft_lr > 0, got {self.ft_start}, {self.ft_lr}")
        if self.noise not in NOISE:
            raise ValueError(f"noise: one of {NOISE}, got {self.noise!r}")
        if self.noise == "fixed" and self.algorithm == 2:
            raise ValueError("noise: Algorithm 2 runs with fresh noise every round (noise 'fresh')")
        if self.method not in SAMPLERS:
            raise ValueError(f"method: one of {SAMPLERS} (stochastic: 'ddpm', 'em'; 'ddim' is eta 0), got {self.method!r}")
        if not 0.0 < self.pca_var < 1.0:
            raise ValueError(f"pca_var: the variance share the subspace holds, in (0, 1), got {self.pca_var}")
        if self.pca_n < 2:
            raise ValueError(f"pca_n: need >= 2 reference latents, got {self.pca_n}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype: float32, float16 or bfloat16, got {self.dtype!r}")
        if self.grid_rounds is not None and any(not (isinstance(k, int) and 0 <= k <= self.rounds) for k in self.grid_rounds):
            raise ValueError(f"grid_rounds: rounds in 0..{self.rounds}, got {list(self.grid_rounds)}")
        if not isinstance(self.reward_kwargs, dict):
            raise ValueError(f"reward_kwargs: a JSON object of the reward's keyword arguments, got {self.reward_kwargs!r}")

    def kept_rounds(self) -> list:
        if self.grid_rounds is not None:
            return sorted(set(self.grid_rounds))
        K = self.rounds
        return sorted({0, K // 3, (2 * K) // 3, K})

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def load_config(path=None, **overrides) -> GuideConfig:
    """A GuideConfig from a JSON file (keys starting with '_' are comments; None = the defaults), then
    ``overrides``. Unknown keys are an error that names them."""
    return load_dataclass(GuideConfig, path, overrides, example="imaging/configs/guide_sd15.json")


# ============================================================================ the pipeline as a flat eps model


class FlatEps(nn.Module):
    """An eps model over latents (C, H, W), e.g. ``LatentEps``, seen as one over flat latents (B, C*H*W) on
    the CPU: the gradient-guidance optimiser (``theory.gradient_guidance``) works on (B, D) samples and
    per-sample gradients. Inputs are moved to the network's ``device`` and eps comes back to x's device and
    dtype, so the optimiser's state stays float32 on the host while the network runs on a GPU in its own
    dtype (the transfers are differentiable, so G_loss's vector-Jacobian product goes through them)."""

    def __init__(self, base: nn.Module, shape: tuple, device: str = "cpu"):
        super().__init__()
        self.base, self.shape, self.device = base, tuple(shape), str(device)
        self.dim = int(np.prod(self.shape))

    def forward(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        B = x.shape[0]
        t = torch.as_tensor(t)
        xd = x.reshape(B, *self.shape).to(self.device)
        c = cond.to(self.device) if torch.is_tensor(cond) else cond
        eps = self.base(xd, t.to(self.device), c)
        return eps.reshape(B, self.dim).to(device=x.device, dtype=x.dtype)


@dataclass
class Context:
    """The loaded pipeline and everything derived from it once."""

    pipe: object
    model: FlatEps
    schedule: object
    ts: torch.Tensor
    shape: tuple
    device: str
    reward: object  # reward(x0 latents (B, C, H, W)) -> (B,)
    model_dir: Optional[str]
    digit: Optional[int]  # the prompt's digit on the digits pipeline (for the judge), else None


class DigitLogProb(nn.Module):
    """A smooth classifier reward for the digits pipeline, docs/theory.md (8.6) with T = 1:
    r(I) = log softmax(W phi(I) + b)[digit], phi(I) = the judge's features (grey levels averaged to 8x8,
    times 16; ``imaging.digits_pipeline.judge_features``) as torch operations, so r is differentiable in
    the image. W, b: scikit-learn's multinomial logistic regression fitted on the generator's TRAINING split
    of the 8x8 digits (the judge is fitted on the held-out split, so reward and judge share no data), copied
    into a torch Linear (the fit is scikit-learn's; only the forward pass is written here)."""

    differentiable = True

    def __init__(self, digit: int = 8, split_seed: int = 0):
        super().__init__()
        if not (isinstance(digit, int) and 0 <= digit <= 9):
            raise ValueError(f"digit: the target digit of the digit-logprob reward, 0..9, got {digit!r}")
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression

        from .digits_pipeline import digits_split

        d = load_digits()
        train, _ = digits_split(split_seed)
        lr = LogisticRegression(max_iter=5000).fit(d.data[train], d.target[train])
        self.linear = nn.Linear(64, 10)
        with torch.no_grad():
            self.linear.weight.copy_(torch.as_tensor(lr.coef_, dtype=torch.float32))
            self.linear.bias.copy_(torch.as_tensor(lr.intercept_, dtype=torch.float32))
        self.requires_grad_(False)
        self.digit = digit
        self.__name__ = f"log p(digit {digit})"

    def forward(self, img: torch.Tensor, cond=None) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(img.float().mean(1, keepdim=True), (8, 8)) * 16.0
        return torch.log_softmax(self.linear(x.flatten(1)), -1)[:, self.digit].to(img.dtype)


def _make_reward(pipe, cfg: GuideConfig):
    from .rewards import LatentReward, make_reward

    if cfg.reward == "digit-logprob":
        return LatentReward(pipe, DigitLogProb(**cfg.reward_kwargs))
    return make_reward(pipe, cfg.reward, **cfg.reward_kwargs)


def build_context(cfg: GuideConfig, pipe=None) -> Context:
    """Load the pipeline (or take ``pipe``), freeze it, encode the prompt, wrap the UNet as a flat eps model,
    build the reward on latents."""
    from .ctrl import resolve_model
    from .pipeline import (
        LatentEps,
        encode_prompts,
        freeze,
        latent_shape,
        load_pipeline,
        resolve_device,
        resolve_dtype,
        schedule_of,
        scheduler_grid,
    )

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model_dir = None
    if pipe is None:
        model_dir = resolve_model(cfg.model)
        pipe = load_pipeline(model_dir, dtype=dtype, device=device)
    freeze(pipe)
    cond, unc = encode_prompts(pipe, [cfg.prompt], device=device)
    sch = schedule_of(pipe)
    base = LatentEps(pipe.unet, sch, cond, unc, cfg.guidance_scale)
    shape = latent_shape(pipe, cfg.image_size, cfg.image_size)
    reward = _make_reward(pipe, cfg)
    if isinstance(getattr(reward, "f", None), nn.Module):  # a learnt image reward (aesthetic, CLIP) loads on the
        reward.f.to(device)  # host; it runs next to the decoder
    if not getattr(reward, "differentiable", True):
        raise ValueError(f"reward: '{cfg.reward}' has no gradient; gradient guidance needs a differentiable reward "
                         "(e.g. diff-compressibility, aesthetic, classifier)")
    digit = None
    from .digits_pipeline import PROMPTS

    if model_dir is not None and cfg.prompt in PROMPTS:
        from .digits_pipeline import is_digits_pipeline

        if is_digits_pipeline(model_dir):
            digit = PROMPTS.index(cfg.prompt)
    return Context(pipe, FlatEps(base, shape, device), sch, scheduler_grid(pipe.scheduler, cfg.steps), shape, device,
                   reward, model_dir, digit)


def _reward_of(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    """The raw reward of flat latents x (B, D) on the host, (B,) float32 on the host, with the graph to x."""
    r = ctx.reward(x.reshape(x.shape[0], *ctx.shape).to(ctx.device))
    return r.to(device=x.device, dtype=x.dtype)


@torch.no_grad()
def _decode(ctx: Context, x: torch.Tensor, batch: int) -> torch.Tensor:
    """Images in [0, 1] (B, 3, H, W), float32 on the host, of flat latents x."""
    from .pipeline import decode_latents

    return torch.cat([decode_latents(ctx.pipe, x[i:i + batch].reshape(-1, *ctx.shape).to(ctx.device)).float().cpu()
                      for i in range(0, len(x), batch)])


# ============================================================================ reference: reward scale and the data subspace


#: the last few reference latents sampled in this process, by (pipeline folder, prompt, sampler, seed, sizes).
_REFERENCE_LATENTS: dict = {}


@torch.no_grad()
def reference(ctx: Context, cfg: GuideConfig) -> dict:
    """``pca_n`` unguided latents (seeds disjoint from the optimiser's: seed + 1_000_003 + batch index), their
    raw reward mean and sd, and their PCA: mean m, the top-k directions U (D, k) holding ``pca_var`` of the
    variance (k the smallest such), the explained-variance curve."""
    from theory.solvers import sample

    # The latents depend on the pipeline, prompt, sampler, seed and sizes only - not on the reward: the figures
    # that share them (one process runs gg_image_alg1, gg_image_jpeg, gg_image_alg2 in turn) sample them once.
    key = None if ctx.model_dir is None else (str(ctx.model_dir), cfg.prompt, cfg.guidance_scale, cfg.steps, cfg.method,
                                              cfg.seed, cfg.pca_n, cfg.batch, cfg.dtype, cfg.image_size, str(ctx.device))
    if key is not None and key in _REFERENCE_LATENTS:
        X = _REFERENCE_LATENTS[key].clone()
    else:
        xs = []
        for b, i in enumerate(range(0, cfg.pca_n, cfg.batch)):
            n = min(cfg.batch, cfg.pca_n - i)
            g = torch.Generator().manual_seed(cfg.seed + 1_000_003 + b)
            xT = torch.randn(n, ctx.model.dim, generator=g)
            xs.append(sample(ctx.model, ctx.schedule, xT, ctx.ts, method=cfg.method, generator=g).x0)
        X = torch.cat(xs).double()
        if key is not None:
            while len(_REFERENCE_LATENTS) >= 4:  # a few (pca_n, 256) tensors at most
                _REFERENCE_LATENTS.pop(next(iter(_REFERENCE_LATENTS)))
            _REFERENCE_LATENTS[key] = X.clone()
    r = torch.cat([_reward_of(ctx, X[i:i + cfg.batch].float()) for i in range(0, len(X), cfg.batch)]).double()
    m = X.mean(0)
    # PCA by the SVD of the centred data (torch.linalg): the principal directions are V's rows
    _, S, Vh = torch.linalg.svd(X - m, full_matrices=False)
    var = S**2 / (len(X) - 1)
    cum = torch.cumsum(var, 0) / var.sum()
    k = int((cum < cfg.pca_var).sum()) + 1
    U = Vh[:k].T.contiguous()
    return {"X": X.float(), "reward": r, "mean_r": float(r.mean()), "sd_r": float(r.std()), "m": m.float(),
            "U": U.float(), "k": k, "D": int(X.shape[1]), "explained": cum.float(),
            "in_sample_off": off_subspace_fraction(X.float(), m.float(), U.float())}


def off_subspace_fraction(x: torch.Tensor, m: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """Per latent, the share of its (centred) energy outside span(U):
    |(I - U U^T)(x - m)|^2 / |x - m|^2, (B,) (the image analogue of r_off, docs/theory.md (5.11): it equals
    r^2 / (1 + r^2) for r = |x_perp| / |x_par| of the centred latent)."""
    if x.ndim != 2 or U.ndim != 2 or U.shape[0] != x.shape[1] or m.shape != (x.shape[1],):
        raise ValueError(f"U, m: expected a ({x.shape[-1]}, k) basis and a ({x.shape[-1]},) mean for latents "
                         f"(B, {x.shape[-1]}), got {tuple(U.shape)} and {tuple(m.shape)}")
    c = x - m
    perp = c - (c @ U) @ U.T
    return perp.pow(2).sum(1) / c.pow(2).sum(1).clamp_min(1e-30)


# ============================================================================ runtime row


#: each runtime measurement is the minimum over this many repeats (robust to other jobs on a shared machine)
TIMING_REPEATS = 3


def time_rounds(ctx: Context, cfg: GuideConfig, objective, repeats: int = TIMING_REPEATS) -> dict:
    """Wall seconds of one unguided pass of ``cfg.n`` chains, and of one Algorithm-1 round with G and one with
    G_loss (the guided pass plus the reward gradient at its samples) on the same chains, toward targets
    y = g.x0 + strengths[0] at the unguided samples x0 (after one warm-up pass); each the minimum over ``repeats``
    interleaved runs; and the ratios
    of the rounds to the unguided pass (the runtime table's image row)."""
    from theory.gradient_guidance import gradient_guidance, objective_and_grad
    from theory.solvers import sample

    xT = torch.randn(cfg.n, ctx.model.dim, generator=torch.Generator().manual_seed(cfg.seed + 7))

    def timed(field):
        t0 = time.perf_counter()
        with torch.no_grad():
            x = sample(ctx.model, ctx.schedule, xT, ctx.ts, method=cfg.method, guidance=field,
                       generator=torch.Generator().manual_seed(1)).x0
        if field is not None:
            objective_and_grad(objective, x)
        return time.perf_counter() - t0, x

    _, x0 = timed(None)  # warm-up, and the samples the targets are built at
    _, grad = objective_and_grad(objective, x0)
    y = (grad * x0).sum(-1) + float(cfg.strengths[0])
    fields = {"unguided": None}
    fields.update({kind: gradient_guidance(ctx.schedule, grad, y, cfg.sigma_y, lookahead=kind == "G_loss", model=ctx.model)
                   for kind in cfg.methods})
    best = {k: float("inf") for k in fields}
    for _ in range(repeats):  # interleaved, so that other jobs' load falls on every kind alike
        for k, field in fields.items():
            best[k] = min(best[k], timed(field)[0])
    out = {"n_chains": cfg.n, "steps": cfg.steps, "repeats": repeats, "interleaved": True,
           "unguided_pass_s": best["unguided"]}
    for kind in cfg.methods:
        out[f"round_{kind}_s"] = best[kind]
        out[f"ratio_{kind}"] = best[kind] / best["unguided"]
    return out


def standardised_objective(ctx: Context, mean: float, sd: float):
    """f(x) = (r(x) - mean) / sd on flat latents (B, D): the reward in units of the pre-trained samples' spread."""

    def objective(x):
        return (_reward_of(ctx, x) - mean) / sd

    objective.dim = ctx.model.dim
    return objective


def retime(results: dict, pipe=None) -> dict:
    """The runtime row of a finished run (``results`` as ``run`` returns or writes them) measured again with
    the current :func:`time_rounds`: the pipeline and reward rebuilt from the recorded config."""
    cfg = load_config(None, **results["config"])
    ctx = build_context(cfg, pipe)
    obj = standardised_objective(ctx, results["reference"]["reward_mean"], results["reference"]["reward_sd"])
    t = time_rounds(ctx, cfg, obj)
    old = results.get("timing") or {}
    t["batched_round_s"], t["n_configs"] = old.get("batched_round_s"), old.get("n_configs")
    return t


# ============================================================================ Algorithm 1 with fixed noise


def algorithm1_fixed_noise(ctx: Context, cfg: GuideConfig, objective, runs, metrics, keep) -> list:
    """Algorithm 1 (docs/theory.md (7.5)) for the configurations ``runs`` with each chain's x_T and sampler noise
    drawn once (from ``cfg.seed``, the same for every configuration) and kept in every round: round k + 1 is the
    pre-trained sampler from chain i's own noise, guided by G or G_loss toward (g_k, y_k = g_k.x_k + delta).
    All configurations' chains share one network call per step (the field takes the kind and delta per chain:
    ``theory.gradient_guidance.gradient_guidance``). Returns one ``OptimResult`` per run."""
    from theory.gradient_guidance import OptimResult, gradient_guidance, objective_and_grad
    from theory.solvers import is_stochastic, sample

    n, D = cfg.n, ctx.model.dim
    gen = torch.Generator().manual_seed(cfg.seed)
    xT = torch.randn(n, D, generator=gen)
    S = len(runs)
    noise = None
    if is_stochastic(cfg.method):
        noise = torch.randn(ctx.ts.numel() - 1, n, D, generator=gen).repeat(1, S, 1)
    XT = xT.repeat(S, 1)
    look = torch.cat([torch.full((n,), r.guidance == "G_loss") for r in runs])
    delta = torch.cat([torch.full((n,), float(r.delta)) for r in runs])
    values, mets, kept = [[] for _ in runs], [[] for _ in runs], [{} for _ in runs]
    times = []

    def record(k, x, f):
        for j in range(S):
            xj, fj = x[j * n:(j + 1) * n], f[j * n:(j + 1) * n]
            values[j].append(fj)
            mets[j].append(metrics(xj, fj))
            if k in keep:
                kept[j][k] = xj.clone()

    t0 = time.perf_counter()
    with torch.no_grad():
        x = sample(ctx.model, ctx.schedule, XT, ctx.ts, method=cfg.method, noise=noise).x0
    f, g = objective_and_grad(objective, x)
    times.append(time.perf_counter() - t0)
    record(0, x, f)
    for k in range(cfg.rounds):
        t0 = time.perf_counter()
        y = (g * x).sum(-1) + delta
        field = gradient_guidance(ctx.schedule, g, y, cfg.sigma_y, lookahead=look if 0 < int(look.sum()) < len(look)
                                  else bool(look[0]), model=ctx.model)
        with torch.no_grad():
            x = sample(ctx.model, ctx.schedule, XT, ctx.ts, method=cfg.method, guidance=field, noise=noise).x0
        f, g = objective_and_grad(objective, x)
        times.append(time.perf_counter() - t0)
        record(k + 1, x, f)
    return [OptimResult(values=values[j], metrics=mets[j], x=x[j * n:(j + 1) * n], samples=kept[j],
                        round_times=list(times), model=ctx.model) for j in range(S)]


# ============================================================================ the experiment


def _metrics_fn(ctx: Context, cfg: GuideConfig, ref: dict, judge):
    from .rewards import jpeg_size_kb

    def metrics(x, f):
        img = _decode(ctx, x, cfg.batch)
        off = off_subspace_fraction(x.float(), ref["m"], ref["U"])
        m = {"reward_raw": (f.double() * ref["sd_r"] + ref["mean_r"]).tolist(),
             "off_subspace": off.tolist(),
             "jpeg_kb": jpeg_size_kb(img, quality=95, upscale=cfg.jpeg_upscale).double().tolist()}
        if judge is not None:
            from .digits_pipeline import judge_features

            p = judge.predict_proba(judge_features(img))
            m["judge_p_digit"] = p[:, ctx.digit].tolist()
            m["judge_max"] = p.max(1).tolist()
        return m

    return metrics


def _mean_se(v) -> tuple:
    a = np.asarray(v, dtype=float)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("nan")


def _paired(configs, results, cfg: GuideConfig) -> list:
    """G_loss minus G per chain, at each strength and round: both kinds run from the same noise (same seed; fixed
    noise: the same x_T and sampler noise, fresh: the same draws every round), so chain i of one is paired with
    chain i of the other. Mean and se of the differences of the standardised reward and of the off-subspace share."""
    by = dict(zip(configs, results))
    out = []
    for s in cfg.strengths:
        a, b = by.get(("G_loss", float(s))), by.get(("G", float(s)))
        if a is None or b is None:
            continue
        rows = []
        for k in range(len(a.values)):
            row = {"round": k}
            for name, da, db in [("reward_std", a.values[k], b.values[k]),
                                 ("off_subspace", a.metrics[k]["off_subspace"], b.metrics[k]["off_subspace"])]:
                row[name], row[name + "_se"] = _mean_se(np.asarray(da, dtype=float) - np.asarray(db, dtype=float))
            rows.append(row)
        out.append({"strength": float(s), "rounds": rows})
    return out


def _uint8(img: torch.Tensor) -> torch.Tensor:
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def run(cfg: GuideConfig, out=None, *, pipe=None, progress: bool = False) -> dict:
    """The experiment (docs/theory.md §7 on the pipeline of §8). Returns plain data; with ``out`` also writes
    ``out/results.json`` and ``out/samples.safetensors`` (uint8 images (n_kept, 3, H, W) per configuration and
    kept round, keys '<method>_s<strength>_r<round>')."""
    from theory.gradient_guidance import FineTune, Run, optimize_batched

    cfg.validate()
    if out is not None:
        from theory.io import check_writable

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        check_writable(out)
    torch.manual_seed(cfg.seed)
    t_all = time.perf_counter()
    ctx = build_context(cfg, pipe)
    t0 = time.perf_counter()
    ref = reference(ctx, cfg)
    t_ref = time.perf_counter() - t0
    if not ref["sd_r"] > 0:
        raise ValueError(f"reward: '{cfg.reward}' is constant on the pre-trained samples (sd 0); it cannot be "
                         "standardised or optimised")
    if progress:
        print(f"reference: {cfg.pca_n} latents in {t_ref:.1f}s; reward {ref['mean_r']:.4g} +- {ref['sd_r']:.3g}; "
              f"PCA k={ref['k']} of D={ref['D']} holds {cfg.pca_var:.0%}", flush=True)
    mu, sd = ref["mean_r"], ref["sd_r"]

    objective = standardised_objective(ctx, mu, sd)
    judge = None
    if ctx.digit is not None:
        from .digits_pipeline import fit_judge

        judge = fit_judge()
    configs = [(kind, float(s)) for kind in cfg.methods for s in cfg.strengths]
    runs = [Run(guidance=kind, delta=s, sigma_y=cfg.sigma_y, seed=cfg.seed, n=cfg.n) for kind, s in configs]
    finetune = None
    model = ctx.model
    if cfg.algorithm == 2:
        finetune = FineTune(start=cfg.ft_start, steps=cfg.ft_steps, lr=cfg.ft_lr)
        model.requires_grad_(True)  # the copies fine-tune; the pipeline's own UNet is not touched
    keep = cfg.kept_rounds()
    kw = dict(dim=ctx.model.dim, rounds=cfg.rounds, ts=ctx.ts, method=cfg.method, finetune=finetune,
              metrics=_metrics_fn(ctx, cfg, ref, judge), keep_rounds=keep, dtype=torch.float32)
    t0 = time.perf_counter()
    batched = True
    if cfg.noise == "fixed":
        results = algorithm1_fixed_noise(ctx, cfg, objective, runs, kw["metrics"], keep)
    else:
        try:
            results = optimize_batched(model, ctx.schedule, objective, runs, **kw)
        except (RuntimeError, NotImplementedError) as e:
            # Algorithm 2's per-run copies are evaluated together by torch.func.vmap over stacked parameters; a
            # network that vmap cannot trace falls back to the runs one after another (same results per run).
            if cfg.algorithm != 2:
                raise
            batched = False
            if progress:
                print(f"batched Algorithm 2 not possible for this network ({type(e).__name__}: {str(e)[:120]}); "
                      "running the configurations one by one", flush=True)
            results = [optimize_batched(model, ctx.schedule, objective, [r], **kw)[0] for r in runs]
    t_opt = time.perf_counter() - t0
    if cfg.algorithm == 2:
        model.requires_grad_(False)
    timing = None
    if cfg.timing:
        timing = time_rounds(ctx, cfg, objective)
        timing["batched_round_s"] = [float(v) for v in results[0].round_times]
        timing["n_configs"] = len(runs)
        if progress:
            print("timing: " + ", ".join(f"{k} {v:.3g}" for k, v in timing.items() if isinstance(v, float)), flush=True)

    per_config, tensors = [], {}
    for (kind, s), res in zip(configs, results):
        rows = []
        f0, off0 = res.values[0], np.asarray(res.metrics[0]["off_subspace"])
        for k, (f, met) in enumerate(zip(res.values, res.metrics)):
            row = {"round": k}
            # paired per chain against round 0 (same chains, same noise when noise is fixed)
            paired = [("gain_std", (f - f0).tolist()), ("off_change", (np.asarray(met["off_subspace"]) - off0).tolist())]
            for name, vals in [("reward_std", f.tolist())] + list(met.items()) + paired:
                row[name], row[name + "_se"] = _mean_se(vals)
            rows.append(row)
        per_config.append({"method": kind, "strength": s, "rounds": rows,
                           "gain_std": rows[-1]["reward_std"] - rows[0]["reward_std"],
                           "gain_raw": rows[-1]["reward_raw"] - rows[0]["reward_raw"]})
        if cfg.grid_n:
            for k, x in res.samples.items():
                tensors[f"{kind}_s{s:g}_r{k}"] = _uint8(_decode(ctx, x[:cfg.grid_n], cfg.batch)).contiguous()
        if progress:
            print(f"{kind:6s} strength {s:g}: reward(std) {rows[0]['reward_std']:+.3f} -> {rows[-1]['reward_std']:+.3f}, "
                  f"off-subspace {rows[0]['off_subspace']:.4f} -> {rows[-1]['off_subspace']:.4f}", flush=True)
    paired = _paired(configs, results, cfg)
    results_json = {
        "config": cfg.to_json(), "model_dir": ctx.model_dir, "latent_shape": list(ctx.shape),
        "reference": {"n": cfg.pca_n, "reward_mean": mu, "reward_sd": sd, "pca_k": ref["k"], "D": ref["D"],
                      "pca_var": cfg.pca_var, "explained_at_k": float(ref["explained"][ref["k"] - 1]),
                      "explained": [float(v) for v in ref["explained"][:min(64, ref["D"])]],
                      "in_sample_off_subspace": float(ref["in_sample_off"].mean()), "seconds": t_ref},
        "judge_digit": ctx.digit, "batched": batched, "kept_rounds": keep, "configs": per_config, "paired": paired,
        "timing": timing, "optimise_seconds": t_opt, "seconds": time.perf_counter() - t_all,
    }
    if out is not None:
        from safetensors.torch import save_file

        if tensors:
            save_file(tensors, str(out / "samples.safetensors"))
        (out / "results.json").write_text(json.dumps(results_json, indent=1, default=float))
    results_json["samples"] = tensors
    return results_json
