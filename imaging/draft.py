"""DRaFT and its relatives on an image pipeline (Clark et al. 2024; docs/theory.md §6, §8), measured.

Experiments, each a function of a frozen :class:`DraftImageConfig` returning plain JSON-able data; every
fine-tuning run goes through ``theory.engine.finetune`` (the package's one loop) on the latents of a
diffusers SD-style pipeline (the digits pipeline trained here by default):

- ``compare``: DRaFT (the whole chain, gradient checkpointing), DRaFT-1, DRaFT-K, DRaFT-LV, ReFL and DDPO on
  the differentiable JPEG (in)compressibility (``imaging.rewards.JpegRoundTrip``, docs/theory.md (8.3)),
  each run stopped at the same budget of reward queries (the strategies' declared ``queries`` per step,
  ``budget_steps``), over seeds; evaluated on fixed noise every ``eval_every`` queries with the trained
  reward AND the true JPEG size (docs/theory.md (8.2)), which none of them trains on. ``claims`` turns it
  into the paper's comparisons (DRaFT-LV against ReFL; gradient methods against DDPO) as speed-ups.
- ``lora``: the trained adapters leave in the diffusers format (``imaging.lora_io``) and come back into a
  fresh pipeline with stock ``load_lora_weights`` / ``set_adapters``: one adapter scaled 0 .. 1.5 toward the
  pre-trained model, and the sum of two adapters trained on different rewards over a grid of weights
  (DRaFT sec. 5.1, LoRA scaling and mixing).
- ``diversity``: sample diversity (mean pairwise distance of the judge's 8x8 features among samples of one
  prompt) against the weight of the path KL (lam; docs/theory.md §4, §6) and of DRaFT+'s eps penalty.

One sampler for training and evaluation: DDIM(eta) on the scheduler's grid; DDPO alone trains on the same
grid with its last point at alphas_cumprod[0] (``ddpo_grid``), where its last transition has a density.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .configfile import load_dataclass

__all__ = ["DraftImageConfig", "METHOD_LABELS", "REWARDS", "QUICK", "load_config", "strategy_for", "budget_steps",
           "build_context", "make_reward", "train_run", "evaluate", "compare", "claims",
           "speedup", "queries_to_reach", "ddpo_grid", "lora", "diversity", "pairwise_diversity", "CONFIG_DIR"]

CONFIG_DIR = Path(__file__).with_name("configs")

#: the methods of the comparison, by label
METHOD_LABELS = ("DRaFT", "DRaFT-1", "DRaFT-K", "DRaFT-LV", "ReFL", "DDPO")
#: the rewards trained on (differentiable JPEG compressibility and its negation)
REWARDS = ("compress", "incompress")


@dataclass(frozen=True)
class DraftImageConfig:
    """Settings of the three experiments (defaults: the committed digits-pipeline run).

    Pipeline: ``model`` (local diffusers folder; None = the digits pipeline), ``prompts`` (None = the ten
    digit prompts), CFG weight ``guidance_scale``, ``sample_steps`` DDIM steps with ``eta`` (0: DRaFT's
    sampler) for the gradient methods and for every evaluation, ``ddpo_eta`` for DDPO's training chains (its
    policy needs random transitions), ``div_eta`` for the diversity runs (the path KL needs them too). At
    eta = 1 the gradient methods' estimates are noisier and at this budget they did not improve the reward.
    Training: LoRA ``lora_rank`` on ``lora_targets`` (default: attention, feed-forward and the ResNet
    convolutions - the digits UNet has attention only in its mid block, where an attention-only LoRA of
    4k parameters barely moves the samples in this budget), AdamW ``lr`` / ``weight_decay`` / ``grad_clip``,
    ``batch_size``; every run stops after ``budget`` reward queries (steps = budget // queries per step).
    Methods: ``methods`` (labels of METHOD_LABELS), DRaFT-K's ``k``, DRaFT-LV's ``lv_n``, ReFL's
    ``refl_steps`` (m uniform in [lo, hi] steps before the end), DDPO's ``ddpo_clip`` / ``ddpo_inner``.
    Rewards: ``rewards`` (of REWARDS), the codec quality ``codec_quality`` of the differentiable JPEG, trained
    on times ``reward_scale`` (the reward is ~1e-3, its LoRA gradients ~1e-10 per parameter, below AdamW's
    eps = 1e-8, where Adam no longer normalises the step: unscaled, lr 1e-3 did not move the samples and
    lr 3e-2 moved them erratically, then collapsed; times 1e3 with lr 3e-3 it improved steadily); the
    true size at ``jpeg_quality`` after a ``measure_upscale`` nearest upscale. ``seeds``.
    Evaluation: ``n_eval`` samples on fixed noise every ``eval_every`` queries; ``n_show`` images kept.
    LoRA: the adapters of ``lora_method`` (seed ``seeds[0]``) on ``lora_rewards`` (two rewards of the
    comparison), scales ``lora_scales``, mixing weights ``mix_weights`` (each adapter), ``n_lora`` samples.
    Diversity: ``div_method`` on ``div_reward`` for ``div_budget`` queries, with each ``div_lams`` (eps
    penalty 0) and each ``div_eps`` (lam 0); ``div_per_prompt`` samples of each of ``div_prompts`` prompts.
    The method must differentiate a stochastic step: DRaFT-1's only differentiated step (into t = 0) is
    deterministic, carries no KL term, and so gets no gradient from lam. The path KL is summed over the
    latent dimensions and steps, the trained reward is ~1 (``reward_scale``): hence lam ~1e-3 .. 1e-2.
    """

    model: Optional[str] = None
    prompts: Optional[tuple] = None
    guidance_scale: float = 3.0
    sample_steps: int = 10
    eta: float = 0.0
    ddpo_eta: float = 1.0
    div_eta: float = 1.0
    dtype: str = "float32"
    lora_rank: int = 4
    lora_targets: tuple = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2")
    lr: float = 3e-3
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 4
    budget: int = 128
    methods: tuple = METHOD_LABELS
    k: int = 5
    lv_n: int = 2
    refl_steps: tuple = (1, 4)
    ddpo_clip: float = 1e-4
    ddpo_inner: int = 1
    rewards: tuple = REWARDS
    codec_quality: float = 10.0
    reward_scale: float = 1000.0
    jpeg_quality: int = 95
    measure_upscale: int = 4
    seeds: tuple = (0,)
    n_eval: int = 16
    eval_every: int = 32
    n_show: int = 4
    lora_method: str = "DRaFT-LV"
    lora_rewards: tuple = ("compress", "incompress")
    lora_scales: tuple = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
    mix_weights: tuple = (0.0, 0.5, 1.0)
    n_lora: int = 8
    div_method: str = "DRaFT-K"
    div_reward: str = "compress"
    div_budget: int = 128
    div_lams: tuple = (0.0, 1e-3, 1e-2)
    div_eps: tuple = (1e-2,)
    div_prompts: int = 10
    div_per_prompt: int = 4
    threads: Optional[int] = None

    def validate(self) -> None:
        for k in ("sample_steps", "lora_rank", "batch_size", "budget", "k", "lv_n", "n_eval", "eval_every",
                  "n_lora", "div_budget", "div_prompts", "div_per_prompt", "ddpo_inner", "measure_upscale"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k}: must be an int >= 1, got {v!r}")
        if self.div_per_prompt < 2:
            raise ValueError(f"div_per_prompt: diversity needs >= 2 samples per prompt, got {self.div_per_prompt}")
        bad = [m for m in (*self.methods, self.lora_method, self.div_method) if m not in METHOD_LABELS]
        if bad:
            raise ValueError(f"methods: unknown {bad}; choose from {list(METHOD_LABELS)}")
        bad = [r for r in (*self.rewards, *self.lora_rewards, self.div_reward) if r not in REWARDS]
        if bad:
            raise ValueError(f"rewards: unknown {bad}; choose from {list(REWARDS)}")
        if len(self.lora_rewards) != 2 or not set(self.lora_rewards) <= set(self.rewards):
            raise ValueError(f"lora_rewards: two rewards of the comparison's rewards {list(self.rewards)}, got "
                             f"{list(self.lora_rewards)}")
        if self.lora_method not in self.methods:
            raise ValueError(f"lora_method: {self.lora_method!r} must be one of the compared methods {list(self.methods)}")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        if "DDPO" in self.methods and not self.ddpo_eta > 0:
            raise ValueError("ddpo_eta: DDPO needs the stochastic sampler; set ddpo_eta > 0 (e.g. 1)")
        if (any(v > 0 for v in self.div_lams)) and not self.div_eta > 0:
            raise ValueError("div_eta: the path KL needs the stochastic sampler; set div_eta > 0 (e.g. 1)")
        if self.k > self.sample_steps or self.refl_steps[1] > self.sample_steps:
            raise ValueError(f"k, refl_steps: must not exceed sample_steps={self.sample_steps}")
        if any(v < 0 for v in (*self.div_lams, *self.div_eps)) or not self.lr > 0:
            raise ValueError("div_lams, div_eps, lr: weights must be >= 0 and lr > 0")

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def key(self) -> str:
        """A short hash of the settings (names the cache folder of the trained adapters)."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:12]


#: reduced settings of the quick figures
QUICK = dict(budget=48, seeds=(0,), n_eval=8, eval_every=16, lora_scales=(0.0, 0.5, 1.0, 1.5), mix_weights=(0.0, 1.0),
             n_lora=4, div_budget=48, div_lams=(0.0, 1e-2), div_eps=(1e-2,), div_prompts=4, div_per_prompt=3,
             sample_steps=6, k=3, refl_steps=(1, 3))


def load_config(path=None, **overrides) -> DraftImageConfig:
    """A DraftImageConfig from a JSON file (keys starting with '_' are comments; unknown keys are an error
    naming them), then ``overrides``."""
    return load_dataclass(DraftImageConfig, path, overrides)


# ============================================================================ building blocks


def strategy_for(label: str, cfg: DraftImageConfig):
    """(engine strategy, gradient checkpointing) of a method label (``theory.engine.make_strategy``)."""
    from theory.engine import make_strategy

    table = {
        "DRaFT": ("draft", {}),
        "DRaFT-1": ("draftk", {"k": 1}),
        "DRaFT-K": ("draftk", {"k": cfg.k}),
        "DRaFT-LV": ("draftlv", {"n": cfg.lv_n}),
        "ReFL": ("refl", {"steps": tuple(cfg.refl_steps)}),
        "DDPO": ("ddpo", {"clip": cfg.ddpo_clip, "inner_steps": cfg.ddpo_inner}),
    }
    if label not in table:
        raise ValueError(f"method: unknown {label!r}; choose from {list(table)}")
    name, opts = table[label]
    return make_strategy(name, **opts), label == "DRaFT"


def budget_steps(label: str, cfg: DraftImageConfig, budget: Optional[int] = None) -> tuple[int, int]:
    """(optimisation steps, reward queries per step) that spend ``budget`` (default ``cfg.budget``) reward
    queries with method ``label``: the strategy's own declared cost ``queries(batch_size)`` (DRaFT-LV n per
    sample, every other method one), so every method sees the same number of reward evaluations."""
    budget = cfg.budget if budget is None else budget
    qps = strategy_for(label, cfg)[0].queries(cfg.batch_size)
    return max(1, budget // qps), qps


@dataclass
class Context:
    pipe: object
    base: torch.nn.Module
    schedule: object
    ts: torch.Tensor
    ts_ddpo: torch.Tensor
    shape: tuple
    prompts: tuple
    model_dir: Optional[str]


def ddpo_grid(pipe, n_steps: int) -> torch.Tensor:
    """The scheduler's DDIM grid (``imaging.pipeline.scheduler_grid``) with its last point at t = 1, i.e.
    alphas_cumprod[0] (diffusers' ``set_alpha_to_one=False``, SD v1.5's own setting) instead of alpha = 1:
    the last DDIM(eta > 0) transition then has a positive variance, so DDPO's log-probabilities are defined
    on every step (into alpha = 1 the last step is deterministic and has no density). Only DDPO trains on
    it: the path KL skips a deterministic step (docs/theory.md §4), and a last step of tiny variance would
    dominate it."""
    from .pipeline import scheduler_grid

    ts = scheduler_grid(pipe.scheduler, n_steps).clone()
    ts[-1] = 1.0
    return ts


def build_context(cfg: DraftImageConfig, pipe=None) -> Context:
    """Load (or take) the pipeline, freeze it, encode the prompts, wrap the UNet with CFG as an eps model."""
    from .digits_pipeline import PROMPTS, ensure_digits_pipeline
    from .pipeline import LatentEps, encode_prompts, freeze, latent_shape, load_pipeline, schedule_of, scheduler_grid

    model_dir = None
    if pipe is None:
        model_dir = cfg.model or str(ensure_digits_pipeline(progress=True))
        pipe = load_pipeline(model_dir, dtype=getattr(torch, cfg.dtype), device="cpu")
    freeze(pipe)
    prompts = tuple(cfg.prompts) if cfg.prompts else tuple(PROMPTS)
    cond, unc = encode_prompts(pipe, list(prompts), device="cpu")
    sch = schedule_of(pipe)
    base = LatentEps(pipe.unet, sch, cond, unc, cfg.guidance_scale)
    return Context(pipe, base, sch, scheduler_grid(pipe.scheduler, cfg.sample_steps), ddpo_grid(pipe, cfg.sample_steps),
                   latent_shape(pipe), prompts, model_dir)


class _Scaled:
    """c * reward(x0, cond): the same maximiser, gradients times c."""

    differentiable = True

    def __init__(self, reward, c: float):
        self.reward, self.c = reward, float(c)
        self.__name__ = getattr(reward, "__name__", "reward")

    def __call__(self, x0, cond=None):
        return self.c * self.reward(x0, cond)


def make_reward(ctx: Context, name: str, cfg: DraftImageConfig):
    """``cfg.reward_scale`` times the differentiable JPEG (in)compressibility (docs/theory.md (8.3)) on the
    latents, through the decoder."""
    from .rewards import JpegRoundTrip, LatentReward

    if name not in REWARDS:
        raise ValueError(f"reward: unknown {name!r}; choose from {list(REWARDS)}")
    return _Scaled(LatentReward(ctx.pipe, JpegRoundTrip(cfg.codec_quality, incompressible=name == "incompress")),
                   cfg.reward_scale)


def _steered(ctx: Context, cfg: DraftImageConfig):
    from theory.engine import SteeredModel

    # peft injects LoRA into the module it is given: a private copy keeps ctx.base the pre-trained model
    return SteeredModel(copy.deepcopy(ctx.base), lora_rank=cfg.lora_rank, lora_targets=list(cfg.lora_targets))


@torch.no_grad()
def draw(ctx: Context, model, n: int, seed: int, eta: float, prompts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decoded images (n, 3, H, W) in [0, 1] of ``model`` on noise fixed by ``seed`` (prompt i mod P)."""
    from theory.solvers import sample

    from .pipeline import decode_latents

    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn((n, *ctx.shape), generator=g)
    c = torch.arange(n) % len(ctx.prompts) if prompts is None else prompts
    x0 = sample(model, ctx.schedule, x_T, ctx.ts, method="ddim", eta=eta, cond=c, generator=g).x0
    return decode_latents(ctx.pipe, x0.to(ctx.pipe.vae.dtype)).float()


def _grey_u8(images: torch.Tensor) -> list:
    return (images.mean(1).clamp(0, 1) * 255).round().to(torch.uint8).tolist()


def evaluate(ctx: Context, cfg: DraftImageConfig, model, n: int, seed: int = 4242, keep: int = 0,
             eta: Optional[float] = None) -> dict:
    """Mean differentiable compressibility (8.3) and mean true JPEG size in kB (8.2) of n samples on fixed
    noise (the same noise for every model), DDIM(eta, default ``cfg.eta``), with their standard errors;
    ``keep`` images as grey uint8."""
    from .rewards import JpegRoundTrip, jpeg_size_kb

    imgs = draw(ctx, model, n, seed, cfg.eta if eta is None else eta)
    comp = JpegRoundTrip(cfg.codec_quality)(imgs.double()).numpy()
    kb = jpeg_size_kb(imgs, quality=cfg.jpeg_quality, upscale=cfg.measure_upscale).double().numpy()
    out = {"compress": float(comp.mean()), "compress_se": float(comp.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
           "jpeg_kb": float(kb.mean()), "jpeg_kb_se": float(kb.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0}
    if keep:
        out["images"] = _grey_u8(imgs[:keep])
    return out


def train_run(ctx: Context, cfg: DraftImageConfig, label: str, reward_name: str, seed: int, *,
              budget: Optional[int] = None, lam: float = 0.0, eps_penalty: float = 0.0, eval_every: Optional[int] = None,
              n_eval: Optional[int] = None, log_kl: bool = False, eta: Optional[float] = None,
              progress: bool = False):
    """Fine-tune a fresh LoRA with method ``label`` on ``reward_name`` until the budget of reward queries is
    spent (``budget_steps``), through ``theory.engine.finetune``; evaluate on fixed noise at the start and
    every ``eval_every`` queries (evaluation time is not counted in the training wall time); ``log_kl``
    records the path KL also when lam = 0 (an extra pre-trained pass per step). ``eta``: the sampler of
    training and evaluation (default ``cfg.eta``; DDPO trains at ``cfg.ddpo_eta``). Returns
    (model, data: curve rows {step, queries, wall_time, compress, jpeg_kb, ...} and the history)."""
    from theory.engine import FinetuneConfig, finetune

    strategy, ckpt = strategy_for(label, cfg)
    steps, qps = budget_steps(label, cfg, budget)
    every = max(1, (eval_every or cfg.eval_every) // qps)
    n_eval = n_eval or cfg.n_eval
    eval_eta = cfg.eta if eta is None else eta
    train_eta = cfg.ddpo_eta if label == "DDPO" else eval_eta
    torch.manual_seed(seed)
    model = _steered(ctx, cfg)
    reward = make_reward(ctx, reward_name, cfg)
    fcfg = FinetuneConfig(steps=steps, batch_size=cfg.batch_size, n_steps=cfg.sample_steps, method="ddim", eta=train_eta,
                          lam=lam, eps_penalty=eps_penalty, lr=cfg.lr, weight_decay=cfg.weight_decay,
                          grad_clip=cfg.grad_clip, checkpoint=ckpt, seed=seed, progress=progress,
                          log_kl=log_kl and lam == 0 and label != "ReFL")
    P = len(ctx.prompts)
    curve = [dict(step=0, queries=0, wall_time=0.0, **evaluate(ctx, cfg, model, n_eval, eta=eval_eta))]
    spent = [0.0]

    def callback(step, row):
        if step % every == 0 or step == steps:
            t0 = time.perf_counter()
            model.eval()
            ev = evaluate(ctx, cfg, model, n_eval, keep=cfg.n_show if step == steps else 0, eta=eval_eta)
            model.train()
            # the engine's wall time runs from the start of training and includes earlier evaluations
            curve.append(dict(step=step, queries=int(row["reward_queries_total"]),
                              wall_time=float(row["wall_time"]) - spent[0], **ev))
            spent[0] += time.perf_counter() - t0

    t0 = time.perf_counter()
    hist = finetune(model, ctx.schedule, reward, strategy, fcfg,
                    x_T_sampler=lambda n, g: torch.randn((n, *ctx.shape), generator=g),
                    cond_sampler=lambda n, g: torch.randint(0, P, (n,), generator=g),
                    ts=ctx.ts_ddpo if label == "DDPO" else ctx.ts, callback=callback)
    model.eval()
    rows = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in hist]
    return model, {"method": label, "reward": reward_name, "seed": seed, "steps": steps, "queries_per_step": qps,
                   "lam": lam, "eps_penalty": eps_penalty, "curve": curve, "history": rows,
                   "seconds_total": time.perf_counter() - t0}


# ============================================================================ 1. the method comparison


def compare(cfg: DraftImageConfig, ctx: Optional[Context] = None, adapter_dir=None, progress: bool = False) -> dict:
    """Every reward x method x seed on ``cfg.budget`` reward queries. With ``adapter_dir``, the adapters of
    ``cfg.lora_method`` (first seed) are written there in the diffusers format (for ``lora``)."""
    from .lora_io import save_diffusers_lora

    cfg.validate()
    ctx = ctx or build_context(cfg)
    t0 = time.perf_counter()
    out = {"config": cfg.to_json(), "model_dir": ctx.model_dir, "budget_steps": {}, "runs": {}, "adapters": {}}
    for m in cfg.methods:
        s, q = budget_steps(m, cfg)
        out["budget_steps"][m] = {"steps": s, "queries_per_step": q, "queries": s * q}
    out["pretrained"] = evaluate(ctx, cfg, ctx.base, cfg.n_eval, keep=cfg.n_show)
    for r in cfg.rewards:
        out["runs"][r] = {}
        for m in cfg.methods:
            out["runs"][r][m] = []
            for s in cfg.seeds:
                model, data = train_run(ctx, cfg, m, r, s)
                out["runs"][r][m].append(data)
                if progress:
                    c = data["curve"]
                    print(f"[draft-image] {r} {m} seed {s}: compress {c[0]['compress']:.3e} -> {c[-1]['compress']:.3e}, "
                          f"jpeg {c[0]['jpeg_kb']:.3f} -> {c[-1]['jpeg_kb']:.3f} kB, train {c[-1]['wall_time']:.0f} s",
                          flush=True)
                if adapter_dir is not None and m == cfg.lora_method and s == cfg.seeds[0] and r in cfg.lora_rewards:
                    d = Path(adapter_dir) / f"{r}-{m}-s{s}"
                    save_diffusers_lora(model, d)
                    out["adapters"][r] = str(d)
                del model
    out["seconds"] = time.perf_counter() - t0
    out["claims"] = claims(out)
    return out


def queries_to_reach(x, y, level: float) -> float:
    """First x at which the curve y reaches ``level`` (y >= level), linearly interpolated; inf if never."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    above = np.nonzero(y >= level)[0]
    if above.size == 0:
        return math.inf
    i = int(above[0])
    if i == 0:
        return float(x[0])
    f = (level - y[i - 1]) / (y[i] - y[i - 1])
    return float(x[i - 1] + f * (x[i] - x[i - 1]))


def _curves(runs: list, key: str, sign: float, axis: str):
    """(x, mean y) over seeds; curves of one method share their query grid, wall times are averaged."""
    Y = sign * np.array([[c[key] for c in r["curve"]] for r in runs], float)
    X = np.array([[c["queries" if axis == "queries" else "wall_time"] for c in r["curve"]] for r in runs], float)
    return X.mean(0), Y.mean(0), Y


def speedup(runs_fast: list, runs_slow: list, key: str = "compress", sign: float = 1.0, axis: str = "queries",
            fractions=(0.25, 0.5, 0.75)) -> dict:
    """How many times fewer reward queries (``axis='queries'``) or training seconds (``'wall_time'``) the
    fast method needs than the slow one to reach r0 + f (final_slow - r0), f in ``fractions``, on the
    seed-mean curves of sign * key (r0 the pre-trained value, final_slow the slow method's mean at the end
    of the budget). > 1: the fast method is faster. When the slow method made no progress (final_slow <=
    r0) no level is defined and ``levels`` is empty; ``gain_ratio`` (fast's final gain / slow's) is given."""
    xf, yf, Yf = _curves(runs_fast, key, sign, axis)
    xs, ys, Ys = _curves(runs_slow, key, sign, axis)
    r0 = float(np.concatenate([Yf[:, 0], Ys[:, 0]]).mean())
    gf, gs = float(yf[-1] - r0), float(ys[-1] - r0)
    out = {"key": key, "sign": sign, "axis": axis, "r0": r0, "final_fast": float(yf[-1]), "final_slow": float(ys[-1]),
           "gain_fast": gf, "gain_slow": gs, "gain_ratio": gf / gs if gs != 0 else math.nan, "levels": []}
    if gs <= 0:
        return out
    for f in fractions:
        lvl = r0 + f * gs
        a, b = queries_to_reach(xf, yf, lvl), queries_to_reach(xs, ys, lvl)
        out["levels"].append({"fraction": f, "level": lvl, "fast": a, "slow": b,
                              "ratio": b / a if a > 0 and math.isfinite(a) else math.nan})
    return out


def claims(data: dict) -> dict:
    """The paper's comparisons as numbers, per reward, on the trained reward ('compress', signed so that
    higher is better) and on the true JPEG size (-kB for compressibility, +kB for incompressibility):
    DRaFT-LV against ReFL (paper: about 2x faster), and every gradient method against DDPO, per reward
    query and per second of training."""
    out = {}
    for r, runs in data["runs"].items():
        s = -1.0 if r == "incompress" else 1.0
        keys = {"diff": ("compress", s), "true_size": ("jpeg_kb", -s)}
        c = {}
        if {"DRaFT-LV", "ReFL"} <= set(runs):
            c["lv_vs_refl"] = {f"{kn}_{ax}": speedup(runs["DRaFT-LV"], runs["ReFL"], k, sg, ax)
                               for kn, (k, sg) in keys.items() for ax in ("queries", "wall_time")}
        if "DDPO" in runs:
            c["gradient_vs_ddpo"] = {m: {f"{kn}_{ax}": speedup(runs[m], runs["DDPO"], k, sg, ax)
                                         for kn, (k, sg) in keys.items() for ax in ("queries", "wall_time")}
                                     for m in runs if m != "DDPO"}
        finals = {}
        for m, rr in runs.items():
            for kn, (k, sg) in keys.items():
                _, y, Y = _curves(rr, k, sg, "queries")
                finals.setdefault(m, {})[kn] = {"start": float(y[0]), "final": float(y[-1]),
                                                "final_seeds": Y[:, -1].tolist()}
        c["finals"] = finals
        out[r] = c
    return out


# ============================================================================ 2. LoRA scaling and mixing


def lora(cfg: DraftImageConfig, adapters: dict, ctx: Optional[Context] = None, pipe=None) -> dict:
    """Scaling and mixing of the diffusers-format adapters ``adapters`` ({reward: folder}, the two
    ``cfg.lora_rewards``) loaded into a fresh copy of the pipeline with stock ``load_lora_weights`` and
    ``set_adapters`` (``imaging.lora_io.load_diffusers_loras``): W + sum_a s_a dW_a (DRaFT sec. 5.1).
    Scale sweep of the first adapter over ``lora_scales`` and the grid of ``mix_weights`` x ``mix_weights``
    for the two; each on the same fixed noise, with both measures and a few images."""
    from .lora_io import load_diffusers_loras
    from .pipeline import LatentEps, encode_prompts, load_pipeline

    cfg.validate()
    ra, rb = cfg.lora_rewards
    missing = [r for r in (ra, rb) if r not in adapters]
    if missing:
        raise ValueError(f"adapters: no adapter for {missing}; run compare with adapter_dir first")
    t0 = time.perf_counter()
    if pipe is None:
        ctx = ctx or build_context(cfg)
        pipe = load_pipeline(ctx.model_dir, dtype=getattr(torch, cfg.dtype), device="cpu") if ctx.model_dir else \
            copy.deepcopy(ctx.pipe)
    ctx = ctx or build_context(cfg, pipe=copy.deepcopy(pipe))
    pipe.set_progress_bar_config(disable=True)
    names = load_diffusers_loras(pipe, [(Path(adapters[ra]), 1.0), (Path(adapters[rb]), 1.0)])
    cond, unc = encode_prompts(pipe, list(ctx.prompts), device="cpu")
    model = LatentEps(pipe.unet, ctx.schedule, cond, unc, cfg.guidance_scale).eval()
    lctx = replace(ctx, pipe=pipe)

    def at(wa, wb, keep):
        pipe.set_adapters(names, adapter_weights=[float(wa), float(wb)])
        return evaluate(lctx, cfg, model, cfg.n_lora, keep=keep)

    scales = [dict(scale=s, **at(s, 0.0, cfg.n_show)) for s in cfg.lora_scales]
    mix = [dict(w_a=a, w_b=b, **at(a, b, min(2, cfg.n_show))) for a in cfg.mix_weights for b in cfg.mix_weights]
    return {"config": cfg.to_json(), "adapters": {ra: str(adapters[ra]), rb: str(adapters[rb])}, "reward_a": ra,
            "reward_b": rb, "scales": scales, "mix": mix, "seconds": time.perf_counter() - t0}


# ============================================================================ 3. diversity against the KL weight


def pairwise_diversity(features: np.ndarray, groups: np.ndarray) -> float:
    """Mean over groups of the mean Euclidean distance between all pairs of feature vectors in the group
    (samples of one prompt): 0 when every sample of a prompt is the same image."""
    vals = []
    for g in np.unique(groups):
        f = features[groups == g]
        if len(f) < 2:
            continue
        d = np.sqrt(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1))
        iu = np.triu_indices(len(f), 1)
        vals.append(d[iu].mean())
    return float(np.mean(vals)) if vals else math.nan


def _diversity_of(ctx: Context, cfg: DraftImageConfig, model) -> dict:
    from .digits_pipeline import judge_features
    from .rewards import JpegRoundTrip, jpeg_size_kb

    P = min(cfg.div_prompts, len(ctx.prompts))
    prompts = torch.arange(P).repeat(cfg.div_per_prompt)
    imgs = draw(ctx, model, len(prompts), 777, cfg.div_eta, prompts=prompts)
    feats = judge_features(imgs)
    pix = imgs.mean(1).flatten(1).numpy()
    return {"judge_diversity": pairwise_diversity(feats, prompts.numpy()),
            "pixel_diversity": pairwise_diversity(pix, prompts.numpy()),
            "compress": float(JpegRoundTrip(cfg.codec_quality)(imgs.double()).mean()),
            "jpeg_kb": float(jpeg_size_kb(imgs, quality=cfg.jpeg_quality, upscale=cfg.measure_upscale).mean()),
            "images": _grey_u8(torch.stack([imgs[prompts == p][:3] for p in range(min(P, 4))]).flatten(0, 1))}


def diversity(cfg: DraftImageConfig, ctx: Optional[Context] = None, progress: bool = False) -> dict:
    """``cfg.div_method`` on ``cfg.div_reward`` for ``cfg.div_budget`` queries with each KL weight lam of
    ``div_lams`` and each DRaFT+ eps-penalty weight of ``div_eps``; per run the final diversity (judge
    features and pixels, within a prompt), the rewards and the path KL of the last steps."""
    cfg.validate()
    ctx = ctx or build_context(cfg)
    t0 = time.perf_counter()
    out = {"config": cfg.to_json(), "pretrained": _diversity_of(ctx, cfg, ctx.base), "runs": []}
    settings = [(lam, 0.0) for lam in cfg.div_lams] + [(0.0, e) for e in cfg.div_eps]
    for lam, eps in settings:
        model, data = train_run(ctx, cfg, cfg.div_method, cfg.div_reward, cfg.seeds[0], budget=cfg.div_budget,
                                lam=lam, eps_penalty=eps, eval_every=cfg.div_budget, n_eval=cfg.n_eval,
                                log_kl=True, eta=cfg.div_eta)
        kl = [r["kl"] for r in data["history"][-5:] if r.get("kl") is not None]
        row = {"lam": lam, "eps_penalty": eps, "kl_last": float(np.mean(kl)) if kl else None,
               "train_seconds": data["curve"][-1]["wall_time"], **_diversity_of(ctx, cfg, model)}
        out["runs"].append(row)
        if progress:
            print(f"[draft-image] diversity lam {lam:g} eps {eps:g}: judge diversity {row['judge_diversity']:.3f} "
                  f"(pre-trained {out['pretrained']['judge_diversity']:.3f}), compress {row['compress']:.3e}, "
                  f"KL {row['kl_last']}", flush=True)
        del model
    out["seconds"] = time.perf_counter() - t0
    return out
