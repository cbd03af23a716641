"""The settings of a fine-tuning run and its per-step history."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..io import atomic_write_json
from ..solvers import SOLVERS

__all__ = ["FinetuneConfig", "History", "lr_factor", "RESUMABLE_FIELDS"]

#: fields that may differ between a run and its resumption: the total step count (a run can be extended),
#: and settings that do not change the numbers (checkpoint period, progress bar, output folder)
RESUMABLE_FIELDS = ("steps", "ckpt_every", "progress", "out_dir")


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of ``finetune``, in four groups.

    Run: ``steps`` (optimisation steps), ``batch_size`` (samples per step PER PROCESS; a k-process run
    uses k * batch_size, see ``theory.engine.Distributed``), ``seed``, ``out_dir`` / ``ckpt_every``
    (checkpoint period in steps; 0 = only at the end when ``out_dir`` is set), ``progress``.
    Sampler: ``n_steps``, ``method``, ``eta``, ``t_min``, ``grid``, ``shape`` (per-sample shape of x for the
    default x_T sampler), ``checkpoint`` (gradient checkpointing of the sampling steps).
    Objective: ``lam`` (path-KL weight; 0 = DRaFT, CTRL: 1 / gamma), ``eps_penalty`` (DRaFT+),
    ``log_kl`` (compute the path KL for the history also when lam = 0).
    Optimiser: AdamW with ``lr`` (LoRA), ``lr_embed`` (label parameters; default lr), ``weight_decay``,
    ``betas``, ``grad_clip`` (global norm; 0 = none), ``lr_schedule`` ('constant', 'linear' decay to 0 or
    'cosine' decay to 0 over ``steps``) after ``warmup_steps`` of linear warm-up from 0."""

    steps: int
    batch_size: int
    n_steps: int
    method: str = "ddim"
    eta: float = 1.0
    lam: float = 0.0
    lr: float = 1e-3
    lr_embed: Optional[float] = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    checkpoint: bool = False
    seed: int = 0
    t_min: float = 0.0
    grid: str = "uniform"
    ckpt_every: int = 0
    out_dir: Optional[str] = None
    progress: bool = True
    eps_penalty: float = 0.0
    shape: Optional[tuple] = None
    log_kl: bool = False
    betas: tuple = (0.9, 0.999)
    lr_schedule: str = "constant"
    warmup_steps: int = 0

    def validate(self) -> None:
        for k in ("steps", "batch_size", "n_steps"):
            v = getattr(self, k)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{k}: must be an int >= 1, got {v!r}")
        if self.method not in SOLVERS:
            raise ValueError(f"method: unknown solver '{self.method}', choose from {sorted(SOLVERS)}")
        if not self.eta >= 0:
            raise ValueError(f"eta: must be >= 0, got {self.eta}")
        if not self.lam >= 0:
            raise ValueError(f"lam: the KL weight must be >= 0, got {self.lam}")
        if not self.lr > 0 or (self.lr_embed is not None and not self.lr_embed > 0):
            raise ValueError(f"lr, lr_embed: learning rates must be > 0, got {self.lr}, {self.lr_embed}")
        if not self.eps_penalty >= 0 or not self.weight_decay >= 0:
            raise ValueError("eps_penalty, weight_decay: must be >= 0")
        if not (isinstance(self.ckpt_every, int) and self.ckpt_every >= 0):
            raise ValueError(f"ckpt_every: must be an int >= 0, got {self.ckpt_every!r}")
        if self.lr_schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"lr_schedule: 'constant', 'cosine' or 'linear' (decay to 0 over steps), got {self.lr_schedule!r}")
        if not (isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps <= self.steps):
            raise ValueError(f"warmup_steps: must be an int in [0, steps={self.steps}], got {self.warmup_steps!r}")
        if self.ckpt_every > 0 and self.out_dir is None:
            raise ValueError("out_dir: checkpoints (ckpt_every > 0) need an output folder")

    @property
    def stochastic(self) -> bool:
        """Whether the sampler's steps are random (needed for the path KL and DDPO)."""
        return self.method in SOLVERS and SOLVERS[self.method].is_stochastic(self.eta)


def lr_factor(config: FinetuneConfig) -> Callable[[int], float]:
    """Multiplier of every group's lr after ``k`` completed steps: linear warm-up (k + 1) / W for k < W, then
    1 (constant), 1 - (k - W) / (S - W) (linear) or 1/2 (1 + cos(pi (k - W) / (S - W))) (cosine)."""
    S, W = config.steps, config.warmup_steps

    def decay(j: int, D: int) -> float:  # j of D decay steps done
        if D <= 0:
            return 1.0 if config.lr_schedule == "constant" else 0.0
        if config.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(j, D) / D))
        if config.lr_schedule == "linear":
            return max(0.0, 1.0 - j / D)
        return 1.0

    def factor(k: int) -> float:
        if k < W:
            return (k + 1) / W
        return decay(k - W, S - W)

    return factor


class History:
    """Per-step records (dicts with step, reward_mean, reward_std, kl, loss, grad_norm, wall_time,
    reward_queries, reward_queries_total, and strategy extras). Iterable, indexable, ``len``. In JSON a
    missing value (NaN: e.g. the KL when it is not computed) is ``null``; reading turns it back into NaN."""

    KEYS = ("step", "reward_mean", "reward_std", "kl", "loss", "grad_norm", "wall_time", "reward_queries",
            "reward_queries_total")
    FLOAT_KEYS = ("reward_mean", "reward_std", "kl", "loss", "grad_norm", "wall_time")

    def __init__(self, rows: Optional[list] = None):
        self.rows: list[dict] = [self._row(r) for r in (rows or [])]

    @classmethod
    def _row(cls, r: dict) -> dict:
        return {k: (float("nan") if v is None and k in cls.FLOAT_KEYS else v) for k, v in r.items()}

    def append(self, row: dict) -> None:
        self.rows.append(dict(row))

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def as_arrays(self) -> dict:
        """{key: np.ndarray over steps} for every key present in the records (NaN where missing)."""
        keys = list(self.KEYS) + sorted({k for r in self.rows for k in r} - set(self.KEYS))
        out = {}
        for k in keys:
            vals = [r.get(k) for r in self.rows]
            out[k] = np.array([np.nan if v is None else v for v in vals], dtype=float)
        return out

    def to_json(self, path) -> None:
        """Strict JSON (NaN -> null), written atomically."""
        atomic_write_json(path, self.rows)

    @classmethod
    def from_json(cls, path) -> "History":
        return cls(json.loads(Path(path).read_text()))
