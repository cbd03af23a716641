"""The fine-tuning engine: one loop for CTRL, DRaFT, ReFL and DDPO (docs/theory.md §6).

Modules, each readable on its own:

- ``steered``: the steered model (frozen base + LoRA + CTRL label correction) and its Protocol;
- ``strategies``: where gradients flow through the sampler; one interface, a registry of names;
- ``config``: the run's settings and history;
- ``checkpoint``: safetensors + JSON checkpoints, resume refusing other settings;
- ``distributed``: the data-parallel hook (``Distributed``);
- ``loop``: ``finetune`` and the only optimiser step (``Update``).
"""
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .config import RESUMABLE_FIELDS, FinetuneConfig, History, lr_factor
from .distributed import Distributed, SingleProcess
from .loop import NonFiniteError, Update, finetune, objective, update
from .steered import PromptLabel, Steered, SteeredModel, trainable_dtype
from .strategies import (
    DDPO,
    STRATEGIES,
    Adjoint,
    DRaFT,
    DRaFTK,
    DRaFTLV,
    NonFiniteRewardError,
    ReFL,
    StepContext,
    StepResult,
    Strategy,
    make_strategy,
    normalise_per_condition,
    ppo_loss,
    renoise,
    strategy_name,
)

__all__ = [
    "SteeredModel", "Steered", "PromptLabel", "trainable_dtype",
    "Strategy", "DRaFT", "DRaFTK", "DRaFTLV", "ReFL", "Adjoint", "DDPO", "STRATEGIES", "make_strategy",
    "strategy_name", "StepContext", "StepResult",
    "FinetuneConfig", "History", "lr_factor", "RESUMABLE_FIELDS",
    "NonFiniteRewardError", "NonFiniteError", "finetune", "objective", "update", "Update",
    "ppo_loss", "normalise_per_condition", "renoise",
    "Distributed", "SingleProcess",
    "save_checkpoint", "load_checkpoint", "find_checkpoint",
]
