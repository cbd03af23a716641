"""Time one sampling pass guided by G_loss against an unguided pass and a G-guided pass, in one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_guidance.py [--quick] [--batch 32] [--steps 200]

Same model, batch, grid (the paper's T = 200 discrete cosine schedule, DDPM steps) and noise for all
three; the passes are interleaved round-robin and the median of ``repeats`` is reported, so machine
load affects the three alike. Models: the exact subspace score (D = 64, d = 16, float64) and the
EpsMLP of sims.gradguide (256 x 3, float32; timing does not depend on its weights, so an untrained
copy is used and nothing is trained). G_loss costs one forward pass with a graph plus one
vector-Jacobian product per step on top of the unguided step.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from theory.exact import random_orthonormal, subspace_gaussian
from theory.gradient_guidance import default_grid, make_guidance
from theory.nets import EpsMLP
from theory.schedules import DiscreteVP
from theory.solvers import sample


def bench(model, schedule, dim, batch, steps, repeats, dtype):
    gen = torch.Generator().manual_seed(0)
    xT = torch.randn(batch, dim, dtype=dtype, generator=gen)
    g = torch.randn(batch, dim, dtype=dtype, generator=gen)
    y = torch.ones(batch, dtype=dtype)
    ts = default_grid(schedule, steps)
    fields = {"unguided": None, "G": make_guidance("G", model, schedule, g, y),
              "G_loss": make_guidance("G_loss", model, schedule, g, y)}
    times = {k: [] for k in fields}
    for r in range(repeats + 1):  # the first round is a warm-up
        for name, field in fields.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                sample(model, schedule, xT, ts, method="ddpm", guidance=field, generator=torch.Generator().manual_seed(1))
            if r:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="50 steps, 3 repeats")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 200, quick 50)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 7, quick 3)")
    a = p.parse_args(argv)
    steps = a.steps or (50 if a.quick else 200)
    repeats = a.repeats or (3 if a.quick else 7)
    sch = DiscreteVP.cosine(200)
    A = random_orthonormal(64, 16, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    models = {"exact subspace score (float64)": (subspace_gaussian(A, sch), torch.float64),
              "EpsMLP 256x3 (float32)": (EpsMLP(64, hidden=256, depth=3, T=200.0), torch.float32)}
    print(f"one DDPM sampling pass, B = {a.batch}, {steps} steps, D = 64, median of {repeats}, "
          f"torch threads = {torch.get_num_threads()}")
    print(f"{'model':34s} {'unguided s':>11s} {'G s':>9s} {'G_loss s':>9s} {'G_loss/unguided':>16s} "
          f"{'G_loss/G':>9s} {'G/unguided':>11s}")
    out = {}
    for name, (m, dt) in models.items():
        t = bench(m, sch, 64, a.batch, steps, repeats, dt)
        out[name] = t
        print(f"{name:34s} {t['unguided']:11.4f} {t['G']:9.4f} {t['G_loss']:9.4f} {t['G_loss'] / t['unguided']:16.2f} "
              f"{t['G_loss'] / t['G']:9.2f} {t['G'] / t['unguided']:11.2f}")
    return out


if __name__ == "__main__":
    main()
