"""Reward queries to reach a fixed fraction of the optimum against the dimension D, for DRaFT-1, DRaFT-LV and
DDPO (docs/theory.md §6.6, §6.7), on a task whose difficulty per dimension does not change with D.

Pre-trained model: X_0 ~ N(0, I_D) under the VP schedule, whose marginals are N(0, I_D) at every t, so the
exact eps is eps(x, t) = sigma(t) x (docs/theory.md (2.1) with score -x). No pre-training is needed.
The trainable part is a correction network added to it, ``EpsMLP(D)`` with its output layer zeroed
(the sum is the exact eps bit for bit), fine-tuned through LoRA of rank ``rank`` by the engine
(``theory.engine.finetune`` with ``make_strategy``).

Reward: r(x) = -mean_i (x_i - c)^2 (the per-coordinate mean, so its value range does not change with D).
Pre-trained: E r = -(1 + c^2); optimum 0 at x = c 1 (lam = 0). "Reach" = the evaluated mean reward on
fixed noise reaches r_0 + frac (0 - r_0), r_0 the pre-trained model's evaluated reward; the number reported is the reward queries
spent by then (``strategy.queries(batch)`` per step), or None if not within the budget.

Learning rates: the same grid for every method (equal tuning effort); per (method, D) the learning rate
with the fewest queries (mean over seeds; not reached counts as 2 x budget) is kept.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from theory.engine import FinetuneConfig, SteeredModel, finetune, make_strategy
from theory.nets import EpsMLP
from theory.schedules import LinearVP, as_time
from theory.solvers import sample, time_grid

__all__ = ["DimConfig", "quick", "StdNormalEps", "MeanSquareReward", "METHODS", "train_one", "sweep",
           "summarise"]

#: (label, engine strategy name, strategy options)
METHODS = (("DRaFT-1", "draftk", {"k": 1}), ("DRaFT-LV", "draftlv", {"n": 2}),
           ("DDPO", "ddpo", {"clip": 0.2, "inner_steps": 4}))


@dataclass(frozen=True)
class DimConfig:
    dims: tuple = (2, 8, 32, 128, 512)
    seeds: tuple = (0, 1, 2)
    lrs: tuple = (3e-3, 1e-2, 3e-2)
    center: float = 1.0
    frac: float = 0.5
    batch_size: int = 32
    budget: int = 3200  # reward queries per run
    eval_every: int = 80  # reward queries between evaluations
    n_eval: int = 256
    n_steps: int = 20  # DDIM steps
    eta: float = 1.0
    t_min: float = 1e-3
    hidden: int = 64
    depth: int = 2
    rank: int = 4
    beta_min: float = 0.1
    beta_max: float = 20.0


def quick(cfg: DimConfig = DimConfig()) -> DimConfig:
    """The full run's dimensions (so that "holds only when D in {...}" can name the same ones), 2 seeds,
    2 learning rates, half the budget, evaluations every 160 queries."""
    return replace(cfg, seeds=(0, 1), lrs=(3e-3, 1e-2), budget=1600, eval_every=160)


class StdNormalEps(nn.Module):
    """eps(x, t) = sigma(t) x + corr(x, t): the exact eps of N(0, I_D) (docs/theory.md (2.1)) plus a
    correction ``EpsMLP`` whose output layer is zero, so that the pre-trained model is exact."""

    def __init__(self, D: int, schedule, hidden: int = 64, depth: int = 2, seed: int = 0):
        super().__init__()
        if int(D) != D or D < 1:
            raise ValueError(f"D: the dimension must be an int >= 1, got {D!r}")
        self.schedule, self.dim = schedule, int(D)
        torch.manual_seed(seed)
        self.corr = EpsMLP(self.dim, hidden=hidden, depth=depth, T=float(schedule.T))
        last = self.corr.net[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()

    def forward(self, x, t, cond=None):
        tt = as_time(t, x)
        return self.schedule.sigma(tt).to(x.dtype)[:, None] * x + self.corr(x, tt)


class MeanSquareReward:
    """r(x) = -mean_i (x_i - c)^2; differentiable."""

    differentiable = True

    def __init__(self, center: float = 1.0):
        self.center = float(center)

    def __call__(self, x, cond=None):
        return -((x - self.center) ** 2).mean(-1)


def _model(cfg: DimConfig, D: int, seed: int):
    sch = LinearVP(cfg.beta_min, cfg.beta_max, T=1.0)
    base = StdNormalEps(D, sch, cfg.hidden, cfg.depth, seed=seed)
    return SteeredModel(base, lora_rank=cfg.rank), sch


def evaluate(model, sch, ts, cfg: DimConfig, D: int, reward) -> float:
    """Mean reward of cfg.n_eval samples on fixed x_T and noise (not counted as queries)."""
    g = torch.Generator().manual_seed(12345)
    xT = torch.randn(cfg.n_eval, D, generator=g)
    noise = torch.randn(len(ts) - 1, cfg.n_eval, D, generator=g)
    with torch.no_grad():
        x0 = sample(model, sch, xT, ts, method="ddim", eta=cfg.eta, noise=noise).x0
    return float(reward(x0).mean())


def train_one(cfg: DimConfig, D: int, method: str, lr: float, seed: int) -> dict:
    """One fine-tuning run: the evaluated reward curve against reward queries and wall time."""
    label, kind, opts = next(m for m in METHODS if m[0] == method)
    strategy = make_strategy(kind, **opts)
    qps = strategy.queries(cfg.batch_size)
    steps = max(1, cfg.budget // qps)
    every = max(1, cfg.eval_every // qps)
    model, sch = _model(cfg, D, seed)
    ts = time_grid(sch, cfg.n_steps, t_min=cfg.t_min)
    reward = MeanSquareReward(cfg.center)
    fc = FinetuneConfig(steps=steps, batch_size=cfg.batch_size, n_steps=cfg.n_steps, method="ddim", eta=cfg.eta,
                        lr=lr, seed=seed, t_min=cfg.t_min, progress=False, shape=(D,))
    curve = [(0, evaluate(model, sch, ts, cfg, D, reward))]
    t_eval = [0.0]

    def cb(step, *a, **k):
        if step % every == 0 or step == steps:
            t0 = time.perf_counter()
            model.eval()
            curve.append((step * qps, evaluate(model, sch, ts, cfg, D, reward)))
            model.train()
            t_eval[0] += time.perf_counter() - t0

    t0 = time.perf_counter()
    diverged = None
    try:
        finetune(model, sch, reward, strategy, fc, ts=ts, callback=cb)
    except FloatingPointError as e:  # a learning rate too large for this method and D: the run stops there
        diverged = str(e).split(";")[0]
    wall = time.perf_counter() - t0 - t_eval[0]
    return {"queries": [q for q, _ in curve], "reward": [r for _, r in curve], "wall_s": wall,
            "queries_per_step": qps, "diverged": diverged}


def queries_to_reach(curve: dict, target: float):
    """First evaluated query count with reward >= target (None: not reached)."""
    for q, r in zip(curve["queries"], curve["reward"]):
        if math.isfinite(r) and r >= target:
            return q
    return None


@functools.lru_cache(maxsize=None)
def sweep(cfg: DimConfig, progress=None) -> dict:
    """Every (D, method, lr, seed) run; returns the curves and timings."""
    runs = {}
    todo = [(D, m[0], lr, s) for D in cfg.dims for m in METHODS for lr in cfg.lrs for s in cfg.seeds]
    t0 = time.perf_counter()
    for i, (D, m, lr, s) in enumerate(todo):
        runs[f"{D}|{m}|{lr:g}|{s}"] = train_one(cfg, D, m, lr, s)
        if progress is not None:
            progress(i + 1, len(todo))
    return {"runs": runs, "wall_s": time.perf_counter() - t0}


def summarise(cfg: DimConfig, res: dict, frac=None) -> dict:
    """Per (method, D): queries to reach the target (``frac``, default cfg.frac, of the way from the
    pre-trained reward to the optimum 0) at the best learning rate (mean and per seed), and the ratio
    DDPO / the better gradient method per D (> 1: a gradient method needs fewer queries)."""
    frac = cfg.frac if frac is None else frac
    # r_0: the pre-trained model's evaluated reward (the same fixed noise for every run; its exact value
    # -(1 + c^2) is approached only as the sampler's steps grow)
    r0 = {str(D): res["runs"][f"{D}|{METHODS[0][0]}|{cfg.lrs[0]:g}|{cfg.seeds[0]}"]["reward"][0] for D in cfg.dims}
    table = {}
    for m, _, _ in METHODS:
        table[m] = {}
        for D in cfg.dims:
            best = None
            target = r0[str(D)] * (1 - frac)
            for lr in cfg.lrs:
                qs = [queries_to_reach(res["runs"][f"{D}|{m}|{lr:g}|{s}"], target) for s in cfg.seeds]
                score = sum(2 * cfg.budget if q is None else q for q in qs) / len(qs)
                final = [res["runs"][f"{D}|{m}|{lr:g}|{s}"]["reward"][-1] for s in cfg.seeds]
                row = {"lr": lr, "queries_per_seed": qs, "score": score, "reached_all": None not in qs,
                       "final_reward_mean": sum(final) / len(final)}
                if best is None or score < best["score"]:
                    best = row
            table[m][str(D)] = best
    grad = {str(D): min(table["DRaFT-1"][str(D)]["score"], table["DRaFT-LV"][str(D)]["score"]) for D in cfg.dims}
    ratio = {str(D): table["DDPO"][str(D)]["score"] / grad[str(D)] for D in cfg.dims}
    return {"frac": frac, "target_reward": {D: r * (1 - frac) for D, r in r0.items()}, "pretrained_reward": r0,
            "optimum": 0.0, "table": table, "ddpo_over_best_gradient": ratio}
