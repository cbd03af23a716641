"""Rewards on images for fine-tuning SD-style models: ``reward(x0_latents, cond) -> (B,)``.

``LatentReward`` composes the VAE decoder (the last, differentiable step of every image reward) with
an image reward ``f(images in [0, 1] (B, 3, H, W), cond) -> (B,)``. The built-in image rewards need no
downloaded weights: colourfulness and brightness are differentiable (for DRaFT-style training),
JPEG compressibility (DDPO's reward) is not. A learnt reward (an aesthetic or a classifier head) is any
module passed as ``f``.
"""
from __future__ import annotations

import io
from typing import Callable

import numpy as np
import torch

from .pipeline import decode_latents

__all__ = ["LatentReward", "colourfulness", "brightness", "jpeg_compressibility", "IMAGE_REWARDS"]


def colourfulness(img: torch.Tensor, cond=None) -> torch.Tensor:
    """Mean saturation max_c - min_c of the RGB channels (differentiable almost everywhere)."""
    return (img.amax(1) - img.amin(1)).flatten(1).mean(1)


def brightness(img: torch.Tensor, cond=None) -> torch.Tensor:
    """Mean pixel intensity."""
    return img.flatten(1).mean(1)


def jpeg_compressibility(img: torch.Tensor, cond=None, quality: int = 95) -> torch.Tensor:
    """Minus the JPEG size in kB (DDPO's compressibility reward; not differentiable)."""
    from PIL import Image

    out = []
    for im in img.detach().float().cpu():
        buf = io.BytesIO()
        Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, format="JPEG", quality=quality)
        out.append(-buf.tell() / 1000.0)
    return torch.tensor(out, dtype=img.dtype, device=img.device)


jpeg_compressibility.differentiable = False  # type: ignore[attr-defined]

IMAGE_REWARDS: dict[str, Callable] = {
    "colourfulness": colourfulness,
    "brightness": brightness,
    "compressibility": jpeg_compressibility,
}


class LatentReward:
    """r(x0) = f(decode(x0), cond): an image reward seen through the pipeline's VAE decoder."""

    def __init__(self, pipe, image_reward: Callable | str):
        if isinstance(image_reward, str):
            if image_reward not in IMAGE_REWARDS:
                raise ValueError(f"image_reward: unknown '{image_reward}', choose from {sorted(IMAGE_REWARDS)} or pass a callable")
            image_reward = IMAGE_REWARDS[image_reward]
        self.pipe, self.f = pipe, image_reward
        self.differentiable = getattr(image_reward, "differentiable", True)
        self.__name__ = getattr(image_reward, "__name__", type(image_reward).__name__)

    def __call__(self, x0: torch.Tensor, cond=None) -> torch.Tensor:
        r = self.f(decode_latents(self.pipe, x0), cond)
        if r.shape != (x0.shape[0],):
            raise ValueError(f"image_reward: {self.__name__} returned shape {tuple(r.shape)}, expected ({x0.shape[0]},)")
        return r.to(x0.dtype)
