"""The six gradient-guidance figures, registered with ``theory.registry.figure`` (``diffsteer figures --only``).

Full settings (the paper's, docs/theory.md §7) are the default; ``quick`` shrinks rounds (1/10),
seeds (2) and sampler steps (20). Each figure reads the numbers of ``sims.gradguide.experiments``.
"""
from __future__ import annotations

import math

import numpy as np

from theory.progress import report
from theory.registry import figure

from . import verdicts as _v
from .config import Setup, SphereConfig, alg_runs, convergence_runs, quick_sphere
from .data import basis, objective
from .experiments import converge_round, pass_times, run, run_sphere

COLORS = {"G": "tab:red", "G_loss": "tab:blue"}
LABELS = {"alg1_G": "Alg. 1, G", "alg1_G_loss": "Alg. 1, G_loss", "alg2_G": "Alg. 2, G",
          "alg2_G_loss": "Alg. 2, G_loss"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _run_all(cfgs: dict) -> dict:
    """``run`` of each config (cached per process), reporting each finished run to a progress listener."""
    out = {}
    for i, (k, c) in enumerate(cfgs.items()):
        out[k] = run(c)
        report(i + 1, len(cfgs), "run", "gradient-guidance runs")
    return out


def _curve_summary(res, key):
    arr = np.array([res["seeds"][s][key] for s in res["config"].seeds])
    return {"mean": arr.mean(0).tolist(), "min": arr.min(0).tolist(), "max": arr.max(0).tolist(),
            "final_per_seed": arr[:, -1].tolist()}


def _band_summary(ax, summ, label, color, ls="-"):
    """A band from its JSON summary: the mean over seeds, the min-max spread over seeds shaded."""
    k = np.arange(len(summ["mean"]))
    ax.plot(k, summ["mean"], color=color, ls=ls, label=label)
    ax.fill_between(k, summ["min"], summ["max"], color=color, alpha=0.2)


def _kind(name: str) -> str:
    return "G_loss" if name.endswith("G_loss") else "G"


def _quick(data: dict) -> str:
    return " [quick]" if data.get("quick") else ""


def draw_roff(data: dict):
    """gg_roff from its JSON (per-round r_off summaries over seeds)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, alg in zip(axes, ("alg1", "alg2")):
        for kind in ("G", "G_loss"):
            name = f"{alg}_{kind}"
            _band_summary(ax, data[name]["roff_mean"], LABELS[name], COLORS[kind])
        ax.axhline(data["pretrained_roff"], color="k", ls=":", label="pre-trained model")
        ax.set_yscale("log")
        ax.set_xlabel("round k")
        starts = [data[f"{alg}_{k}"].get("start") for k in ("G", "G_loss")]
        ax.set_title(f"Algorithm {alg[-1]}" + (f" (score fine-tuned from round {starts[0]}/{starts[1]})"
                                               if alg == "alg2" and None not in starts else ""))
        ax.legend(fontsize=8)
    axes[0].set_ylabel("r_off = |x_perp| / |x_par| (batch mean)")
    fig.suptitle("f1 with theta_2 (off/in-span ratio 9); mean over seeds, shaded: min-max" + _quick(data))
    return fig


@figure("gg_roff", "Gradient guidance: off-support ratio r_off per round, G vs G_loss, Algorithms 1 and 2 "
        "(f1 theta_2, trained score), with the pre-trained model's r_off", draw=draw_roff, verdicts=_v.roff)
def fig_roff(quick: bool = False) -> dict:
    runs = _run_all(alg_runs(quick))
    data = {}
    for name, res in runs.items():
        data[name] = {"roff_mean": _curve_summary(res, "roff_mean"),
                      "roff_top4": _curve_summary(res, "roff_top4")["final_per_seed"],
                      "delta": res["config"].delta, "rounds": res["config"].rounds, "start": res["config"].start}
    data["pretrained_roff"] = float(np.mean([runs["alg1_G_loss"]["seeds"][s]["roff_mean"][0]
                                             for s in runs["alg1_G_loss"]["config"].seeds]))
    data["quick"] = quick
    return data


def draw_objective(data: dict):
    """gg_objective from its JSON (per-round objective summaries over seeds, the two reference levels)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in LABELS:
        _band_summary(ax, data[name]["f_mean"], LABELS[name], COLORS[_kind(name)],
                      ls="-" if name.startswith("alg2") else "--")
    ax.axhline(data["global_max"], color="k", ls="-", lw=0.8,
               label=f"global max = {data['global_max']:g} (also sup on span(A), at |x_par| ~ 27)")
    ax.axhline(data["best_on_span_data_radius"], color="gray", ls=":",
               label=f"max on span(A) within |z| <= {R99:.2f}: {data['best_on_span_data_radius']:.2f}")
    ax.set_xlabel("round k")
    ax.set_ylabel("f1(x) (batch mean)")
    ax.legend(fontsize=7)
    ax.set_title("Algorithm 1 (dashed) vs Algorithm 2 (solid)" + _quick(data))
    return fig


#: ~ 99% quantile of |z|, z ~ N(0, I_16) (chi^2_16 0.99 quantile = 32.0): the data radius of gg_objective
R99 = math.sqrt(32.0)


@figure("gg_objective", "Gradient guidance: objective per round, Algorithm 1 vs Algorithm 2 (f1 theta_2, trained "
        "score), with the global maximum and the best value on the subspace", draw=draw_objective, verdicts=_v.objective)
def fig_objective(quick: bool = False) -> dict:
    runs = _run_all(alg_runs(quick))
    setup = Setup()
    f = objective("f1_theta2", setup)
    A = basis(setup)
    data = {name: {"f_mean": _curve_summary(res, "f_mean"), "f_top4": _curve_summary(res, "f_top4")["final_per_seed"]}
            for name, res in runs.items()}
    data["global_max"] = f.max_value
    data["best_on_span_data_radius"] = f.best_on_span(A, R99)
    data["theta_par_norm"] = float((A.T @ f.theta).norm())
    data["quick"] = quick
    return data


#: the four panels of gg_convergence: (title, runs drawn in it)
CONVERGENCE_PANELS = [("f1_theta1", ["f1_theta1"]), ("f1_theta2", ["f1_theta2"]),
                      ("f2_b1", ["f2_b1_exact", "f2_b1_trained"]), ("f2_b2", ["f2_b2_exact", "f2_b2_trained"])]


def draw_convergence(data: dict):
    """gg_convergence from its JSON (objective mean and max per round, summaries over seeds; bounds)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, (title, names) in zip(axes, CONVERGENCE_PANELS):
        for name, color in zip(names, ("tab:blue", "tab:orange")):
            model = "exact" if name.endswith("_exact") else "trained"
            _band_summary(ax, data[name]["f_mean"], f"{model} score, mean", color)
            _band_summary(ax, data[name]["f_max"], f"{model} score, max", color, ls=":")
        b = data[names[0]]["bounds"]
        ax.axhline(b["global_max"], color="k", lw=0.8, label="global max")
        if title.startswith("f2"):
            ax.axhline(b["best_on_span"], color="gray", ls="--", label="best on span(A)")
        ax.set_title(f"{title} (delta {data[names[0]]['delta']})")
        ax.set_xlabel("round k")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("objective")
    fig.suptitle("Algorithm 1, G_loss" + _quick(data))
    return fig


@figure("gg_convergence", "Gradient guidance: Algorithm 1 with G_loss on f1 (theta_1, theta_2) and f2 (b_1, b_2; "
        "exact and trained score)", draw=draw_convergence, verdicts=_v.convergence)
def fig_convergence(quick: bool = False) -> dict:
    runs = _run_all(convergence_runs(quick))
    data = {}
    for name in [n for _, names in CONVERGENCE_PANELS for n in names]:
        res = runs[name]
        data[name] = {"f_mean": _curve_summary(res, "f_mean"), "f_max": _curve_summary(res, "f_max"),
                      "roff_mean": _curve_summary(res, "roff_mean"), "bounds": res["bounds"],
                      "delta": res["config"].delta}
        if res["config"].model == "exact":
            arr = np.array([res["seeds"][s]["f_max"] for s in res["config"].seeds])
            data[name]["max_excess_over_best_on_span"] = float(arr.max() - res["bounds"]["best_on_span"])
            data[name]["max_roff_any_round"] = float(np.max([res["seeds"][s]["roff_max"] for s in res["config"].seeds]))
    data["quick"] = quick
    return data


#: where a point's label may go, in points from the point: (dx, dy, ha, va), nearest directions first
_AROUND = {"upper left": (-5, 4, "right", "bottom"), "lower right": (5, -4, "left", "top"),
           "upper right": (5, 4, "left", "bottom"), "lower left": (-5, -4, "right", "top"),
           "left": (-7, 0, "right", "center"), "right": (7, 0, "left", "center"),
           "above": (0, 7, "center", "bottom"), "below": (0, -7, "center", "top")}


def _label_points(ax, points, first: dict, marker_pt: float = 4.0):
    """Label each point (x, y, text, color, series) beside it where the label covers no other label, no marker
    and no line of the axes, trying the series' ``first`` side, then the other sides of ``_AROUND``; where
    every side is covered, the side covering least. Greedy, in the order given, on the drawn figure (call it
    after the layout is final). Written here because matplotlib places no annotations by itself and the only
    library that does (adjustText) moves labels iteratively, which this one figure does not need."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    px = fig.dpi / 72.0
    to_px = ax.transData.transform
    # every marker of the axes, and every line as dense samples, in pixels (a label on a segment between
    # markers hides it too)
    marks, curves = [np.empty((0, 2))], []
    for line in ax.get_lines():
        xy = to_px(np.column_stack(line.get_data()).astype(float))
        if line.get_marker() not in (None, "None", "", " "):
            marks.append(xy)
        for a, b in zip(xy[:-1], xy[1:]):
            curves.append(a + np.linspace(0, 1, 25)[:, None] * (b - a))
    curve_px = np.concatenate(curves) if curves else np.empty((0, 2))
    marks = np.concatenate(marks)
    frame = ax.get_window_extent(renderer)
    legend = ax.get_legend()
    blocked = [legend.get_window_extent(renderer)] if legend is not None else []

    def cost(box):
        pad = 1.0
        x0, y0, x1, y1 = box.x0 - pad, box.y0 - pad, box.x1 + pad, box.y1 + pad
        r = marker_pt * px
        hits = sum(b.overlaps(box) for b in blocked)
        hits += int(np.sum((marks[:, 0] > x0 - r) & (marks[:, 0] < x1 + r) & (marks[:, 1] > y0 - r) & (marks[:, 1] < y1 + r)))
        hits += int(np.any((curve_px[:, 0] > x0) & (curve_px[:, 0] < x1) & (curve_px[:, 1] > y0) & (curve_px[:, 1] < y1)))
        inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        return hits + (0 if inside else 10)

    for x, y, text, color, series in points:
        sides = [first[series]] + [k for k in _AROUND if k != first[series]]
        best = None
        for side in sides:
            dx, dy, ha, va = _AROUND[side]
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=7,
                              color=color)
            c = cost(ann.get_window_extent(renderer))
            if best is None or c < best[0]:
                if best is not None:
                    best[1].remove()
                best = (c, ann)
            else:
                ann.remove()
            if c == 0:
                break
        blocked.append(best[1].get_window_extent(renderer))


def draw_sphere(data: dict):
    """gg_sphere from its JSON: final reward against the off-support measure per delta (each point labelled
    with its delta, beside it where the label covers no other label, marker or line), and the reward per round
    at the middle delta."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    deltas = data["deltas"]
    points = []
    for kind, marker in (("G", "o"), ("G_loss", "s")):
        rew, dev = data["final"][kind]["reward"], data["final"][kind]["dev_abs"]
        axes[0].plot(dev, rew, marker=marker, color=COLORS[kind], label=kind)
        points += [(x, y, f"{d:g}", COLORS[kind], kind) for d, x, y in zip(deltas, dev, rew)]
        mid = deltas[len(deltas) // 2]
        axes[1].plot(data["curves"][f"{kind}@{mid}"]["reward"], color=COLORS[kind], label=f"{kind}, delta {mid:g}")
    pre = data["pretrained"]
    axes[0].plot([pre["dev_abs"]], [pre["reward"]], "k*", ms=10, label="pre-trained")
    axes[0].set_xscale("log")
    lo = min(min(data["final"][k]["dev_abs"]) for k in data["final"])
    hi = max(max(data["final"][k]["dev_abs"]) for k in data["final"])
    ticks = [t for t in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0) if lo / 1.5 <= t <= hi * 1.5]
    axes[0].xaxis.set_major_locator(FixedLocator(ticks))
    axes[0].xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    axes[0].xaxis.set_minor_locator(NullLocator())
    axes[0].xaxis.set_minor_formatter(NullFormatter())
    axes[0].set_xlabel("mean ||x| - 1| (off-support, log scale)")
    axes[0].set_ylabel("final reward theta.x (batch mean)")
    axes[0].set_title("one point per delta (labels: delta)", fontsize=9)
    axes[0].legend(fontsize=8, loc="upper left")
    axes[1].set_xlabel("round k")
    axes[1].set_ylabel("reward theta.x (batch mean)")
    axes[1].legend(fontsize=8, loc="lower right")
    c = data["config"]
    fig.suptitle(f"unit sphere, D = {c['D']}, B = {c['n']}, K = {c['rounds']}" + (" [quick]" if data["quick"] else ""))
    fig.tight_layout()
    # the labels last, on the final layout; the two series on opposite sides first
    _label_points(axes[0], points, {"G": "upper left", "G_loss": "lower right"})
    return fig


@figure("gg_sphere", "Gradient guidance on unit-sphere data: reward vs ||x| - 1|, G vs G_loss over the delta sweep",
        draw=draw_sphere, verdicts=_v.sphere)
def fig_sphere(quick: bool = False) -> dict:
    cfg = quick_sphere() if quick else SphereConfig()
    res = run_sphere(cfg)
    data = {"deltas": list(cfg.deltas), "pretrained": res["pretrained"], "final": {}, "curves": res["runs"],
            "config": cfg, "quick": quick}
    for kind in ("G", "G_loss"):
        data["final"][kind] = {key: [res["runs"][f"{kind}@{d}"][key][-1] for d in cfg.deltas]
                               for key in ("reward", "dev_abs")}
    return data


#: what the sample panels of gg_distributions draw, per kept round (from ``experiments._summary``)
_DRAWN = ("along_theta_par", "along_theta_perp", "perp_norm")


def draw_distributions(data: dict):
    """gg_distributions from its JSON: one column per run; top: samples of one seed along theta's in-span
    and off-span directions at round 0 and the last round; bottom: histogram of log10 |x_perp|."""
    plt = _plt()
    runs = data["runs"]
    fig, axes = plt.subplots(2, len(runs), figsize=(4.4 * len(runs), 8))
    for j, (name, r) in enumerate(runs.items()):
        ax, bx = axes[0, j], axes[1, j]
        K = r["rounds"]
        logp = {k: np.log10(np.array(r["samples"][str(k)]["perp_norm"], dtype=float) + 1e-16) for k in (0, K)}
        edges = np.histogram_bin_edges(np.concatenate(list(logp.values())), bins=30)  # one set of bins for both
        for k, color in ((0, "gray"), (K, COLORS[r["guidance"]])):
            smp = r["samples"][str(k)]
            ax.scatter(smp["along_theta_par"], smp["along_theta_perp"], s=8, color=color, alpha=0.7, label=f"round {k}")
            bx.hist(logp[k], bins=edges, color=color, alpha=0.6, label=f"round {k}")
        ax.set_title(LABELS[name], fontsize=10)
        ax.set_xlabel("x . theta_par/|theta_par| (in span)")
        bx.set_xlabel("log10 |x_perp|")
        ax.margins(y=0.25)  # room above the points for the legend
        ax.legend(fontsize=7, loc="upper left", ncol=2)
        bx.legend(fontsize=7, loc="upper center", ncol=2)
        bx.margins(y=0.2)
    axes[0, 0].set_ylabel("x . theta_perp/|theta_perp| (off span)")
    axes[1, 0].set_ylabel("samples")
    fig.suptitle(f"samples of seed {next(iter(runs.values()))['seed']}: along theta's in-span and off-span "
                 "directions (top), |x_perp| (bottom)" + (" [quick]" if data["quick"] else ""))
    fig.tight_layout()
    return fig


@figure("gg_distributions", "Gradient guidance: samples before and after (projections on span(A) and |x_perp|), "
        "Algorithms 1 and 2, G and G_loss (f1 theta_2)", draw=draw_distributions, verdicts=_v.distributions)
def fig_distributions(quick: bool = False) -> dict:
    runs = _run_all(alg_runs(quick))
    data = {}
    drawn = {}
    for name, res in runs.items():
        s0 = res["config"].seeds[0]
        samp = res["seeds"][s0]["samples"]
        K = res["config"].rounds
        data[name] = {"seed": s0, "par_norm_mean": {k: float(np.mean(samp[k]["par_norm"])) for k in (0, K)},
                      "perp_norm_mean": {k: float(np.mean(samp[k]["perp_norm"])) for k in (0, K)},
                      "along_theta_par_mean": {k: float(np.mean(samp[k]["along_theta_par"])) for k in (0, K)},
                      "along_theta_perp_mean": {k: float(np.mean(samp[k]["along_theta_perp"])) for k in (0, K)}}
        drawn[name] = {"seed": s0, "rounds": K, "guidance": res["config"].guidance,
                       "samples": {k: {key: samp[k][key] for key in _DRAWN} for k in (0, K)}}
    return {**data, "runs": drawn, "quick": quick}


RUNTIME_RUNS = ("f1_theta1", "f1_theta2", "f2_b2_trained", "f2_b2_exact")


def draw_runtime(data: dict):
    """gg_runtime's table from its JSON."""
    plt = _plt()
    rows = []
    for name in RUNTIME_RUNS:
        d = data[name]
        rows.append([name, "exact" if name.endswith("_exact") else "trained", str(d["chains_per_round"]),
                     str(d["rounds_to_converge"]), f"{d['total_s']:.1f}", f"{d['time_per_round_s']:.3f}",
                     f"{d['unguided_pass_s']:.3f}", f"{d['ratio_total_unguided']:.0f}"])
    pt = data["pass_times_s"]
    for kind in ("G_loss", "G"):
        rows.append([f"one {kind} pass", "trained", "32", "-", f"{pt[kind]:.3f}", "-", f"{pt['unguided']:.3f}",
                     f"{pt[kind] / pt['unguided']:.2f}"])
    fig, ax = plt.subplots(figsize=(12, 2.8))
    ax.axis("off")
    tab = ax.table(cellText=rows, colLabels=["run (Alg. 1, G_loss)", "score", "chains", "rounds to 95%",
                                             "total s", "s / round", "unguided pass s", "total / unguided"],
                   loc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    tab.scale(1, 1.4)
    steps = f"{data['n_steps']} sampler steps, " if "n_steps" in data else ""
    ax.set_title(f"runtime, {steps}CPU 1 thread" + _quick(data))
    return fig


@figure("gg_runtime", "Gradient guidance: runtime table (time to converge, per round, one unguided pass, ratios)",
        draw=draw_runtime, verdicts=_v.runtime)
def fig_runtime(quick: bool = False) -> dict:
    setup = Setup()
    data = {}
    conv = convergence_runs(quick)
    n_steps = conv["f1_theta1"].n_steps
    # best of ``reps`` passes: a default-settings pass (20 sampler steps, batch 32) lasts ~10 ms, a scheduler slice
    # on a shared machine, so one interruption can double it; 10 repeats cost what 1 full-settings pass does
    reps = 10 if quick else 3
    pts = {}

    def unguided(model, batch):
        if (model, batch) not in pts:
            pts[(model, batch)] = pass_times(setup, model, n=batch, n_steps=n_steps, repeats=reps)
        return pts[(model, batch)]

    for i, name in enumerate(RUNTIME_RUNS):
        cfg = conv[name]
        res = run(cfg)
        curve = np.mean([res["seeds"][s]["f_mean"] for s in cfg.seeds], axis=0)
        k_conv = converge_round(curve)
        tpr = res["time_per_round_s"]
        batch = cfg.n * len(cfg.seeds)
        t_un = unguided(cfg.model, batch)["unguided"]
        data[name] = {"rounds_to_converge": k_conv, "time_per_round_s": tpr, "total_s": k_conv * tpr,
                      "chains_per_round": batch, "unguided_pass_s": t_un,
                      "ratio_total_unguided": k_conv * tpr / t_un, "ratio_round_unguided": tpr / t_un}
        report(i + 1, len(RUNTIME_RUNS), "run", "gradient-guidance runs")
    data["pass_times_s"] = unguided("trained", 32)
    data["n_steps"] = n_steps
    data["quick"] = quick
    return data
