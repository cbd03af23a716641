"""The data-parallel hook of the engine: what ``finetune`` needs of a launcher (accelerate, torchrun).

Semantics of a k-rank run (``finetune(..., dist=...)``): ``config.batch_size`` is the PER-PROCESS batch b.
Every rank draws the combined batch's initial states, conditions, strategy draws and sampler noise (k b
samples) from the shared generators (seeded identically on every rank) and keeps its own slice
[rank b, (rank + 1) b); the engine's update all-reduces (mean) the trainable gradients before clipping.
So a k-rank run equals a single-process run with batch k b up to the order of the float all-reduce, and the
RNG / resume state is the same on every rank. Only ``is_main`` writes checkpoints and the history; the
history's reward / KL / loss are averaged over the ranks.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

__all__ = ["Distributed", "SingleProcess", "check_dist"]


@runtime_checkable
class Distributed(Protocol):
    """A data-parallel group as the engine sees it (module docstring)."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool: ...

    def all_reduce_mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace every tensor in place by its mean over the ranks."""

    def barrier(self) -> None:
        """Wait until every rank reaches this point."""


class SingleProcess:
    """The default ``Distributed``: one process, nothing to reduce or wait for."""

    rank = 0
    world_size = 1
    is_main = True

    def all_reduce_mean_(self, tensors) -> None:
        return None

    def barrier(self) -> None:
        return None


def check_dist(dist) -> Distributed:
    """``dist`` checked (None: ``SingleProcess()``)."""
    if dist is None:
        return SingleProcess()
    for a in ("rank", "world_size", "is_main", "all_reduce_mean_", "barrier"):
        if not hasattr(dist, a):
            raise ValueError(f"dist: {type(dist).__name__} lacks `{a}`; implement theory.engine.Distributed")
    if not (0 <= int(dist.rank) < int(dist.world_size)):
        raise ValueError(f"dist: rank {dist.rank} outside [0, world_size={dist.world_size})")
    return dist
