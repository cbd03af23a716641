"""Verdicts of the gradient-guidance figures on the paper's claims (docs/theory.md §7), computed from each
figure's JSON data (``theory.registry.figure(verdicts=...)``; the helpers and standard errors are those of
``theory.verdicts``)."""
from __future__ import annotations

import math

from theory.verdicts import Z, beyond, both, by_condition, mean_se, num, pm, settings_note, side, verdict

PAPER = "Gradient guidance (Guo et al.)"
#: "near the pre-trained model's off-support measure": within this factor of it
NEAR = 2.0
#: a curve has plateaued when its last tenth of rounds moves it by less than this share of its total change
PLATEAU = 0.05
#: on the sphere: a mean ||x| - 1| within this factor of the unguided sampler's (its discretisation error)
ON_SPHERE = 1.05

CLAIM_ROFF = f"{PAPER}: G drives the samples off the data's subspace while G_loss keeps r_off near the pre-trained model's"
CLAIM_ALG1 = (f"{PAPER}: Algorithm 1 converges to a regularised optimum, below the global maximum when the maximiser "
              "lies off the data")
CLAIM_ALG2 = f"{PAPER}: Algorithm 2 (score fine-tuning) reaches the global maximum"
CLAIM_RATE = f"{PAPER}: Algorithm 1 approaches its limit at the rate O(1/K) or faster"
CLAIM_SPAN = f"{PAPER}: with the exact score G_loss keeps the samples on the subspace, so f2 stays below its subspace bound (7.7)"
CLAIM_SPHERE = f"{PAPER}: on sphere data the (reward, off-sphere distance) front of G_loss dominates G's"
CLAIM_RUNTIME = (f"{PAPER}: a G_loss pass costs one forward and one vector-Jacobian product per step, at most 3 "
                 "unguided passes")


def _settings(data) -> str:
    """The settings the data records (older JSONs record them only at the top level: then nothing)."""
    return settings_note(data.get("quick"))


def _plateau(curve) -> tuple[bool, float, float]:
    """(plateaued, mean of the last tenth of rounds, its change from the tenth before as a share of the
    total change from round 0)."""
    c = [float(x) for x in curve]
    w = max(1, len(c) // 10)
    tail = sum(c[-w:]) / w
    prev = sum(c[-2 * w:-w]) / w if len(c) >= 2 * w else c[0]
    total = tail - c[0]
    rel = (tail - prev) / total if total != 0 else math.inf
    return abs(rel) < PLATEAU, tail, rel


def roff(data: dict) -> list[dict]:
    """gg_roff: per algorithm, G's final r_off is above NEAR x the pre-trained model's (beyond Z se over
    seeds) and G_loss's final r_off is below NEAR x it (no se: a point check). A run whose G_loss is below and
    whose G is within Z se of NEAR x is not resolved (``side``)."""
    pre = float(data["pretrained_roff"])
    ok, words, budget = {}, [], []
    for alg, title in (("alg1", "Algorithm 1"), ("alg2", "Algorithm 2")):
        g, gl = data[f"{alg}_G"], data[f"{alg}_G_loss"]
        mg, sg, n = mean_se(g["roff_mean"]["final_per_seed"])
        ml, sl, _ = mean_se(gl["roff_mean"]["final_per_seed"])
        leaves = side(mg - NEAR * pre, sg)
        near = ml < NEAR * pre
        ok[title] = both(near, leaves)
        words.append(f"{title}: G {pm(mg, sg, n)}, {num(mg / pre)}x; G_loss {pm(ml, sl, n)}, {num(ml / pre)}x")
        budget.append(f"{title} {g['rounds']} rounds (delta G {num(g['delta'])}, G_loss {num(gl['delta'])})")
    v = by_condition(ok, "run")
    return [verdict(CLAIM_ROFF, f"{v} (criterion: final r_off against {num(NEAR)}x the pre-trained model's {num(pre)}: "
                                f"G's above by {num(Z)} se, G_loss's below; not resolved when G's is within "
                                f"{num(Z)} se)",
                    "; ".join(words), f"f1 with theta_2 (off/in-span norm ratio 9), subspace data, trained score"
                    f"{_settings(data)}", "; ".join(budget) + f"; {n} seeds")]


def objective(data: dict) -> list[dict]:
    """gg_objective: Algorithm 1 plateaus below the global maximum (beyond Z se; a plateau within Z se of it
    is not resolved, ``side``); Algorithm 2 ends within PLATEAU of the way from round 0 to the global maximum
    (a tolerance check, two-valued)."""
    gmax = float(data["global_max"])
    ok1, ok2, w1, w2 = {}, {}, [], []
    n = 0
    for kind in ("G", "G_loss"):
        a1, a2 = data[f"alg1_{kind}"]["f_mean"], data[f"alg2_{kind}"]["f_mean"]
        flat, tail, rel = _plateau(a1["mean"])
        m1, s1, n = mean_se(a1["final_per_seed"])
        ok1[kind] = both(flat, side(gmax - m1, s1))
        w1.append(f"{kind}: final {pm(m1, s1, n)}, last tenth of rounds moved it {num(100 * rel, 2)} % of its gain")
        m2, s2, _ = mean_se(a2["final_per_seed"])
        way = (m2 - a2["mean"][0]) / (gmax - a2["mean"][0])
        ok2[kind] = not beyond(gmax - m2 - PLATEAU * (gmax - a2["mean"][0]), s2)
        curve = [float(v) for v in a2["mean"]]
        top = max(range(len(curve)), key=curve.__getitem__)
        w2.append(f"{kind}: Algorithm 2 {pm(m2, s2, n)} ({num(100 * way, 3)} % of the way from round 0 to the max; "
                  f"its seed-mean curve peaks at {num(curve[top])} in round {top}), Algorithm 1 {pm(m1, s1, n)}")
    regime = (f"f1 with theta_2 (off/in-span norm ratio 9), global max {num(gmax)}, best on span(A) within the data's "
              f"radius {num(data['best_on_span_data_radius'])}; trained score{_settings(data)}")
    rounds = f"{len(data['alg1_G']['f_mean']['mean']) - 1} rounds (Algorithm 1), " \
             f"{len(data['alg2_G']['f_mean']['mean']) - 1} (Algorithm 2); {n} seeds"
    return [verdict(CLAIM_ALG1, f"{by_condition(ok1, 'guidance')} (criterion: plateau: < {num(100 * PLATEAU)} % change over the "
                                f"last tenth of rounds; below the global max {num(gmax)} beyond {num(Z)} se; not "
                                f"resolved when a plateau is within {num(Z)} se of it)",
                    "; ".join(w1), regime, rounds),
            verdict(CLAIM_ALG2, f"{by_condition(ok2, 'guidance')} (criterion: in the last round within {num(100 * PLATEAU)} % of "
                                f"the way to the global max {num(gmax)}, {num(Z)} se)", "; ".join(w2), regime, rounds)]


def _loglog_slope(curve) -> tuple[float, float, int]:
    """Least-squares slope (and its standard error, and the number of points) of log |plateau - f(k)|
    against log k, over k = 1 .. the first round where the gap falls below 3 times the round-to-round
    noise of the last tenth of rounds (the plateau is the mean of that tenth)."""
    c = [float(x) for x in curve]
    w = max(2, len(c) // 10)
    tail = c[-w:]
    plateau = sum(tail) / len(tail)
    noise = math.sqrt(sum((x - plateau) ** 2 for x in tail) / (len(tail) - 1))
    xs, ys = [], []
    for k in range(1, len(c)):
        gap = abs(plateau - c[k])
        if gap <= 3 * noise or gap <= 0:
            break
        xs.append(math.log(k))
        ys.append(math.log(gap))
    n = len(xs)
    if n < 3:
        return math.nan, math.nan, n
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    res = sum((y - my - b * (x - mx)) ** 2 for x, y in zip(xs, ys))
    return b, math.sqrt(res / (n - 2) / sxx), n


def convergence(data: dict) -> list[dict]:
    """gg_convergence: every run plateaus (Algorithm 1's limit); the gap to the plateau falls at least like
    1/K (criterion: log-log slope <= -1 within Z se); with the exact score no sample exceeds f2's subspace bound and
    r_off stays at round-off."""
    runs = {k: v for k, v in data.items() if isinstance(v, dict) and "f_mean" in v}
    ok_p, ok_r, wp, wr = {}, {}, [], []
    n = 0
    for name, v in runs.items():
        flat, tail, rel = _plateau(v["f_mean"]["mean"])
        m, s, n = mean_se(v["f_mean"]["final_per_seed"])
        below = beyond(float(v["bounds"]["global_max"]) - m, s)
        ok_p[name] = flat and below
        wp.append(f"{name}: {pm(m, s, n)} (max {num(v['bounds']['global_max'])}), tail moved {num(100 * rel, 2)} %")
        b, sb, npts = _loglog_slope(v["f_mean"]["mean"])
        ok_r[name] = math.isfinite(b) and not beyond(b + 1.0, sb)
        wr.append(f"{name}: slope {pm(b, sb)} (least-squares se) over {npts} rounds" if math.isfinite(b) else
                  f"{name}: at the plateau within {npts} rounds (too few to fit)")
    exact = {k: v for k, v in runs.items() if "max_excess_over_best_on_span" in v}
    regime = f"subspace data, f1 (theta_1, theta_2) and f2 (b_1, b_2), exact and trained score{_settings(data)}"
    budget = "; ".join(f"{k} {len(v['f_mean']['mean']) - 1} rounds (delta {num(v['delta'])})" for k, v in runs.items()) \
        + f"; {n} seeds"
    out = [verdict(CLAIM_ALG1, f"{by_condition(ok_p, 'run')} (criterion: plateau: < {num(100 * PLATEAU)} % change over the last "
                               f"tenth of rounds, below the global max beyond {num(Z)} se)", "; ".join(wp), regime,
                   budget),
           verdict(CLAIM_RATE, f"{by_condition(ok_r, 'run')} (criterion: log-log slope of the gap to the plateau against the "
                               f"round, not above -1 by {num(Z)} se)", "; ".join(wr), regime, budget)]
    if exact:
        ok = {k: float(v["max_excess_over_best_on_span"]) < 0 and float(v["max_roff_any_round"]) < 1e-6
              for k, v in exact.items()}
        words = "; ".join(f"{k}: max excess over the bound {num(v['max_excess_over_best_on_span'])}, max r_off "
                          f"{num(v['max_roff_any_round'])}" for k, v in exact.items())
        out.append(verdict(CLAIM_SPAN, f"{by_condition(ok, 'run')} (criterion: every sample of every round and seed below the "
                                       "bound, r_off < 1e-6)", words + " (every sample, no se needed)",
                           "subspace data, f2, exact score" + _settings(data), budget))
    return out


def dominance(final: dict, deltas, floor: float, n: int, floor_sd: float) -> tuple[dict, list[str]]:
    """Per delta, whether G_loss's point dominates G's, each axis judged beyond Z standard errors of the batch
    means (se = the final round's sample sd / sqrt(n), the two runs' se combined as independent, which their
    shared seed makes conservative): G's final reward is not above G_loss's by Z se, and G_loss's mean
    ||x| - 1| is not above the larger of G's and ON_SPHERE x the unguided sampler's ``floor`` (the
    discretisation's own distance, where neither method has left the sphere; its se from ``floor_sd``) by Z se.
    Without the standard errors two batch means that differ by noise alone would decide it (at small delta
    G and G_loss are the same sampler). ``final[kind]`` holds per delta "reward", "dev_abs", "reward_sd",
    "dev_abs_sd". Returns ({delta: ok}, the numbers in words)."""
    if not all("reward_sd" in final[k] and "dev_abs_sd" in final[k] for k in ("G", "G_loss")):
        raise ValueError("data: the sphere runs record no per-sample sd (reward_sd, dev_abs_sd), written by an older "
                         "version; recompute the figure")
    root = math.sqrt(n)
    ok, words = {}, []
    for i, d in enumerate(deltas):
        g, gl = final["G"], final["G_loss"]
        rg, rl, dg, dl = (float(x[k][i]) for x, k in ((g, "reward"), (gl, "reward"), (g, "dev_abs"), (gl, "dev_abs")))
        se_r = math.hypot(float(g["reward_sd"][i]), float(gl["reward_sd"][i])) / root
        thr, thr_sd = (dg, float(g["dev_abs_sd"][i])) if dg >= ON_SPHERE * floor else \
            (ON_SPHERE * floor, ON_SPHERE * floor_sd)
        se_d = math.hypot(float(gl["dev_abs_sd"][i]), thr_sd) / root
        ok[num(d)] = not beyond(rg - rl, se_r) and not beyond(dl - thr, se_d)
        words.append(f"delta {num(d)}: reward {num(rl)} vs {num(rg)} (G - G_loss {pm(rg - rl, se_r)}), off-sphere "
                     f"{num(dl)} vs {num(dg)} (G_loss over max(G, {num(ON_SPHERE)}x floor) {pm(dl - thr, se_d)})")
    return ok, words


def sphere(data: dict) -> list[dict]:
    """gg_sphere: the front dominance of ``dominance`` per delta (one seed; se over the batch's samples)."""
    c = data["config"]
    deltas = data["deltas"]
    curves = data["curves"]
    final = {kind: {k: [curves[f"{kind}@{d}"].get(k, [math.nan])[-1] for d in deltas]
                    for k in ("reward", "dev_abs", "reward_sd", "dev_abs_sd") if k in curves[f"{kind}@{deltas[0]}"]}
             for kind in ("G", "G_loss")}
    floor = float(data["pretrained"]["dev_abs"])
    floor_sd = float(curves[f"G@{deltas[0]}"].get("dev_abs_sd", [math.nan])[0])
    ok, words = dominance(final, deltas, floor, int(c["n"]), floor_sd)
    return [verdict(CLAIM_SPHERE, by_condition(ok, "delta") + f" (criterion: G's reward not above G_loss's by {num(Z)} se, "
                    f"G_loss's distance not above G's or {num(ON_SPHERE)}x the unguided sampler's {num(floor)} by "
                    f"{num(Z)} se)",
                    "G_loss vs G, " + "; ".join(words) + f" (1 seed, batch means of {c['n']}, se over the samples)",
                    f"unit sphere in D = {c['D']}, learned score, objective theta.x{_settings(data)}",
                    f"{c['rounds']} rounds of {c['n']} chains, {c['n_steps']} sampler steps per delta")]


def distributions(data: dict) -> list[dict]:
    """gg_distributions: per run (one seed), the mean |x_perp| over the samples of the last round against
    round 0 (standard error over the samples): G above NEAR x beyond Z se, G_loss below NEAR x (a point check);
    not resolved when G_loss is below and G within Z se of NEAR x (``side``)."""
    ok, words = {}, []
    runs = data["runs"]
    for alg, title in (("alg1", "Algorithm 1"), ("alg2", "Algorithm 2")):
        stats = {}
        for kind in ("G", "G_loss"):
            r = runs[f"{alg}_{kind}"]
            m0, _, _ = mean_se(r["samples"]["0"]["perp_norm"])
            mk, sk, nk = mean_se(r["samples"][str(r["rounds"])]["perp_norm"])
            stats[kind] = (m0, mk, sk, nk)
        g, gl = stats["G"], stats["G_loss"]
        ok[title] = both(gl[1] < NEAR * gl[0], side(g[1] - NEAR * g[0], g[2]))
        words.append(f"{title}: |x_perp| G {num(g[0])} -> {pm(g[1], g[2], g[3], 'samples')}, "
                     f"G_loss {num(gl[0])} -> {pm(gl[1], gl[2], gl[3], 'samples')}")
    seed = next(iter(runs.values()))["seed"]
    return [verdict(CLAIM_ROFF, f"{by_condition(ok, 'run')} (criterion: last round against {num(NEAR)}x round 0's "
                                f"|x_perp|: G above by {num(Z)} se, G_loss below; not resolved when G is within "
                                f"{num(Z)} se)",
                    "; ".join(words) + f" (seed {seed} only)",
                    f"f1 with theta_2, subspace data, trained score{_settings(data)}",
                    "; ".join(f"{k} {r['rounds']} rounds" for k, r in runs.items()))]


def runtime(data: dict) -> list[dict]:
    """gg_runtime: one G_loss pass over one unguided pass (best of a few repeats: no se) at most 3."""
    pt = data["pass_times_s"]
    ratio = float(pt["G_loss"]) / float(pt["unguided"])
    v = "holds" if ratio <= 3.0 else "does not hold"
    conv = "; ".join(f"{k}: {data[k]['rounds_to_converge']} rounds to 95 %, {num(data[k]['ratio_total_unguided'])} "
                     "unguided passes in all" for k in data if isinstance(data[k], dict) and "rounds_to_converge" in data[k])
    return [verdict(CLAIM_RUNTIME, f"{v} (criterion: G_loss pass / unguided pass {num(ratio)})",
                    f"G_loss / unguided {num(ratio)}, G / unguided {num(float(pt['G']) / float(pt['unguided']))} "
                    f"(best of repeated passes, no se); {conv}",
                    f"MLP score network, CPU, 1 thread{_settings(data)}",
                    (f"{data['n_steps']} sampler steps per pass, " if "n_steps" in data else "") + "batch 32 per pass")]
