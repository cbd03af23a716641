"""The fine-tuning loop: AdamW on a steered model with any strategy (docs/theory.md §6).

``finetune`` draws each step's batch, builds the ``StepContext`` and lets the strategy make its
update(s) through ``Update``, the engine's only zero_grad / backward / all-reduce / clip / optimiser step,
which checks the loss and the gradients before the step and the parameters after it; a non-finite value
stops the run with ``NonFiniteError`` naming the step, the parameter and the cause, before anything
non-finite reaches a checkpoint.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..io import check_writable
from ..schedules import NoiseSchedule
from ..solvers import check_grid, time_grid
from .checkpoint import find_checkpoint, load_checkpoint, run_settings, save_checkpoint
from .config import FinetuneConfig, History, lr_factor
from .distributed import Distributed, check_dist
from .strategies import Adjoint, NonFiniteRewardError, StepContext, Strategy, callable_name

__all__ = ["finetune", "objective", "Update", "update", "NonFiniteError"]


class NonFiniteError(FloatingPointError):
    """A non-finite loss, gradient or parameter; the message names the step, the parameter and the cause."""


def _first_bad(named: dict):
    """The name of the first non-finite tensor of ``named`` (None entries skipped), or None; one device
    synchronisation for all of them."""
    items = [(n, t) for n, t in named.items() if t is not None]
    if not items:
        return None
    bad = torch.stack([~torch.isfinite(t).all() for _, t in items])
    if not bool(bad.any()):
        return None
    return items[int(bad.nonzero()[0])][0]


class Update:
    """One optimiser step on ``loss`` (callable: ``update(loss) -> gradient norm before clipping``):
    zero_grad, backward, the mean of the gradients over the processes (``dist``), a finiteness check of
    the gradients, clipping to global norm ``grad_clip`` (0 = none), ``optimizer.step()`` and a finiteness
    check of the parameters. ``params``: the trainable parameters (a list, or {name: parameter} for
    messages naming them). ``step``: the optimisation step, for messages."""

    def __init__(self, optimizer, params, grad_clip: float = 0.0, dist: Optional[Distributed] = None,
                 step: Optional[int] = None):
        self.optimizer = optimizer
        self.named = dict(params) if isinstance(params, dict) else {f"param[{i}]": p for i, p in enumerate(params)}
        self.grad_clip = grad_clip
        self.dist = check_dist(dist)
        self.step = step

    def _where(self) -> str:
        return f"at optimisation step {self.step}" if self.step is not None else "in an update"

    def __call__(self, loss: torch.Tensor) -> float:
        if not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteError(f"loss: non-finite objective ({float(loss.detach())}) {self._where()}; cause: the "
                                 f"reward, the KL term or the model output overflowed")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = list(self.named.values())
        if self.dist.world_size > 1:  # data parallel: the mean gradient over the ranks
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.dist.all_reduce_mean_([p.grad for p in params])
        bad = _first_bad({n: p.grad for n, p in self.named.items()})
        if bad is not None:
            raise NonFiniteError(f"gradient of {bad}: non-finite {self._where()} with a finite loss "
                                 f"({float(loss.detach()):.6g}); cause: a non-differentiable point of the reward "
                                 f"or model (e.g. sqrt at 0, log at 0); the step was not taken")
        gs = [p for p in params if p.grad is not None]
        gnorm = 0.0
        if gs:
            mx = self.grad_clip if self.grad_clip and self.grad_clip > 0 else float("inf")
            gnorm = float(torch.nn.utils.clip_grad_norm_(gs, mx))
        self.optimizer.step()
        bad = _first_bad({n: p.detach() for n, p in self.named.items()})
        if bad is not None:
            lrs = sorted({g["lr"] for g in getattr(self.optimizer, "param_groups", [])})
            raise NonFiniteError(f"parameter {bad}: non-finite after the optimiser step {self._where()} (finite "
                                 f"gradients, norm {gnorm:.4g}); cause: the update overflowed - learning rate(s) "
                                 f"{lrs} too large?")
        return gnorm


def update(loss: torch.Tensor, optimizer, params, *, grad_clip: float = 0.0, dist: Optional[Distributed] = None,
           step: Optional[int] = None) -> float:
    """``Update(optimizer, params, grad_clip, dist, step)(loss)``: the engine's optimiser step for callers
    with their own loop (e.g. Algorithm 2's score fine-tuning)."""
    return Update(optimizer, params, grad_clip, dist, step)(loss)


def _check_inputs(model, reward, strategy, config, schedule, ts):
    config.validate()
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: must be an nn.Module eps model, got {type(model).__name__}")
    if not callable(reward):
        raise ValueError("reward: must be callable reward(x0, cond) -> (B,)")
    if not isinstance(strategy, Strategy):
        raise ValueError(f"strategy: expected DRaFT(), DRaFTK(k), DRaFTLV(n), ReFL(steps), Adjoint() or DDPO() "
                         f"(theory.engine.STRATEGIES), got {strategy!r}")
    ts = time_grid(schedule, config.n_steps, t_min=config.t_min, kind=config.grid) if ts is None else \
        check_grid(ts, schedule)
    if ts.numel() - 1 != config.n_steps:
        raise ValueError(f"ts: the grid has {ts.numel() - 1} steps but config.n_steps={config.n_steps}; make them agree")
    strategy.validate(config.n_steps, config)
    if strategy.needs_gradient_reward and not getattr(reward, "differentiable", True):
        raise ValueError(f"reward: {callable_name(reward)} is not differentiable (differentiable=False); use strategy DDPO()")
    kl_on = config.lam > 0 or config.log_kl
    if kl_on and not config.stochastic:
        raise ValueError("lam: the path KL needs stochastic transitions; use method 'ddpm'/'em' or 'ddim' with eta > 0")
    reference = getattr(model, "reference", None) if (kl_on or config.eps_penalty > 0) else None
    if (kl_on or config.eps_penalty > 0) and reference is None:
        raise ValueError("model: lam > 0 / eps_penalty need `model.reference`, the pre-trained eps model")
    return ts, kl_on, reference


def _param_groups(model, config: FinetuneConfig):
    if hasattr(model, "param_groups"):
        groups = model.param_groups(config.lr, config.lr_embed)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": config.lr}]
    groups = [g for g in groups if list(g["params"])]
    if not groups:
        raise ValueError("model: has no trainable parameters (param_groups returned none); add LoRA or labels")
    return groups


def objective(model: nn.Module, schedule: NoiseSchedule, reward: Callable, strategy, config: FinetuneConfig,
              x_T: torch.Tensor, *, cond=None, ts=None, generator: Optional[torch.Generator] = None, step: int = 1):
    """One evaluation of a gradient strategy's objective J (the quantity ``finetune`` ascends), without an
    optimiser step: returns (J, rewards, kl). ``generator`` (CPU; default seeded with config.seed) supplies
    the strategy's draws and the sampler noise in the same order as ``finetune`` on CPU. For gradient
    checks and analyses (e.g. the gradient of DRaFT-K against K)."""
    ts, kl_on, reference = _check_inputs(model, reward, strategy, config, schedule, ts)
    gen = generator if generator is not None else torch.Generator().manual_seed(config.seed)
    ctx = StepContext(model=model, reference=reference, kl_reference=reference if kl_on else None, schedule=schedule,
                      reward=reward, ts=ts.to(x_T.device), x_T=x_T, cond=cond, config=config, gen=gen,
                      noise_gen=gen if x_T.device.type == "cpu" else None, step=step)
    return strategy.objective(ctx)


def _default_x_T_sampler(model, config, shape):
    shape = tuple(shape) if shape is not None else (tuple(config.shape) if config.shape is not None else None)
    if shape is None:
        dim = getattr(model, "dim", None) or getattr(getattr(model, "base", None), "dim", None)
        if not isinstance(dim, int):
            raise ValueError("shape: give x_T_sampler or the per-sample shape (argument or config.shape)")
        shape = (dim,)
    p0 = next(model.parameters())
    dev, dt = p0.device, (p0.dtype if p0.is_floating_point() else torch.get_default_dtype())

    def x_T_sampler(n, generator):
        return torch.randn((n,) + shape, generator=generator, dtype=dt).to(dev)

    return x_T_sampler


def finetune(model: nn.Module, schedule: NoiseSchedule, reward: Callable, strategy, config: FinetuneConfig, *,
             x_T_sampler: Optional[Callable] = None, cond_sampler: Optional[Callable] = None, ts=None,
             callback: Optional[Callable] = None, shape: Optional[Sequence[int]] = None,
             dist: Optional[Distributed] = None) -> History:
    """Fine-tune ``model`` to maximise mean reward - lam * mean path KL (``theory.engine.strategies``).

    ``model``: any eps module with trainable parameters, ``.reference`` (the pre-trained eps model, for
    the KL) and ideally ``.param_groups(lr_lora, lr_embed)`` (AdamW groups; else all trainable parameters
    at ``config.lr``). ``reward(x0, cond) -> (B,)``; attribute ``differentiable`` (default True).
    ``x_T_sampler(n, generator)``: the initial states (default N(0, I) of ``shape``/``config.shape``);
    ``cond_sampler(n, generator)``: the conditions (default None). ``ts``: the time grid (default
    ``time_grid(schedule, n_steps, t_min, kind=grid)``; must have n_steps + 1 points). ``callback(step, row)``
    after each completed optimisation step (step counted from 1). With ``config.out_dir`` the loop resumes
    from ``out_dir/checkpoint`` if present (refusing other settings, see ``theory.engine.checkpoint``) and
    checkpoints every ``ckpt_every`` steps and at the end; the history is also written to
    ``out_dir/history.json``. ``dist``: a ``Distributed`` for data-parallel runs (default one process);
    ``config.batch_size`` is then the per-process batch. Returns the ``History``.
    """
    ts, kl_on, reference = _check_inputs(model, reward, strategy, config, schedule, ts)
    dist = check_dist(dist)
    if dist.world_size > 1 and isinstance(strategy, Adjoint):
        raise ValueError("strategy: Adjoint draws its Brownian motion inside torchsde and cannot share the "
                         "combined batch's noise across processes; use DRaFT with checkpoint=True")
    if x_T_sampler is None:
        x_T_sampler = _default_x_T_sampler(model, config, shape)
    out_dir = Path(config.out_dir) if config.out_dir is not None else None
    if out_dir is not None and dist.is_main:  # fail before any work if the folder cannot be written
        check_writable(out_dir, "out_dir")

    groups = _param_groups(model, config)
    group_ids = {id(p) for g in groups for p in g["params"]}
    named = {n: p for n, p in model.named_parameters() if id(p) in group_ids}
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config))

    # randomness: ``gen`` (CPU) draws x_T, cond and the strategies' choices (K, m); the sampler noise comes
    # from ``gen`` too on CPU, from a generator on the model's device otherwise. All saved in checkpoints.
    gen = torch.Generator().manual_seed(config.seed)
    dev = next(model.parameters()).device
    noise_gen = gen if dev.type == "cpu" else torch.Generator(device=dev).manual_seed(config.seed + 1)
    own_noise = noise_gen if noise_gen is not gen else None
    settings = run_settings(config, strategy, dist.world_size)
    history = History()
    start, last_ckpt = 0, None
    if out_dir is not None:
        ck = find_checkpoint(out_dir)
        if ck is not None:
            start, history = load_checkpoint(ck, model=model, optimizer=optimizer, scheduler=scheduler, gen=gen,
                                             noise_gen=own_noise, settings=settings)
            last_ckpt = start
    wall0 = history.rows[-1]["wall_time"] if history.rows else 0.0
    total_q = history.rows[-1].get("reward_queries_total", 0) if history.rows else 0

    iterator = range(start + 1, config.steps + 1)
    bar = None
    if config.progress and dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(iterator, desc=f"finetune ({type(strategy).__name__})", initial=start, total=config.steps)
        iterator = bar
    t_start = time.perf_counter()
    K, b = dist.world_size, config.batch_size
    mine = slice(dist.rank * b, (dist.rank + 1) * b)  # this process's part of the combined batch
    for step in iterator:
        x_T = x_T_sampler(K * b, gen)
        if not isinstance(x_T, torch.Tensor) or x_T.shape[0] != K * b:
            raise ValueError(f"x_T_sampler: {callable_name(x_T_sampler)} must return a tensor with batch size "
                             f"{K * b}, got {getattr(x_T, 'shape', type(x_T).__name__)}")
        cond = cond_sampler(K * b, gen) if cond_sampler is not None else None
        if cond is not None and len(cond) != K * b:
            raise ValueError(f"cond_sampler: {callable_name(cond_sampler)} returned {len(cond)} conditions for "
                             f"batch size {K * b}")
        if K > 1:
            x_T = x_T[mine]
            cond = cond[mine] if cond is not None else None
        if cond is not None and hasattr(cond, "to"):
            cond = cond.to(x_T.device)
        ctx = StepContext(model=model, reference=reference, kl_reference=reference if kl_on else None,
                          schedule=schedule, reward=reward, ts=ts.to(x_T.device), x_T=x_T, cond=cond, config=config,
                          gen=gen, noise_gen=noise_gen if noise_gen.device == x_T.device else None, step=step,
                          dist=dist, update=Update(optimizer, named, config.grad_clip, dist, step))
        try:
            out = strategy.step(ctx)
        except (NonFiniteError, NonFiniteRewardError) as e:
            note = (f"the checkpoint of step {last_ckpt} in {out_dir / 'checkpoint'} is intact and finite; resume "
                    f"from it" if last_ckpt is not None else "no checkpoint was written")
            raise type(e)(f"{e}; {note}") from None
        scheduler.step()
        q = strategy.queries(b) * K
        total_q += q
        # the history describes the combined batch: every rank's rewards and KLs gathered, the loss averaged
        r, kl = ctx.gather(out.rewards), (ctx.gather(out.kl) if out.kl is not None else None)
        loss = torch.tensor([out.loss], dtype=torch.float64)
        if K > 1:
            dist.all_reduce_mean_([loss])
        row = {"step": step, "reward_mean": float(r.float().mean()),
               "reward_std": float(r.float().std()) if r.numel() > 1 else 0.0,
               "kl": float(kl.float().mean()) if kl is not None else float("nan"), "loss": float(loss[0]),
               "grad_norm": float(out.grad_norm), "wall_time": wall0 + time.perf_counter() - t_start,
               "reward_queries": int(q), "reward_queries_total": total_q, **out.extras}
        history.append(row)
        if bar is not None:
            bar.set_postfix(reward=f"{row['reward_mean']:.4g}", kl=f"{row['kl']:.3g}")
        if callback is not None:
            callback(step, row)
        if out_dir is not None and ((config.ckpt_every and step % config.ckpt_every == 0) or step == config.steps):
            if dist.is_main:
                save_checkpoint(out_dir, model=model, optimizer=optimizer, scheduler=scheduler, step=step,
                                history=history, gen=gen, noise_gen=own_noise, settings=settings)
            dist.barrier()
            last_ckpt = step
    if bar is not None:
        bar.close()
    if out_dir is not None and dist.is_main:
        history.to_json(out_dir / "history.json")
    return history
