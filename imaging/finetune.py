"""Reward fine-tuning of a Stable Diffusion pipeline with the package's one engine (``theory.engine``).

Nothing here is specific to images except the wiring: the UNet with prompt embeddings and
classifier-free guidance is an eps model over latents (``imaging.pipeline.LatentEps``), the reward
sees the latents through the VAE decoder (``imaging.rewards.LatentReward``), LoRA from peft goes on
the UNet's attention projections, and ``theory.engine.finetune`` runs DRaFT / DRaFT-K / DRaFT-LV /
ReFL / the adjoint / DDPO exactly as on the 2-D toys (DRaFT, Clark et al. 2024, sec. 4; CTRL's KL
term via ``lam``). Runs checkpoint atomically into ``out`` and resume from there.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

__all__ = ["SDFinetuneConfig", "METHODS", "strategy_of", "build", "run_finetune", "UNET_LORA_TARGETS"]

#: LoRA on the attention projections of every transformer block of the UNet (DRaFT sec. 4, as
#: diffusers' LoRA training script).
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

METHODS = ("draft", "draftk", "draftlv", "refl", "adjoint", "ddpo")


@dataclass(frozen=True)
class SDFinetuneConfig:
    """One SD fine-tuning run. ``model`` is a local pipeline folder; ``tiny`` builds an in-process toy
    pipeline instead (CPU smoke runs). ``method``: one of METHODS; ``k`` for DRaFT-K (an int, or
    "lo,hi" drawn once per sample), ``lv_n`` for DRaFT-LV, ``refl_steps`` for ReFL."""

    model: Optional[str] = None
    tiny: bool = False
    prompts: Sequence[str] = ("a photo of a cat",)
    reward: str = "colourfulness"
    method: str = "draftk"
    k: str = "1"
    lv_n: int = 2
    refl_steps: tuple = (1, 10)
    steps: int = 100
    batch_size: int = 2
    sample_steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 7.5
    lam: float = 0.0
    lr: float = 1e-4
    grad_clip: float = 1.0
    lora_rank: int = 4
    lora_targets: Sequence[str] = UNET_LORA_TARGETS
    grad_checkpoint: bool = False
    seed: int = 0
    out: str = "runs/sd-finetune"
    ckpt_every: int = 10
    device: Optional[str] = None
    dtype: str = "float32"
    progress: bool = True


def _parse_k(k):
    if isinstance(k, (int, tuple)):
        return k
    parts = [int(p) for p in str(k).replace("-", ",").split(",") if p.strip()]
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise ValueError(f"k: expected an int or 'lo,hi', got {k!r}")


def strategy_of(cfg: SDFinetuneConfig):
    """The engine strategy named by ``cfg.method``."""
    from theory import engine as E

    if cfg.method not in METHODS:
        raise ValueError(f"method: unknown '{cfg.method}', choose from {', '.join(METHODS)}")
    if cfg.method == "draft":
        return E.DRaFT()
    if cfg.method == "draftk":
        return E.DRaFTK(_parse_k(cfg.k))
    if cfg.method == "draftlv":
        return E.DRaFTLV(n=cfg.lv_n)
    if cfg.method == "refl":
        return E.ReFL(steps=tuple(cfg.refl_steps))
    if cfg.method == "adjoint":
        return E.Adjoint()
    return E.DDPO()


def build(cfg: SDFinetuneConfig):
    """(pipe, steered model, schedule, time grid, reward) for ``cfg``; no training."""
    from theory.engine import SteeredModel

    from .pipeline import LatentEps, encode_prompts, load_pipeline, schedule_of, scheduler_grid
    from .rewards import LatentReward

    if not cfg.prompts:
        raise ValueError("prompts: give at least one prompt")
    if cfg.batch_size < 1 or cfg.steps < 1 or cfg.sample_steps < 1:
        raise ValueError("batch_size, steps, sample_steps: must be >= 1")
    if cfg.dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {cfg.dtype!r}")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, cfg.dtype)
    if cfg.tiny:
        from .tiny import tiny_pipeline

        pipe = tiny_pipeline(seed=cfg.seed).to(device)
    elif cfg.model is None:
        raise ValueError("model: pass the local folder of a diffusers pipeline (or tiny=True for a toy pipeline)")
    else:
        pipe = load_pipeline(cfg.model, dtype=dtype, device=device)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    cond, unc = encode_prompts(pipe, list(cfg.prompts), device=device)
    sch = schedule_of(pipe)
    base = LatentEps(pipe.unet, sch, cond, unc, cfg.guidance_scale)
    model = SteeredModel(base, lora_rank=cfg.lora_rank, lora_targets=list(cfg.lora_targets))
    model.to(device)
    ts = scheduler_grid(pipe.scheduler, cfg.sample_steps)
    reward = LatentReward(pipe, cfg.reward)
    return pipe, model, sch, ts, reward


def run_finetune(cfg: SDFinetuneConfig) -> dict:
    """Fine-tune, writing into ``cfg.out``: ``checkpoint/`` (atomic, resumed from if present),
    ``lora.safetensors`` (the trained adapter), ``history.json`` and ``summary.json`` (mean reward of
    the pre-trained and the fine-tuned model on the same fixed noise)."""
    from theory.engine import FinetuneConfig, finetune
    from theory.lora import save_lora
    from theory.solvers import sample

    from .pipeline import latent_shape

    strategy = strategy_of(cfg)
    pipe, model, sch, ts, reward = build(cfg)
    if cfg.method != "ddpo" and not reward.differentiable:
        raise ValueError(f"reward: '{cfg.reward}' has no gradient; use method='ddpo' for it")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    dtype = getattr(torch, cfg.dtype)
    shape = latent_shape(pipe)
    P = len(cfg.prompts)

    def x_T_sampler(n, generator):
        return torch.randn((n, *shape), generator=generator, dtype=dtype).to(device)

    def cond_sampler(n, generator):
        return torch.randint(0, P, (n,), generator=generator).to(device)

    @torch.no_grad()
    def mean_reward(eps_model, seed=12345, n=None):
        n = n or max(P, cfg.batch_size)
        g = torch.Generator().manual_seed(seed)
        x = x_T_sampler(n, g)
        c = torch.arange(n, device=device) % P
        x0 = sample(eps_model, sch, x, ts, method="ddim", eta=cfg.eta, cond=c, generator=g).x0
        return float(reward(x0, c).float().mean())

    before = mean_reward(model.reference)
    fcfg = FinetuneConfig(steps=cfg.steps, batch_size=cfg.batch_size, n_steps=cfg.sample_steps, method="ddim",
                          eta=cfg.eta, lam=cfg.lam, lr=cfg.lr, grad_clip=cfg.grad_clip,
                          checkpoint=cfg.grad_checkpoint, seed=cfg.seed, ckpt_every=cfg.ckpt_every,
                          out_dir=str(out), progress=cfg.progress)
    hist = finetune(model, sch, reward, strategy, fcfg, x_T_sampler=x_T_sampler, cond_sampler=cond_sampler, ts=ts)
    save_lora(model, out / "lora.safetensors")
    hist.to_json(out / "history.json")
    model.eval()
    after = mean_reward(model)
    summary = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
               "reward_before": before, "reward_after": after, "steps": len(list(hist))}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
