"""CTRL on real images at CPU scale: scikit-learn's 8x8 handwritten digits.

The same code path as the 2-D toys and as Stable Diffusion, on real data that ships inside a package
(no download): an unconditional eps MLP pre-trained by denoising score matching on the digits, a clean
classifier p_phi(y | x) learnt by maximum likelihood from offline (x, y) pairs and temperature-scaled
on a held-out split, and CTRL (Zhao et al. 2024, Algorithm 1): the pre-trained model augmented with LoRA
and a zero-initialised label embedding (``theory.engine.SteeredModel``), fine-tuned by
``theory.engine.finetune`` to maximise  E[gamma log p_phi(y | x0)] - KL(path || pre-trained path)
(reward log p_phi, KL weight lam = 1 / gamma; docs/theory.md §4, §6). The baseline is DPS / reconstruction
guidance with the same classifier (docs/theory.md §6). Samples are judged by a second classifier
(scikit-learn logistic regression) fitted on a split that neither the model nor p_phi saw, and their
realism by the distance to the nearest training digit.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from theory.classifiers import (
    ClassifierMLP,
    ClassifierReward,
    FitConfig,
    expected_calibration_error,
    fit_mle,
    fit_temperature,
)
from theory.guidance import dps_guidance
from theory.nets import DSMConfig, EpsMLP, cached, train_dsm
from theory.registry import figure
from theory.schedules import LinearVP
from theory.solvers import sample, time_grid

from . import verdicts as _v

__all__ = ["DigitsConfig", "load_digits", "pretrained", "run", "draw", "QUICK"]


@dataclass(frozen=True)
class DigitsConfig:
    hidden: int = 512
    depth: int = 3
    dsm_steps: int = 8000
    dsm_batch: int = 256
    dsm_lr: float = 1e-3
    n_steps: int = 50  # sampler steps (DDIM eta = 1)
    t_min: float = 1e-3
    clf_hidden: int = 128
    clf_steps: int = 1500
    gamma: float = 4.0  # CTRL's reward weight; lam = 1 / gamma
    lora_rank: int = 8
    ft_steps: int = 600
    ft_batch: int = 50
    ft_k: int = 10  # DRaFT-K truncation of the back-propagation (CTRL sec. 5 uses truncation too)
    ft_lr: float = 3e-3
    dps_zeta: float = 1.0
    n_eval: int = 40  # samples per label
    seed: int = 0


#: the default (reduced) settings. Fine-tuning: 200 Adam steps of batch 10 (2,000 samples). 60 steps of batch 30
#: (1,800 samples) left the time-embedding variant at the pre-trained model's judged accuracy (0.095 vs 0.09),
#: where the full run reaches 0.8: its label enters through the time features and needs more updates, not
#: more samples per update; with 200 x 10 both variants clear the pre-trained model by > 3.5 se on 200 samples.
QUICK = DigitsConfig(dsm_steps=3000, clf_steps=800, ft_steps=200, ft_batch=10, n_eval=20)


def load_digits(seed: int = 0):
    """The 1,797 digits scaled to [-1, 1] (64 dims), split 50/25/25 into train (score model and p_phi),
    held-out (temperature) and judge (the evaluation classifier) by a seeded permutation."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("load_digits: needs scikit-learn (pip install scikit-learn)") from e
    d = _load()
    x = torch.tensor(d.data, dtype=torch.float32) / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n1, n2 = x.shape[0] // 2, (3 * x.shape[0]) // 4
    parts = perm[:n1], perm[n1:n2], perm[n2:]
    return {name: (x[i], y[i]) for name, i in zip(("train", "held", "judge"), parts)}


def schedule():
    return LinearVP(0.1, 20.0, T=1.0)


def pretrained(cfg: DigitsConfig, data) -> EpsMLP:
    """The unconditional eps MLP on the training digits (cached in ``theory.nets.cache_dir``)."""
    x, _ = data["train"]
    # EMA of the weights over the last ~10% of training (decay 0.999 at 8000 steps; a short run must not
    # average in its random initialisation)
    ema = min(0.999, 1.0 - 10.0 / cfg.dsm_steps)
    key = dict(data="sklearn-digits-train", split_seed=cfg.seed, hidden=cfg.hidden, depth=cfg.depth,
               steps=cfg.dsm_steps, batch=cfg.dsm_batch, lr=cfg.dsm_lr, sch="linear-0.1-20", ema=ema)
    dsm = DSMConfig(steps=cfg.dsm_steps, batch_size=cfg.dsm_batch, lr=cfg.dsm_lr, t_min=cfg.t_min, seed=cfg.seed, ema=ema)
    model = cached("digits-eps", key, lambda: EpsMLP(64, hidden=cfg.hidden, depth=cfg.depth),
                   lambda m: train_dsm(m, schedule(), x, dsm))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _draw(model, n_per, seed, guidance_for=None):
    """n_per samples for each label 0..9 on fixed noise (DDIM eta = 1)."""
    sch = schedule()
    ts = time_grid(sch, DigitsConfig.n_steps, t_min=DigitsConfig.t_min)
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(10):
        x_T = torch.randn(n_per, 64, generator=g)
        cond = torch.full((n_per,), c, dtype=torch.long)
        field = None if guidance_for is None else guidance_for(cond)
        if field is None:
            with torch.no_grad():
                x = sample(model, sch, x_T, ts, method="ddim", eta=1.0, cond=cond, generator=g).x0
        else:
            x = sample(model, sch, x_T, ts, method="ddim", eta=1.0, cond=cond, guidance=field, generator=g).x0.detach()
        out.append(x)
    return torch.stack(out)  # (10, n_per, 64)


def _judge(data):
    from sklearn.linear_model import LogisticRegression

    xj, yj = data["judge"]
    return LogisticRegression(max_iter=2000, C=1.0).fit(xj.numpy(), yj.numpy())


def _metrics(samples, judge, train_x):
    n_per = samples.shape[1]
    flat = samples.reshape(-1, 64).clamp(-1, 1)
    labels = np.repeat(np.arange(10), n_per)
    pred = judge.predict(flat.numpy())
    nn_dist = torch.cdist(flat, train_x).min(1).values
    return {"judge_accuracy": float((pred == labels).mean()),
            "per_label_accuracy": [float((pred[labels == c] == c).mean()) for c in range(10)],
            "nn_distance_mean": float(nn_dist.mean()), "nn_distance_std": float(nn_dist.std())}


def run(cfg: DigitsConfig = DigitsConfig(), progress: bool = False) -> dict:
    """Pre-train (cached), fit p_phi, run CTRL and DPS, judge the samples. Returns plain data."""
    from theory.engine import DRaFTK, FinetuneConfig, SteeredModel, finetune

    torch.manual_seed(cfg.seed)
    data = load_digits(cfg.seed)
    base = pretrained(cfg, data)
    xtr, ytr = data["train"]
    clf = ClassifierMLP(64, 10, hidden=cfg.clf_hidden)
    fit_mle(clf, xtr, ytr, FitConfig(steps=cfg.clf_steps, seed=cfg.seed))
    xh, yh = data["held"]
    with torch.no_grad():
        ece_before = expected_calibration_error(clf(xh), yh)
    T = fit_temperature(clf, xh, yh)
    with torch.no_grad():
        ece_after = expected_calibration_error(clf(xh), yh)
        clf_acc = float((clf(data["judge"][0]).argmax(1) == data["judge"][1]).float().mean())
    judge = _judge(data)
    xh_, yh_ = data["held"]  # real digits of each label, against the training digits (same realism yardstick)
    real = _metrics(torch.stack([xh_[yh_ == c][: min(cfg.n_eval, 30)] for c in range(10)]), judge, xtr)

    reward = ClassifierReward(clf, clamp=(-1.0, 1.0))  # x0 clipped to the pixel range, as SD's decoder clamps
    fcfg = FinetuneConfig(steps=cfg.ft_steps, batch_size=cfg.ft_batch, n_steps=cfg.n_steps, method="ddim", eta=1.0,
                          lam=1.0 / cfg.gamma, lr=cfg.ft_lr, grad_clip=5.0, seed=cfg.seed, t_min=cfg.t_min,
                          progress=progress)
    variants = {  # the paper's augmentation (embedding added to the eps output) and ours (to the time features)
        "CTRL (eps embedding)": dict(),
        "CTRL (time embedding)": dict(label_mode="module", label_module="time", label_shape=(base.config["time_dim"],)),
    }
    models, training = {}, {}
    for name, kw in variants.items():
        # SteeredModel injects LoRA into the module it is given: give it a copy, keep `base` pre-trained
        model = SteeredModel(copy.deepcopy(base), lora_rank=cfg.lora_rank, n_labels=10, **kw)
        t0 = time.perf_counter()
        hist = finetune(model, schedule(), reward, DRaFTK(cfg.ft_k), fcfg,
                        x_T_sampler=lambda n, g: torch.randn(n, 64, generator=g),
                        cond_sampler=lambda n, g: torch.randint(0, 10, (n,), generator=g))
        h = hist.as_arrays()
        training[name] = {"reward_mean": np.round(np.asarray(h["reward_mean"], dtype=float), 4).tolist(),
                          "kl": np.round(np.asarray(h["kl"], dtype=float), 4).tolist(),
                          "seconds": time.perf_counter() - t0}
        models[name] = model.eval()

    samples = {"pre-trained": _draw(base, cfg.n_eval, seed=1),
               "DPS": _draw(base, cfg.n_eval, seed=1, guidance_for=lambda c: dps_guidance(
                   base, schedule(), lambda x0, y: clf.log_lik(x0, y), c, zeta=cfg.dps_zeta))}
    samples.update({name: _draw(m, cfg.n_eval, seed=1) for name, m in models.items()})
    metrics = {"real digits": real}
    metrics.update({name: _metrics(x, judge, xtr) for name, x in samples.items()})
    return {
        "config": asdict(cfg),
        "classifier": {"temperature": T, "ece_before": ece_before, "ece_after": ece_after, "judge_split_accuracy": clf_acc},
        "training": training,
        "metrics": metrics,
        "samples": {name: np.round(x[:, :6].numpy(), 3).tolist() for name, x in samples.items()},
    }


def draw(res: dict):
    """The figure from the JSON numbers of ``run`` (samples: the first 6 per label of each method)."""
    import matplotlib.pyplot as plt

    names = list(res["samples"])
    fig = plt.figure(figsize=(17, 7.2), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[2.3, 1.4], wspace=0.04)
    # the grids lie wide (a column per label), two by two, so that they fill the left half's height
    grid = left.subplots(2, (len(names) + 1) // 2, squeeze=False).ravel()
    for ax in grid[len(names):]:
        ax.set_axis_off()
    for ax, name in zip(grid, names):
        s = np.asarray(res["samples"][name], dtype=float)  # (10 labels, 6 samples, 64)
        pad = np.full((10, 6, 10, 10), -1.0)  # one blank pixel around each digit
        pad[:, :, 1:9, 1:9] = np.clip(s, -1, 1).reshape(10, 6, 8, 8)
        tiles = pad.transpose(1, 2, 0, 3).reshape(60, 100)  # rows: samples, columns: labels
        ax.imshow(-tiles, cmap="gray", vmin=-1, vmax=1)
        acc = res["metrics"][name]["judge_accuracy"]
        ax.set_title(f"{name} (columns: label 0-9; judged acc {acc:.2f})", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    top, bottom = right.subfigures(2, 1, height_ratios=[1, 1.05])
    ax = top.subplots()
    for i, (name, tr) in enumerate(res["training"].items()):
        steps = np.arange(1, len(tr["reward_mean"]) + 1)
        ax.plot(steps, tr["reward_mean"], color=f"C{i}", label=name)
        ax.plot(steps, tr["kl"], color=f"C{i}", ls="--")
    ax.set_xlabel("CTRL step")
    ax.set_title("training: reward log p_phi(y|x0) (solid), path KL (dashed)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    metrics = list(res["metrics"])
    y = np.arange(len(metrics))
    axes = bottom.subplots(1, 2, sharey=True)
    for ax, (key, label, color) in zip(axes, (("judge_accuracy", "judged accuracy", "C0"),
                                              ("nn_distance_mean", "distance to nearest\ntraining digit", "C1"))):
        ax.barh(y, [res["metrics"][n][key] for n in metrics], 0.6, color=color)
        ax.set_title(label, fontsize=9)
    axes[0].set_yticks(y, metrics, fontsize=8)
    axes[0].invert_yaxis()
    axes[0].set_xlim(0, 1)
    fig.suptitle(f"CTRL on 8x8 digits (gamma={res['config']['gamma']}, {res['config']['ft_steps']} steps, "
                 f"DRaFT-{res['config']['ft_k']}; ECE {res['classifier']['ece_before']:.3f} -> "
                 f"{res['classifier']['ece_after']:.3f} after temperature scaling)", fontsize=10)
    return fig


@figure("digits_ctrl", "CTRL on scikit-learn's 8x8 digits: samples per label vs DPS, judged accuracy, realism",
        draw=draw, verdicts=_v.digits_ctrl)
def fig_digits(quick: bool) -> dict:
    return run(QUICK if quick else DigitsConfig())
