"""The methods of the CTRL toy. Every one samples through ``theory.solvers.sample`` (DDIM, eta = 1):

- CTRL (CTRL paper, Algorithm 1; docs/theory.md §6.5): the augmented model
      eps_aug(x, t, y) = eps_pre(x, t) + g_psi(x, t, y),   g_psi(., ., NULL) = 0,  g_psi = 0 at init
  (the paper's f_pre + g_psi; the correction's last layer starts at zero, the NULL label gives exactly
  zero), fine-tuned by ``theory.engine.finetune`` on the reward r(x0, y) = log p_phi(y | x0) with KL weight
  lam = 1 / gamma (objective E[gamma log p_phi(y|x0)] - KL, divided by gamma), path KL to the pre-trained
  model summed over dimensions. Several labels: r = sum_i log p_i(y_i | x0) (conditional independence).
  Inference: ``AugmentedEps.cfg(w)`` = eps_null + w (eps_y - eps_null) rescales gamma (appendix B).
- Classifier guidance: gamma grad log p_phi(y | x_t, t), a noisy classifier (``theory.guidance``).
- DPS: zeta grad_{x_t} log p_phi(y | x0_hat(x_t)), the clean calibrated classifier.
- Classifier-free guidance: a conditional EpsMLP trained on the offline pairs with label dropout.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from theory.classifiers import ClassifierReward
from theory.engine import DRaFT, DRaFTK, FinetuneConfig, SteeredModel, finetune
from theory.guidance import CFGEps
from theory.nets import DSMConfig, EpsMLP, train_dsm
from theory.solvers import sample

from .configs import CTRLConfig, ToyConfig
from .data import check_gamma, grid_times, schedule

__all__ = ["AugmentedEps", "ClassifierReward", "QuantisedReward", "train_ctrl", "draw", "train_cfg_model",
           "uniform_cond_sampler"]


def AugmentedEps(base: nn.Module, n_labels: Union[int, Sequence[int]], dim: int = 2, hidden: int = 64,
                 depth: int = 2, dtype=torch.float32) -> SteeredModel:
    """CTRL's augmented eps model (CTRL eq. 3 / appendix B; docs/theory.md (6.10b)): eps_pre(x, t) + g_psi(x, t, y), the steered
    model's 'network' label mode (``theory.engine.SteeredModel``).

    ``n_labels``: an int (one condition, cond of shape (B,)) or a tuple (several conditions, cond (B, m)).
    Label -1 is NULL; g_psi sees the one-hot codes of the non-null labels and is multiplied by 0 when all
    labels are NULL, so eps_aug(., ., NULL) = eps_pre exactly; its last layer is zero-initialised, so at
    initialisation eps_aug = eps_pre bit for bit. The pre-trained model is frozen; ``reference`` is it."""
    return SteeredModel(base, n_labels=n_labels, label_mode="network", label_shape=(dim,), label_hidden=hidden,
                        label_depth=depth, label_dtype=dtype)


class QuantisedReward(ClassifierReward):
    """A non-differentiable label reward for the PPO route: the classifier read on x0 rounded to a grid of
    step ``step`` (piecewise constant in x0, so its gradient is zero almost everywhere)."""

    differentiable = False

    def __init__(self, *log_probs, step: float = 0.25):
        super().__init__(*log_probs)
        self.step = step

    def __call__(self, x0, cond):
        with torch.no_grad():
            return super().__call__(torch.round(x0.detach() / self.step) * self.step, cond)


def uniform_cond_sampler(n_labels: Union[int, Sequence[int]]):
    """cond(n, generator): labels uniform over the classes (one column per condition)."""
    ks = (n_labels,) if isinstance(n_labels, int) else tuple(n_labels)

    def sampler(n, generator=None):
        cols = [torch.randint(0, k, (n,), generator=generator) for k in ks]
        return cols[0] if isinstance(n_labels, int) else torch.stack(cols, 1)

    return sampler


def _gauss(dtype):
    def sampler(n, generator=None):
        return torch.randn(n, 2, generator=generator, dtype=dtype)

    return sampler


def train_ctrl(model: SteeredModel, reward, ctrl: CTRLConfig, toy: ToyConfig = ToyConfig(), strategy=None,
               progress: bool = False, callback=None):
    """CTRL planning (Algorithm 1) through the engine: reward r = log p_phi(y|x0), lam = 1 / gamma, DDIM
    eta = 1 on ``ctrl.n_steps`` steps, gradients through the whole chain (``DRaFT()``) or the last k
    (``DRaFTK(k)``); ``strategy`` overrides (e.g. ``DDPO()`` for a non-differentiable reward).
    ``callback(step, row)``: passed to ``finetune`` (e.g. learning curves). Returns the engine's History."""
    gamma = check_gamma(ctrl.gamma)
    if strategy is None:
        strategy = DRaFT() if ctrl.k is None else DRaFTK(ctrl.k)
    dtype = model.g[0].weight.dtype
    cfg = FinetuneConfig(steps=ctrl.steps, batch_size=ctrl.batch_size, n_steps=ctrl.n_steps, method="ddim",
                         eta=1.0, lam=1.0 / gamma, lr=ctrl.lr, grad_clip=5.0, seed=ctrl.seed, t_min=toy.t_min,
                         progress=progress)
    ts = grid_times(toy, ctrl.n_steps)
    return finetune(model, schedule(toy), reward, strategy, cfg, x_T_sampler=_gauss(dtype),
                    cond_sampler=uniform_cond_sampler(model.n_labels), ts=ts, callback=callback)


@torch.no_grad()
def _sample_nograd(model, toy, x_T, cond, gen, guidance):
    return sample(model, schedule(toy), x_T, grid_times(toy), method="ddim", eta=1.0, cond=cond,
                  guidance=guidance, generator=gen).x0


def draw(model, cond, n: int, seed: int, toy: ToyConfig = ToyConfig(), guidance=None, dtype=torch.float32):
    """n samples of ``model`` (DDIM eta = 1, ``toy.n_steps`` steps) for label(s) ``cond`` (broadcast), on
    fixed noise (seed). Guidance fields differentiate internally, so no autograd graph is kept."""
    gen = torch.Generator().manual_seed(30_000 + seed)
    x_T = torch.randn(n, 2, generator=gen, dtype=dtype)
    if isinstance(cond, int):  # one label for every sample
        cond = torch.full((n,), cond, dtype=torch.long)
    elif isinstance(cond, (tuple, list)):  # one label per condition, for every sample
        cond = torch.tensor(cond, dtype=torch.long)[None].expand(n, -1)
    if guidance is not None:
        x = sample(model, schedule(toy), x_T, grid_times(toy), method="ddim", eta=1.0, cond=cond,
                   guidance=guidance, generator=gen).x0
        return x.detach()
    return _sample_nograd(model, toy, x_T, cond, gen, None)


def train_cfg_model(x: torch.Tensor, y: torch.Tensor, n_classes: int, p_uncond: float, dsm: DSMConfig,
                    toy: ToyConfig = ToyConfig()) -> EpsMLP:
    """Classifier-free guidance baseline: EpsMLP(n_classes) by denoising score matching on the offline
    pairs only, labels dropped to NULL with probability p_uncond (Ho & Salimans 2022)."""
    from dataclasses import replace

    torch.manual_seed(dsm.seed)
    model = EpsMLP(2, hidden=toy.hidden, depth=toy.depth, T=1.0, n_classes=n_classes)
    train_dsm(model, schedule(toy), x.float(), replace(dsm, p_uncond=p_uncond), labels=y)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def cfg_eps(model: EpsMLP, w: float) -> CFGEps:
    return CFGEps(model, w)
