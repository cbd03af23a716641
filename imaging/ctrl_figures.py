"""Figures of CTRL on the digits pipeline (``diffsteer figures``): the experiment is ``imaging.ctrl.run`` with
``imaging/configs/ctrl_digits.json`` (full) or ``QUICK_OVERRIDES`` on top of it (quick); the two figures
share one run per process (and resume it from the cache folder after an interruption).

- ``ctrl_digits``: per-class mean true JPEG size against reward queries during CTRL's training (the
  paper's Figure 2a), accuracy / macro-F1 by the true measure for the pre-trained model, CTRL, CTRL with
  classifier-free mixing and DPS at each strength, and samples per requested class.
- ``ctrl_digits_multitask``: compressibility x ink mass, four compositional classes, the same table.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from theory.registry import figure, needs

from . import digits_pipeline as _digits_pipeline  # noqa: F401  (registers the prerequisite)
from . import verdicts as _v

__all__ = ["experiment", "QUICK_OVERRIDES", "draw_compress", "draw_multitask"]

#: reduced settings of the quick figures (the full ones are the config file's).
QUICK_OVERRIDES = dict(n_offline=256, clf_steps=150, steps=16, batch_size=4, sample_steps=10, truncation_k=3,
                       n_eval=6, curve_every=8, curve_n=3, dps_strengths=(10.0, 100.0), cfg_weights=(2.0,),
                       ckpt_every=8)
_RUNS: dict = {}
_GRID_N = 3  # samples per class in the grid

needs(__name__, "digits-pipeline")


def experiment(quick: bool) -> dict:
    """The digits CTRL run (cached per process; resumed from ``<cache>/ctrl-digits-<config hash>``)."""
    from .cache import cache_root
    from .ctrl import CONFIG_DIR, load_config, run

    if quick in _RUNS:
        return _RUNS[quick]
    cfg = load_config(CONFIG_DIR / "ctrl_digits.json", **(QUICK_OVERRIDES if quick else {}))
    key = hashlib.sha256(json.dumps(cfg.to_json(), sort_keys=True).encode()).hexdigest()[:12]
    out = cache_root() / f"ctrl-digits-{key}"
    res = run(cfg, out, progress=True)
    res["run_dir"] = str(out)
    res["grids"] = _grids(out, res)
    _RUNS[quick] = res
    return res


def _grids(out, res) -> dict:
    """Grey-level uint8 samples (class, i, H, W) of the pre-trained model, CTRL and DPS's best, per task."""
    from safetensors.torch import load_file

    grids = {}
    for tname, t in res["tasks"].items():
        imgs = load_file(str(out / f"samples_{tname}.safetensors"))
        best = t["metrics"].get("DPS best", {}).get("strength")
        g = {}
        for name in ("pre-trained", "CTRL", best):
            if name is None:
                continue
            x = imgs[name.replace(" ", "_")][:, :_GRID_N].float().mean(2)  # (K, n, H, W) grey
            g[name] = (x.clamp(0, 1) * 255).round().to(dtype=__import__("torch").uint8).tolist()
        grids[tname] = g
    return grids


def _strip(res: dict, task: str) -> dict:
    t = res["tasks"][task]
    return {"config": res["config"], "offline": res["offline"], "task": task, "thresholds": t["thresholds"],
            "threshold_source": t["threshold_source"], "offline_class_counts": t["offline_class_counts"],
            "classifiers": t["classifiers"], "training": t["training"], "curve": t["curve"], "metrics": t["metrics"],
            "grid": res["grids"][task], "wall_s_experiment": res["seconds"]}


def _table(ax, metrics: dict, cols=("accuracy", "macro_f1")):
    names = [n for n in metrics if n != "DPS best"]
    best = metrics.get("DPS best", {}).get("strength")
    cells = [[f"{metrics[n][c]:.3f}" for c in cols] + [" ".join(f"{v:.2f}" for v in metrics[n]["mean_kb"])]
             for n in names]
    labels = [n + ("  (DPS best)" if n == best else "") for n in names]
    ax.axis("off")
    tab = ax.table(cellText=cells, rowLabels=labels, colLabels=[c.replace("_", "-") for c in cols] +
                   ["mean kB per requested class"], loc="center", cellLoc="center", colWidths=[0.2, 0.2, 0.6])
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    tab.scale(1.0, 1.3)


def _grid(ax, grid: dict, class_names):
    names = list(grid)
    blocks = []
    for name in names:
        a = np.asarray(grid[name], dtype=float) / 255.0  # (K, n, H, W)
        K, n, H, W = a.shape
        pad = np.ones((K, n, H + 2, W + 2))
        pad[:, :, 1:-1, 1:-1] = a
        blocks.append(pad.transpose(0, 2, 1, 3).reshape(K * (H + 2), n * (W + 2)))
        blocks.append(np.ones((K * (H + 2), 4)))
    ax.imshow(np.concatenate(blocks[:-1], 1), cmap="gray", vmin=0, vmax=1)
    ax.set_yticks([(k + 0.5) * (H + 2) for k in range(K)], class_names, fontsize=7)
    ax.set_xticks([(i + 0.5) * n * (W + 2) + i * 4 for i in range(len(names))], names, fontsize=7)
    ax.set_title("samples per requested class (same noise in every column block)", fontsize=9)


def draw_compress(d: dict):
    import matplotlib.pyplot as plt

    K = len(d["thresholds"][0]) + 1
    fig = plt.figure(figsize=(15, 5.2))
    gs = fig.add_gridspec(1, 3, width_ratios=[1.1, 1.0, 1.2])
    ax = fig.add_subplot(gs[0])
    q = [r["reward_queries"] for r in d["curve"]]
    for k in range(K):
        ax.plot(q, [r["mean_kb"][k] for r in d["curve"]], "o-", ms=3, label=f"requested class {k}")
    for th in d["thresholds"][0]:
        ax.axhline(th, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("reward queries"), ax.set_ylabel("mean true JPEG size (kB)")
    ax.set_title("per-class mean size during CTRL training (cf. paper Fig. 2a)", fontsize=9)
    ax.legend(fontsize=7)
    _table(fig.add_subplot(gs[1]), d["metrics"])
    names = [f"y{k}" for k in range(K)]
    _grid(fig.add_subplot(gs[2]), d["grid"], names)
    c = d["classifiers"][0]
    cfg = d["config"]
    fig.suptitle(f"CTRL on the digits pipeline, 4 JPEG-size classes ({d['threshold_source']}: "
                 f"{', '.join(f'{t:.3f}' for t in d['thresholds'][0])} kB at {cfg['measure_upscale']}x); classifier "
                 f"test acc {c['test_after']['accuracy']:.2f}, NLL {c['test_before']['nll']:.3f}->{c['test_after']['nll']:.3f}, "
                 f"ECE {c['test_before']['ece']:.3f}->{c['test_after']['ece']:.3f}; gamma {cfg['gamma']}, "
                 f"lam {cfg['kl_weight']}, K {cfg['truncation_k']}, {cfg['steps']} steps", fontsize=9)
    fig.tight_layout()
    return fig


def draw_multitask(d: dict):
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(14, 5))
    gs = fig.add_gridspec(1, 3, width_ratios=[1.0, 0.9, 1.2])
    ax = fig.add_subplot(gs[0])
    ms = d["metrics"]
    names = [n for n in ms if n != "DPS best"]
    x = np.arange(len(names))
    for j, lab in enumerate(("JPEG size", "ink mass")):
        ax.bar(x + (j - 0.5) * 0.35, [ms[n]["per_task_accuracy"][j] for n in names], 0.35, label=f"{lab} accuracy")
    ax.set_xticks(x, names, rotation=25, fontsize=7), ax.set_ylim(0, 1), ax.legend(fontsize=7)
    ax.set_title("per-task accuracy by the true measures", fontsize=9)
    _table(fig.add_subplot(gs[1]), ms)
    names = ["big,heavy", "big,light", "small,heavy", "small,light"]  # class 0 of each measure = above its median
    _grid(fig.add_subplot(gs[2]), d["grid"], names)
    fig.suptitle(f"multi-task CTRL: JPEG size (median {d['thresholds'][0][0]:.3f} kB) x ink mass (median "
                 f"{d['thresholds'][1][0]:.4f}), four compositional classes; classifier test acc "
                 f"{d['classifiers'][0]['test_after']['accuracy']:.2f} / {d['classifiers'][1]['test_after']['accuracy']:.2f}",
                 fontsize=9)
    fig.tight_layout()
    return fig


@figure("ctrl_digits", "CTRL on the digits pipeline: 4 JPEG-size classes by the true measure vs DPS and the "
                       "pre-trained model; per-class size during training; samples", draw=draw_compress, verdicts=_v.ctrl_digits)
def fig_ctrl_digits(quick: bool) -> dict:
    return _strip(experiment(quick), "compress")


@figure("ctrl_digits_multitask", "CTRL multi-task on the digits pipeline: JPEG size x ink mass, four "
                                 "compositional classes", draw=draw_multitask, verdicts=_v.ctrl_digits)
def fig_ctrl_digits_multitask(quick: bool) -> dict:
    res = experiment(quick)
    if "multitask" not in res["tasks"]:
        raise ValueError("multitask: the digits config has multitask off; nothing to draw")
    return _strip(res, "multitask")
