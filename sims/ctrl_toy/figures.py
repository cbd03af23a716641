"""Figures of the CTRL toy, registered with ``theory.registry.figure``:

1. ``ctrl_toy_density``: density panels, exact target vs each method, one row per label kind.
2. ``ctrl_toy_table``: accuracy / macro-F1 / mean label log-likelihood / KL to the target per method and label.
3. ``ctrl_toy_efficiency``: KL to the target against the offline size, CTRL vs CFG (mean, min..max over seeds).
4. ``ctrl_toy_gamma``: CTRL trained at one gamma, rescaled at inference (appendix B) vs the exact targets.
5. ``ctrl_toy_two_labels``: two labels at once (y1 component x y2 half-plane).
"""
from __future__ import annotations

import numpy as np

from theory.nets import DSMConfig
from theory.registry import figure

from . import data
from . import verdicts as _v
from .configs import CompareConfig, EfficiencyConfig, GammaConfig, ToyConfig, TwoLabelConfig
from .experiments import compare, efficiency, gamma_sweep, two_labels

PANEL_METHODS = ("exact target (floor)", "CTRL", "classifier guidance", "DPS", "CFG")
TABLE_METHODS = ("CTRL", "CTRL (last 5 steps)", "CTRL-PPO (quantised label)", "classifier guidance", "DPS", "CFG",
                 "exact classifier guidance (reference)", "pre-trained", "exact target (floor)")


def _strip(d):
    """Drop bulky sample lists from the JSON numbers."""
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in ("samples", "history")}
    if isinstance(d, list):
        return [_strip(v) for v in d]
    return d


def _show_target(ax, lab, c, gamma, toy):
    u, d = data.exact_target(lambda p: lab.log_prob(p)[:, c], gamma, toy)
    lim = 3.5
    ax.imshow(d.numpy(), origin="lower", extent=[-toy.grid_lim, toy.grid_lim] * 2, cmap="Greys", aspect="equal")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)


def _scatter(ax, pts, color):
    p = np.asarray(pts)
    ax.scatter(p[:, 0], p[:, 1], s=2, alpha=0.5, color=color)


#: samples per panel kept in the JSON (the panels draw these), rounded to 1e-3
N_DRAWN = 1000


def _drawn(pts) -> list:
    """The first ``N_DRAWN`` samples of a panel, rounded to 3 decimals, as the JSON keeps them."""
    return np.round(np.asarray(pts, dtype=float)[:N_DRAWN], 3).tolist()


def _toy(d: dict) -> ToyConfig:
    """The ToyConfig recorded in a JSON (lists back to tuples, the nested DSMConfig rebuilt)."""
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    kw["dsm"] = DSMConfig(**d["dsm"])
    return ToyConfig(**kw)


def draw_density(d: dict):
    """ctrl_toy_density from its JSON: per label kind (rows) and method (columns) the samples of the drawn
    class over the exact target (recomputed on the grid from the recorded toy config: closed form)."""
    import matplotlib.pyplot as plt

    toy, panels = _toy(d["config"]["toy"]), d["panels"]
    kinds = list(panels)
    fig, axes = plt.subplots(len(kinds), len(PANEL_METHODS), figsize=(3 * len(PANEL_METHODS), 3 * len(kinds)),
                             squeeze=False)
    for i, kind in enumerate(kinds):
        c, lab = panels[kind]["class"], data.true_label(kind, toy)
        for j, name in enumerate(PANEL_METHODS):
            ax = axes[i, j]
            _show_target(ax, lab, c, d["gamma"], toy)
            if name in panels[kind]["samples"]:
                _scatter(ax, panels[kind]["samples"][name], f"C{j}")
                ax.set_title(f"{name}\n{kind}, y={c}: KL={d['numbers'][f'{kind}/{name}/kl_y{c}']:.3f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"gamma={d['gamma']}, {d['config']['n_offline']} offline pairs; grey: exact target, dots: samples")
    fig.tight_layout()
    return fig


@figure("ctrl_toy_density", "CTRL toy: exact target p(y|x)^gamma p(x) vs CTRL, classifier guidance, DPS, CFG per label",
        draw=draw_density, verdicts=_v.density)
def fig_density(quick: bool = False) -> dict:
    cfg = CompareConfig.quick() if quick else CompareConfig()
    res = compare(cfg)
    numbers, panels = {}, {}
    for kind, r in res["labels"].items():
        lab = data.true_label(kind, cfg.toy)
        c = 1 if kind == "halfplane" else lab.n_classes - 1  # the rarest class: the hardest target
        panels[kind] = {"class": c, "samples": {}}
        for name in PANEL_METHODS:
            m = r["methods"].get(name)
            if m is not None and "samples" in m:
                numbers[f"{kind}/{name}/kl_y{c}"] = m["kl_per_class"][c]
                panels[kind]["samples"][name] = _drawn(m["samples"][c])
    return dict(numbers=numbers, config=cfg, gamma=res["gamma"], panels=panels)


def draw_table(d: dict):
    """The table from its JSON numbers: one row per label kind and method; a "note" column only when a
    method failed (its error message)."""
    import matplotlib.pyplot as plt

    cells, rows = [], []
    for kind, r in d["results"].items():
        for name in TABLE_METHODS:
            m = r["methods"].get(name)
            if m is None:
                continue
            rows.append(f"{kind}: {name}" + (f" (zeta={m['zeta']})" if "zeta" in m else ""))
            cells.append(["-"] * 4 + [m["error"][:40]] if "error" in m else
                         [f"{m['accuracy']:.3f}", f"{m['macro_f1']:.3f}", f"{m['log_lik']:.3f}", f"{m['kl']:.3f}", ""])
    cols = ["accuracy", "macro-F1", "E log p(y|x)", "KL to target"]
    if any(c[4] for c in cells):
        cols.append("note")
    cells = [c[: len(cols)] for c in cells]
    fig, ax = plt.subplots(figsize=(8.5 + 2.5 * (len(cols) > 4), 0.22 * (len(rows) + 1) + 0.5))
    ax.axis("off")
    t = ax.table(cellText=cells, rowLabels=rows, colLabels=cols, bbox=[0.36, 0.0, 0.64, 1.0])
    t.auto_set_font_size(False)
    t.set_fontsize(8)
    cfg = d["config"]
    ax.set_title(f"gamma={cfg['ctrl']['gamma']}, {cfg['n_offline']} offline pairs; metrics under the true p(y|x)",
                 fontsize=9, pad=12)
    return fig


@figure("ctrl_toy_table", "CTRL toy: accuracy / macro-F1 / label log-likelihood / KL of CTRL, classifier guidance, DPS, CFG",
        draw=draw_table, verdicts=_v.table)
def fig_table(quick: bool = False) -> dict:
    cfg = CompareConfig.quick() if quick else CompareConfig()
    res = compare(cfg)
    out = {kind: dict(methods=_strip(r["methods"]), ece=r["ece"], times=r["times"]) for kind, r in res["labels"].items()}
    return dict(results=out, config=cfg)


def draw_efficiency(d: dict):
    """ctrl_toy_efficiency from its JSON (KL and accuracy against the offline size: mean, min..max over seeds)."""
    import matplotlib.pyplot as plt

    sizes, summ = d["sizes"], d["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, label, col in (("ctrl", "CTRL", "C0"), ("cfg", "CFG", "C3")):
        for ax, metric in zip(axes, ("kl", "acc")):
            ax.plot(sizes, summ[f"{key}_{metric}_mean"], "o-", color=col, label=label)
            ax.fill_between(sizes, summ[f"{key}_{metric}_min"], summ[f"{key}_{metric}_max"], color=col, alpha=0.2, lw=0)
    axes[0].axhline(d["kl_floor"], color="k", ls=":", label="exact samples (floor)")
    axes[0].set_ylabel("KL(samples || exact target), grid histogram")
    axes[1].set_ylabel("accuracy under true p(y|x)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("offline pairs")
        ax.legend()
    what = f"label {d['label']}, gamma={d['gamma']}, " if "label" in d else ""
    fig.suptitle(f"{what}seeds {d['config']['seeds']} (band: min..max)")
    fig.tight_layout()
    return fig


@figure("ctrl_toy_efficiency", "CTRL toy: KL to the exact target vs offline data size, CTRL vs classifier-free guidance",
        draw=draw_efficiency, verdicts=_v.efficiency)
def fig_efficiency(quick: bool = False) -> dict:
    cfg = EfficiencyConfig.quick() if quick else EfficiencyConfig()
    res = efficiency(cfg)
    sizes = res["sizes"]
    summary = {}
    for key in ("ctrl", "cfg"):
        for metric in ("kl", "acc"):
            M = np.array([[r[f"{key}_{metric}"] for r in res["rows"] if r["size"] == s] for s in sizes])
            summary[f"{key}_{metric}_mean"] = M.mean(1).tolist()
            summary[f"{key}_{metric}_min"] = M.min(1).tolist()
            summary[f"{key}_{metric}_max"] = M.max(1).tolist()
    return dict(summary=summary, sizes=sizes, kl_floor=res["kl_floor"], rows=_strip(res["rows"]), config=cfg,
                label=res["label"], gamma=res["gamma"])


def draw_gamma(d: dict):
    """ctrl_toy_gamma from its JSON: KL and E log p(y|x) against the inference gamma, and per gamma the
    samples of the drawn class over the exact target (recomputed from the recorded toy config)."""
    import matplotlib.pyplot as plt

    rows, toy = d["rows"], _toy(d["config"]["base"]["toy"])
    g = [r["gamma"] for r in rows]
    lab = data.true_label(d["label"], toy)
    c = lab.n_classes - 1
    fig, axes = plt.subplots(1, 2 + len(rows), figsize=(4 * (2 + len(rows)), 3.8))
    axes[0].plot(g, [r["ctrl_kl"] for r in rows], "o-", label="CTRL rescaled (w = gamma/gamma_train)")
    axes[0].plot(g, [r["cfg_kl"] for r in rows], "s-", label="CFG (w = gamma)")
    axes[0].plot(g, [r["floor_kl"] for r in rows], "k:", label="exact samples (floor)")
    axes[0].set_ylabel("KL to exact p(y|x)^gamma p(x)")
    axes[1].plot(g, [r["ctrl_loglik"] for r in rows], "o-", label="CTRL rescaled")
    axes[1].plot(g, [r["cfg_loglik"] for r in rows], "s-", label="CFG")
    axes[1].plot(g, [r["floor_loglik"] for r in rows], "k:", label="exact target")
    axes[1].set_ylabel("E log p(y|x)")
    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.set_xlabel("gamma at inference")
        ax.axvline(d["gamma_train"], color="grey", lw=0.5)
        ax.legend(fontsize=7)
    for ax, r, pts in zip(axes[2:], rows, d["drawn"]):
        _show_target(ax, lab, c, r["gamma"], toy)
        _scatter(ax, pts, "C0")
        ax.set_title(f"gamma={r['gamma']} (w={r['w']:.2g}), y={c}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"label {d['label']}, CTRL trained at gamma={d['gamma_train']}")
    fig.tight_layout()
    return fig


@figure("ctrl_toy_gamma", "CTRL toy: gamma sweep, trained at one gamma and rescaled at inference (appendix B)",
        draw=draw_gamma, verdicts=_v.gamma)
def fig_gamma(quick: bool = False) -> dict:
    cfg = GammaConfig.quick() if quick else GammaConfig()
    res = gamma_sweep(cfg)
    c = data.true_label(res["label"], cfg.base.toy).n_classes - 1
    return dict(rows=_strip(res["rows"]), gamma_train=res["gamma_train"], config=cfg, label=res["label"],
                drawn=[_drawn(r["samples"][c]) for r in res["rows"]])


TWO_LABEL_METHODS = ("CTRL (two labels)", "classifier guidance (sum)")


def draw_two(d: dict):
    """ctrl_toy_two_labels from its JSON: per label pair, CTRL's and summed classifier guidance's samples
    over the exact p(y1|x) p(y2|x) p(x) (recomputed from the recorded toy config)."""
    import matplotlib.pyplot as plt

    rows, toy = d["rows"], _toy(d["config"]["base"]["toy"])
    l1, l2 = data.true_label(d["labels"][0], toy), data.true_label(d["labels"][1], toy)
    fig, axes = plt.subplots(2, len(rows), figsize=(2.6 * len(rows), 5.4), squeeze=False)
    for j, (r, pts) in enumerate(zip(rows, d["drawn"])):
        u, dens = data.exact_target(lambda p, r=r: l1.log_prob(p)[:, r["y1"]] + l2.log_prob(p)[:, r["y2"]], 1.0, toy)
        for i, name in enumerate(TWO_LABEL_METHODS):
            ax = axes[i, j]
            ax.imshow(dens.numpy(), origin="lower", extent=[-toy.grid_lim, toy.grid_lim] * 2, cmap="Greys")
            ax.set_xlim(-3.5, 3.5)
            ax.set_ylim(-3.5, 3.5)
            _scatter(ax, pts[name], f"C{i}")
            ax.set_title(f"{'CTRL' if i == 0 else 'CG sum'} y1={r['y1']},y2={r['y2']}\nKL={r['kl'][name]:.2f}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"two labels ({d['labels'][0]} x {d['labels'][1]}); grey: exact p(y1|x) p(y2|x) p(x)")
    fig.tight_layout()
    return fig


@figure("ctrl_toy_two_labels", "CTRL toy: two conditionally independent labels at once from two classifiers",
        draw=draw_two, verdicts=_v.two_labels)
def fig_two(quick: bool = False) -> dict:
    cfg = TwoLabelConfig.quick() if quick else TwoLabelConfig()
    res = two_labels(cfg)
    rows = res["rows"]
    means = {name: float(np.mean([r["kl"][name] for r in rows])) for name in rows[0]["kl"]}
    acc = {name: float(np.mean([r["acc_joint"][name] for r in rows])) for name in rows[0]["acc_joint"]}
    return dict(mean_kl=means, mean_joint_accuracy=acc, rows=_strip(rows), train_seconds=res["train_seconds"],
                config=cfg, labels=res["labels"], drawn=[{n: _drawn(r["samples"][n]) for n in TWO_LABEL_METHODS}
                                                         for r in rows])
