"""Verdicts of the DRaFT toy figures on the paper's claims (docs/theory.md §6), computed from each figure's
JSON data (``theory.registry.figure(verdicts=...)``). Speed ratios come from ``experiments.speedup`` on the
stored per-seed curves (seed i against seed i), with standard errors over seeds (``theory.verdicts``)."""
from __future__ import annotations

import math

from theory.verdicts import Z, beyond, both, by_condition, mean_se, num, pm, side, verdict, word

from .experiments import speedup

PAPER = "DRaFT (Clark et al.)"
#: the fraction of the slower method's gain at which speeds are compared
FRACTION = 0.5
#: "keeps diversity": the spread of the samples stays above this factor of the unregularised run's
KEEP = 2.0

CLAIM_LV = f"{PAPER}: DRaFT-LV learns about 2x faster than ReFL per training step"
CLAIM_DDPO = f"{PAPER}: gradient methods (DRaFT, DRaFT-K, DRaFT-LV, ReFL) need fewer reward queries than DDPO"
CLAIM_TRUNC = f"{PAPER}: truncated back-propagation (DRaFT-K, small K) learns as fast per query as the full chain"
CLAIM_GRADK = f"{PAPER}: the DRaFT-K gradient's norm grows with K (why truncation helps)"
CLAIM_SCALE = f"{PAPER}: scaling the LoRA weights moves the reward smoothly from the pre-trained to the fine-tuned model's"
CLAIM_SUM = f"{PAPER}: summing LoRA adapters trained on two rewards combines them"
CLAIM_KL = f"{PAPER}: a KL term keeps the samples' diversity while the reward rises"


def _regime(cfg: dict) -> str:
    p = cfg.get("pretrain", {})
    r = cfg.get("rewards", {})
    return (f"2-D ring of {p.get('n_modes', '?')} Gaussians, pre-trained eps MLP (hidden {p.get('hidden', '?')}), LoRA; "
            f"reward A: -|x - {r.get('center_a', '?')}|^2")


def _level(claim: dict, fraction: float = FRACTION) -> tuple[float, float, int]:
    """(mean, se, n) over seeds of the per-seed speed ratio at ``fraction`` of a ``speedup`` result."""
    lv = next(x for x in claim["levels"] if abs(float(x["fraction"]) - fraction) < 1e-9)
    return mean_se(lv["per_seed"])


def compare(data: dict) -> list[dict]:
    """draft_toy_compare: DRaFT-LV over ReFL per step (>= 2 within Z se); the best gradient method over
    DDPO per query (> 1 beyond Z se, "not resolved" within Z se either way), against 4-epoch DDPO and
    one-update DDPO; DRaFT-K over DRaFT per
    query (not below 1 beyond Z se)."""
    runs = {k: [{"curve": c} for c in v] for k, v in data["curves"].items()}
    cfg = data["config"]
    train = cfg.get("train", {})
    n_seeds = len(next(iter(runs.values())))
    budget = f"{num(train.get('budget', '?'))} reward queries per run, batch {train.get('batch_size', '?')}; " \
             f"{n_seeds} seeds"
    out = []
    if {"DRaFT-LV", "ReFL"} <= set(runs):
        words = []
        for axis in ("steps", "queries"):
            m, se, n = _level(speedup({"runs": runs}, "DRaFT-LV", "ReFL", axis=axis))
            words.append(f"per {axis[:-1] if axis == 'steps' else 'query'} {pm(m, se, n, suffix='x')}")
            if axis == "steps":
                ok = not beyond(2.0 - m, se)
        out.append(verdict(CLAIM_LV, ("holds" if ok else "does not hold") + f" (criterion: DRaFT-LV / ReFL speed at "
                                    f"{num(100 * FRACTION)} % of ReFL's gain not below 2 by {num(Z)} se)",
                           "DRaFT-LV over ReFL: " + ", ".join(words), _regime(cfg), budget))
    claims = data.get("claims", {})
    ok, words = {}, []
    for name, group in (("DDPO, 4 PPO epochs per batch", claims.get("gradient_vs_ddpo", {}).get("queries")),
                        ("DDPO, 1 update per batch", claims.get("gradient_vs_ddpo_1upd"))):
        if not group:
            continue
        best = max(((lab, *_level(c)) for lab, c in group.items() if not lab.startswith("DDPO")),
                   key=lambda t: t[1] if math.isfinite(t[1]) else -math.inf)
        ok[name] = side(best[1] - 1.0, best[2])
        words.append(f"against {name}: best {best[0]} {pm(best[1], best[2], best[3], suffix='x')} fewer queries")
    if ok:
        out.append(verdict(CLAIM_DDPO, f"{by_condition(ok, 'the baseline')} (criterion: best gradient method's query "
                                       f"ratio at {num(100 * FRACTION)} % of DDPO's gain above 1 by {num(Z)} se; not "
                                       f"resolved when within {num(Z)} se either way)",
                           "; ".join(words) + " (on DDPO's own threshold reward)", _regime(cfg) + "; D = 2", budget))
    trunc = claims.get("truncation_vs_full", {})
    # DRaFT-K with K at least the sampler's steps back-propagates through the whole chain: it is full DRaFT
    # (a consistency check of the engine), not a truncation, so it is reported but not judged
    steps = int(cfg.get("pretrain", {}).get("n_steps", 0)) or None
    if trunc and any(steps is None or int(lab.split("-")[1]) < steps for lab in trunc):
        ok, words, same = {}, [], []
        for lab, c in sorted(trunc.items(), key=lambda kv: int(kv[0].split("-")[1])):
            m, se, n = _level(c)
            if steps is not None and int(lab.split("-")[1]) >= steps:
                same.append(f"{lab} {pm(m, se, n, suffix='x')}")
                continue
            ok[lab] = not beyond(1.0 - m, se)
            words.append(f"{lab} {pm(m, se, n, suffix='x')}")
        note = (f"; not judged, the whole {steps}-step chain (same as DRaFT): " + ", ".join(same)) if same else ""
        out.append(verdict(CLAIM_TRUNC, f"{by_condition(ok, 'method')} (criterion: speed over full DRaFT per query at "
                                        f"{num(100 * FRACTION)} % of its gain not below 1 by {num(Z)} se"
                                        + (f"; K < {steps} sampler steps)" if steps else ")"),
                           "speed per query over full DRaFT: " + ", ".join(words) + note, _regime(cfg), budget))
    return out


def grad_k(data: dict) -> list[dict]:
    """draft_toy_grad_k: the per-repeat ratio |grad_K| / |grad_1| at the largest K, above 1 beyond Z se, and
    the mean norm non-decreasing in K ("not resolved" when the norms are non-decreasing but the ratio is
    within Z se of 1)."""
    ks = [int(k) for k in data["ks"]]
    N = [[float(x) for x in row] for row in data["grad_norm"]]
    m, se, n = mean_se(b / a for a, b in zip(N[0], N[-1]))
    means = [sum(r) / len(r) for r in N]
    rising = side(m - 1.0, se)
    ok = both(all(b >= a for a, b in zip(means, means[1:])), rising)
    c = data.get("config", {})
    return [verdict(CLAIM_GRADK, word(ok) + f" (criterion: |grad_K={ks[-1]}| / |grad_1| above 1 by {num(Z)} se and the "
                                 f"mean norm non-decreasing in K; not resolved when the norms are non-decreasing and "
                                 f"the ratio within {num(Z)} se of 1)",
                    f"|grad_{ks[-1]}| / |grad_1| = {pm(m, se, n, 'repeats')}; mean norms "
                    + ", ".join(f"K={k}: {num(x)}" for k, x in zip(ks, means)),
                    _regime(c) + f"; LoRA rank {c.get('lora_rank', '?')} at a random init",
                    f"batch {c.get('batch_size', '?')} per gradient; {n} repeats")]


def lora(data: dict) -> list[dict]:
    """draft_toy_lora: reward A never falls beyond Z se between neighbouring scales and rises from scale 0 to
    1 beyond Z se; the summed adapters' r_A + r_B exceeds each single adapter's beyond Z se. Either reads
    "not resolved" when nothing refutes it beyond Z se but the rise (the excess) is within Z se (``side``)."""
    rows = sorted(data["scale"], key=lambda r: float(r["scale"]))
    drops = [(a, b) for a, b in zip(rows, rows[1:])
             if beyond(float(a["reward_a"]) - float(b["reward_a"]), math.hypot(a["reward_a_se"], b["reward_a_se"]))]
    lo, hi = rows[0], rows[-1]
    rise = float(hi["reward_a"]) - float(lo["reward_a"])
    ok = False if drops else side(rise, math.hypot(lo["reward_a_se"], hi["reward_a_se"]))
    cfg = data["config"]
    tr = cfg.get("train", {})
    budget = f"{num(tr.get('budget', '?'))} reward queries per adapter, batch {tr.get('batch_size', '?')}; " \
             f"{tr.get('n_eval', '?')} evaluation samples; 1 seed"
    out = [verdict(CLAIM_SCALE, word(ok) + f" (criterion: no drop between neighbouring scales beyond {num(Z)} se, a "
                                f"rise from scale {num(lo['scale'])} to {num(hi['scale'])} beyond {num(Z)} se; not "
                                f"resolved when no drop and the rise within {num(Z)} se)",
                   "reward A by scale: " + ", ".join(f"{num(r['scale'])}: {pm(r['reward_a'], r['reward_a_se'])}"
                                                     for r in rows)
                   + (f"; drops at {[num(b['scale']) for a, b in drops]}" if drops else ""),
                   _regime(cfg) + f"; method {cfg.get('method', {}).get('label', '?')}", budget)]
    comb = data.get("combine", {})
    singles = {k: v for k, v in comb.items() if k in ("A", "B")}
    sums = {k: v for k, v in comb.items() if "+" in k}
    if singles and sums:
        best_single = max(singles.items(), key=lambda kv: float(kv[1]["reward_a+b"]))
        okc = {}
        for k, v in sums.items():
            okc[k] = side(float(v["reward_a+b"]) - float(best_single[1]["reward_a+b"]),
                          math.hypot(v["reward_a+b_se"], best_single[1]["reward_a+b_se"]))
        words = "; ".join(f"{k}: {pm(v['reward_a+b'], v['reward_a+b_se'])}" for k, v in comb.items())
        out.append(verdict(CLAIM_SUM, f"{by_condition(okc, 'sum')} (criterion: r_A + r_B above the best single "
                                      f"adapter's ({best_single[0]}) by {num(Z)} se; not resolved when within {num(Z)} "
                                      "se either way)", "r_A + r_B: " + words,
                           _regime(cfg) + "; adapter A trained on r_A, B on r_B", budget))
    return out


def diversity(data: dict) -> list[dict]:
    """draft_toy_diversity: a run with a KL weight lam > 0 keeps diversity when its final spread is above
    KEEP x the unregularised run's and it went at least half of the way from the pre-trained objective to
    its exact optimum's lam log Z (so the reward did rise)."""
    runs = data["runs"]
    base = next((r for r in runs.values() if float(r["method"].get("lam", 0)) == 0
                 and float(r["method"].get("eps_penalty", 0)) == 0), None)
    if base is None:
        raise ValueError("data: draft_toy_diversity holds no run without KL and penalty to compare with; recompute it")
    s0 = float(base["curve"][-1]["spread"])
    ok, words = {}, []
    for label, r in runs.items():
        lam = float(r["method"].get("lam", 0))
        opt = data.get("optimum", {}).get(label)
        if lam <= 0 or opt is None:
            continue
        f, start = r["curve"][-1], r["curve"][0]
        obj0 = float(start["reward_a"]) - lam * float(start["kl"])
        obj = float(f["reward_a"]) - lam * float(f["kl"])
        way = (obj - obj0) / (float(opt["objective"]) - obj0)
        ok[label] = float(f["spread"]) > KEEP * s0 and way >= 0.5
        words.append(f"{label}: spread {num(f['spread'])} (optimum {num(opt['spread'])}), reward "
                     f"{pm(f['reward_a'], f['reward_a_se'])}, {num(100 * way, 2)} % of the way to the optimum's objective")
    cfg = data["config"]
    tr = cfg.get("train", {})
    return [verdict(CLAIM_KL, f"{by_condition(ok, 'run')} (criterion: spread above {num(KEEP)}x the unregularised "
                              f"run's {num(s0)} and at least half of the way to the exact optimum's lam log Z)",
                    "; ".join(words) + f"; unregularised: spread {num(s0)}, reward {num(base['curve'][-1]['reward_a'])} "
                    "(1 seed; spread without se)", _regime(cfg),
                    f"{num(tr.get('budget', base['curve'][-1]['queries']))} reward queries per run; 1 seed")]
