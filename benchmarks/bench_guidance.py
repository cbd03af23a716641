"""Time a sampling pass guided by G_loss (and by G) against an unguided pass, next to the network's own
costs, in one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_guidance.py [--quick] [--batch 32 160] [--steps 200] [--no-unet] [--compile]

Same model, batch, grid (the T = 200 discrete cosine schedule, DDPM steps) and noise for every pass; the
passes and the network timings are interleaved round-robin; times are medians of ``repeats``, ratios the
medians of the ratios within each repeat.
Times are this process's CPU time (``time.process_time``; run with one thread), not wall time: on a
shared machine wall time mostly measures how often the process was descheduled. The floor of a G_loss step is one forward pass with a graph plus one
vector-Jacobian product (docs/theory.md §7), so the column to compare G_loss/unguided with is
(forward + VJP)/forward, both measured here on the same network, batch and times. "non-net" is the share
of the unguided pass spent outside the network, "noise" the part of it that draws the Gaussian noise
(one generator draw per step, the sampler's randomness itself); the rest is the solver's arithmetic. "bare"
is the non-network share of the least an eager pass can do (``_bare_pass``: the noise draw, the network and
the step's three elementwise operations, written out by hand): the floor "non-net" is compared with.
"non-net" takes the network's time from calls in a loop of their own; "in pass" takes it from the same
calls timed inside one more unguided pass (``_timed``), where the sampler's other work shares the caches
with the network and slows it (by 6-13 % at B = 160-512 on the development machine): the network's
share of the pass is then higher and the non-network remainder lower.

Batches (``--batch``, several allowed): 32, and 160, the batch the gradient-guidance figures sample the
EpsMLP at (Algorithm 1 runs its 32 chains for each of 5 seeds as one batch, ``sims.gradguide.config``).
The per-step overhead of eager PyTorch is about constant in B, so the ratios depend on the batch.

Models: the exact subspace score (D = 64, d = 16, float64; not a network, listed for reference), the
EpsMLP of sims.gradguide (256 x 3, float32), and a U-Net-sized network: diffusers' UNet2DModel on
3 x 16 x 16 images (2.7 M parameters, float32), flattened to the (B, D) samples the gradient-guidance
fields take, on fewer steps (the per-step ratios do not depend on the step count). Timing does not depend
on the weights, so untrained networks are used and nothing is trained or downloaded.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from theory.exact import random_orthonormal, subspace_gaussian
from theory.gradient_guidance import default_grid, make_guidance
from theory.nets import EpsMLP
from theory.schedules import DiscreteVP
from theory.solvers import sample


class FlatUNet(nn.Module):
    """diffusers' UNet2DModel as an eps model on flattened (B, C*H*W) samples."""

    def __init__(self, shape=(3, 16, 16)):
        super().__init__()
        from diffusers import UNet2DModel

        self.shape = tuple(shape)
        self.dim = shape[0] * shape[1] * shape[2]
        self.unet = UNet2DModel(sample_size=shape[1], in_channels=shape[0], out_channels=shape[0],
                                block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))

    def forward(self, x, t, cond=None):
        return self.unet(x.view((x.shape[0],) + self.shape), t).sample.reshape(x.shape)


def _step_times(ts, x):
    """The (B,) network time of every step of the grid ``ts`` (all but its last point), in x's dtype."""
    return [ts[i].to(x.dtype).expand(x.shape[0]) for i in range(ts.numel() - 1)]


def _network_costs(model, x, ts, g):
    """Seconds of len(ts) - 1 forward passes without a graph, of as many forward passes with a graph plus
    one VJP of (g . eps) with respect to x, at the grid's times, and of as many noise draws."""
    times = _step_times(ts, x)
    gen = torch.Generator().manual_seed(1)
    t0 = time.process_time()
    for _ in times:
        torch.randn(x.shape, dtype=x.dtype, generator=gen)
    noise = time.process_time() - t0
    t0 = time.process_time()
    with torch.no_grad():
        for t in times:
            model(x, t, None)
    fwd = time.process_time() - t0
    t0 = time.process_time()
    for t in times:
        xg = x.detach().requires_grad_(True)
        torch.autograd.grad((g * model(xg, t, None)).sum(), xg)
    return fwd, time.process_time() - t0, noise


def _bare_pass(model, schedule, x, ts, gen):
    """Seconds of the least an eager DDPM pass can do, written out by hand: per step one noise draw, one
    network call and the step's three elementwise operations (x_s = c_x x + c_eps eps + c z), with the
    coefficients precomputed. Its non-network share is the floor the sampler's own is compared with."""
    from theory.solvers import ddim_coefs, grid_points

    pts = grid_points(schedule, ts, x.shape[0], x.dtype, x.device)
    coefs = [ddim_coefs(pts[i], pts[i + 1], 1.0) for i in range(len(pts) - 1)]  # DDPM = DDIM with eta 1
    times = _step_times(ts, x)
    t0 = time.process_time()
    with torch.no_grad():
        for t, (c_x, c_e, c) in zip(times, coefs):
            z = torch.randn(x.shape, dtype=x.dtype, generator=gen)
            x = torch.addcmul(torch.addcmul(c_x * x, c_e, model(x, t, None)), c, z)
    return time.process_time() - t0


class _timed:
    """``model`` with the process time of its calls summed in ``seconds`` (two clock reads per call; a plain
    callable, not a module, so that the wrapper adds no module-call overhead to the pass)."""

    def __init__(self, model):
        self.model, self.seconds = model, 0.0

    def __call__(self, x, t, cond=None):
        t0 = time.process_time()
        out = self.model(x, t, cond)
        self.seconds += time.process_time() - t0
        return out


def bench(model, schedule, dim, batch, steps, repeats, dtype):
    gen = torch.Generator().manual_seed(0)
    xT = torch.randn(batch, dim, dtype=dtype, generator=gen)
    g = torch.randn(batch, dim, dtype=dtype, generator=gen)
    y = torch.ones(batch, dtype=dtype)
    ts = default_grid(schedule, steps)
    fields = {"unguided": None, "G": make_guidance("G", model, schedule, g, y),
              "G_loss": make_guidance("G_loss", model, schedule, g, y)}
    times = {k: [] for k in list(fields) + ["fwd", "fwd+vjp", "noise", "bare", "in pass"]}
    for r in range(repeats + 1):  # the first round is a warm-up
        for name, field in fields.items():
            t0 = time.process_time()
            with torch.no_grad():
                sample(model, schedule, xT, ts, method="ddpm", guidance=field, generator=torch.Generator().manual_seed(1))
            if r:
                times[name].append(time.process_time() - t0)
        costs = _network_costs(model, xT, ts, g) + (_bare_pass(model, schedule, xT, ts, torch.Generator().manual_seed(1)),)
        timed = _timed(model)
        t0 = time.process_time()
        with torch.no_grad():
            sample(timed, schedule, xT, ts, method="ddpm", generator=torch.Generator().manual_seed(1))
        costs += (1 - timed.seconds / (time.process_time() - t0),)
        if r:
            for k, v in zip(("fwd", "fwd+vjp", "noise", "bare", "in pass"), costs):
                times[k].append(v)
    out = {k: statistics.median(v) for k, v in times.items()}
    # ratios within each repeat (its passes and network timings ran back to back), then their median: a
    # load change between repeats does not enter a ratio
    out["G_loss/unguided"] = statistics.median(a / b for a, b in zip(times["G_loss"], times["unguided"]))
    out["floor"] = statistics.median(a / b for a, b in zip(times["fwd+vjp"], times["fwd"]))
    out["gap"] = statistics.median(a / b * d / c - 1 for a, b, c, d in
                                   zip(times["G_loss"], times["unguided"], times["fwd+vjp"], times["fwd"]))
    out["G/unguided"] = statistics.median(a / b for a, b in zip(times["G"], times["unguided"]))
    out["non-net"] = statistics.median(1 - a / b for a, b in zip(times["fwd"], times["unguided"]))
    out["noise share"] = statistics.median(a / b for a, b in zip(times["noise"], times["unguided"]))
    out["bare non-net"] = statistics.median(1 - a / b for a, b in zip(times["fwd"], times["bare"]))
    out["non-net in pass"] = statistics.median(times["in pass"])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="50 steps (U-Net 10), 3 repeats")
    p.add_argument("--batch", type=int, nargs="+", default=[32, 160],
                   help="batches of the exact score and the EpsMLP (default 32 and 160, the figures' batch)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 200, quick 50)")
    p.add_argument("--unet-batch", type=int, default=8)
    p.add_argument("--unet-steps", type=int, default=None, help="U-Net sampler steps (default 20, quick 10)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 7, quick 3)")
    p.add_argument("--no-unet", action="store_true", help="skip the U-Net (needs diffusers)")
    p.add_argument("--compile", action="store_true",
                   help="add the EpsMLP compiled by torch.compile (inductor, CPU); its compile time is printed")
    a = p.parse_args(argv)
    steps = a.steps or (50 if a.quick else 200)
    unet_steps = a.unet_steps or (10 if a.quick else 20)
    repeats = a.repeats or (3 if a.quick else 7)
    sch = DiscreteVP.cosine(200)
    A = random_orthonormal(64, 16, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    mlp = EpsMLP(64, hidden=256, depth=3, T=200.0)
    models = [("exact subspace score (float64)", subspace_gaussian(A, sch), torch.float64, 64),
              ("EpsMLP 256x3 (float32)", mlp, torch.float32, 64)]
    if a.compile:  # the same weights, compiled; the first (warm-up) round of bench() pays the compilation
        models.append(("EpsMLP 256x3 torch.compile", torch.compile(mlp, dynamic=False), torch.float32, 64))
    runs = [(name, m, dt, dim, b, steps) for b in a.batch for name, m, dt, dim in models]
    if not a.no_unet:
        unet = FlatUNet()
        n_par = sum(q.numel() for q in unet.parameters()) / 1e6
        runs.append((f"UNet2DModel {n_par:.1f}M (float32)", unet, torch.float32, unet.dim, a.unet_batch, unet_steps))
    print(f"one DDPM sampling pass per column, median of {repeats}, torch threads = {torch.get_num_threads()}")
    print(f"{'model':32s} {'B':>3s} {'steps':>5s} {'unguided s':>10s} {'G s':>8s} {'G_loss s':>9s} "
          f"{'G_loss/ung':>10s} {'fwd+VJP/fwd':>11s} {'gap':>6s} {'G/ung':>6s} {'non-net':>7s} {'in pass':>7s} "
          f"{'noise':>6s} {'bare':>6s}")
    out = {}
    for name, m, dt, dim, batch, n in runs:
        w0 = time.perf_counter()
        t = bench(m, sch, dim, batch, n, repeats, dt)
        if "compile" in name:
            print(f"  ({name}, B = {batch}: {time.perf_counter() - w0:.0f} s wall in all, compilation included)")
        out[name, batch] = t
        print(f"{name:32s} {batch:3d} {n:5d} {t['unguided']:10.4f} {t['G']:8.4f} {t['G_loss']:9.4f} "
              f"{t['G_loss/unguided']:10.2f} {t['floor']:11.2f} {t['gap']:+6.1%} {t['G/unguided']:6.2f} "
              f"{t['non-net']:7.1%} {t['non-net in pass']:7.1%} {t['noise share']:6.1%} {t['bare non-net']:6.1%}")
    return out


if __name__ == "__main__":
    main()
