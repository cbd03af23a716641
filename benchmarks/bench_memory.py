"""Memory and time of one gradient of the fine-tuning objective, per strategy, against the number of
sampler steps, in one run:

    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py [--quick] [--batch 64] [--dim 8]

What is measured. "saved" is the activation memory autograd keeps for the backward pass: the bytes of
every distinct tensor storage packed by ``torch.autograd.graph.saved_tensors_hooks`` while the objective
is evaluated (parameters excluded). This is what grows with the chain length for back-propagation
through sampling (DRaFT, ReFL, CTRL's planning). It is exact and deterministic on CPU, unlike RSS.
Gradient checkpointing keeps only each step's input. Its backward re-computes one step at a time, so its
peak is "saved" plus one step; the table prints the persistent part. The torchsde adjoint keeps no
activations, only the solution at every step (B x D numbers a step, which anchor its backward solve;
see ``theory.sde.sdeint``), so its memory grows by that little; its backward's transient is one step.

The model is the same for every strategy: SteeredModel(EpsMLP(dim, 256, 3)) with rank-4 LoRA, float32.
The reward is smooth (-|x - 1|^2). The grid is linear VP, DDIM eta = 1. Time: median of ``repeats``
forward + backward passes, interleaved across strategies so that load affects all alike. Ratios are
against DRaFT (the whole chain) at the same number of steps. "slope" is the fitted exponent of saved
memory in the number of steps (1 = linear growth, 0 = constant).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from theory.engine import Adjoint, DRaFT, DRaFTK, DRaFTLV, FinetuneConfig, ReFL, SteeredModel, objective
from theory.nets import EpsMLP
from theory.schedules import LinearVP


def _reward(x0, cond=None):
    return -((x0 - 1.0) ** 2).sum(1)


_reward.differentiable = True


def saved_bytes_and_grad(model, strategy, cfg, x_T, params):
    """(bytes saved for backward during the forward pass, seconds for forward + backward)."""
    seen: dict[int, int] = {}
    pids = {p.data_ptr() for p in params}

    def pack(t):
        try:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in pids and ptr not in seen:
                seen[ptr] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. sparse) are not counted
            pass
        return t

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        J, _, _ = objective(model, LinearVP(), _reward, strategy, cfg, x_T,
                            generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(J, params, allow_unused=True)
    dt = time.perf_counter() - t0
    assert any(g is not None for g in grads)
    return sum(seen.values()), dt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="steps 10, 20, 40; 2 repeats")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--repeats", type=int, default=None)
    a = p.parse_args(argv)
    steps = (10, 20, 40) if a.quick else (25, 50, 100, 200)
    repeats = a.repeats or (2 if a.quick else 3)
    torch.manual_seed(0)
    model = SteeredModel(EpsMLP(a.dim, hidden=256, depth=3), lora_rank=4)
    with torch.no_grad():  # LoRA B away from 0 so that every adapter parameter gets a gradient
        for n, q in model.named_parameters():
            if "lora_B" in n:
                q.normal_(0, 0.01)
    params = [q for q in model.parameters() if q.requires_grad]
    x_T = torch.randn(a.batch, a.dim, generator=torch.Generator().manual_seed(0))
    strategies = {
        "DRaFT": (DRaFT(), False),
        "DRaFT + checkpoint": (DRaFT(), True),
        "DRaFT-K, K=10": (DRaFTK(10), False),
        "DRaFT-K, K=1": (DRaFTK(1), False),
        "DRaFT-LV, n=2": (DRaFTLV(2), False),
        "ReFL": (ReFL(steps=(1, 5)), False),
        "adjoint (torchsde)": (Adjoint(), False),
    }
    res = {k: {} for k in strategies}
    for n in steps:
        times = {k: [] for k in strategies}
        mem = {}
        for r in range(repeats + 1):  # round 0 is a warm-up
            for name, (strat, ckpt) in strategies.items():
                cfg = FinetuneConfig(steps=1, batch_size=a.batch, n_steps=n, method="ddim", eta=1.0, t_min=1e-3,
                                     checkpoint=ckpt, progress=False)
                b, dt = saved_bytes_and_grad(model, strat, cfg, x_T, params)
                mem[name] = b
                if r:
                    times[name].append(dt)
        for name in strategies:
            res[name][n] = (mem[name], statistics.median(times[name]))
    print(f"one gradient, batch {a.batch}, dim {a.dim}, EpsMLP 256x3 + LoRA r=4, float32, "
          f"median of {repeats}, torch threads {torch.get_num_threads()}")
    head = f"{'strategy':22s}" + "".join(f"{'n=' + str(n):>22s}" for n in steps) + f"{'slope':>8s}"
    print("saved for backward, MB (ratio to DRaFT)")
    print(head)
    for name in strategies:
        row = f"{name:22s}"
        for n in steps:
            b = res[name][n][0]
            row += f"{b / 2**20:>12.2f} ({b / res['DRaFT'][n][0]:6.3f})"
        ys = [max(res[name][n][0], 1) for n in steps]
        slope = float(np.polyfit(np.log(steps), np.log(ys), 1)[0])
        print(row + f"{slope:>8.2f}")
    print("seconds per gradient (ratio to DRaFT)")
    print(head[:-8])
    for name in strategies:
        row = f"{name:22s}"
        for n in steps:
            s = res[name][n][1]
            row += f"{s:>12.3f} ({s / res['DRaFT'][n][1]:6.3f})"
        print(row)
    return res


if __name__ == "__main__":
    main()
