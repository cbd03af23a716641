"""Experiments of the gradient-guidance reproduction: functions of frozen configs returning plain data
(lists and floats); the figures only read these numbers. Results are memoised per config, so figures
that share a run (1, 2 and 5) compute it once per process."""
from __future__ import annotations

import functools
import time

import torch

from theory.gradient_guidance import FineTune, Run, default_grid, optimize, optimize_batched, r_off
from theory.solvers import sample

from .config import RunConfig, Setup, SphereConfig
from .data import basis, objective, pretrained, schedule_of, trained_model
from .objectives import Linear

__all__ = ["run", "run_sphere", "unguided_pass_time", "pass_times", "converge_round"]


def _stats(x: torch.Tensor, f: torch.Tensor, A: torch.Tensor) -> dict:
    """Per-round numbers: objective mean / max / top-4 mean, r_off mean and over the top-4-reward samples."""
    r = r_off(x, A.to(x.dtype))
    top = torch.topk(f, min(4, f.numel())).indices
    return {"f_mean": float(f.mean()), "f_max": float(f.max()), "f_top4": float(f[top].mean()),
            "roff_mean": float(r.mean()), "roff_top4": float(r[top].mean()), "roff_max": float(r.max()),
            "x_par_norm": float((x @ A.to(x.dtype)).norm(dim=-1).mean())}


def _summary(x: torch.Tensor, A: torch.Tensor, direction=None) -> dict:
    """Samples for the distribution plots: 2 in-span coordinates (A^T x)[:, :2], |x_perp|, |x_par|, and
    for an objective with a direction theta: x along theta_par/|theta_par| and along theta_perp/|theta_perp|."""
    A = A.to(x.dtype)
    z = x @ A
    perp = x - z @ A.T
    out = {"z1": z[:, 0].tolist(), "z2": z[:, 1].tolist(), "perp_norm": perp.norm(dim=-1).tolist(),
           "par_norm": z.norm(dim=-1).tolist()}
    if direction is not None:
        th = direction.to(x.dtype)
        tp = A @ (A.T @ th)
        to = th - tp
        out["along_theta_par"] = (x @ (tp / tp.norm())).tolist()
        out["along_theta_perp"] = (x @ (to / to.norm().clamp_min(1e-30))).tolist()
    return out


@functools.lru_cache(maxsize=None)
def run(cfg: RunConfig) -> dict:
    """Algorithm 1 (all seeds' chains in one batch, seeded by seeds[0]) or Algorithm 2 (one fine-tuned
    copy per seed, all copies sampled together by ``optimize_batched``: each seed's result is that of the
    seed run alone). Returns per seed the per-round stats, mean time per round (of all seeds' chains) and
    kept samples."""
    setup = cfg.setup
    sch = schedule_of(setup)
    A = basis(setup)
    f = objective(cfg.objective, setup)
    model = pretrained(cfg.model, setup, cfg.net)
    ts = default_grid(sch, cfg.n_steps)
    S, n = len(cfg.seeds), cfg.n
    keep = tuple(sorted(set(cfg.keep_rounds) | {0, cfg.rounds}))
    out = {"config": cfg, "seeds": {}, "bounds": {}}
    if hasattr(f, "best_on_span"):
        out["bounds"]["best_on_span"] = f.best_on_span(A)
    out["bounds"]["global_max"] = f.max_value
    common = dict(dim=setup.D, rounds=cfg.rounds, ts=ts, method="ddpm", keep_rounds=keep)
    t_all = time.perf_counter()
    if cfg.algorithm == 1:
        res = optimize(model, sch, f, n=S * n, delta=cfg.delta, guidance=cfg.guidance, sigma_y=cfg.sigma_y,
                       generator=torch.Generator().manual_seed(cfg.seeds[0]),
                       metrics=lambda x, fx: [_stats(x[j * n:(j + 1) * n], fx[j * n:(j + 1) * n], A) for j in range(S)],
                       **common)
        # (seed, its chains' rows of x, its per-round metrics)
        per_seed = [(s, slice(j * n, (j + 1) * n), [m[j] for m in res.metrics]) for j, s in enumerate(cfg.seeds)]
        results = [res] * S
    elif cfg.algorithm == 2:
        ft = FineTune(start=cfg.start, steps=cfg.ft_steps, lr=cfg.lr)
        runs = [Run(cfg.guidance, cfg.delta, cfg.sigma_y, seed=int(s), n=n) for s in cfg.seeds]
        results = optimize_batched(model, sch, f, runs, finetune=ft, metrics=lambda x, fx: _stats(x, fx, A), **common)
        per_seed = [(s, slice(None), r.metrics) for s, r in zip(cfg.seeds, results)]
    else:
        raise ValueError(f"algorithm: 1 or 2, got {cfg.algorithm}")
    per_round = sum(results[0].round_times[1:]) / max(1, cfg.rounds)
    for (s, sl, mets), res in zip(per_seed, results):
        stats = {key: [m[key] for m in mets] for key in mets[0]}
        stats["samples"] = {int(k): _summary(v[sl], A, getattr(f, "theta", None)) for k, v in res.samples.items()}
        out["seeds"][int(s)] = stats
    out["time_per_round_s"] = per_round
    out["wall_s"] = time.perf_counter() - t_all
    out["final"] = {key: [out["seeds"][s][key][-1] for s in cfg.seeds]
                    for key in ("f_mean", "f_max", "f_top4", "roff_mean", "roff_top4")}
    out["initial"] = {key: [out["seeds"][s][key][0] for s in cfg.seeds] for key in ("f_mean", "roff_mean")}
    return out


def converge_round(curve, frac: float = 0.95) -> int:
    """First round at which a curve has made ``frac`` of its total change (start -> mean of its last
    10%): the "rounds to converge" of the runtime table."""
    c = torch.as_tensor(curve, dtype=torch.float64)
    tail = c[-max(1, len(c) // 10):].mean()
    target = c[0] + frac * (tail - c[0])
    hit = (c >= target) if tail >= c[0] else (c <= target)
    idx = torch.nonzero(hit).flatten()
    return int(idx[0]) if idx.numel() else len(c) - 1


def pass_times(setup: Setup, model_kind: str = "trained", n: int = 32, n_steps: int = 200, repeats: int = 3,
               net=None, seed: int = 0) -> dict:
    """Wall time of one sampling pass: unguided, G-guided, G_loss-guided (same batch, same grid, best of
    ``repeats``), and the ratios G_loss / unguided, G_loss / G (the paper: one extra VJP per step)."""
    from theory.gradient_guidance import make_guidance

    from .config import NetConfig

    sch = schedule_of(setup)
    model = pretrained(model_kind, setup, net or NetConfig())
    dtype = next(iter(list(model.parameters()) + list(model.buffers()))).dtype
    ts = default_grid(sch, n_steps)
    gen = torch.Generator().manual_seed(seed)
    xT = torch.randn(n, setup.D, dtype=dtype, generator=gen)
    gvec = torch.randn(n, setup.D, dtype=dtype, generator=gen)
    y = torch.ones(n, dtype=dtype)
    fields = {"unguided": None,
              "G": make_guidance("G", model, sch, gvec, y),
              "G_loss": make_guidance("G_loss", model, sch, gvec, y)}
    out = {}
    for name, fld in fields.items():
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                sample(model, sch, xT, ts, method="ddpm", guidance=fld, generator=torch.Generator().manual_seed(1))
            best = min(best, time.perf_counter() - t0)
        out[name] = best
    out["ratio_G_loss_unguided"] = out["G_loss"] / out["unguided"]
    out["ratio_G_loss_G"] = out["G_loss"] / out["G"]
    out["ratio_G_unguided"] = out["G"] / out["unguided"]
    return out


def unguided_pass_time(setup: Setup, **kw) -> float:
    return pass_times(setup, **kw)["unguided"]


@functools.lru_cache(maxsize=None)
def run_sphere(cfg: SphereConfig) -> dict:
    """Unit-sphere front: for each delta and guidance, Algorithm 1 on theta.x (theta fixed by cfg.seed);
    per round the reward mean and the off-support measure mean ||x| - 1| (and their sample standard deviations)."""
    setup = Setup(D=cfg.D, n_timesteps=cfg.setup.n_timesteps, schedule=cfg.setup.schedule)
    sch = schedule_of(setup)
    model = trained_model(setup, cfg.net)
    g = torch.Generator().manual_seed(cfg.seed)
    theta = torch.randn(cfg.D, dtype=torch.float64, generator=g)
    f = Linear(theta / theta.norm())
    ts = default_grid(sch, cfg.n_steps)

    def metrics(x, fx):
        dev = (x.norm(dim=-1) - 1)
        return {"reward": float(fx.mean()), "dev_abs": float(dev.abs().mean()), "dev": float(dev.mean()),
                "reward_sd": float(fx.std()), "dev_abs_sd": float(dev.abs().std())}  # sds: the verdict's se

    out = {"config": cfg, "runs": {}}
    t0 = time.perf_counter()
    for kind in ("G", "G_loss"):
        for delta in cfg.deltas:
            res = optimize(model, sch, f, n=cfg.n, dim=cfg.D, rounds=cfg.rounds, delta=delta, guidance=kind,
                           sigma_y=cfg.sigma_y, ts=ts, generator=torch.Generator().manual_seed(cfg.seed),
                           metrics=metrics)
            out["runs"][f"{kind}@{delta}"] = {key: [m[key] for m in res.metrics] for key in res.metrics[0]}
    out["wall_s"] = time.perf_counter() - t0
    out["pretrained"] = {key: out["runs"][f"G@{cfg.deltas[0]}"][key][0] for key in ("reward", "dev_abs", "dev_abs_sd")}
    return out
