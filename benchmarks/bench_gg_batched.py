"""Rounds per second of Algorithm 1 (G_loss and G) at D = 64, T = 200: several configurations sharing one
model run as one batch (``optimize_batched``, one network call per step for all chains) against the same
configurations run one at a time (``optimize``), in one run; and Algorithm 2 over several seeds, each
fine-tuning its own copy of the network, the copies evaluated in one call over stacked parameters
(``theory.gradient_guidance._Copies``: one ``torch.baddbmm`` per layer for an unconditional EpsMLP) against
the seeds one at a time, and (``--vmap``) against the generic path the library keeps for other networks
(``torch.func.functional_call`` under ``vmap``).

    OMP_NUM_THREADS=1 python benchmarks/bench_gg_batched.py [--quick] [--n 32] [--rounds 3] [--vmap]

Configurations: G and G_loss x delta in (0.1, 0.5) x two seeds (8 runs of ``n`` chains); Algorithm 2:
G_loss at delta 0.1 for four seeds, one fine-tuning step per round from round 0. The network is the EpsMLP of
sims.gradguide (256 x 3, float32, untrained: timing does not depend on the weights) on the T = 200
discrete cosine schedule's full grid (199 DDPM steps), a linear objective. Both ways are timed alternately
``repeats`` times; the median is reported, as CPU time of this process (``time.process_time``; one thread),
which a shared machine's load does not inflate. The batched results equal the one-at-a-time results up to
the round-off of a larger batch; the largest difference of the final samples is printed.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import theory.gradient_guidance as gg
from theory.gradient_guidance import FineTune, Run, default_grid, optimize, optimize_batched
from theory.nets import EpsMLP
from theory.schedules import DiscreteVP


class VmapCopies(gg._Copies):
    """``_Copies`` forced onto its generic path (vmap of functional_call), which it takes for networks other
    than an unconditional EpsMLP."""

    def __init__(self, model, copies):
        super().__init__(model, copies)
        self._linear = None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="50 steps, 1 round, 2 repeats")
    p.add_argument("--n", type=int, default=32, help="chains per configuration")
    p.add_argument("--rounds", type=int, default=None, help="rounds after round 0 (default 3, quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3, quick 2)")
    p.add_argument("--vmap", action="store_true", help="also Algorithm 2 over copies evaluated by vmap (generic path)")
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
    runs2 = [Run("G_loss", 0.1, 0.1, seed, a.n) for seed in range(4)]
    ft = FineTune(start=0, steps=1, lr=1e-5)
    common = dict(rounds=rounds, ts=ts, method="ddpm")

    def alone(rs, finetune=None):
        return [optimize(model, sch, f, n=r.n, delta=r.delta, guidance=r.guidance, sigma_y=r.sigma_y,
                         generator=torch.Generator().manual_seed(r.seed), finetune=finetune, **common) for r in rs]

    cases = {"Algorithm 1 one at a time": lambda: alone(runs),
             "Algorithm 1 batched": lambda: optimize_batched(model, sch, f, runs, **common),
             "Algorithm 2 one at a time": lambda: alone(runs2, ft),
             "Algorithm 2 batched": lambda: optimize_batched(model, sch, f, runs2, finetune=ft, **common)}

    def vmap():
        saved, gg._Copies = gg._Copies, VmapCopies
        try:
            return optimize_batched(model, sch, f, runs2, finetune=ft, **common)
        finally:
            gg._Copies = saved

    if a.vmap:
        cases["Algorithm 2 batched (vmap)"] = vmap
    times, results = {k: [] for k in cases}, {}
    for _ in range(repeats):
        for k, fn in cases.items():
            t0 = time.process_time()
            results[k] = fn()
            times[k].append(time.process_time() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{len(runs)} Algorithm-1 configurations (G, G_loss x delta 0.1, 0.5 x 2 seeds) and {len(runs2)} "
          f"Algorithm-2 seeds, {a.n} chains each, D = {D}, {ts.numel() - 1} DDPM steps, {rounds} rounds after "
          f"round 0, median of {repeats}, torch threads = {torch.get_num_threads()}")
    print(f"{'':28s} {'CPU s (all runs)':>16s} {'rounds/s':>9s} {'max |x - x_alone|':>18s}")
    for k, v in med.items():
        nr = len(runs if k.startswith("Algorithm 1") else runs2) * (rounds + 1)
        ref = results[k.replace(" (vmap)", "").replace("batched", "one at a time")]
        diff = max(float((b.x - s_.x).abs().max()) for b, s_ in zip(results[k], ref))
        print(f"{k:28s} {v:16.2f} {nr / v:9.2f} {diff:18.2e}")
    for k in med:
        if "batched" in k:
            one = med[k.split(" batched")[0] + " one at a time"]
            print(f"{k}: speed-up over one at a time {one / med[k]:.2f}x")
    return med


if __name__ == "__main__":
    main()
