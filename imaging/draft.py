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

from theory.verdicts import both, condition_word, side

from .configfile import load_dataclass

__all__ = ["DraftImageConfig", "METHOD_LABELS", "REWARDS", "QUICK", "load_config", "strategy_for", "budget_steps",
           "build_context", "make_reward", "train_run", "evaluate", "compare", "claims",
           "speedup", "queries_to_reach", "censored_ratio", "ratio_text", "mean_se", "speedup_cell", "ddpo_grid", "lora",
           "diversity", "pairwise_diversity", "verdicts_compare", "verdicts_lora", "verdicts_diversity", "CONFIG_DIR"]

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
    LoRA: the adapters of ``lora_method`` (one per seed; default DRaFT-K, the method that moved both rewards
    most) on ``lora_rewards`` (two rewards of the comparison), scales ``lora_scales``, mixing weights
    ``mix_weights`` (each adapter), ``n_lora`` samples on the same noise at every scale.
    Diversity: ``div_method`` on ``div_reward`` for ``div_budget`` queries, with each ``div_lams`` (eps
    penalty 0) and each ``div_eps`` (lam 0), once per seed; ``div_per_prompt`` samples of each of
    ``div_prompts`` prompts.
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
    seeds: tuple = (0, 1, 2)
    n_eval: int = 16
    eval_every: int = 32
    n_show: int = 4
    lora_method: str = "DRaFT-K"
    lora_rewards: tuple = ("compress", "incompress")
    lora_scales: tuple = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
    mix_weights: tuple = (0.0, 0.5, 1.0)
    n_lora: int = 16
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
             eta: Optional[float] = None, values: bool = False) -> dict:
    """Mean differentiable compressibility (8.3) and mean true JPEG size in kB (8.2) of n samples on fixed
    noise (the same noise for every model), DDIM(eta, default ``cfg.eta``), with their standard errors;
    ``keep`` images as grey uint8; ``values``: the per-sample numbers too."""
    from .rewards import JpegRoundTrip, jpeg_size_kb

    imgs = draw(ctx, model, n, seed, cfg.eta if eta is None else eta)
    comp = JpegRoundTrip(cfg.codec_quality)(imgs.double()).numpy()
    kb = jpeg_size_kb(imgs, quality=cfg.jpeg_quality, upscale=cfg.measure_upscale).double().numpy()
    out = {"compress": float(comp.mean()), "compress_se": float(comp.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
           "jpeg_kb": float(kb.mean()), "jpeg_kb_se": float(kb.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0}
    if values:  # per sample, for paired differences between models evaluated on this same noise
        out["compress_values"], out["jpeg_kb_values"] = comp.tolist(), kb.tolist()
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
                   "seconds_per_step": curve[-1]["wall_time"] / steps, "seconds_total": time.perf_counter() - t0}


# ============================================================================ 1. the method comparison


def compare(cfg: DraftImageConfig, ctx: Optional[Context] = None, adapter_dir=None, progress: bool = False) -> dict:
    """Every reward x method x seed on ``cfg.budget`` reward queries. With ``adapter_dir``, the adapters of
    ``cfg.lora_method`` (every seed) are written there in the diffusers format (for ``lora``): ``adapters``
    {reward: folder} of the first seed, ``adapters_by_seed`` [{reward: folder}] of every seed."""
    from .lora_io import save_diffusers_lora

    cfg.validate()
    ctx = ctx or build_context(cfg)
    t0 = time.perf_counter()
    out = {"config": cfg.to_json(), "model_dir": ctx.model_dir, "budget_steps": {}, "runs": {}, "adapters": {},
           "adapters_by_seed": [{} for _ in cfg.seeds]}
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
                if adapter_dir is not None and m == cfg.lora_method and r in cfg.lora_rewards:
                    d = Path(adapter_dir) / f"{r}-{m}-s{s}"
                    save_diffusers_lora(model, d)
                    out["adapters_by_seed"][cfg.seeds.index(s)][r] = str(d)
                    if s == cfg.seeds[0]:
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


def _num(v) -> float:
    """A number as computed or as stored in the JSON (non-finite floats are the strings 'inf' / 'nan')."""
    return math.nan if v is None else float(v)


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n)) of ``values``; se is nan below two values."""
    v = np.asarray([_num(x) for x in values], float)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), (float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan)


def _curves(runs: list, key: str, sign: float, axis: str):
    """(x, mean y, per-seed Y, per-seed X) over seeds; curves of one method share their query grid, wall
    times differ per seed (the mean x is their average)."""
    Y = sign * np.array([[_num(c[key]) for c in r["curve"]] for r in runs], float)
    X = np.array([[_num(c["queries" if axis == "queries" else "wall_time"]) for c in r["curve"]] for r in runs], float)
    return X.mean(0), Y.mean(0), Y, X


def censored_ratio(a: float, b: float, end_fast: float, end_slow: float) -> tuple[float, str]:
    """The speed-up b / a of reaching one level (a: the fast method's cost, b: the slow one's; inf = never
    reached within its budget ``end_*``), as (value, bound): '=' both reach it; '>=' only the fast one does,
    so the ratio is at least end_slow / a (the slow one would need more than its whole budget); '<=' only
    the slow one does, at most b / end_fast; 'none' neither (value nan)."""
    fa, fb = math.isfinite(a) and a > 0, math.isfinite(b)
    if fa and fb:
        return b / a, "="
    if fa:
        return end_slow / a, ">="
    if fb:
        return b / end_fast, "<="
    return math.nan, "none"


def ratio_text(value: float, bound: str, end_fast: float, end_slow: float, unit: str) -> str:
    """A speed-up as text: '2.31x', '>= 2.60x (the slower never reaches it in 128 queries)', ..."""
    if bound == "=":
        return f"{value:.2f}x"
    if bound == ">=":
        return f">= {value:.2f}x (the slower never reaches it in {end_slow:.4g} {unit})"
    if bound == "<=":
        return f"<= {value:.2f}x (the faster never reaches it in {end_fast:.4g} {unit})"
    return "n/a (neither reaches it)"


def speedup(runs_fast: list, runs_slow: list, key: str = "compress", sign: float = 1.0, axis: str = "queries",
            fractions=(0.25, 0.5, 0.75)) -> dict:
    """How many times fewer reward queries (``axis='queries'``) or training seconds (``'wall_time'``) the
    fast method needs than the slow one to reach the level r0 + f * g, f in ``fractions``, on curves of
    sign * key: r0 the pre-trained value, g the larger of the two methods' final gains of the seed-mean
    curves (so one of them reaches every level). > 1: the first-named method is faster.

    Per level: the ratio on the seed-mean curves, and per seed (seed i of one method against seed i of the
    other, the same level) with the mean and standard error over seeds. A method that never reaches a level
    within its budget makes the ratio a bound (``censored_ratio``): '>=' budget_slow / cost_fast when the
    slow one never reaches it, '<=' when the fast one never does; ``n_censored`` counts the seeds whose
    ratio is a bound (their mean then mixes bounds with values, and says so in ``text``). When neither
    method gained (g <= 0) no level is defined and ``levels`` is empty. Also the final gains with their
    standard errors over seeds and ``gain_ratio`` (fast's gain / slow's, with a delta-method se)."""
    xf, yf, Yf, Xf = _curves(runs_fast, key, sign, axis)
    xs, ys, Ys, Xs = _curves(runs_slow, key, sign, axis)
    r0 = float(np.concatenate([Yf[:, 0], Ys[:, 0]]).mean())
    gf, gs = float(yf[-1] - r0), float(ys[-1] - r0)
    gf_m, gf_se = mean_se(Yf[:, -1] - r0)
    gs_m, gs_se = mean_se(Ys[:, -1] - r0)
    ratio = gf / gs if gs != 0 else math.nan
    ratio_se = abs(ratio) * math.sqrt((gf_se / gf) ** 2 + (gs_se / gs) ** 2) if gf != 0 and gs != 0 else math.nan
    unit = "queries" if axis == "queries" else "s"
    out = {"key": key, "sign": sign, "axis": axis, "r0": r0, "final_fast": float(yf[-1]), "final_slow": float(ys[-1]),
           "gain_fast": gf, "gain_slow": gs, "gain_fast_se": gf_se, "gain_slow_se": gs_se, "gain_ratio": ratio,
           "gain_ratio_se": ratio_se, "n_seeds": [len(runs_fast), len(runs_slow)],
           "level_of": "fast" if gf > gs else "slow", "levels": []}
    g = max(gf, gs)
    if not g > 0:
        return out
    for f in fractions:
        lvl = r0 + f * g
        a, b = queries_to_reach(xf, yf, lvl), queries_to_reach(xs, ys, lvl)
        v, bound = censored_ratio(a, b, float(xf[-1]), float(xs[-1]))
        seeds = []
        for i in range(min(len(Yf), len(Ys))):
            ef, es = float(Xf[i, -1]), float(Xs[i, -1])
            ai, bi = queries_to_reach(Xf[i], Yf[i], lvl), queries_to_reach(Xs[i], Ys[i], lvl)
            vi, bi_ = censored_ratio(ai, bi, ef, es)
            seeds.append({"fast": ai, "slow": bi, "ratio": vi, "bound": bi_})
        vals = [s["ratio"] for s in seeds if s["bound"] != "none"]
        m, se = mean_se(vals)
        cens = sum(s["bound"] != "=" for s in seeds)
        text = ratio_text(v, bound, float(xf[-1]), float(xs[-1]), unit)
        if len(vals) > 1:
            text += (f"; per seed {m:.2f} +- {se:.2f} ({len(vals)} seeds"
                     + (f", {cens} of them a bound: {', '.join(s['bound'] + format(s['ratio'], '.2f') for s in seeds)}"
                        if cens else "") + ")")
        short = (f"{bound}{v:.2f}x".lstrip("=") if bound != "none" else "n/a") + (
            f" (per seed {m:.2f} +- {se:.2f})" if len(vals) > 1 else "")
        out["levels"].append({"fraction": f, "level": lvl, "fast": a, "slow": b, "ratio": v, "bound": bound,
                              "ratio_mean": m, "ratio_se": se, "n_censored": cens, "seeds": seeds, "text": text,
                              "short": short})
    return out


def claims(data: dict) -> dict:
    """The paper's comparisons as numbers, per reward, on the trained reward ('compress', signed so that
    higher is better) and on the true JPEG size (-kB for compressibility, +kB for incompressibility):
    DRaFT-LV against ReFL (paper: about 2x faster), and every gradient method against DDPO, per reward
    query and per second of training (``speedup``); per method the start and final values with their
    standard errors over seeds and the training seconds per optimisation step (``seconds_per_step``)."""
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
        finals, per_step = {}, {}
        for m, rr in runs.items():
            for kn, (k, sg) in keys.items():
                _, y, Y, _ = _curves(rr, k, sg, "queries")
                fm, fse = mean_se(Y[:, -1])
                gm, gse = mean_se(Y[:, -1] - Y[:, 0])
                sample_se = float(np.mean([_num(run["curve"][-1][f"{k}_se"]) for run in rr]))
                finals.setdefault(m, {})[kn] = {"start": float(y[0]), "final": float(y[-1]), "final_se": fse,
                                                "gain": gm, "gain_se": gse, "final_sample_se": sample_se,
                                                "final_seeds": Y[:, -1].tolist()}
            sps = [_num(run["seconds_per_step"]) if "seconds_per_step" in run else
                   _num(run["curve"][-1]["wall_time"]) / run["steps"] for run in rr]
            pm, pse = mean_se(sps)
            per_step[m] = {"seconds": pm, "seconds_se": pse, "queries_per_step": rr[0]["queries_per_step"]}
        c["finals"] = finals
        c["seconds_per_step"] = per_step
        out[r] = c
    return out


# ============================================================================ 2. LoRA scaling and mixing


def lora(cfg: DraftImageConfig, adapters, ctx: Optional[Context] = None, pipe=None) -> dict:
    """Scaling and mixing of diffusers-format adapters: ``adapters`` is {reward: folder} (the two
    ``cfg.lora_rewards``) or a list of such, one per seed of the fine-tuning. Each pair is loaded into a
    fresh copy of the pipeline with stock ``load_lora_weights`` and ``set_adapters``
    (``imaging.lora_io.load_diffusers_loras``): W + sum_a s_a dW_a (DRaFT sec. 5.1). Scale sweep of the
    first adapter over ``lora_scales`` and the grid of ``mix_weights`` x ``mix_weights`` for the two; every
    setting on the same fixed noise (``n_lora`` samples, per-sample values kept for paired differences).

    ``per_adapter`` holds each pair's sweep; ``scales`` / ``mix`` their mean over pairs, with ``*_se`` the
    standard error over pairs (over samples when there is one pair) and the first pair's images."""
    from .lora_io import load_diffusers_loras
    from .pipeline import LatentEps, encode_prompts, load_pipeline

    cfg.validate()
    ra, rb = cfg.lora_rewards
    pairs = [adapters] if isinstance(adapters, dict) else list(adapters)
    if not pairs:
        raise ValueError("adapters: give at least one {reward: folder} pair; run compare with adapter_dir first")
    for ad in pairs:
        missing = [r for r in (ra, rb) if r not in ad]
        if missing:
            raise ValueError(f"adapters: no adapter for {missing}; run compare with adapter_dir first")
    t0 = time.perf_counter()
    if pipe is None:
        ctx = ctx or build_context(cfg)
        pipe = load_pipeline(ctx.model_dir, dtype=getattr(torch, cfg.dtype), device="cpu") if ctx.model_dir else \
            copy.deepcopy(ctx.pipe)
    ctx = ctx or build_context(cfg, pipe=copy.deepcopy(pipe))
    pipe.set_progress_bar_config(disable=True)
    per = []
    for i, ad in enumerate(pairs):
        p = copy.deepcopy(pipe)  # a fresh pipeline per pair: adapters never accumulate
        names = load_diffusers_loras(p, [(Path(ad[ra]), 1.0), (Path(ad[rb]), 1.0)])
        cond, unc = encode_prompts(p, list(ctx.prompts), device="cpu")
        model = LatentEps(p.unet, ctx.schedule, cond, unc, cfg.guidance_scale).eval()
        lctx = replace(ctx, pipe=p)

        def at(wa, wb, keep):
            p.set_adapters(names, adapter_weights=[float(wa), float(wb)])
            return evaluate(lctx, cfg, model, cfg.n_lora, keep=keep if i == 0 else 0, values=True)

        per.append({"adapters": {ra: str(ad[ra]), rb: str(ad[rb])},
                    "scales": [dict(scale=s, **at(s, 0.0, cfg.n_show)) for s in cfg.lora_scales],
                    "mix": [dict(w_a=a, w_b=b, **at(a, b, min(2, cfg.n_show))) for a in cfg.mix_weights
                            for b in cfg.mix_weights]})

    def pooled(kind):
        """Mean over pairs per setting, and the change from the pre-trained setting (scale 0 / weights 0, 0)
        paired on the same noise: per pair its mean over samples, then mean +- se over pairs (over samples
        with one pair)."""
        base = [r for r in per[0][kind] if all(_num(r[k]) == 0 for k in ("scale", "w_a", "w_b") if k in r)]
        j0 = per[0][kind].index(base[0]) if base else None
        rows = []
        for j, first in enumerate(per[0][kind]):
            row = {k: v for k, v in first.items() if k not in ("compress", "compress_se", "jpeg_kb", "jpeg_kb_se")
                   and not k.endswith("_values")}
            for key in ("compress", "jpeg_kb"):
                m, se = mean_se([pa[kind][j][key] for pa in per])
                row[key], row[f"{key}_se"] = m, (se if len(per) > 1 else first[f"{key}_se"])
                if j0 is not None:
                    d = [np.asarray(pa[kind][j][f"{key}_values"]) - np.asarray(pa[kind][j0][f"{key}_values"]) for pa in per]
                    m, se = mean_se([x.mean() for x in d]) if len(per) > 1 else mean_se(d[0])
                    row[f"{key}_change"], row[f"{key}_change_se"] = m, se
            rows.append(row)
        return rows

    return {"config": cfg.to_json(), "adapters": per[0]["adapters"], "reward_a": ra, "reward_b": rb,
            "n_adapters": len(per), "se_over": "adapters (seeds)" if len(per) > 1 else "samples",
            "scales": pooled("scales"), "mix": pooled("mix"), "per_adapter": per, "seconds": time.perf_counter() - t0}


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
    ``div_lams`` and each DRaFT+ eps-penalty weight of ``div_eps``, once per seed of ``cfg.seeds``; per run
    the final diversity (judge features and pixels, within a prompt, on the same evaluation noise), the
    rewards and the path KL of the last steps. ``runs_by_seed``: every run; ``runs``: per setting the mean
    over seeds with ``*_se`` its standard error (nan with one seed) and the first seed's images."""
    cfg.validate()
    ctx = ctx or build_context(cfg)
    t0 = time.perf_counter()
    out = {"config": cfg.to_json(), "pretrained": _diversity_of(ctx, cfg, ctx.base), "runs": [], "runs_by_seed": []}
    settings = [(lam, 0.0) for lam in cfg.div_lams] + [(0.0, e) for e in cfg.div_eps]
    keys = ("judge_diversity", "pixel_diversity", "compress", "jpeg_kb", "kl_last", "train_seconds")
    for lam, eps in settings:
        rows = []
        for seed in cfg.seeds:
            model, data = train_run(ctx, cfg, cfg.div_method, cfg.div_reward, seed, budget=cfg.div_budget,
                                    lam=lam, eps_penalty=eps, eval_every=cfg.div_budget, n_eval=cfg.n_eval,
                                    log_kl=True, eta=cfg.div_eta)
            kl = [r["kl"] for r in data["history"][-5:] if r.get("kl") is not None]
            row = {"lam": lam, "eps_penalty": eps, "seed": seed, "kl_last": float(np.mean(kl)) if kl else None,
                   "train_seconds": data["curve"][-1]["wall_time"], "seconds_per_step": data["seconds_per_step"],
                   **_diversity_of(ctx, cfg, model)}
            if seed != cfg.seeds[0]:
                row.pop("images")
            rows.append(row)
            out["runs_by_seed"].append(row)
            if progress:
                print(f"[draft-image] diversity lam {lam:g} eps {eps:g} seed {seed}: judge diversity "
                      f"{row['judge_diversity']:.3f} (pre-trained {out['pretrained']['judge_diversity']:.3f}), "
                      f"compress {row['compress']:.3e}, KL {row['kl_last']}", flush=True)
            del model
        agg = {"lam": lam, "eps_penalty": eps, "n_seeds": len(rows), "images": rows[0]["images"]}
        for k in keys:
            vals = [r[k] for r in rows if r.get(k) is not None]
            agg[k], agg[f"{k}_se"] = mean_se(vals) if vals else (None, None)
        out["runs"].append(agg)
    out["seconds"] = time.perf_counter() - t0
    return out


# ============================================================================ 4. verdicts on the paper's claims

#: a difference counts as resolved when it exceeds this many standard errors
Z = 2.0


def _regime(cfg: dict) -> str:
    return (f"digits pipeline ({'local model' if cfg.get('model') else 'trained here'}), LoRA rank {cfg['lora_rank']}, "
            f"{cfg['sample_steps']} DDIM steps (eta {cfg['eta']}), CFG {cfg['guidance_scale']}, differentiable JPEG "
            f"(in)compressibility at codec quality {cfg['codec_quality']}, times {cfg['reward_scale']:g}")


def _pm(m: float, se: float, scale: float = 1.0, digits: int = 3) -> str:
    m, se = _num(m) * scale, _num(se) * scale
    return f"{m:.{digits}g} +- {se:.2g}" if math.isfinite(se) else f"{m:.{digits}g} (no se)"


def _side(d: float, se: float) -> Optional[bool]:
    """``theory.verdicts.side`` at this module's Z: True beyond Z se above 0, False below, None within (or no
    finite se)."""
    return side(d, se, Z)


def _level(s: dict, fraction: float = 0.5) -> Optional[dict]:
    return next((lv for lv in s.get("levels", []) if abs(_num(lv["fraction"]) - fraction) < 1e-9), None)


def speedup_cell(lv: Optional[dict], target: float = 1.5) -> str:
    """Whether a level's per-seed speed-ups show 'about 2x faster': 'holds' when mean - Z se > 1 (faster,
    resolved) and mean + Z se >= ``target`` (consistent with ~2x); 'fails' when mean + Z se < target (short
    of ~2x); else 'unresolved'. Bounds ('>=' / '<=' seeds) are used only in the direction they are safe:
    upper bounds can show 'fails', lower bounds 'holds'."""
    if lv is None:
        return "unresolved"
    m, se = _num(lv.get("ratio_mean")), _num(lv.get("ratio_se"))
    if not (math.isfinite(m) and math.isfinite(se)):
        return "unresolved"
    kinds = {s["bound"] for s in lv.get("seeds", [])}
    lo, hi = m - Z * se, m + Z * se
    if hi < target and kinds <= {"=", "<="}:
        return "fails"
    if lo > 1 and hi >= target and kinds <= {"=", ">="}:
        return "holds"
    return "unresolved"


def verdicts_compare(data: dict) -> list[dict]:
    """Verdicts of the method comparison (its data as stored in the JSON): DRaFT-LV against ReFL (about 2x
    faster, ``speedup_cell`` on the per-seed speed-ups to half the larger final gain, per reward query, on
    each reward) and gradient methods against DDPO (final gain minus DDPO's > Z se, se over seeds, over
    evaluation samples with one seed), per reward query."""
    cfg, cl = data["config"], data["claims"]
    n = len(cfg["seeds"])
    budget = (f"{cfg['budget']} reward queries per run (batch {cfg['batch_size']}), {n} seed(s); "
              f"seconds per step: " + "; ".join(
                  f"{r}: " + ", ".join(f"{m} {_pm(v['seconds'], v['seconds_se'], digits=2)}"
                                       for m, v in c.get("seconds_per_step", {}).items()) for r, c in cl.items()))
    out = []
    cells, nums = {}, []
    for r, c in cl.items():
        lv = c.get("lv_vs_refl")
        if not lv:
            continue
        q, w = _level(lv["diff_queries"]), _level(lv["diff_wall_time"])
        cells[r] = speedup_cell(q)
        g = lv["diff_queries"]
        nums.append(f"{r}: to half the larger final gain, per query {q['text'] if q else 'n/a'}; per second "
                    f"{w['text'] if w else 'n/a'}; final gain ratio at equal queries "
                    f"{_pm(g['gain_ratio'], g.get('gain_ratio_se'), digits=2)}")
    if cells:
        word, good = condition_word({r: {"holds": True, "fails": False}.get(v) for r, v in cells.items()})
        unresolved = [r for r, v in cells.items() if v == "unresolved"]
        if word == "holds":
            verdict = "holds: DRaFT-LV reaches the level faster per reward query on " + ", ".join(good)
        elif word == "holds only when":
            verdict = f"holds only when trained on {', '.join(good)}"
        elif word == "not resolved":
            short = [r for r, v in cells.items() if v == "fails"]
            verdict = (f"not resolved: per reward query DRaFT-LV's speed over ReFL's is neither resolved above 1x "
                       f"and consistent with 2x nor short of 2x beyond {Z:g} se at {n} seed(s) on "
                       f"{', '.join(unresolved)}" + (f"; short of 2x on {', '.join(short)}" if short else ""))
        else:  # no reward's cell holds, at least one fails
            failing = [r for r, v in cells.items() if v == "fails"]
            slower = all(_num(lvl["ratio_mean"]) + Z * _num(lvl["ratio_se"]) < 1 and
                         {x["bound"] for x in lvl["seeds"]} <= {"=", "<="} for lvl in
                         (_level(cl[r]["lv_vs_refl"]["diff_queries"]) for r in failing) if lvl)
            verdict = ("does not hold: per reward query DRaFT-LV is "
                       + (f"slower than ReFL (> {Z:g} se below 1x)" if slower else "short of 2x ReFL's speed")
                       + " on " + ", ".join(failing))
        if unresolved and word != "not resolved":
            verdict += f" (not resolved at {n} seed(s) on {', '.join(unresolved)})"
        out.append({"claim": "DRaFT-LV reaches a reward level about 2x faster than ReFL (DRaFT paper, Clark et al.)",
                    "verdict": verdict, "numbers": "; ".join(nums), "regime": _regime(cfg), "budget": budget})
    cells, nums = {}, []
    for r, c in cl.items():
        if "gradient_vs_ddpo" not in c:
            continue
        fd = c["finals"]["DDPO"]["diff"]
        nums.append(f"{r} (gains x1e-3 at equal queries; speed-up to half the larger gain): DDPO "
                    f"{_pm(fd['gain'], fd['gain_se'], 1e3)}")
        for m, v in c["gradient_vs_ddpo"].items():
            fm = c["finals"][m]["diff"]
            se = math.hypot(_num(fm["gain_se"]), _num(fd["gain_se"]))
            if not math.isfinite(se):
                se = math.hypot(_num(fm.get("final_sample_se")), _num(fd.get("final_sample_se")))
            d = _num(fm["gain"]) - _num(fd["gain"])
            cells[f"{m} ({r})"] = _side(d, se)
            lvl = _level(v["diff_queries"])
            nums.append(f"{m} {_pm(fm['gain'], fm['gain_se'], 1e3)} (minus DDPO {d * 1e3:.3g} +- {se * 1e3:.2g}; "
                        f"speed-up {lvl.get('short', lvl['text']) if lvl else 'n/a'})")
    if cells:
        word, good = condition_word(cells)
        if word == "holds":
            verdict = f"holds: every gradient method's final gain exceeds DDPO's by > {Z:g} se at equal reward queries"
        elif word == "holds only when":
            verdict = (f"holds only when the method is one of {', '.join(good)} (gain over DDPO's > {Z:g} se); not for "
                       + ", ".join(k for k in cells if k not in good))
        elif word == "not resolved":
            verdict = (f"not resolved: no gradient method's final gain exceeds DDPO's by > {Z:g} se, and "
                       + ", ".join(k for k, v in cells.items() if v is None) + f" within {Z:g} se of it (or no se)")
        else:  # none exceeds DDPO's, at least one is below it beyond Z se
            within = [k for k, v in cells.items() if v is None]
            verdict = (f"does not hold: the final gain is below DDPO's by > {Z:g} se for "
                       + ", ".join(k for k, v in cells.items() if v is False)
                       + (f"; within {Z:g} se of it (or no se) for {', '.join(within)}" if within else ""))
        out.append({"claim": "Gradient methods (the DRaFT family, ReFL) beat DDPO per reward query (DRaFT paper, "
                             "Clark et al.)", "verdict": verdict, "numbers": "; ".join(nums), "regime": _regime(cfg),
                    "budget": budget})
    return out


def verdicts_diversity(data: dict) -> list[dict]:
    """Verdict of the diversity figure: a KL setting (lam > 0 or DRaFT+'s eps penalty > 0) preserves
    diversity when its judge diversity exceeds that of the run without either by > Z se (se over seeds,
    independent runs), and the run without either lost diversity against the pre-trained model (> Z se).
    "not resolved" when that loss is within Z se (no se: one seed), or when it is resolved but no setting is
    beyond Z se of lam = 0 either way."""
    cfg, runs, pre = data["config"], data["runs"], data["pretrained"]

    def name(r):
        return f"lam = {_num(r['lam']):g}" if _num(r["eps_penalty"]) == 0 else f"eps penalty = {_num(r['eps_penalty']):g}"

    base = next((r for r in runs if _num(r["lam"]) == 0 and _num(r["eps_penalty"]) == 0), None)
    if base is None:
        return []
    bse = _num(base.get("judge_diversity_se"))
    lost = _num(pre["judge_diversity"]) - _num(base["judge_diversity"])
    cells, nums = {}, [f"judge diversity (compress x1e-3): pre-trained {_num(pre['judge_diversity']):.3g} "
                       f"({_num(pre['compress']) * 1e3:.4g}); lam = 0: {_pm(base['judge_diversity'], bse)} "
                       f"({_pm(base['compress'], base.get('compress_se'), 1e3, 4)})"]
    for r in runs:
        if r is base:
            continue
        se = math.hypot(bse, _num(r.get("judge_diversity_se")))
        d = _num(r["judge_diversity"]) - _num(base["judge_diversity"])
        cells[name(r)] = _side(d, se)
        nums.append(f"{name(r)}: {_pm(r['judge_diversity'], r.get('judge_diversity_se'))} ({d:+.3g} +- {se:.2g} over "
                    f"lam = 0; compress {_pm(r['compress'], r.get('compress_se'), 1e3, 4)}; path KL "
                    f"{_num(r.get('kl_last')):.3g})")
    if all("pixel_diversity" in r for r in [pre, *runs]):
        nums.append("pixel diversity (not the verdict's measure): " + ", ".join(
            f"{'pre-trained' if r is pre else name(r)} {_pm(r['pixel_diversity'], r.get('pixel_diversity_se'))}"
            for r in [pre, *runs]))
    n = len(cfg["seeds"])
    budget = f"{cfg['div_budget']} reward queries per run, {n} seed(s) per setting"
    regime = (f"{cfg['div_method']} on {cfg['div_reward']}, eta {cfg['div_eta']}; diversity = mean pairwise distance "
              f"of the judge's features among {cfg['div_per_prompt']} samples of each of {cfg['div_prompts']} prompts; "
              + _regime(cfg))
    per_seed = [_num(r["judge_diversity"]) for r in data.get("runs_by_seed", [])
                if _num(r["lam"]) == 0 and _num(r["eps_penalty"]) == 0]
    if len(per_seed) > 1:
        nums.insert(1, "lam = 0 per seed: " + ", ".join(f"{x:.3g}" for x in per_seed))
    lost_side = _side(lost, bse)
    if lost_side is not True:
        good = [k for k, ok in cells.items() if ok is True]
        head = "not resolved" if lost_side is None else "does not hold as resolved"
        verdict = (f"{head} at {n} seed(s): without the KL term diversity changed by {-lost:+.3g} "
                   + (f"+- {bse:.2g} (se over seeds), not a fall of > {Z:g} se" if math.isfinite(bse) else
                      "(no se: one seed)") + ", so there is no resolved loss for the KL term to prevent; settings "
                   f"above lam = 0 by > {Z:g} se: {', '.join(good) if good else 'none'}")
    else:
        word, good = condition_word(cells)
        verdict = {"holds": f"holds: every KL / eps-penalty setting keeps more diversity than lam = 0 (> {Z:g} se)",
                   "holds only when": f"holds only when {' or '.join(good)} (> {Z:g} se over lam = 0); not for "
                                      + ", ".join(k for k in cells if k not in good),
                   "not resolved": f"not resolved: no KL / eps-penalty setting keeps more diversity than lam = 0 "
                                   f"by > {Z:g} se, and " + ", ".join(k for k, v in cells.items() if v is None)
                                   + f" within {Z:g} se of it",
                   "does not hold": f"does not hold: {', '.join(k for k, v in cells.items() if v is False)} keep(s) "
                                    f"less diversity than lam = 0 by > {Z:g} se"
                                    + "".join(f"; {k} within {Z:g} se of it" for k, v in cells.items() if v is None)
                   }[word]
    return [{"claim": "The KL term (or DRaFT+'s eps penalty) preserves sample diversity (DRaFT paper, Clark et al.; "
                      "DRaFT+)", "verdict": verdict, "numbers": "; ".join(nums), "regime": regime, "budget": budget}]


def _paired(a: list, b: list, sign: float) -> tuple[float, float]:
    """Mean and se of sign * (a - b) over samples evaluated on the same noise."""
    return mean_se(sign * (np.asarray(a, float) - np.asarray(b, float)))


def verdicts_lora(data: dict) -> list[dict]:
    """Verdicts of the LoRA figure, per adapter pair (seed) with paired per-sample differences (the same noise
    at every scale): scaling is monotone when the reward (signed as the first adapter's reward) at scale 1
    exceeds scale 0 by > Z se and no step between consecutive scales falls by > Z se ('holds only when
    s <= the last scale before a fall'); summing mixes the rewards when the sum's reward lies between the two
    adapters' own, both differences > Z se. Each reads "not resolved" when nothing refutes it beyond Z se but a
    rise (a difference) it needs is within Z se."""
    cfg, per = data["config"], data.get("per_adapter", [])
    if not per:
        return []
    ra, rb = data["reward_a"], data["reward_b"]
    sign = -1.0 if ra == "incompress" else 1.0
    regime = f"{cfg['lora_method']} adapters ({ra}, {rb}) loaded by stock diffusers; " + _regime(cfg)
    budget = f"{cfg['budget']} reward queries per adapter, {len(per)} adapter pair(s), {cfg['n_lora']} samples per setting"
    mono, limits, nums = {}, [], []
    for i, pa in enumerate(per):
        sc = sorted(pa["scales"], key=lambda r: _num(r["scale"]))
        s = [_num(r["scale"]) for r in sc]
        v = {x: r["compress_values"] for x, r in zip(s, sc)}
        if 0.0 not in v or 1.0 not in v:
            continue
        tot, tse = _paired(v[1.0], v[0.0], sign)
        falls = [s[j + 1] for j in range(len(s) - 1)
                 if (lambda d: d[0] < -Z * d[1])(_paired(v[s[j + 1]], v[s[j]], sign))]
        ok = _side(tot, tse)
        mono[i] = False if falls else ok
        if ok is True and falls and min(falls) > 1.0:
            limits.append(max(x for x in s if x < min(falls)))
        steps = [_paired(v[s[j + 1]], v[s[j]], sign) for j in range(len(s) - 1)]
        nums.append(f"adapter {i}: scale 0 -> 1 {tot * 1e3:+.3g} +- {tse * 1e3:.2g} (x1e-3); steps "
                    + ", ".join(f"{d * 1e3:+.2g}+-{e * 1e3:.1g}" for d, e in steps))
    out = []
    if mono:
        pooled = data["scales"]
        nums.insert(0, f"{ra} reward per scale (x1e-3, mean +- se over {data.get('se_over', 'adapters')}): "
                    + ", ".join(f"s={_num(r['scale']):g}: {_pm(r['compress'], r['compress_se'], 1e3)}" for r in pooled))
        if all(mono.values()):
            verdict = (f"holds: for every adapter the reward rises from scale 0 to 1 by > {Z:g} se and no step up to "
                       f"{max(_num(r['scale']) for r in pooled):g} falls by > {Z:g} se")
        elif limits and len(limits) + sum(v is True for v in mono.values()) == len(mono):
            verdict = f"holds only when s <= {min(limits):g} (beyond it the reward falls by > {Z:g} se for some adapter)"
        elif all(v is not False for v in mono.values()):
            verdict = (f"not resolved: no step falls by > {Z:g} se, and the rise from scale 0 to 1 is within {Z:g} se "
                       f"for {sum(v is None for v in mono.values())} of {len(mono)} adapters")
        else:
            verdict = (f"does not hold: the rise from scale 0 to 1 exceeds {Z:g} se, without a fall, for "
                       f"{sum(v is True for v in mono.values())} of {len(mono)} adapters")
        out.append({"claim": "LoRA scale interpolates the reward monotonically between the pre-trained (0) and "
                             "fine-tuned (1) model and beyond (DRaFT paper, Clark et al., LoRA scaling)",
                    "verdict": verdict, "numbers": "; ".join(nums), "regime": regime, "budget": budget})
    mix, nums = {}, []
    for i, pa in enumerate(per):
        w = sorted({_num(m["w_a"]) for m in pa["mix"]})
        hi = w[-1]
        if not hi > 0:
            continue
        get = {(_num(m["w_a"]), _num(m["w_b"])): m["compress_values"] for m in pa["mix"]}
        A, M, B = get[(hi, 0.0)], get[(hi, hi)], get[(0.0, hi)]
        d1, e1 = _paired(A, M, sign)
        d2, e2 = _paired(M, B, sign)
        mix[i] = both(_side(d1, e1), _side(d2, e2))
        nums.append(f"adapter pair {i} ({ra} reward, x1e-3): {ra} alone - sum {d1 * 1e3:+.3g} +- {e1 * 1e3:.2g}, "
                    f"sum - {rb} alone {d2 * 1e3:+.3g} +- {e2 * 1e3:.2g}")
    if mix:
        word, good = condition_word(mix)
        bad = [k for k in mix if k not in good]
        verdict = {"holds": f"holds: the sum's reward lies between the two adapters' own for every pair (> {Z:g} se)",
                   "holds only when": f"holds only when the adapter pair is number {', '.join(map(str, good))} of {len(mix)} "
                                      f"(one pair per seed): for pair {', '.join(map(str, bad))} the sum's reward is not "
                                      f"between the two adapters' own by > {Z:g} se",
                   "not resolved": f"not resolved: no pair's sum lies between the two adapters' rewards by > {Z:g} se, "
                                   f"and none lies outside beyond {Z:g} se for pair "
                                   + ", ".join(str(k) for k, v in mix.items() if v is None),
                   "does not hold": f"does not hold: for pair {', '.join(str(k) for k, v in mix.items() if v is False)} "
                                    f"the sum's reward lies outside the two adapters' own by > {Z:g} se"
                                    + "".join(f"; pair {k} within {Z:g} se" for k, v in mix.items() if v is None)
                   }[word]
        out.append({"claim": "Summing two LoRA adapters trained on different rewards mixes their rewards (DRaFT "
                             "paper, Clark et al., LoRA mixing)", "verdict": verdict, "numbers": "; ".join(nums),
                    "regime": regime, "budget": budget})
    return out
