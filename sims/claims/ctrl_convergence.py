"""Has CTRL converged on the 2-D toy? Learning curves and one-factor sweeps of CTRL against DPS and
classifier guidance, on the budget axes reward queries and wall time (issue: "CTRL is less accurate than DPS").

Setting: the CTRL toy's 'component' label (``sims.ctrl_toy``), gamma = 1, the calibrated clean classifier
p_phi(y | x0) of the toy's offline set (seed 0, the classifier of ``ctrl_toy_table``), shared by CTRL
(its reward, docs/theory.md (6.9)) and DPS (6.2); classifier guidance (6.1) uses the toy's noisy
classifier of the same pairs. Every method samples with ``theory.solvers.sample`` (DDIM eta = 1, the toy's
evaluation grid) and is scored by the grid-histogram KL to the exact target p(y | x)^gamma p(x)
(``sims.grid2d``) and the component accuracy under the true p(y | x), both averaged over the labels.

Two references below every method:

- the exact floor: the same estimator on exact target samples (the value of a perfect sampler);
- CTRL's own optimum with this classifier: by Theorem 1 (docs/theory.md §6.5, started from the tilted
  initial law; the bias (4.10) is negligible at alpha(1) ~ 0.007) the optimum of (4.6) with reward (6.9)
  samples p_phi(y | x)^gamma p(x), which is not the target when p_phi is not p. We sample that law exactly on
  the grid and score it like the methods; ``grid_target_kl`` gives its exact (grid) KL to the target.

Budgets (counted the same way for every method): a reward query is one evaluation of a classifier on a
sample (with its gradient for DPS, classifier guidance and CTRL's DRaFT gradient); CTRL spends
steps x batch of them in training and none at sampling; DPS and classifier guidance spend one per sample and
sampler step. Wall time: CTRL's training time (evaluations excluded) plus its sampling time; DPS's and
classifier guidance's sampling time for the same evaluation set.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch

from sims.ctrl_toy import data
from sims.ctrl_toy.configs import CompareConfig, CTRLConfig
from sims.ctrl_toy.experiments import evaluate, prepare
from sims.ctrl_toy.methods import AugmentedEps, ClassifierReward, draw, train_ctrl
from theory.guidance import classifier_guidance, dps_guidance
from theory.progress import report
from theory.registry import figure
from theory.verdicts import Z, condition_word, mean_se, side, word

__all__ = ["ConvConfig", "quick_config", "grid_target_kl", "optimal_objective", "references", "run_guided", "run_ctrl_curve", "run", "summarise", "verdicts",
           "VARIANTS", "draw_figure", "fig_ctrl_convergence"]

#: one-factor sweeps: (name, ((CTRLConfig field, value), ...)); every other field at its default.
VARIANTS = (
    ("hidden 256", (("hidden", 256),)),
    ("sampler steps 50", (("n_steps", 50),)),
    ("truncated k = 5", (("k", 5),)),
    ("lr 1e-3", (("lr", 1e-3),)),
    ("lr 1e-2", (("lr", 1e-2),)),
)


@dataclass(frozen=True)
class ConvConfig:
    """``base``: the toy's settings (CTRL defaults in ``base.ctrl``: hidden 64, depth 2, batch 128, 25
    sampler steps, lr 3e-3, no truncation); ``curve_steps``: the default settings' learning curve length;
    ``sweep_steps``: each variant's length; ``evals``: optimisation steps at which the KL is measured
    (plus the step at which CTRL's training queries equal DPS's for the evaluation set); ``n_eval``:
    samples per label at every evaluation; ``dps_zetas``: DPS strengths (the best by mean KL is kept:
    tuned on the target, which favours DPS)."""

    base: CompareConfig = CompareConfig(labels=("component",))
    seeds: tuple = (0, 1, 2)
    curve_steps: int = 1600
    sweep_steps: int = 800
    evals: tuple = (100, 200, 400, 800, 1200, 1600)
    variants: tuple = VARIANTS
    n_eval: int = 1000
    dps_zetas: tuple = (0.25, 0.35, 0.5, 0.7, 1.0)
    default_steps: int = 400  # the budget of ctrl_toy_table (CTRLConfig().steps)

    def __post_init__(self):
        if not self.seeds:
            raise ValueError("seeds: give at least one seed (3 for a standard error)")
        if self.curve_steps < 1 or self.sweep_steps < 1:
            raise ValueError(f"curve_steps, sweep_steps: must be >= 1, got {self.curve_steps}, {self.sweep_steps}")
        bad = [s for s in self.evals if not 1 <= s <= self.curve_steps]
        if bad:
            raise ValueError(f"evals: evaluation steps must lie in [1, curve_steps={self.curve_steps}], got {bad}")
        if self.n_eval < 2:
            raise ValueError(f"n_eval: need >= 2 samples per label, got {self.n_eval}")
        fields = set(CTRLConfig.__dataclass_fields__)
        for name, kv in self.variants:
            for k, _ in kv:
                if k not in fields:
                    raise ValueError(f"variants: {name!r} sets unknown CTRLConfig field {k!r} (one of {sorted(fields)})")


def quick_config() -> ConvConfig:
    """Reduced settings for ``diffsteer figures --quick`` (<= 60 s on one idle thread)."""
    return ConvConfig(curve_steps=150, sweep_steps=75, evals=(50, 100, 150), n_eval=500, default_steps=150,
                      variants=(("sampler steps 50", (("n_steps", 50),)),), dps_zetas=(0.5,))


# --- exact references --------------------------------------------------------------------------------

def grid_target_kl(log_r_p, log_r_q, gamma: float, toy) -> float:
    """KL(p || q) between two tilts of the toy's law on its grid: p ∝ exp(gamma log_r_p(x)) p(x), q likewise
    (docs/theory.md (4.1) with r = log p(y | x), lam = 1/gamma; normalised on the grid, (5.10)):
    KL = sum_grid p (log p - log q) du^2. ``log_r_*(pts (P, 2) float64) -> (P,)``."""
    u, p = data.exact_target(log_r_p, gamma, toy)
    _, q = data.exact_target(log_r_q, gamma, toy)
    du = float(u[1] - u[0])
    m = p > 0
    return float((p[m] * (p[m].log() - q[m].clamp(min=1e-300).log())).sum() * du**2)


def _clf_log_lik(clf, c):
    def f(p):
        return clf.log_lik(p.float(), torch.full((p.shape[0],), c, dtype=torch.long)).double()

    return f


def _true_log_lik(lab, c):
    return lambda p: lab.log_prob(p)[:, c]


def references(cfg: ConvConfig, prep: dict, seed: int) -> dict:
    """The exact floor and CTRL's optimum with this classifier (exact samples of p_phi^gamma p), scored like
    the methods on n_eval samples per label; plus the grid KL of that optimum to the target."""
    lab, clf, toy, gamma, K = prep["label"], prep["clf"], cfg.base.toy, cfg.base.ctrl.gamma, prep["label"].n_classes
    g = torch.Generator().manual_seed(50_000 + seed)
    exact, opt = {}, {}
    for c in range(K):
        u, d = data.exact_target(_true_log_lik(lab, c), gamma, toy)
        exact[c] = data.sample_target(u, d, cfg.n_eval, g)
        u, d = data.exact_target(_clf_log_lik(clf, c), gamma, toy)
        opt[c] = data.sample_target(u, d, cfg.n_eval, g)
    out = {"exact floor": _score(evaluate(exact, lab, gamma, cfg.base)),
           "CTRL optimum (this classifier)": _score(evaluate(opt, lab, gamma, cfg.base))}
    out["CTRL optimum (this classifier)"]["grid_kl"] = float(np.mean(
        [grid_target_kl(_clf_log_lik(clf, c), _true_log_lik(lab, c), gamma, toy) for c in range(K)]))
    out["CTRL optimum (this classifier)"]["objective"] = optimal_objective(clf, gamma, toy, K)
    return out


def optimal_objective(clf, gamma: float, toy, K: int) -> float:
    """The optimum of CTRL's objective (4.6) with reward (6.9), divided by gamma as the engine does
    (lam = 1/gamma): J* = E_y[lam log Z_y], Z_y = E_{p}[p_phi(y | X)^gamma] (docs/theory.md §4: J(u) =
    lam log Z - lam KL(P^u || P*)), labels uniform over the K classes as in training, p the data law on the
    grid. A run's J = mean reward - lam path KL is below J* by lam KL(P^u || P*) (up to the pre-trained
    model's and the grid's errors), which bounds the KL of its samples to CTRL's optimum."""
    u = torch.linspace(-toy.grid_lim, toy.grid_lim, toy.grid_n, dtype=torch.float64)
    X, Y = torch.meshgrid(u, u, indexing="xy")
    pts = torch.stack([X.flatten(), Y.flatten()], 1)
    logp = data.law(toy).log_prob(pts, 0.0)
    du = float(u[1] - u[0])
    lam = 1.0 / gamma
    out = []
    for c in range(K):
        lz = torch.logsumexp(logp + gamma * _clf_log_lik(clf, c)(pts), 0) + math.log(du**2)
        out.append(lam * float(lz))
    return float(np.mean(out))


def _score(e: dict) -> dict:
    return {"kl": float(e["kl"]), "accuracy": float(e["accuracy"])}


# --- the methods ---------------------------------------------------------------------------------------

def _eval_seed(seed: int, j: int, c: int) -> int:
    return 100_000 * (seed + 1) + 100 * j + c


def _sample_all(model, K, n, seed, j, toy, guidance_for=None):
    t0 = time.perf_counter()
    xs = {}
    for c in range(K):
        g = guidance_for(c) if guidance_for is not None else None
        xs[c] = draw(model, None if g is not None else c, n, _eval_seed(seed, j, c), toy, guidance=g)
    return xs, time.perf_counter() - t0


def run_guided(cfg: ConvConfig, prep: dict, seed: int) -> dict:
    """DPS at each zeta and classifier guidance, n_eval samples per label (eval noise ``seed``): scores,
    sampling wall time and reward queries (n_eval x labels x sampler steps)."""
    toy, gamma, n = cfg.base.toy, cfg.base.ctrl.gamma, cfg.n_eval
    lab, K = prep["label"], prep["label"].n_classes
    base, sch = data.pretrained_mlp(toy), data.schedule(toy)
    queries = n * K * toy.n_steps
    out = {}
    for z in cfg.dps_zetas:
        xs, wall = _sample_all(base, K, n, seed, 1, toy, lambda c, z=z: dps_guidance(
            base, sch, prep["clf"].log_lik, torch.full((n,), c), z))
        out[f"DPS zeta {z:g}"] = dict(_score(evaluate(xs, lab, gamma, cfg.base)), wall_s=wall, queries=queries)
    xs, wall = _sample_all(base, K, n, seed, 2, toy, lambda c: classifier_guidance(
        prep["noisy"], torch.full((n,), c), gamma))
    out["classifier guidance"] = dict(_score(evaluate(xs, lab, gamma, cfg.base)), wall_s=wall, queries=queries)
    return out


def run_ctrl_curve(cfg: ConvConfig, prep: dict, ctrl: CTRLConfig, steps: int, eval_steps, seed: int) -> dict:
    """Train CTRL (``sims.ctrl_toy.methods.train_ctrl``, the engine's ``finetune``) for ``steps`` with
    CTRLConfig ``ctrl`` (seed ``seed``), measuring at each of ``eval_steps`` the KL / accuracy of n_eval
    samples per label (fresh evaluation noise), the training reward queries so far and the training wall
    time so far (evaluation excluded). Returns the curve as lists."""
    toy, gamma = cfg.base.toy, ctrl.gamma
    lab, K = prep["label"], prep["label"].n_classes
    torch.manual_seed(seed)
    model = AugmentedEps(data.pretrained_mlp(toy), K, hidden=ctrl.hidden)
    at = sorted({int(s) for s in eval_steps if 1 <= s <= steps} | {steps})
    curve = {k: [] for k in ("step", "queries", "train_wall_s", "kl", "accuracy", "sample_wall_s", "reward_mean",
                             "path_kl", "grad_norm", "objective")}
    spent = [0.0]
    win = []

    def cb(step, row):
        win.append((row["reward_mean"], row["kl"], row["grad_norm"]))
        if step not in at:
            return
        t0 = time.perf_counter()
        xs, ws = _sample_all(model, K, cfg.n_eval, seed, 10 + len(curve["step"]), toy)
        sc = _score(evaluate(xs, lab, gamma, cfg.base))
        w = np.array(win[-50:])
        for k, v in (("step", step), ("queries", int(row["reward_queries_total"])),
                     ("train_wall_s", row["wall_time"] - spent[0]), ("kl", sc["kl"]), ("accuracy", sc["accuracy"]),
                     ("sample_wall_s", ws), ("reward_mean", float(w[:, 0].mean())), ("path_kl", float(w[:, 1].mean())),
                     ("grad_norm", float(w[:, 2].mean())),
                     ("objective", float((w[:, 0] - w[:, 1] / gamma).mean()))):
            curve[k].append(v)
        spent[0] += time.perf_counter() - t0

    train_ctrl(model, ClassifierReward(prep["clf"]), replace(ctrl, steps=steps, seed=seed), toy, callback=cb)
    return curve


def run(cfg: ConvConfig, progress=None) -> dict:
    """Every run: references and guided methods per seed, the default learning curve per seed (to
    ``curve_steps``), each variant per seed (to ``sweep_steps``). ``progress(i, n)``."""
    t_all = time.perf_counter()
    b = cfg.base
    prep = prepare(b, "component", b.n_offline, b.seed, with_cfg=False)
    K = prep["label"].n_classes
    eq_steps = cfg.n_eval * K * b.toy.n_steps // b.ctrl.batch_size  # CTRL's training queries = DPS's
    evals = sorted(set(cfg.evals) | {cfg.default_steps} | ({eq_steps} if eq_steps <= cfg.curve_steps else set()))
    n_tasks = len(cfg.seeds) * (2 + len(cfg.variants))
    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, n_tasks)

    refs, guided, curves = {}, {}, {"default": {}}
    for v, _ in cfg.variants:
        curves[v] = {}
    for s in cfg.seeds:
        refs[s] = references(cfg, prep, s)
        guided[s] = run_guided(cfg, prep, s)
        tick()
        curves["default"][s] = run_ctrl_curve(cfg, prep, b.ctrl, cfg.curve_steps, evals, s)
        tick()
    for name, kv in cfg.variants:
        for s in cfg.seeds:
            curves[name][s] = run_ctrl_curve(cfg, prep, replace(b.ctrl, **dict(kv)), cfg.sweep_steps, evals, s)
            tick()
    return dict(references=refs, guided=guided, curves=curves, eq_steps=eq_steps, evals=evals,
                n_samples=cfg.n_eval * K, ece=prep["ece"], wall_s=time.perf_counter() - t_all)


# --- summaries and verdicts ----------------------------------------------------------------------------

def _ms(xs) -> dict:
    """Mean, standard error over seeds (``theory.verdicts.mean_se``) and the number of seeds."""
    m, s, n = mean_se(xs)
    return {"mean": m, "se": s, "n": n}


def _by_seed(d: dict) -> list:
    """Values of a {seed: x} dict in seed order (JSON keys are strings)."""
    return [d[k] for k in sorted(d, key=lambda k: int(k))]


def _at(curve: dict, step: int, key: str):
    """The curve's value at the last evaluation at or before ``step`` (None if there is none)."""
    i = [j for j, s in enumerate(curve["step"]) if s <= step]
    return curve[key][i[-1]] if i else None


def summarise(res: dict, cfg: ConvConfig) -> dict:
    """Means and standard errors over seeds: references, the best DPS zeta (by mean KL), classifier
    guidance, CTRL at the default budget, at equal reward queries to DPS, at the end of its curve, and each
    variant at the end of its sweep; paired differences CTRL - DPS with their se."""
    refs, guided, curves = res["references"], res["guided"], res["curves"]
    seeds = sorted(refs, key=lambda k: int(k))
    S = {}
    for name in ("exact floor", "CTRL optimum (this classifier)"):
        S[name] = {m: _ms([refs[s][name][m] for s in seeds]) for m in ("kl", "accuracy")}
    for k in ("grid_kl", "objective"):
        S["CTRL optimum (this classifier)"][k] = float(refs[seeds[0]]["CTRL optimum (this classifier)"][k])
    dps_names = [k for k in guided[seeds[0]] if k.startswith("DPS")]
    best = min(dps_names, key=lambda k: np.mean([guided[s][k]["kl"] for s in seeds]))
    for name, key in (("DPS", best), ("classifier guidance", "classifier guidance")):
        S[name] = {m: _ms([guided[s][key][m] for s in seeds]) for m in ("kl", "accuracy", "wall_s")}
        S[name]["queries"] = guided[seeds[0]][key]["queries"]
    S["DPS"]["zeta"] = best
    S["DPS sweep"] = {k: {m: _ms([guided[s][k][m] for s in seeds]) for m in ("kl", "accuracy")} for k in dps_names}

    def ctrl_at(curve_name, step):
        cs = curves[curve_name]
        row = {m: _ms([_at(cs[s], step, m) for s in seeds]) for m in ("kl", "accuracy", "queries", "train_wall_s",
                                                                         "sample_wall_s")}
        row["step"] = int(_at(cs[seeds[0]], step, "step"))
        # J* - J = lam KL(P^u || P*) (docs/theory.md §4): the run's path-level distance to CTRL's optimum
        row["objective_gap"] = _ms([refs[s]["CTRL optimum (this classifier)"]["objective"] - _at(cs[s], step, "objective")
                                   for s in seeds])
        row["d_kl_vs_dps"] = _ms([_at(cs[s], step, "kl") - guided[s][best]["kl"] for s in seeds])
        row["d_acc_vs_dps"] = _ms([_at(cs[s], step, "accuracy") - guided[s][best]["accuracy"] for s in seeds])
        row["d_kl_vs_optimum"] = _ms([_at(cs[s], step, "kl") - refs[s]["CTRL optimum (this classifier)"]["kl"]
                                     for s in seeds])
        return row

    n_curve = max(curves["default"][seeds[0]]["step"])
    S["CTRL default budget"] = ctrl_at("default", cfg.default_steps)
    S["CTRL equal queries"] = ctrl_at("default", res["eq_steps"]) if res["eq_steps"] <= n_curve else None
    S["CTRL end of curve"] = ctrl_at("default", n_curve)
    # plateau: the change of KL over the curve's last doubling of steps (paired over seeds)
    half = [s for s in curves["default"][seeds[0]]["step"] if s <= n_curve // 2]
    if half:
        S["plateau"] = {"from_step": half[-1], "to_step": n_curve, "d_kl": _ms(
            [_at(curves["default"][s], n_curve, "kl") - _at(curves["default"][s], half[-1], "kl") for s in seeds])}
    sweep_end = {}
    for name in curves:
        if name == "default":
            continue
        end = max(curves[name][seeds[0]]["step"])
        sweep_end[name] = ctrl_at(name, end)
    if sweep_end:
        end = max(curves[next(iter(sweep_end))][seeds[0]]["step"])
        sweep_end["default"] = ctrl_at("default", end)
    S["sweep end"] = sweep_end
    # equal wall time: CTRL pays its training once and a per-sample sampling cost; DPS a per-sample cost.
    # N* = samples beyond which CTRL's total is the smaller (inf: never), per seed
    n_set = res["n_samples"]
    for name in ("CTRL default budget", "CTRL equal queries", "CTRL end of curve"):
        if S.get(name) is None:
            continue
        step = S[name]["step"]
        cs = curves["default"]
        per_dps = [guided[s][best]["wall_s"] / n_set for s in seeds]
        per_ctrl = [_at(cs[s], step, "sample_wall_s") / n_set for s in seeds]
        fixed = [_at(cs[s], step, "train_wall_s") for s in seeds]
        S[name]["break_even_samples_wall"] = [f / (d - c) if d > c else float("inf")
                                              for f, d, c in zip(fixed, per_dps, per_ctrl)]
        S[name]["break_even_samples_queries"] = S[name]["queries"]["mean"] / S["DPS"]["queries"] * n_set
    return S


def _fmt(ms: dict, digits: int = 3) -> str:
    return f"{ms['mean']:.{digits}f} +- {ms['se']:.{digits}f}"


#: ``_side``'s three values as words
_REL = {True: "above", False: "below", None: "within 2 se of"}


def _side(d: dict, k: float = Z) -> Optional[bool]:
    """``theory.verdicts.side`` of a stored {mean, se}: True / False when the mean is more than k standard
    errors above / below 0, None otherwise (also without a finite mean and se)."""
    if not (math.isfinite(d["mean"]) and math.isfinite(d["se"])):
        return None
    return side(d["mean"], d["se"], k)


#: how the verdicts decide (appended to each verdict string)
CRITERION = f" (criterion: KL differences to DPS's, paired over the seeds, beyond {Z:g} se)"
#: the same for the directional claims (CTRL's KL above DPS's), which read "not resolved" within Z se
CRITERION_SIDE = CRITERION[:-1] + f"; not resolved when within {Z:g} se either way)"


def _converged(S: dict) -> tuple:
    """The best CTRL run at the end of its budget (by mean KL): the default curve's end or a variant's."""
    cands = {"default settings, end of curve": S["CTRL end of curve"]}
    cands.update({f"{k}, end of sweep": v for k, v in S["sweep end"].items() if k != "default"})
    name = min(cands, key=lambda k: cands[k]["kl"]["mean"])
    return name, cands[name]


def verdicts(data: dict) -> list:
    """The claims' verdicts from the stored numbers (``data['summary']``): a difference counts when it is
    more than 2 standard errors (paired over seeds) from zero. The two directional claims (CTRL's KL above
    DPS's) take their word from the two budgets (default, converged) by ``theory.verdicts.condition_word``'s
    rule (the equal-query claim from its one budget); Theorem 1 (CTRL's KL not above the optimum's) is a
    tolerance check, two-valued."""
    S, c = data["summary"], data["config"]
    n_seeds = len(c["seeds"])
    regime = (f"2-D 4-component Gaussian mixture, label = component, gamma = {c['base']['ctrl']['gamma']:g}; learned "
              f"pre-trained MLP; calibrated classifier from {c['base']['n_offline']} offline pairs (one, shared by "
              f"CTRL and DPS); DDIM eta = 1, {c['base']['toy']['n_steps']} sampling steps; KL = grid-histogram KL "
              f"to the exact target ({c['base']['toy']['hist_bins']}^2 bins, {c['n_eval']} samples per label); "
              f"{n_seeds} seeds")
    dps, cg, fl, opt = S["DPS"], S["classifier guidance"], S["exact floor"], S["CTRL optimum (this classifier)"]
    D0, Dend = S["CTRL default budget"], S["CTRL end of curve"]
    cname, Cv = _converged(S)
    ref = (f"DPS ({dps['zeta']}, best of the zeta sweep on the target) KL {_fmt(dps['kl'])}, acc "
           f"{_fmt(dps['accuracy'])}; classifier guidance KL {_fmt(cg['kl'])}; exact floor {_fmt(fl['kl'])}; "
           f"CTRL's optimum with this classifier {_fmt(opt['kl'])} (acc {_fmt(opt['accuracy'])})")

    def row(name, r):
        return (f"{name} ({r['step']} steps, {r['queries']['mean'] / 1e3:.0f}k queries, "
                f"{r['train_wall_s']['mean']:.0f} s): KL {_fmt(r['kl'])}, acc {_fmt(r['accuracy'])}, "
                f"KL - DPS {_fmt(r['d_kl_vs_dps'])}")

    out = []
    # 1. the earlier verdict: CTRL less accurate than DPS
    s0, s1 = _side(D0["d_kl_vs_dps"]), _side(Cv["d_kl_vs_dps"])
    w, _ = condition_word({"default": s0, "converged": s1})
    if w == "holds":
        v = f"holds: CTRL's KL stays above DPS's at the default budget and after convergence ({cname})"
    elif w == "holds only when" and s0:
        v = (f"holds only when CTRL is stopped before convergence (the default {D0['step']} steps): converged "
             f"({cname}) its KL is {_REL[s1]} DPS's")
    elif w == "holds only when":
        v = (f"holds only when CTRL is trained to convergence ({cname}): at the default {D0['step']} steps its KL is "
             f"{_REL[s0]} DPS's")
    else:
        v = (f"{w}: CTRL's KL is {_REL[s0]} DPS's at the default {D0['step']} steps, and converged ({cname}) it is "
             f"{_REL[s1]} DPS's")
    out.append(dict(claim=("CTRL (Zhao et al.): CTRL is less accurate than DPS on the 2-D toy (the earlier toy "
                           "verdict of ctrl_toy_table)"),
                    verdict=v + CRITERION_SIDE, numbers=f"{row('CTRL default', D0)}; {row('CTRL ' + cname, Cv)}; {ref}",
                    regime=regime, budget=_budget(S, c, data)))
    # 2. equal reward queries
    Eq = S.get("CTRL equal queries")
    if Eq is not None:
        se = _side(Eq["d_kl_vs_dps"])
        n_set = data["n_samples"]
        v = (f"{word(se)}: with the {Eq['queries']['mean'] / 1e3:.0f}k reward queries DPS spends on {n_set} "
             f"samples, default CTRL's KL is {_REL[se]} DPS's")
        wall = [x for x in Eq["break_even_samples_wall"] if isinstance(x, (int, float))]
        out.append(dict(claim=("CTRL (Zhao et al.): at equal reward queries (CTRL's training queries = DPS's "
                               "sampling queries for the evaluation set) CTRL is less accurate than DPS"),
                        verdict=v + CRITERION_SIDE, numbers=(f"{row('CTRL', Eq)}; {ref}; CTRL's training pays off in wall time after "
                                            f"{_fmt(_ms(wall), 0) if wall else 'inf'} samples (DPS "
                                            f"{_fmt(dps['wall_s'], 2)} s per {n_set} samples)"),
                        regime=regime, budget=_budget(S, c, data)))
    # 3. Theorem 1: CTRL reaches its tilted target
    t_def, t_best = _side(Dend["d_kl_vs_optimum"]), _side(Cv["d_kl_vs_optimum"])
    if t_def is not True:
        v = f"holds: default CTRL at the end of its curve is within 2 se of (or below) the optimum's KL"
    elif t_best is not True:
        v = f"holds only when trained with {cname}: default CTRL stays above the optimum's KL"
    else:
        v = (f"does not hold within the budget: the best run ({cname}) stays "
             f"{_fmt(Cv['d_kl_vs_optimum'])} above the optimum's KL")
    pl = S.get("plateau")
    plateau = (f"; default curve's KL change from step {pl['from_step']} to {pl['to_step']}: {_fmt(pl['d_kl'])} "
               f"({'still falling' if _side(pl['d_kl']) is False else 'plateau within 2 se'})") if pl else ""
    out.append(dict(claim=("CTRL (Zhao et al.): CTRL's fine-tuned model samples the tilted target "
                           "p_phi(y|x)^gamma p(x) (Theorem 1; p_phi the calibrated classifier it is trained on)"),
                    verdict=v + CRITERION.replace("DPS's", "the optimum's (exact samples of p_phi^gamma p)"), numbers=(f"{row('CTRL default', Dend)} (KL - optimum {_fmt(Dend['d_kl_vs_optimum'])}, "
                                        f"objective gap J* - J = lam KL(P^u || P*) "
                                        f"{_fmt(Dend['objective_gap'])} nats); "
                                        f"{row('CTRL ' + cname, Cv)} (KL - optimum {_fmt(Cv['d_kl_vs_optimum'])}, "
                                        f"objective gap {_fmt(Cv['objective_gap'])}); "
                                        f"optimum KL {_fmt(opt['kl'])} (grid KL to the true target "
                                        f"{opt['grid_kl']:.3f}), exact floor {_fmt(fl['kl'])}{plateau}"),
                    regime=regime, budget=_budget(S, c, data)))
    return out


def _budget(S, c, data) -> str:
    return (f"CTRL batch {c['base']['ctrl']['batch_size']}, default curve to {c['curve_steps']} steps, sweeps to "
            f"{c['sweep_steps']} steps; DPS / classifier guidance {S['DPS']['queries'] // data['n_samples']} reward "
            f"queries per sample; wall {data['wall_s'] / 60:.1f} min for the whole figure (one thread on a shared "
            f"2-core machine: wall times are noisy)")


# --- figure --------------------------------------------------------------------------------------------

COLORS = {"default": "k", "hidden 128": "tab:olive", "hidden 256": "tab:green", "sampler steps 50": "tab:red",
          "sampler steps 100": "tab:pink", "truncated k = 5": "tab:brown", "lr 1e-3": "tab:blue",
          "lr 1e-2": "tab:purple"}
REFS = (("DPS", "tab:orange", "--"), ("classifier guidance", "tab:cyan", "--"),
        ("CTRL optimum (this classifier)", "tab:gray", "-."), ("exact floor", "k", ":"))


def _curve_stats(curves: dict, key: str, x: str):
    """Mean over seeds of ``x`` (reward queries in thousands) and mean / se of ``key`` at each evaluation."""
    cs = _by_seed(curves)
    xs = np.mean([c[x] for c in cs], 0) / (1e3 if x == "queries" else 1.0)
    ys = np.array([c[key] for c in cs], dtype=float)
    se = ys.std(0, ddof=1) / math.sqrt(len(cs)) if len(cs) > 1 else np.zeros(ys.shape[1])
    return xs, ys.mean(0), se


def draw_figure(data: dict):
    """Six panels from the JSON: KL of default CTRL against reward queries (top axis: steps) and training wall
    time, accuracy against queries; the sweeps' KL against queries and wall time; bars at the default budget,
    equal queries and convergence. Bands: +- 1 se over seeds; horizontal lines: DPS, classifier guidance,
    CTRL's optimum with this classifier, the exact floor (mean over seeds)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    S, curves, c = data["summary"], data["curves"], data["config"]
    batch = c["base"]["ctrl"]["batch_size"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9.6))

    def refs(ax, metric):
        for name, col, ls in REFS:
            ax.axhline(S[name][metric]["mean"], color=col, ls=ls, lw=1.2, label=name)

    def band(ax, name, key, x, **kw):
        xs, m, se = _curve_stats(curves[name], key, x)
        ax.plot(xs, m, "o-", ms=3, color=COLORS.get(name, None), label=f"CTRL {name}", **kw)
        ax.fill_between(xs, m - se, m + se, color=COLORS.get(name, None), alpha=0.2, lw=0)

    ax = axes[0, 0]
    band(ax, "default", "kl", "queries")
    refs(ax, "kl")
    ax.axvline(S["DPS"]["queries"] / 1e3, color="tab:orange", lw=0.8, ls=":")
    ax.text(S["DPS"]["queries"] / 1e3, ax.get_ylim()[1], "DPS's queries for\nthe eval set ", fontsize=7, va="top",
            ha="right")
    ax.set_xlabel("CTRL training reward queries (thousands)")
    ax.set_ylabel("KL to the exact target")
    ax.set_title("default CTRL: learning curve", fontsize=9)
    sec = ax.secondary_xaxis("top", functions=(lambda q: q * 1e3 / batch, lambda s: s * batch / 1e3))
    sec.set_xlabel("optimisation steps", fontsize=8)
    ax.legend(fontsize=6.5)
    ax = axes[0, 1]
    band(ax, "default", "kl", "train_wall_s")
    refs(ax, "kl")
    ax.set_xlabel("CTRL training wall time (s, one thread, shared machine)")
    ax.set_ylabel("KL to the exact target")
    ax.set_title(f"against wall time (DPS samples the eval set in {S['DPS']['wall_s']['mean']:.1f} s)", fontsize=9)
    ax = axes[0, 2]
    band(ax, "default", "accuracy", "queries")
    refs(ax, "accuracy")
    ax.set_xlabel("CTRL training reward queries (thousands)")
    ax.set_ylabel("component accuracy (true p(y|x))")
    ax.set_title("default CTRL: accuracy", fontsize=9)
    for ax, x, xl in ((axes[1, 0], "queries", "CTRL training reward queries (thousands)"),
                      (axes[1, 1], "train_wall_s", "CTRL training wall time (s)")):
        end = min(c["sweep_steps"], c["curve_steps"])
        for name in curves:
            if name == "default":
                xs, m, se = _curve_stats(curves[name], "kl", x)
                steps = np.array(_by_seed(curves[name])[0]["step"])
                k = steps <= end
                ax.plot(xs[k], m[k], "o-", ms=3, color="k", label="CTRL default")
                ax.fill_between(xs[k], (m - se)[k], (m + se)[k], color="k", alpha=0.15, lw=0)
            else:
                band(ax, name, "kl", x)
        for name, col, ls in REFS[:3]:
            ax.axhline(S[name]["kl"]["mean"], color=col, ls=ls, lw=1.2)
        ax.set_xlabel(xl)
        ax.set_yscale("log")
        ax.set_ylabel("KL to the exact target (log scale)")
        ax.set_title("one factor at a time (lines: DPS, CG, CTRL optimum)", fontsize=9)
        if x == "queries":
            ax.legend(fontsize=6.5, ncol=2)
    ax = axes[1, 2]
    cname, Cv = _converged(S)
    bars = [(f"CTRL\ndefault\n({S['CTRL default budget']['step']} st.)", S["CTRL default budget"]), ("CTRL\nequal\nqueries", S.get("CTRL equal queries")),
            ("CTRL\nend of\ncurve", S["CTRL end of curve"]), ("CTRL\nbest run", Cv), ("DPS", S["DPS"]),
            ("classifier\nguidance", S["classifier guidance"]), ("CTRL\noptimum", S["CTRL optimum (this classifier)"]),
            ("exact\nfloor", S["exact floor"])]
    bars = [(n, r) for n, r in bars if r is not None]
    xs = np.arange(len(bars))
    colour = {"DPS": "tab:orange", "classifier\nguidance": "tab:cyan", "CTRL\noptimum": "0.6", "exact\nfloor": "0.85"}
    ax.bar(xs, [r["kl"]["mean"] for _, r in bars], yerr=[r["kl"]["se"] for _, r in bars], capsize=3,
           color=[colour.get(n, "0.3") for n, _ in bars])
    ax.set_xticks(xs)
    ax.set_xticklabels([n for n, _ in bars], fontsize=7)
    ax.set_ylabel("KL to the exact target (+- se)")
    ax.set_title(f"best run: {cname}", fontsize=8)
    v = verdicts(data)
    head = " | ".join(f"{i + 1}. {d['verdict'].split(' (criterion:')[0]}" for i, d in enumerate(v))
    fig.suptitle(textwrap.fill(("[quick] " if data.get("quick") else "") + head, 200), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


@figure("claims_ctrl_convergence", "CTRL on the 2-D toy until it plateaus (3 seeds), one-factor sweeps (capacity, "
        "sampler steps, truncation, learning rate) on reward queries and wall time, against DPS and classifier "
        "guidance at the default budget, at equal queries and at convergence", draw=draw_figure, verdicts=verdicts)
def fig_ctrl_convergence(quick: bool = False) -> dict:
    cfg = quick_config() if quick else ConvConfig()
    res = run(cfg, progress=lambda i, n: report(i, n, "run", "CTRL runs"))
    return {"config": cfg, "quick": quick, **res, "summary": summarise(res, cfg)}
