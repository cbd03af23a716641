"""Experiments of the DRaFT toy (docs/theory.md §6.6), each a function of a frozen config returning plain data.

- ``compare``: every method x seed on the same budget of reward queries; evaluation curves against
  reward queries and training wall time.
- ``grad_vs_k``: norm of the DRaFT-K gradient and its angle to the DRaFT-1 gradient against K.
- ``lora_analysis``: LoRA scale 0..1 (reward, path KL); the sum of adapters trained on rewards A and B;
  LoRA on the first / last m sampling steps only.
- ``diversity``: spread, mode coverage and KL over a long run, with lam = 0, lam > 0 and DRaFT+'s penalty.

All sampling goes through ``theory.solvers.sample`` (directly, or inside ``theory.engine.finetune``).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, replace

import torch
from torch import nn

from theory.engine import make_strategy
from theory.solvers import sample

from . import model as toy
from .configs import (
    CompareConfig,
    DiversityConfig,
    GradKConfig,
    LoraConfig,
    Method,
    PretrainConfig,
    RewardConfig,
    TrainConfig,
)
from .metrics import evaluate, fixed_noise, kl_regularised_optimum
from .rewards import make_reward

__all__ = ["strategy_of", "steered", "train_method", "compare", "grad_vs_k", "LoraWindow",
           "lora_analysis", "diversity", "with_adapters", "MergedLora", "lora_deltas", "queries_to_reach", "summarise_compare", "speedup", "claims", "sensitivity", "step_costs"]


# ----------------------------------------------------------------------------- building blocks


def strategy_of(method: Method):
    """The engine strategy of a ``Method``: ``theory.engine.make_strategy`` on its kind and options."""
    return make_strategy(method.kind, k=method.k, n=method.n, steps=tuple(method.refl_steps),
                         clip=method.ddpo_clip, inner_steps=method.ddpo_inner)


def steered(pretrain: PretrainConfig = PretrainConfig(), rank: int = 4):
    """A fresh ``SteeredModel``: a private copy of the frozen pre-trained MLP plus zero-initialised LoRA
    of rank ``rank`` on its Linear layers (peft injects in place, hence the copy)."""
    from theory.engine import SteeredModel

    return SteeredModel(copy.deepcopy(toy.pretrained(pretrain)), lora_rank=rank)


def queries_per_step(method: Method, batch_size: int) -> int:
    """Reward evaluations per optimisation step, as the engine's strategy declares them."""
    return strategy_of(method).queries(batch_size)


def train_method(method: Method, seed: int, train: TrainConfig = TrainConfig(),
                 pretrain: PretrainConfig = PretrainConfig(), rewards: RewardConfig = RewardConfig(),
                 evaluate_every: bool = True):
    """Fine-tune a fresh steered model with ``method`` until ``train.budget`` reward queries are spent,
    evaluating every ``train.eval_every`` queries on fixed noise (not counted in the budget nor in the
    wall time). Returns (model, data) with data = {"curve": [...], "history": [...]}."""
    from theory.engine import FinetuneConfig, finetune

    qps = queries_per_step(method, train.batch_size)
    ups = method.ddpo_inner if method.kind == "ddpo" else 1  # optimiser updates per step (PPO epochs)
    n_steps_total = max(1, train.budget // qps)
    eval_every_steps = max(1, train.eval_every // qps)
    torch.manual_seed(seed)
    model = steered(pretrain, train.lora_rank)
    reward = make_reward(method.reward, rewards)
    sch, ts = toy.schedule(pretrain), toy.grid(pretrain)
    cfg = FinetuneConfig(steps=n_steps_total, batch_size=train.batch_size, n_steps=pretrain.n_steps, method="ddim",
                         eta=train.eta, lam=method.lam, lr=method.lr, weight_decay=train.weight_decay,
                         grad_clip=train.grad_clip, seed=seed, t_min=pretrain.t_min, progress=False,
                         eps_penalty=method.eps_penalty)
    ev = dict(reference=model.reference, n=train.n_eval, eta=train.eta, pretrain=pretrain, rewards=rewards)
    curve = [dict(step=0, queries=0, updates=0, wall_time=0.0, **evaluate(model, **ev))]
    eval_time = [0.0]

    def callback(step, *args, **kwargs):
        # step: number of completed optimisation steps (1-based), as finetune documents it
        if evaluate_every and (step % eval_every_steps == 0 or step == n_steps_total):
            before = eval_time[0]
            t0 = time.perf_counter()
            was_training = model.training
            model.eval()
            row = evaluate(model, **ev)
            model.train(was_training)
            eval_time[0] += time.perf_counter() - t0
            curve.append(dict(step=step, queries=step * qps, updates=step * ups, eval_time_before=before, **row))

    hist = finetune(model, sch, reward, strategy_of(method), cfg, x_T_sampler=_gauss_sampler, ts=ts,
                    callback=callback)
    rows = [dict(r) for r in hist]
    wall = {int(r["step"]): float(r["wall_time"]) for r in rows}
    for c in curve[1:]:
        # the engine's wall time is measured from the start of training and so includes the earlier
        # evaluations run from the callback; subtract them
        c["wall_time"] = wall.get(c["step"], float("nan")) - c.pop("eval_time_before")
    return model, {"method": asdict(method), "seed": seed, "queries_per_step": qps, "updates_per_step": ups,
                   "curve": curve,
                   "history": rows}


def _gauss_sampler(n, generator):
    return torch.randn(n, 2, generator=generator)


# ----------------------------------------------------------------------------- 1. comparison


def compare(cfg: CompareConfig = CompareConfig()) -> dict:
    """Every method x seed on ``cfg.train.budget`` reward queries. Returns {label: [run data per seed]}
    plus the pre-trained evaluation."""
    out = {"config": asdict(cfg), "runs": {}}
    for m in cfg.methods:
        out["runs"][m.label] = []
        for s in cfg.seeds:
            _, data = train_method(m, s, cfg.train, cfg.pretrain, cfg.rewards)
            out["runs"][m.label].append(data)
    return out


def _curve_matrix(runs, key):
    """(seeds, evals) array of ``key`` and the common query axis (runs of one method share it)."""
    q = [c["queries"] for c in runs[0]["curve"]]
    M = torch.tensor([[c[key] for c in r["curve"]] for r in runs], dtype=torch.float64)
    W = torch.tensor([[c["wall_time"] for c in r["curve"]] for r in runs], dtype=torch.float64)
    return torch.tensor(q, dtype=torch.float64), M, W


def queries_to_reach(q: torch.Tensor, curve: torch.Tensor, level: float) -> float:
    """First query count at which the (mean) curve reaches ``level``, linearly interpolated between
    evaluations; inf if never."""
    above = (curve >= level).nonzero()
    if above.numel() == 0:
        return math.inf
    i = int(above[0])
    if i == 0:
        return float(q[0])
    f = (level - curve[i - 1]) / (curve[i] - curve[i - 1])
    return float(q[i - 1] + f * (q[i] - q[i - 1]))


def summarise_compare(data: dict, key: str = "reward_a") -> dict:
    """Per method: mean and std over seeds of ``key`` at the end of the budget, the area under the
    mean curve per query (normalised by the budget), the queries needed to reach half of the best
    method's final gain over the pre-trained model, and the training wall time."""
    summ = {}
    finals = {}
    r0 = None
    for label, runs in data["runs"].items():
        q, M, W = _curve_matrix(runs, key)
        r0 = float(M[:, 0].mean()) if r0 is None else r0
        finals[label] = float(M[:, -1].mean())
    best = max(finals.values())
    half = r0 + 0.5 * (best - r0)
    for label, runs in data["runs"].items():
        q, M, W = _curve_matrix(runs, key)
        mean = M.mean(0)
        auc = float(torch.trapezoid(mean - r0, q) / (q[-1] - q[0])) if q.numel() > 1 else 0.0
        summ[label] = dict(final_mean=float(M[:, -1].mean()), final_std=float(M[:, -1].std()) if M.shape[0] > 1 else 0.0,
                           gain_auc=auc, queries_to_half_best_gain=queries_to_reach(q, mean, half),
                           wall_time_s=float(W[:, -1].mean()), queries=float(q[-1]))
    return {"key": key, "pretrained": r0, "half_level": half, "methods": summ}


def speedup(data: dict, fast: str, slow: str, key: str = "reward_a", fractions=(0.25, 0.5, 0.75),
            axis: str = "queries") -> dict:
    """How many times fewer reward queries (``axis='queries'``), optimisation steps (``'steps'``) or
    seconds of training (``'wall_time'``) method ``fast`` needs than method ``slow`` to reach the levels
    r0 + f (final_slow - r0), f in ``fractions``, where r0 is the pre-trained value and final_slow the
    mean final value of ``slow``. Ratios > 1 mean ``fast`` is faster. Computed on the mean curves over
    seeds (``ratio``) and seed by seed (``per_seed``, seed i of one against seed i of the other; inf or
    nan when a seed never reaches the level)."""
    if axis not in ("queries", "steps", "updates", "wall_time"):
        raise ValueError(f"axis: use 'queries', 'steps', 'updates' or 'wall_time', got {axis!r}")
    runs_f, runs_s = data["runs"][fast], data["runs"][slow]

    def xs(runs):
        if axis == "wall_time":
            return torch.tensor([[c["wall_time"] for c in r["curve"]] for r in runs], dtype=torch.float64)
        col = {"queries": "queries", "steps": "step", "updates": "updates"}[axis]
        return torch.tensor([[c[col] for c in r["curve"]] for r in runs], dtype=torch.float64)

    Yf = torch.tensor([[c[key] for c in r["curve"]] for r in runs_f], dtype=torch.float64)
    Ys = torch.tensor([[c[key] for c in r["curve"]] for r in runs_s], dtype=torch.float64)
    Xf, Xs = xs(runs_f), xs(runs_s)
    r0 = float(torch.cat([Yf[:, 0], Ys[:, 0]]).mean())
    final_s = float(Ys[:, -1].mean())
    out = {"fast": fast, "slow": slow, "key": key, "axis": axis, "r0": r0, "final_slow": final_s, "levels": []}
    for f in fractions:
        lvl = r0 + f * (final_s - r0)
        qf = queries_to_reach(Xf.mean(0), Yf.mean(0), lvl)
        qs = queries_to_reach(Xs.mean(0), Ys.mean(0), lvl)
        per = []
        for i in range(min(len(runs_f), len(runs_s))):
            a, b = queries_to_reach(Xf[i], Yf[i], lvl), queries_to_reach(Xs[i], Ys[i], lvl)
            per.append(b / a if a > 0 and math.isfinite(a) else (math.inf if a == 0 else math.nan))
        out["levels"].append(dict(fraction=f, level=lvl, fast=qf, slow=qs,
                                  ratio=(qs / qf) if qf > 0 and math.isfinite(qf) else math.nan, per_seed=per))
    return out


def claims(data: dict) -> dict:
    """The comparisons of the method comparison, from a ``compare`` result:
    truncation vs the whole chain (DRaFT-K against DRaFT, per query); DRaFT-LV against DRaFT-1 (per query,
    per step and per second); gradient methods against DDPO on DDPO's own (threshold) reward, per query:
    the levels are fractions of DDPO's final gain, so the ratio says how many times fewer queries the
    gradient method needs to get as far as DDPO does on the whole budget."""
    labels = set(data["runs"])
    out = {"truncation_vs_full": {}, "lv_vs_1": {}, "gradient_vs_ddpo": {}}
    if "DRaFT" in labels:
        for lab in sorted(labels):
            if lab.startswith("DRaFT-") and lab != "DRaFT-LV":
                out["truncation_vs_full"][lab] = speedup(data, lab, "DRaFT")
    if {"DRaFT-LV", "DRaFT-1"} <= labels:
        for ax in ("queries", "steps", "wall_time"):
            out["lv_vs_1"][ax] = speedup(data, "DRaFT-LV", "DRaFT-1", axis=ax)
    if "DDPO" in labels:
        grad = sorted(lab for lab in labels if not lab.startswith("DDPO"))
        for ax in ("queries", "updates", "wall_time"):
            out["gradient_vs_ddpo"][ax] = {lab: speedup(data, lab, "DDPO", key="reward_a_threshold", axis=ax)
                                           for lab in grad + sorted(labels - set(grad) - {"DDPO"})}
        if "DDPO-1upd" in labels:  # one optimiser update per batch, like the gradient methods
            out["gradient_vs_ddpo_1upd"] = {lab: speedup(data, lab, "DDPO-1upd", key="reward_a_threshold")
                                            for lab in grad}
    return out


def step_costs(methods=None, train: TrainConfig = TrainConfig(), steps: int = 25,
               pretrain: PretrainConfig = PretrainConfig()) -> dict:
    """Median (and minimum) wall time of one optimisation step of each method, from the engine's history
    of a short run without evaluations: a per-second comparison that a shared CPU disturbs less than the
    cumulative wall clock of ``compare`` (medians ignore bursts of contention)."""
    import statistics

    from .configs import METHODS

    methods = METHODS if methods is None else methods
    out = {}
    for m in methods:
        tr = replace(train, budget=steps * queries_per_step(m, train.batch_size), eval_every=10**9, n_eval=64)
        _, d = train_method(m, 0, tr, pretrain, evaluate_every=False)
        w = [r["wall_time"] for r in d["history"]]
        dt = [b - a for a, b in zip(w, w[1:])]
        out[m.label] = dict(median_s=statistics.median(dt), min_s=min(dt), queries_per_step=d["queries_per_step"],
                            updates_per_step=d["updates_per_step"])
    return out


def sensitivity(lrs=(3e-4, 1e-3, 3e-3), batch_sizes=(8, 32), seeds=(0, 1), budget: int = 2560,
                labels=("DRaFT", "DRaFT-1", "DRaFT-LV", "ReFL", "DDPO", "DDPO-1upd")) -> dict:
    """The comparison of ``compare`` repeated over learning rates and batch sizes (same budget of reward
    queries, evaluations every 4 optimisation steps), to see whether the conclusions of the comparison depend
    on the one learning rate of ``METHODS``. Returns {"lr=..,B=..": claims(...)} plus the final values."""
    from .configs import METHODS

    methods = [m for m in METHODS if m.label in labels]
    out = {}
    for lr in lrs:
        for bs in batch_sizes:
            cfg = CompareConfig(methods=tuple(replace(m, lr=lr) for m in methods), seeds=tuple(seeds),
                                train=replace(TrainConfig(), batch_size=bs, budget=budget, eval_every=4 * bs,
                                              n_eval=512))
            data = compare(cfg)
            out[f"lr={lr:g},B={bs}"] = {"claims": claims(data), "summary_reward_a": summarise_compare(data),
                                       "summary_threshold": summarise_compare(data, "reward_a_threshold")}
    return out


# ----------------------------------------------------------------------------- 2. gradients against K


def _lora_named(model: nn.Module):
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n]


def grad_vs_k(cfg: GradKConfig = GradKConfig()) -> dict:
    """For each seed: a steered model with LoRA B ~ N(0, lora_init^2) (A as peft initialises it), one
    batch of x_T and noise, and for each K the gradient of the mean reward A of the final samples with
    respect to all LoRA parameters, back-propagated through the last K steps only (DRaFT-K, the
    solver's ``grad_steps``). Returns the norms and the cosine to the K = 1 gradient (same noise)."""
    sch, ts = toy.schedule(cfg.pretrain), toy.grid(cfg.pretrain)
    n = ts.numel() - 1
    if any(not 1 <= k <= n for k in cfg.ks):
        raise ValueError(f"ks: every K must be in [1, {n}], got {cfg.ks}")
    reward = make_reward("a", cfg.rewards)
    ks = sorted(set(cfg.ks) | {1})
    norms = {k: [] for k in ks}
    cosines = {k: [] for k in ks}
    for seed in cfg.seeds:
        torch.manual_seed(seed)
        model = steered(cfg.pretrain, cfg.lora_rank)
        with torch.no_grad():
            for name, p in _lora_named(model):
                if "lora_B" in name:
                    p.normal_(0.0, cfg.lora_init)
        params = [p for _, p in _lora_named(model)]
        x_T, noise = fixed_noise(cfg.batch_size, n, 1000 + seed)
        grads = {}
        for k in ks:
            traj = sample(model, sch, x_T, ts, method="ddim", eta=cfg.eta, noise=noise, grad_steps=k)
            g = torch.autograd.grad(reward(traj.x0).mean(), params)
            grads[k] = torch.cat([gi.flatten() for gi in g]).double()
        for k in ks:
            norms[k].append(float(grads[k].norm()))
            cosines[k].append(float(grads[k] @ grads[1] / (grads[k].norm() * grads[1].norm())))
    return {"config": asdict(cfg), "ks": ks, "grad_norm": [norms[k] for k in ks],
            "cos_to_k1": [cosines[k] for k in ks],
            "angle_deg": [[math.degrees(math.acos(max(-1.0, min(1.0, c)))) for c in cosines[k]] for k in ks]}


# ----------------------------------------------------------------------------- 3. LoRA


class LoraWindow(nn.Module):
    """An eps model that uses the fine-tuned model for steps in a window of the sampling grid and the
    pre-trained (``reference``) model elsewhere (DRaFT section 5.2, figs. 26-27): with ``first=True``
    the fine-tuned eps on the first ``m`` steps (times t > ts[m]), else on the last ``m`` steps
    (t <= ts[n - m]). It switches by the time passed in, so ``theory.solvers.sample`` runs it unchanged."""

    def __init__(self, finetuned: nn.Module, reference, ts: torch.Tensor, m: int, first: bool):
        super().__init__()
        n = ts.numel() - 1
        if not 0 <= m <= n:
            raise ValueError(f"m: number of LoRA steps must be in [0, {n}], got {m}")
        self.finetuned, self.reference, self.first = finetuned, reference, first
        self.threshold = float(ts[m]) if first else float(ts[n - m])
        self.m = m

    def forward(self, x, t, cond=None):
        t32 = torch.as_tensor(t, dtype=torch.float64)
        thr = torch.tensor(self.threshold, dtype=torch.float64).to(torch.as_tensor(t).dtype).double()
        on = (t32 > thr) if self.first else (t32 <= thr)
        if self.m == 0 or not bool(on.any()):
            return self.reference(x, t, cond)
        if bool(on.all()):
            return self.finetuned(x, t, cond)
        on = on.to(x.device).view(-1, *([1] * (x.ndim - 1)))
        return torch.where(on, self.finetuned(x, t, cond), self.reference(x, t, cond))


class MergedLora(nn.Module):
    """eps model of the pre-trained MLP whose Linear weights are W + sum_i c_i * scaling_i * B_i A_i
    (the LoRA deltas of several fine-tunes summed into the weights; DRaFT sec. 5.1, 'mixing LoRA')."""

    def __init__(self, base: nn.Module, adapters: list[tuple[dict, float]]):
        super().__init__()
        self.net = copy.deepcopy(base)
        with torch.no_grad():
            for deltas, c in adapters:
                for name, d in deltas.items():
                    self.net.get_submodule(name).weight.add_(c * d)

    def forward(self, x, t, cond=None):
        return self.net(x, t, cond)


def with_adapters(models: dict, pretrain: PretrainConfig = PretrainConfig(), rank: int = 4) -> nn.Module:
    """One copy of the pre-trained MLP holding the trained 'default' adapter of each steered model in
    ``models`` under its key (``theory.lora.add_lora`` + ``lora_state_dict``), to be combined with
    ``theory.lora.set_active_adapters`` (peft sums the active adapters' deltas)."""
    from theory.lora import add_lora, lora_state_dict, set_active_adapters

    net = copy.deepcopy(toy.pretrained(pretrain))
    for name, m in models.items():
        add_lora(net, rank=rank, adapter_name=name)
        src = {_base_path(k): v for k, v in lora_state_dict(m, "default").items()}
        with torch.no_grad():
            for k, p in net.named_parameters():
                if "lora_" in k and f".{name}." in k:
                    p.copy_(src[_base_path(k.replace(f".{name}.", "."))])
    for p in net.parameters():
        p.requires_grad_(False)
    set_active_adapters(net, {name: 1.0 for name in models})
    return net.eval()


def lora_deltas(model: nn.Module) -> dict:
    """{path of the Linear inside the pre-trained MLP: scaling * B @ A} of a steered model's active
    adapter (peft LoraLayer attributes)."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "lora_B") and hasattr(mod, "scaling"):
            for ad in mod.lora_A.keys():
                d = mod.scaling[ad] * (mod.lora_B[ad].weight @ mod.lora_A[ad].weight)
                out[_base_path(name)] = out.get(_base_path(name), 0) + d.detach().clone()
    return out


def _base_path(name: str) -> str:
    """'base.net.0' or 'base.base_model.model.net.0' -> 'net.0' (the path inside EpsMLP)."""
    i = name.find("net.")
    if i < 0:
        raise ValueError(f"name: cannot locate the MLP layer in module path {name!r}")
    return name[i:]


def lora_analysis(cfg: LoraConfig = LoraConfig()) -> dict:
    """Train one adapter on reward A and one on reward B (same method and seed), then measure
    (1) reward A and path KL of the A model with its LoRA delta scaled by s in ``cfg.scales``
        (``theory.lora.set_lora_scale``; s = 0 is the pre-trained model),
    (2) rewards A, B and A + B of the pre-trained model, of A, of B and of the summed adapters
        A + B (and 0.5 A + 0.5 B): both adapters in one model, active together with those scales
        (``theory.lora.set_active_adapters``; the test checks it against ``MergedLora``),
    (3) reward A when the A model is used only on the first or the last m sampling steps.
    """
    from theory.lora import set_lora_scale

    ma, da = train_method(replace(cfg.method, reward="a"), cfg.seed, cfg.train, cfg.pretrain, cfg.rewards, False)
    mb, db = train_method(replace(cfg.method, reward="b"), cfg.seed, cfg.train, cfg.pretrain, cfg.rewards, False)
    ma.eval(), mb.eval()
    ref = ma.reference
    ev = dict(reference=ref, n=cfg.train.n_eval, eta=cfg.train.eta, pretrain=cfg.pretrain, rewards=cfg.rewards)
    out = {"config": asdict(cfg), "train_a": da["curve"], "train_b": db["curve"]}

    scale_rows = []
    for s in cfg.scales:
        set_lora_scale(ma, float(s))
        scale_rows.append(dict(scale=float(s), **evaluate(ma, **ev)))
    set_lora_scale(ma, 1.0)
    out["scale"] = scale_rows

    from theory.lora import set_active_adapters

    both = with_adapters({"A": ma, "B": mb}, cfg.pretrain, cfg.train.lora_rank)
    combos = {"pre-trained": {"A": 0.0, "B": 0.0}, "A": {"A": 1.0}, "B": {"B": 1.0}, "A+B": {"A": 1.0, "B": 1.0},
              "0.5A+0.5B": {"A": 0.5, "B": 0.5}}
    out["combine"] = {}
    for name, scales in combos.items():
        set_active_adapters(both, scales)
        row = evaluate(both, keep_samples=True, **ev)
        row["samples"] = row["samples"][:400].tolist()
        out["combine"][name] = row

    ts = toy.grid(cfg.pretrain)
    out["window"] = {"first": [], "last": []}
    for first in (True, False):
        for m in cfg.switch_steps:
            row = evaluate(LoraWindow(ma, ref, ts, m, first), **ev)
            out["window"]["first" if first else "last"].append(dict(m=m, **row))
    return out


def diversity(cfg: DiversityConfig = DiversityConfig()) -> dict:
    """Reward A, spread, mode coverage and path KL over a long run of each method in ``cfg.variants``
    (KL weight ``lam``, DRaFT+ ``eps_penalty``), with the final samples; for lam > 0 also the exact
    KL-regularised optimum of that lam (``metrics.kl_regularised_optimum``)."""
    out = {"config": asdict(cfg), "runs": {}, "optimum": {}}
    for m in cfg.variants:
        model, data = train_method(m, cfg.seed, cfg.train, cfg.pretrain, cfg.rewards)
        model.eval()
        fin = evaluate(model, reference=model.reference, n=cfg.train.n_eval, eta=cfg.train.eta,
                       pretrain=cfg.pretrain, rewards=cfg.rewards, keep_samples=True)
        data["final_samples"] = fin["samples"][:400].tolist()
        data["history"] = data["history"][-1:]  # the per-step records are not drawn; keep the JSON small
        out["runs"][m.label] = data
        if m.lam > 0 and m.label not in out["optimum"]:
            opt = kl_regularised_optimum(m.lam, m.reward, cfg.pretrain, cfg.rewards)
            opt.pop("law")
            out["optimum"][m.label] = opt
    return out
