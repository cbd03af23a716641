"""Verdicts of the CTRL toy figures on the paper's claims (docs/theory.md §6), computed from each figure's
JSON data (``theory.registry.figure(verdicts=...)``). KLs are histogram KLs to the binned exact target, with
the standard deviation of ``theory.verdicts.hist_kl_sd``; accuracies carry binomial standard errors."""
from __future__ import annotations

import math

from theory.verdicts import (
    Z,
    beyond,
    binom_se,
    by_condition,
    hist_kl_sd,
    mean_se,
    num,
    pm,
    settings_note,
    side,
    verdict,
)

PAPER = "CTRL (Zhao et al.)"
FLOOR = "exact target (floor)"
BASELINES = ("classifier guidance", "DPS", "CFG")

CLAIM_TARGET = f"{PAPER}: CTRL samples the tilted target p(y|x)^gamma p(x) (Theorem 1): its KL to the target is at the floor"
CLAIM_BASELINES = f"{PAPER}: CTRL samples the tilted target at least as accurately as classifier guidance, DPS and CFG"
CLAIM_EFFICIENCY = f"{PAPER}: CTRL is more data-efficient than classifier-free guidance (closer to the target from few offline pairs)"
CLAIM_GAMMA = f"{PAPER}: gamma rescaled at inference (appendix B) controls the tilt: E log p(y|x) rises with gamma"
CLAIM_GAMMA_TARGET = f"{PAPER}: CTRL rescaled at inference to gamma samples the gamma-tilted target (KL at the floor)"
CLAIM_TWO = f"{PAPER}: one model with two labels samples the joint tilted target p(y1|x) p(y2|x) p(x) (KL at the floor)"


def _n_eval(data: dict) -> int:
    c = data.get("config", {})
    n = c.get("n_eval", c.get("base", {}).get("n_eval"))
    if not n:
        raise ValueError("data: the figure's config records no n_eval (samples per class); recompute it")
    return int(n)


def _settings(data) -> str:
    return settings_note(data.get("quick", data.get("config", {}).get("quick")))


def _regime(data: dict) -> str:
    c = data.get("config", {})
    c = c.get("base", c)
    t = c.get("toy", {})
    return (f"2-D mixture of {t.get('n_modes', '?')} Gaussians, trained eps (hidden {t.get('hidden', '?')}); "
            f"{c.get('n_offline', '?')} offline pairs" + _settings(data))


def _budget(data: dict) -> str:
    c = data.get("config", {})
    c = c.get("base", c)
    k = c.get("ctrl", {})
    return (f"CTRL {k.get('steps', '?')} steps of batch {k.get('batch_size', '?')} (hidden {k.get('hidden', '?')}, "
            f"{k.get('n_steps', '?')} sampler steps); {_n_eval(data)} samples per class; 1 seed")


def _gap(kl: float, floor: float, n: int) -> tuple[float, float]:
    """(criterion: KL - floor, its standard deviation) for histogram KLs of n samples each."""
    return kl - floor, math.hypot(hist_kl_sd(kl, floor, n), hist_kl_sd(floor, floor, n))


def table(data: dict) -> list[dict]:
    """ctrl_toy_table: per label, CTRL's mean KL over classes against the floor and against each baseline
    (difference beyond Z standard deviations)."""
    n1 = _n_eval(data)
    ok_t, ok_b, wt, wb = {}, {}, [], []
    for label, res in data["results"].items():
        m = res["methods"]
        C = len(m["CTRL"].get("kl_per_class", {})) or 1
        n = n1 * C
        kc, fl = float(m["CTRL"]["kl"]), float(m[FLOOR]["kl"])
        gap, sd = _gap(kc, fl, n)
        ok_t[label] = not beyond(gap, sd)
        acc = float(m["CTRL"]["accuracy"])
        wt.append(f"{label}: CTRL KL {num(kc)}, floor {num(fl)}, gap {pm(gap, sd)}; accuracy {pm(acc, binom_se(acc, n))} "
                  f"vs exact target {num(m[FLOOR]['accuracy'])}")
        better = []
        for b in BASELINES:
            if b not in m:
                continue
            kb = float(m[b]["kl"])
            sdb = math.hypot(hist_kl_sd(kc, fl, n), hist_kl_sd(kb, fl, n))
            if beyond(kc - kb, sdb):
                better.append(f"{b} {num(kb)}")
        ok_b[label] = not better
        wb.append(f"{label}: CTRL {num(kc)}" + (f", closer: {', '.join(better)}" if better else ", none closer"))
    return [verdict(CLAIM_TARGET, f"{by_condition(ok_t, 'label')} (criterion: KL - floor within {num(Z)} sd)", "; ".join(wt),
                    _regime(data), _budget(data)),
            verdict(CLAIM_BASELINES, f"{by_condition(ok_b, 'label')} (criterion: no baseline's KL below CTRL's by {num(Z)} sd)",
                    "; ".join(wb) + " (KL sd from the chi-square approximation, 1 seed)", _regime(data), _budget(data))]


def density(data: dict) -> list[dict]:
    """ctrl_toy_density: per label, CTRL's KL on the drawn class against the floor."""
    n = _n_eval(data)
    ok, words = {}, []
    for key, kc in data["numbers"].items():
        label, method, cls = key.split("/")
        if method != "CTRL":
            continue
        fl = float(data["numbers"][f"{label}/{FLOOR}/{cls}"])
        gap, sd = _gap(float(kc), fl, n)
        ok[label] = not beyond(gap, sd)
        others = ", ".join(f"{b} {num(data['numbers'][f'{label}/{b}/{cls}'])}" for b in BASELINES
                           if f"{label}/{b}/{cls}" in data["numbers"])
        words.append(f"{label} ({cls.replace('kl_', '')}): CTRL {num(kc)}, floor {num(fl)}, gap {pm(gap, sd)}; {others}")
    return [verdict(CLAIM_TARGET, f"{by_condition(ok, 'label')} (criterion: drawn class; KL - floor within {num(Z)} sd)",
                    "; ".join(words), _regime(data), _budget(data))]


def efficiency(data: dict) -> list[dict]:
    """ctrl_toy_efficiency: per offline size, the paired (same seed) difference CFG KL - CTRL KL over seeds,
    beyond Z standard errors ("not resolved" when no size is beyond Z se either way, ``side``)."""
    by_size: dict = {}
    for r in data["rows"]:
        by_size.setdefault(r["size"], []).append(r)
    ok, words = {}, []
    n = 0
    for size, rows in sorted(by_size.items()):
        d, se, n = mean_se(float(r["cfg_kl"]) - float(r["ctrl_kl"]) for r in rows)
        ok[str(size)] = side(d, se)
        words.append(f"N = {size}: CTRL {num(mean_se(r['ctrl_kl'] for r in rows)[0])}, CFG "
                     f"{num(mean_se(r['cfg_kl'] for r in rows)[0])}, CFG - CTRL {pm(d, se, n)}")
    return [verdict(CLAIM_EFFICIENCY, f"{by_condition(ok, 'offline pairs N')} (criterion: CFG's KL above CTRL's by {num(Z)} se, "
                                      f"paired by seed; not resolved when within {num(Z)} se either way)",
                    "; ".join(words) + f"; floor {num(data.get('kl_floor'))}", _regime(data).split(";")[0]
                    + f"; offline pairs {sorted(by_size)}" + _settings(data),
                    f"{_budget(data).rsplit(';', 1)[0]}; {n} seeds")]


def gamma(data: dict) -> list[dict]:
    """ctrl_toy_gamma: CTRL's E log p(y|x) strictly rises with gamma (1 seed, no se); per gamma, its KL to
    the gamma-tilted target against the floor."""
    rows = sorted(data["rows"], key=lambda r: float(r["gamma"]))
    ll = [float(r["ctrl_loglik"]) for r in rows]
    rising = all(b > a for a, b in zip(ll, ll[1:]))
    words = "; ".join(f"gamma {num(r['gamma'])}: CTRL {num(r['ctrl_loglik'])}, exact {num(r['floor_loglik'])}, "
                      f"CFG {num(r['cfg_loglik'])}" for r in rows)
    n = _n_eval(data) * 4  # the soft label's four classes
    label = data.get("label", "soft")
    if label != "soft":
        raise ValueError(f"data: ctrl_toy_gamma's verdict counts the soft label's 4 classes, got label {label!r}")
    ok, wk = {}, []
    for r in rows:
        gap, sd = _gap(float(r["ctrl_kl"]), float(r["floor_kl"]), n)
        ok[num(r["gamma"])] = not beyond(gap, sd)
        wk.append(f"gamma {num(r['gamma'])}: CTRL {num(r['ctrl_kl'])}, CFG {num(r['cfg_kl'])}, floor "
                  f"{num(r['floor_kl'])}, CTRL gap {pm(gap, sd)}")
    regime = _regime(data) + f"; trained at gamma {num(data.get('gamma_train'))}, label {label}"
    return [verdict(CLAIM_GAMMA, ("holds" if rising else "does not hold") + " (criterion: E log p(y|x) strictly rising over "
                                 f"gamma {[num(r['gamma']) for r in rows]})",
                    f"E log p(y|x): {words} (1 seed, no se)", regime, _budget(data)),
            verdict(CLAIM_GAMMA_TARGET, f"{by_condition(ok, 'gamma')} (criterion: KL - floor within {num(Z)} sd)", "; ".join(wk),
                    regime, _budget(data))]


def two_labels(data: dict) -> list[dict]:
    """ctrl_toy_two_labels: per label pair, the two-label CTRL's KL against the floor."""
    n = _n_eval(data)
    ok, words = {}, []
    ctrl = next(k for k in data["mean_kl"] if k.startswith("CTRL"))
    for r in data["rows"]:
        gap, sd = _gap(float(r["kl"][ctrl]), float(r["kl"][FLOOR]), n)
        key = f"({r['y1']}, {r['y2']})"
        ok[key] = not beyond(gap, sd)
        words.append(f"{key}: gap {pm(gap, sd)}")
    mk = data["mean_kl"]
    cg = next((k for k in mk if k.startswith("classifier")), None)
    head = f"mean KL CTRL {num(mk[ctrl])}" + (f", classifier guidance (sum) {num(mk[cg])}" if cg else "") + \
        f", floor {num(mk[FLOOR])}; joint accuracy " + ", ".join(
            f"{k} {num(v)}" for k, v in data.get("mean_joint_accuracy", {}).items())
    return [verdict(CLAIM_TWO, f"{by_condition(ok, '(y1, y2)')} (criterion: KL - floor within {num(Z)} sd)",
                    head + "; per pair: " + "; ".join(words), _regime(data), _budget(data))]
