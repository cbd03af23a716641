"""Figures of the DRaFT toy, registered with ``theory.registry.figure``:

- ``draft_toy_compare``: reward A against reward queries and against training wall time, every method
  (mean over seeds, band = min..max over seeds), and the threshold success against queries.
- ``draft_toy_grad_k``: gradient norm and angle to the DRaFT-1 gradient against K.
- ``draft_toy_lora``: LoRA scale sweep (reward A, path KL), summed adapters, LoRA on first/last steps.
- ``draft_toy_diversity``: spread, modes, KL and reward over training for lam = 0, lam > 0, eps penalty.
"""
from __future__ import annotations

import numpy as np

from theory.registry import figure

from . import verdicts as _v
from .configs import CompareConfig, DiversityConfig, GradKConfig, LoraConfig
from .experiments import claims, compare, diversity, grad_vs_k, lora_analysis, summarise_compare

_COLORS = {"DRaFT": "C0", "DRaFT-1": "C1", "DRaFT-5": "C2", "DRaFT-10": "C3", "DRaFT-50": "C4",
           "DRaFT-LV": "C5", "ReFL": "C6", "DDPO": "C7", "DDPO-1upd": "C8"}


def _band(ax, x, M, label, color):
    M = np.asarray(M, dtype=float)
    ax.plot(x, M.mean(0), label=label, color=color, lw=1.5)
    if M.shape[0] > 1:
        ax.fill_between(x, M.min(0), M.max(0), color=color, alpha=0.15, lw=0)


def _mat(curves, key):
    """(seeds, evaluations) array of ``key`` from per-seed curves (lists of evaluation points)."""
    return np.array([[c[key] for c in curve] for curve in curves], dtype=float)


def draw_compare(numbers: dict):
    """draft_toy_compare from its JSON (the per-seed training curves of every method)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.4))
    for label, curves in numbers["curves"].items():
        c = _COLORS.get(label, None)
        ls = "--" if label == "DRaFT-50" else "-"  # the same run as DRaFT; dashed so both show
        q = np.array([p["queries"] for p in curves[0]], dtype=float)
        u = np.array([p["updates"] for p in curves[0]], dtype=float)
        R = _mat(curves, "reward_a")
        _band(axes[0], q, R, label, c)
        W = _mat(curves, "wall_time")
        axes[1].plot(W.mean(0), R.mean(0), label=label, color=c, ls=ls)
        _band(axes[2], q, _mat(curves, "reward_a_threshold"), label, c)
        axes[3].plot(u[1:], R.mean(0)[1:], label=label, color=c, ls=ls)  # log axis: from the 1st eval
        axes[0].lines[-1].set_linestyle(ls)
    axes[0].set(xlabel="reward queries", ylabel="reward A (eval, 50 DDIM steps)",
                title="per reward query (band: min..max over seeds)")
    axes[1].set(xlabel="training wall time (s, 1 thread, shared CPU)", ylabel="reward A", title="per second")
    axes[2].set(xlabel="reward queries", ylabel="P(|x - c_A| < rho)", title="threshold reward (DDPO's)")
    axes[3].set(xlabel="optimiser (AdamW) updates", ylabel="reward A", xscale="log",
                title="per optimiser update (DDPO: 4 PPO epochs per batch)")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


@figure("draft_toy_compare", "DRaFT toy: reward vs reward queries and wall time for DRaFT, DRaFT-K, DRaFT-LV, ReFL, DDPO",
        draw=draw_compare, verdicts=_v.compare)
def fig_compare(quick: bool = False) -> dict:
    cfg = CompareConfig.quick() if quick else CompareConfig()
    data = compare(cfg)
    return {"summary_reward_a": summarise_compare(data, "reward_a"),
            "summary_threshold": summarise_compare(data, "reward_a_threshold"),
            "claims": claims(data),
            "curves": {k: [r["curve"] for r in v] for k, v in data["runs"].items()},
            "config": data["config"]}


def draw_grad_k(d: dict):
    """draft_toy_grad_k from its JSON (gradient norms and angles per K and repeat)."""
    import matplotlib.pyplot as plt

    ks = np.array(d["ks"])
    N, A = np.array(d["grad_norm"], dtype=float), np.array(d["angle_deg"], dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].errorbar(ks, N.mean(1), yerr=N.std(1), marker="o", capsize=3)
    axes[0].set(xscale="log", yscale="log", xlabel="K (steps back-propagated)", ylabel="|grad| (LoRA params)",
                title="gradient norm against K")
    axes[1].errorbar(ks, A.mean(1), yerr=A.std(1), marker="o", capsize=3)
    axes[1].set(xscale="log", xlabel="K", ylabel="angle to DRaFT-1 gradient (deg)", title="angle against K")
    fig.tight_layout()
    return fig


@figure("draft_toy_grad_k", "DRaFT toy: norm of the DRaFT-K gradient and its angle to the DRaFT-1 gradient against K",
        draw=draw_grad_k, verdicts=_v.grad_k)
def fig_grad_k(quick: bool = False) -> dict:
    cfg = GradKConfig.quick() if quick else GradKConfig()
    d = grad_vs_k(cfg)
    N, A = np.array(d["grad_norm"]), np.array(d["angle_deg"])
    return {**d, "grad_norm_mean": N.mean(1), "angle_mean": A.mean(1)}


def draw_lora(d: dict):
    """draft_toy_lora from its JSON (scale sweep, combined adapters with their samples, step windows)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    s = [r["scale"] for r in d["scale"]]
    ax = axes[0]
    ax.plot(s, [r["reward_a"] for r in d["scale"]], "o-", color="C0")
    ax.set(xlabel="LoRA scale", ylabel="reward A", title="scaling the adapter")
    ax2 = ax.twinx()
    ax2.plot(s, [r["kl"] for r in d["scale"]], "s--", color="C3")
    ax2.set_ylabel("path KL to pre-trained", color="C3")
    ax = axes[1]
    names = list(d["combine"])
    x = np.arange(len(names))
    for j, key in enumerate(["reward_a", "reward_b"]):
        ax.bar(x + 0.4 * j - 0.2, [d["combine"][n][key] for n in names], 0.4, label=key)
    ax.set_xticks(x, names, fontsize=8)
    ax.set(ylabel="reward", title="summing adapters (A on r_A, B on r_B)")
    ax.legend(fontsize=8)
    ax = axes[2]
    for n, c in zip(names, ["0.6", "C0", "C1", "C2", "C4"]):
        S = np.array(d["combine"][n]["samples"])
        ax.scatter(S[:, 0], S[:, 1], s=3, color=c, label=n, alpha=0.6)
    ca, cb = d["config"]["rewards"]["center_a"], d["config"]["rewards"]["center_b"]
    ax.plot(*ca, "k*", ms=12)
    ax.plot(*cb, "k*", ms=12)
    ax.set(aspect="equal", title="samples (stars: optima of r_A, r_B)")
    ax.legend(fontsize=7, markerscale=3)
    ax = axes[3]
    for key, style in (("first", "o-"), ("last", "s-")):
        rows = d["window"][key]
        ax.plot([r["m"] for r in rows], [r["reward_a"] for r in rows], style, label=f"LoRA on the {key} m steps")
    ax.set(xlabel="m (of 50 steps)", ylabel="reward A", title="where the adapter acts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


@figure("draft_toy_lora", "DRaFT toy: LoRA scale sweep, sum of two adapters, LoRA on first/last steps", draw=draw_lora, verdicts=_v.lora)
def fig_lora(quick: bool = False) -> dict:
    return lora_analysis(LoraConfig.quick() if quick else LoraConfig())


def draw_diversity(d: dict):
    """draft_toy_diversity from its JSON (training curves, final samples, exact optima)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(22, 4))
    for i, (label, run) in enumerate(d["runs"].items()):
        q = [c["queries"] for c in run["curve"]]
        for ax, key in zip(axes[:4], ["reward_a", "spread", "modes_covered", "kl"]):
            ax.plot(q, [c[key] for c in run["curve"]], "o-", ms=3, label=label, color=f"C{i}")
        S = np.array(run["final_samples"])
        axes[4].scatter(S[:, 0], S[:, 1], s=3, alpha=0.5, color=f"C{i}", label=label)
        opt = d["optimum"].get(label)
        if opt is not None:  # the exact KL-regularised optimum of this lam (docs/theory.md §4-5)
            for ax, key in zip(axes[:4], ("reward", "spread", "modes_2pct", "kl")):
                ax.axhline(opt[key], color=f"C{i}", ls=":", lw=1)
    for ax, t in zip(axes, ["reward A", "spread sqrt(tr Cov)", "modes with >= 2% of samples",
                            "path KL to pre-trained", "final samples"]):
        ax.set(title=t)
    for ax in axes[:4]:
        ax.set_xlabel("reward queries")
    axes[3].set_yscale("symlog")
    axes[4].set_aspect("equal")
    axes[0].legend(fontsize=8, title="dotted: exact optimum of lam", title_fontsize=7)
    fig.tight_layout()
    return fig


@figure("draft_toy_diversity", "DRaFT toy: diversity collapse over training and the effect of the KL term and DRaFT+'s eps penalty",
        draw=draw_diversity, verdicts=_v.diversity)
def fig_diversity(quick: bool = False) -> dict:
    return diversity(DiversityConfig.quick() if quick else DiversityConfig())
