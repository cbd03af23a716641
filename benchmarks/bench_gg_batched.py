"""Rounds per second of Algorithm 1 (G_loss and G) at D = 64, T = 200: several configurations sharing one
model run as one batch (``optimize_batched``, one network call per step for all chains) against the same
configurations run one at a time (``optimize``), in one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_gg_batched.py [--quick] [--n 32] [--rounds 3]

Configurations: G and G_loss x delta in (0.1, 0.5) x two seeds (8 runs of ``n`` chains), the EpsMLP of
sims.gradguide (256 x 3, float32, untrained: timing does not depend on the weights) on the T = 200
discrete cosine schedule's full grid (199 DDPM steps), a linear objective. Both ways are timed alternately
``repeats`` times; the median is reported, as CPU time of this process (``time.process_time``; one thread),
which a shared machine's load does not inflate. The batched results equal the one-at-a-time results up to
the round-off of a larger batch; the largest difference is printed.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from theory.gradient_guidance import Run, default_grid, optimize, optimize_batched
from theory.nets import EpsMLP
from theory.schedules import DiscreteVP


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="50 steps, 1 round, 2 repeats")
    p.add_argument("--n", type=int, default=32, help="chains per configuration")
    p.add_argument("--rounds", type=int, default=None, help="rounds after round 0 (default 3, quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3, quick 2)")
    a = p.parse_args(argv)
    rounds = a.rounds or (1 if a.quick else 3)
    repeats = a.repeats or (2 if a.quick else 3)
    D = 64
    sch = DiscreteVP.cosine(200)
    ts = default_grid(sch, 50) if a.quick else default_grid(sch)
    torch.manual_seed(0)
    model = EpsMLP(D, hidden=256, depth=3, T=200.0)
    theta = torch.randn(D, generator=torch.Generator().manual_seed(1))

    def f(x):
        return x @ (theta / theta.norm()).to(x.dtype)

    f.dim = D
    runs = [Run(kind, delta, 0.1, seed, a.n) for kind in ("G", "G_loss") for delta in (0.1, 0.5) for seed in (0, 1)]
    common = dict(rounds=rounds, ts=ts, method="ddpm")
    times = {"one at a time": [], "batched": []}
    for _ in range(repeats):
        t0 = time.process_time()
        alone = [optimize(model, sch, f, n=r.n, delta=r.delta, guidance=r.guidance, sigma_y=r.sigma_y,
                          generator=torch.Generator().manual_seed(r.seed), **common) for r in runs]
        times["one at a time"].append(time.process_time() - t0)
        t0 = time.process_time()
        batched = optimize_batched(model, sch, f, runs, **common)
        times["batched"].append(time.process_time() - t0)
    diff = max(float((b.x - s.x).abs().max()) for b, s in zip(batched, alone))
    scale = max(float(s.x.abs().max()) for s in alone)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"Algorithm 1, {len(runs)} configurations (G, G_loss x delta 0.1, 0.5 x 2 seeds) of {a.n} chains, "
          f"D = {D}, {ts.numel() - 1} DDPM steps, {rounds} rounds after round 0, median of {repeats}, "
          f"torch threads = {torch.get_num_threads()}")
    print(f"{'':16s} {'CPU s (all runs)':>16s} {'rounds/s':>9s}")
    for k, v in med.items():
        print(f"{k:16s} {v:16.2f} {len(runs) * (rounds + 1) / v:9.2f}")
    print(f"batched / one at a time speed-up: {med['one at a time'] / med['batched']:.2f}x; "
          f"largest |x_batched - x_alone| = {diff:.2e} (samples up to {scale:.1f})")
    return med


if __name__ == "__main__":
    main()
