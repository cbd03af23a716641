"""Stable Diffusion (any diffusers SD-style pipeline) as an eps model of the theory solvers.

The UNet enters the package the way k-diffusion's wrappers bring in external models: one wrapper,
``LatentEps``, turns (UNet, prompt embeddings, classifier-free guidance weight) into an eps model
``eps(x, t, cond)`` over latents with *continuous* time t, and the scheduler's ``alphas_cumprod``
becomes a :class:`theory.schedules.DiscreteVP`. From there every sampler, guidance field and the
fine-tuning engine of ``theory`` applies unchanged (THEORY.md section 1, last schedule).

Weights are never downloaded: ``load_pipeline`` takes a local folder (the user's copy of SD v1.5 or
any pipeline saved with ``save_pretrained``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from theory.schedules import DiscreteVP, as_time

__all__ = ["load_pipeline", "scheduler_grid", "LatentEps", "encode_prompts", "decode_latents", "latent_shape", "schedule_of"]


def load_pipeline(model_path: Union[str, Path], dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a diffusers pipeline from a local folder (no hub access: ``local_files_only=True``)."""
    from diffusers import DiffusionPipeline

    p = Path(model_path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(
            f"model_path: no folder at '{p}'. Pass the local folder of a diffusers pipeline (e.g. your copy of "
            "Stable Diffusion v1.5 saved with save_pretrained); weights are never downloaded."
        )
    if not (p / "model_index.json").is_file():
        raise FileNotFoundError(f"model_path: '{p}' has no model_index.json; it is not a diffusers pipeline folder")
    pipe = DiffusionPipeline.from_pretrained(str(p), torch_dtype=dtype, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def schedule_of(pipe) -> DiscreteVP:
    """The pipeline scheduler's alphas_cumprod as a continuous-time VP schedule."""
    return DiscreteVP.from_scheduler(pipe.scheduler)


def scheduler_grid(scheduler, n_steps: int) -> torch.Tensor:
    """The continuous time grid that visits exactly the timesteps the diffusers scheduler would use
    for ``n_steps`` steps (its own ``set_timesteps``, spacing and offset), descending; the last point
    is t = 0 (alpha = 1) when the scheduler's final alpha is one, else t = 1 (alphas_cumprod[0]),
    as DDIM's ``set_alpha_to_one`` decides."""
    if n_steps < 1:
        raise ValueError(f"n_steps: need >= 1, got {n_steps}")
    scheduler.set_timesteps(n_steps)
    k = torch.as_tensor(scheduler.timesteps, dtype=torch.float64)
    final = getattr(scheduler, "final_alpha_cumprod", torch.tensor(1.0))
    t_end = 0.0 if float(final) >= 1.0 else 1.0
    return torch.cat([k + 1.0, torch.tensor([t_end], dtype=torch.float64)])


def latent_shape(pipe, height: Optional[int] = None, width: Optional[int] = None) -> tuple[int, int, int]:
    """(channels, h, w) of the latents for an image of height x width pixels (default: the UNet's size)."""
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = pipe.unet.config.sample_size
    h = size if height is None else height // f
    w = size if width is None else width // f
    return (pipe.unet.config.in_channels, h, w)


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) text embeddings, shapes (P, L, E) and (1, L, E), by the pipeline's own text encoder."""
    if isinstance(prompts, str):
        prompts = [prompts]
    device = device or pipe.unet.device
    cond, uncond = pipe.encode_prompt(list(prompts), device, 1, True, negative_prompt=None)
    return cond, uncond[:1]


class LatentEps(nn.Module):
    """eps(x, t, cond) of an SD UNet over latents, with classifier-free guidance (THEORY.md 6):

        eps = eps_u(x, t) + w (eps_c(x, t, y) - eps_u(x, t))

    ``t`` is continuous time of ``schedule`` (a DiscreteVP; the UNet sees ``schedule.model_timestep(t)``).
    ``cond`` selects, per sample, a row of ``prompt_embeds`` (a (B,) long tensor; default row 0 for all).
    ``guidance_scale`` = 1 evaluates only the conditional branch; 0 only the unconditional one.
    """

    def __init__(self, unet: nn.Module, schedule: DiscreteVP, prompt_embeds: torch.Tensor,
                 uncond_embeds: Optional[torch.Tensor] = None, guidance_scale: float = 7.5):
        super().__init__()
        if prompt_embeds.ndim != 3:
            raise ValueError(f"prompt_embeds: expected (P, L, E), got {tuple(prompt_embeds.shape)}")
        if guidance_scale != 1.0 and uncond_embeds is None:
            raise ValueError("uncond_embeds: classifier-free guidance (guidance_scale != 1) needs the empty-prompt embedding")
        self.unet, self.schedule, self.guidance_scale = unet, schedule, float(guidance_scale)
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)
        self.register_buffer("uncond_embeds", uncond_embeds[:1] if uncond_embeds is not None else None, persistent=False)

    def _unet(self, x, ts, emb):
        return self.unet(x, ts, encoder_hidden_states=emb).sample

    def forward(self, x: torch.Tensor, t, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = as_time(t, x)
        B = x.shape[0]
        ts = self.schedule.model_timestep(t).to(x.dtype)
        idx = torch.zeros(B, dtype=torch.long, device=x.device) if cond is None else torch.as_tensor(cond, device=x.device).long().reshape(-1)
        if idx.shape != (B,) or (idx < 0).any() or (idx >= self.prompt_embeds.shape[0]).any():
            raise ValueError(f"cond: expected ({B},) prompt indices in [0, {self.prompt_embeds.shape[0]})")
        emb_c = self.prompt_embeds[idx].to(x.dtype)
        w = self.guidance_scale
        if w == 1.0:
            return self._unet(x, ts, emb_c)
        emb_u = self.uncond_embeds.expand(B, -1, -1).to(x.dtype)
        if w == 0.0:
            return self._unet(x, ts, emb_u)
        eps = self._unet(torch.cat([x, x]), torch.cat([ts, ts]), torch.cat([emb_u, emb_c]))
        eps_u, eps_c = eps.chunk(2)
        return eps_u + w * (eps_c - eps_u)


def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE decoder as the last (differentiable) step of a reward: latents -> images in [0, 1], (B, 3, H, W)."""
    z = latents / pipe.vae.config.scaling_factor
    img = pipe.vae.decode(z.to(pipe.vae.dtype)).sample
    return (img / 2 + 0.5).clamp(0, 1)
