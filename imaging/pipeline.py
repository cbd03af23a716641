"""Stable Diffusion (any diffusers SD-style pipeline) as an eps model of the theory solvers.

The UNet enters the package the way k-diffusion's wrappers bring in external models: one wrapper,
``LatentEps``, turns (UNet, prompt embeddings, classifier-free guidance weight) into an eps model
``eps(x, t, cond)`` over latents with *continuous* time t, and the scheduler's ``alphas_cumprod``
becomes a :class:`theory.schedules.DiscreteVP`. From there every sampler, guidance field and the
fine-tuning engine of ``theory`` applies unchanged (docs/theory.md §1, the discrete VP schedule; §8).

Weights are never downloaded: ``load_pipeline`` takes a local folder (the user's copy of SD v1.5 or
any pipeline saved with ``save_pretrained``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from theory.guidance import cfg_combine
from theory.schedules import DiscreteVP, as_time

__all__ = ["load_pipeline", "check_pipeline_folder", "resolve_device", "resolve_dtype", "DTYPES", "scheduler_grid",
           "LatentEps", "encode_prompts", "decode_latents", "latent_shape", "schedule_of"]


DTYPES = ("float32", "bfloat16", "float16")


def resolve_device(device: Optional[str] = None) -> str:
    """``device`` checked against what this machine has (default: cuda if available, else cpu). A CUDA
    device without CUDA is a ValueError naming ``--device`` (torch would fail later, after loading)."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device: '{device}' is not a torch device ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device: '{device}' asked for, but torch sees no CUDA device here "
                             f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device: '{device}' does not exist; this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device: '{device}' asked for, but MPS is not available; use --device cpu")
    return str(dev)


def resolve_dtype(dtype: Union[str, torch.dtype], device: str) -> torch.dtype:
    """The dtype of the frozen pipeline weights (UNet, VAE, text encoder), checked against ``device``.

    float16 needs half-precision arithmetic of a GPU: refused on CPU (use bfloat16 there); bfloat16 on a
    CUDA device without bf16 support is refused too. Trainable parameters (LoRA, label embedding) and the
    optimiser state stay float32 whatever this is (mixed precision as in DRaFT sec. 4)."""
    name = str(dtype).replace("torch.", "")
    if name not in DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    dev = torch.device(device)
    if name == "float16" and dev.type == "cpu":
        raise ValueError("--dtype: float16 needs a GPU with half-precision arithmetic; on the CPU use bfloat16 "
                         "(or float32)")
    if name == "bfloat16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--dtype: this CUDA device ({torch.cuda.get_device_name(dev)}) has no bfloat16 support; "
                         "use float16 or float32")
    return getattr(torch, name)


def check_pipeline_folder(model_path: Union[str, Path]) -> Path:
    """The pipeline folder ``model_path`` if it looks loadable (exists, has a readable model_index.json that
    is a JSON object); else FileNotFoundError / ValueError naming the folder or file. Cheap: no weights read."""
    import json

    p = Path(model_path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(
            f"model_path: no folder at '{p}'. Pass the local folder of a diffusers pipeline (e.g. your copy of "
            "Stable Diffusion v1.5 saved with save_pretrained); weights are never downloaded."
        )
    index = p / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"model_path: '{p}' has no model_index.json; it is not a diffusers pipeline folder")
    try:
        meta = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"model_path: {index} is not valid JSON ({e}); restore it from your copy of the pipeline") from None
    if not isinstance(meta, dict) or "_class_name" not in meta:
        raise ValueError(f"model_path: {index} has no '_class_name'; it is not a diffusers model_index.json")
    return p


def load_pipeline(model_path: Union[str, Path], dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a diffusers pipeline from a local folder (no hub access: ``local_files_only=True``), its
    weights in ``dtype``."""
    from diffusers import DiffusionPipeline

    p = check_pipeline_folder(model_path)
    pipe = DiffusionPipeline.from_pretrained(str(p), dtype=dtype, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def freeze(pipe):
    """The pre-trained pipeline as every steering method uses it: UNet, VAE and text encoder in eval mode
    without gradients (LoRA and label embeddings are added on top), no progress bar. Returns ``pipe``."""
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
        m.eval()
    return pipe


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
    """eps(x, t, cond) of an SD UNet over latents, with classifier-free guidance (docs/theory.md §6):

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
        """eps in x's dtype. Mixed precision: the UNet runs in its own weights' dtype (x and the prompt
        embeddings are cast to it, the timesteps stay float32 - 981 is 980 in bfloat16) and eps comes back
        cast to x's dtype, so the solver's state stays in float32 whatever the frozen weights are."""
        t = as_time(t, x)
        B = x.shape[0]
        ts = self.schedule.model_timestep(t).float()
        idx = self._prompt_index(cond, B, x.device)
        wd = getattr(self.unet, "dtype", x.dtype)
        xu = x.to(wd)
        emb_c = self.prompt_embeds[idx].to(wd)
        w = self.guidance_scale
        if w == 1.0:
            return self._unet(xu, ts, emb_c).to(x.dtype)
        emb_u = self.uncond_embeds.expand(B, -1, -1).to(wd)
        if w == 0.0:
            return self._unet(xu, ts, emb_u).to(x.dtype)
        eps = self._unet(torch.cat([xu, xu]), torch.cat([ts, ts]), torch.cat([emb_u, emb_c])).to(x.dtype)
        eps_u, eps_c = eps.chunk(2)
        return cfg_combine(eps_u, eps_c, w)

    def _prompt_index(self, cond, B: int, device) -> torch.Tensor:
        idx = torch.zeros(B, dtype=torch.long, device=device) if cond is None else \
            torch.as_tensor(cond, device=device).long().reshape(-1)
        if idx.shape != (B,) or (idx < 0).any() or (idx >= self.prompt_embeds.shape[0]).any():
            raise ValueError(f"cond: expected ({B},) prompt indices in [0, {self.prompt_embeds.shape[0]})")
        return idx


def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE decoder as the last (differentiable) step of a reward: latents -> images in [0, 1], (B, 3, H, W)."""
    z = latents / pipe.vae.config.scaling_factor
    img = pipe.vae.decode(z.to(pipe.vae.dtype)).sample
    return (img / 2 + 0.5).clamp(0, 1)
