"""Data-parallel fine-tuning on accelerate: the engine's ``theory.engine.Distributed`` protocol.

``theory.engine.finetune(..., dist=...)`` needs five things of a launcher: ``rank``, ``world_size``,
``is_main``, ``all_reduce_mean_(tensors)`` and ``barrier()``. With k processes every rank draws the
combined batch (k x the per-process batch) from the identically seeded generator and keeps its slice, and
the trainable gradients are replaced by their mean over the ranks before clipping and the AdamW step, so
the k-process run is the single-process run with the combined batch, up to the order of the float sums.
accelerate does the process-group work (``Accelerator().reduce``, ``is_main_process``,
``wait_for_everyone``, the device of this rank); nothing here opens sockets or picks backends itself.

``from_environment()`` returns an ``AccelerateDistributed`` when the process was started by a launcher
with more than one process (``accelerate launch --multi_gpu --num_processes N`` on GPUs, or ``torchrun
--nproc_per_node N``, which both set ``WORLD_SIZE``; ``accelerate launch --cpu`` starts one process, so
several CPU processes come from torchrun), else None (one process, no accelerate state created).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

__all__ = ["AccelerateDistributed", "from_environment", "launched_world_size"]


def launched_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 when not launched)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE: expected an int in the environment, got {os.environ['WORLD_SIZE']!r}") from None


class AccelerateDistributed:
    """``theory.engine.Distributed`` on an ``accelerate.Accelerator`` (created here if not given; under
    ``accelerate launch --cpu`` it uses gloo on the CPU, on GPUs NCCL, one device per process)."""

    def __init__(self, accelerator=None, cpu: Optional[bool] = None):
        if accelerator is None:
            from accelerate import Accelerator

            # accelerate forms a CPU (gloo) group only when told the run is on the CPU
            accelerator = Accelerator(cpu=(not torch.cuda.is_available()) if cpu is None else bool(cpu))
        self.accelerator = accelerator
        self.rank = int(accelerator.process_index)
        self.world_size = int(accelerator.num_processes)
        self.device = accelerator.device

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    def all_reduce_mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Every tensor replaced in place by its mean over the ranks: one collective per dtype on a flat
        buffer (the LoRA of SD has ~130 small tensors; one reduce each would be ~130 round trips)."""
        tensors = list(tensors)
        if self.world_size == 1 or not tensors:
            return
        by_dtype: dict = {}
        for t in tensors:
            by_dtype.setdefault((t.dtype, t.device), []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            flat = self.accelerator.reduce(flat, reduction="mean")
            i = 0
            for t in group:
                n = t.numel()
                t.copy_(flat[i:i + n].view_as(t))
                i += n

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


def from_environment(device: Optional[str] = None) -> Optional[AccelerateDistributed]:
    """An ``AccelerateDistributed`` when launched with several processes, else None (single process).
    ``device``: the run's --device; 'cpu' (or no CUDA) makes the group a CPU one (gloo)."""
    if launched_world_size() <= 1:
        return None
    try:
        import accelerate  # noqa: F401
    except ModuleNotFoundError:
        raise ModuleNotFoundError("launched with several processes (WORLD_SIZE > 1) but accelerate is missing: "
                                  "pip install 'diffsteer[imaging]'", name="accelerate") from None
    cpu = (device is not None and torch.device(device).type == "cpu") or not torch.cuda.is_available()
    return AccelerateDistributed(cpu=cpu)
