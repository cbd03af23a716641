"""A small eps network for the low-dimensional experiments, and its denoising score-matching trainer.

The same network serves every toy: gradient guidance (D = 64 subspace data), CTRL (2-D mixtures,
optionally label-conditional for classifier-free guidance) and DRaFT (LoRA targets are its Linear
layers). Trained models are cached as safetensors under ``cache_dir()`` keyed by a hash of their
config, so a figure regenerates in seconds after the first run and always from the same seed.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import nn

from .cache import cache_dir  # the one cache-folder helper (re-exported)
from .io import atomic_save_tensors
from .progress import report
from .schedules import NoiseSchedule, append_dims, as_time

__all__ = ["EpsMLP", "DSMConfig", "train_dsm", "cache_dir", "cached", "dsm_loss"]


class _TimeFeatures(nn.Module):
    """Sinusoidal features of the normalised time u = t / T in [0, 1] (Vaswani et al. 2017)."""

    def __init__(self, dim: int = 32, T: float = 1.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"time_dim: must be even, got {dim}")
        self.T = float(T)
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), dim // 2)), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        u = (t / self.T)[:, None] * self.freqs[None].to(t.dtype)
        return torch.cat([torch.sin(u), torch.cos(u)], dim=-1)


class EpsMLP(nn.Module):
    """eps_theta(x, t, cond): an MLP on [x, time features (+ label embedding)] with SiLU activations.

    With ``n_classes`` it is label-conditional for classifier-free guidance: ``cond`` holds labels in
    [0, n_classes) or -1 for the null label (a learned "unconditional" embedding). All hidden layers are
    ``nn.Linear`` named ``net.<i>`` so LoRA can target them by name.
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, T: float = 1.0, time_dim: int = 32,
                 n_classes: Optional[int] = None):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"dim, hidden, depth: must be >= 1, got {dim}, {hidden}, {depth}")
        self.dim, self.n_classes = dim, n_classes
        self.config = dict(dim=dim, hidden=hidden, depth=depth, T=T, time_dim=time_dim, n_classes=n_classes)
        self.time = _TimeFeatures(time_dim, T)
        in_dim = dim + time_dim + (hidden if n_classes else 0)
        self.label = nn.Embedding(n_classes + 1, hidden) if n_classes else None  # last row = null label
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x: EpsMLP expects shape (B, {self.dim}), got {tuple(x.shape)}")
        t = as_time(t, x)
        feats = [x, self.time(t).to(x.dtype)]
        if self.label is not None:
            c = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device) if cond is None else \
                torch.as_tensor(cond, device=x.device).long().reshape(-1)
            if c.shape != (x.shape[0],) or (c >= self.n_classes).any() or (c < -1).any():
                raise ValueError(f"cond: expected ({x.shape[0]},) labels in [-1, {self.n_classes}), got {c.tolist()[:8]}")
            c = torch.where(c < 0, torch.full_like(c, self.n_classes), c)
            feats.append(self.label(c).to(x.dtype))
        return self.net(torch.cat(feats, dim=-1))


@dataclass(frozen=True)
class DSMConfig:
    """Denoising score matching (Ho et al. 2020, eq. 14): E |eps_theta(alpha x0 + sigma eps, t) - eps|^2,
    t ~ U[t_min, T]. ``p_uncond`` drops labels to the null label (classifier-free guidance training)."""

    steps: int = 4000
    batch_size: int = 512
    lr: float = 2e-3
    t_min: float = 1e-3
    p_uncond: float = 0.0
    seed: int = 0
    ema: float = 0.0  # EMA decay of weights (0 = off)


def dsm_loss(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor,
             cond: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-batch mean of |eps_theta(x_t, t) - eps|^2 summed over dimensions."""
    eps = torch.randn(x0.shape, dtype=x0.dtype, device=x0.device, generator=generator)
    a, s = schedule.alpha(t).to(x0.dtype), schedule.sigma(t).to(x0.dtype)
    xt = append_dims(a, x0) * x0 + append_dims(s, x0) * eps
    return ((model(xt, t, cond) - eps) ** 2).flatten(1).sum(1).mean()


def train_dsm(model: nn.Module, schedule: NoiseSchedule, data: Union[torch.Tensor, Callable], config: DSMConfig = DSMConfig(),
              labels: Optional[torch.Tensor] = None, progress: bool = False) -> list[float]:
    """Fit ``model`` by denoising score matching on ``data`` (an (N, D) tensor, resampled with replacement,
    or a callable ``data(n, generator) -> (x0, labels or None)``). Returns the loss per step."""
    g = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    if isinstance(data, torch.Tensor):
        if labels is not None and labels.shape[0] != data.shape[0]:
            raise ValueError(f"labels: {labels.shape[0]} labels for {data.shape[0]} samples")
        X, Y = data, labels

        def draw(n, gen):
            idx = torch.randint(0, X.shape[0], (n,), generator=gen)
            return X[idx], (Y[idx] if Y is not None else None)
    else:
        draw = data
    dtype = next(model.parameters()).dtype
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.steps, eta_min=config.lr * 0.05)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()} if config.ema > 0 else None
    losses = []
    it = range(config.steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="score matching", leave=False)
    for step in it:
        x0, y = draw(config.batch_size, g)
        x0 = x0.to(dtype)
        t = config.t_min + (schedule.T - config.t_min) * torch.rand(x0.shape[0], generator=g, dtype=dtype)
        if y is not None and config.p_uncond > 0:
            drop = torch.rand(y.shape[0], generator=g) < config.p_uncond
            y = torch.where(drop, torch.full_like(y, -1), y)
        loss = dsm_loss(model, schedule, x0, t, y, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[k].mul_(config.ema).add_(v, alpha=1 - config.ema)
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0 or step + 1 == config.steps:  # to a progress display, if one listens
            report(step + 1, config.steps, "step", "pre-trained network (score matching)")
    if ema is not None:
        model.load_state_dict(ema)
    return losses


def cached(name: str, key: dict, build: Callable[[], nn.Module], train: Callable[[nn.Module], object]) -> nn.Module:
    """Return ``build()`` with weights loaded from the cache entry for (name, key), training it with
    ``train(model)`` and saving it (atomically, safetensors) on a miss. ``key`` must describe every
    setting that changes the weights (data, architecture, training config, seed).

    ``build`` and ``train`` run under ``torch.random.fork_rng`` with the global generator seeded from the
    key's digest: the initial weights, hence the trained network, are a function of the key alone - not of
    what the process drew before (which figure ran first in a worker, ``--jobs``, a test run earlier) - and
    the global random state after this call is the one before it, on a miss (trained now) as on a hit
    (loaded), so what a caller draws next does not depend on the cache either."""
    from safetensors.torch import load_file

    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_dir() / f"{name}-{digest}.safetensors"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(digest[:8], 16))
        model = build()
        if path.exists():
            model.load_state_dict(load_file(str(path)))
            return model.eval()
        train(model)
    atomic_save_tensors(model.state_dict(), path)
    return model.eval()
