"""The LAION aesthetic predictor as a differentiable image reward (docs/theory.md §8).

    a(x) = MLP( E(x) / |E(x)| ),   E = CLIP ViT-L/14 image tower + projection (768-d),
    MLP  = Linear(768, 1024) - Linear(1024, 128) - Linear(128, 64) - Linear(64, 16) - Linear(16, 1),

the "improved aesthetic predictor" (sac+logos+ava1-l14-linearMSE) that DDPO, DRaFT and CTRL score images
with: a linear stack (no activations) with dropout between the first layers, so that the layer indices of
its state dict (``layers.0``, ``layers.2``, ``layers.4``, ``layers.6``, ``layers.7``) match the original
file. The image goes through ``ClipPreprocess`` (CLIP's preprocessing in torch) so the gradient reaches the
pixels and, through the VAE decoder, the latents. Weights come from local files only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .clip_score import ClipPreprocess, require_folder

__all__ = ["AestheticMLP", "AestheticReward", "AestheticScorer", "load_head"]


class AestheticMLP(nn.Module):
    """The aesthetic head 768-1024-128-64-16-1 (dropout 0.2, 0.2, 0.1; no activations), the original's layout."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = int(input_size)
        self.layers = nn.Sequential(
            nn.Linear(self.input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_head(head_path, input_size: int = 768) -> AestheticMLP:
    """The aesthetic head from a local ``.pth`` / ``.pt`` (read with ``torch.load(weights_only=True)``: tensors
    only, no pickled code) or ``.safetensors`` state dict; FileNotFoundError naming ``head_path`` if absent."""
    if head_path is None:
        raise FileNotFoundError("head_path: not given; pass the local aesthetic head weights, e.g. "
                                "sac+logos+ava1-l14-linearMSE.pth (weights are never downloaded)")
    p = Path(head_path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"head_path: no file at '{p}'; expected the LAION aesthetic head weights "
                                "(sac+logos+ava1-l14-linearMSE.pth, or the same state dict as .safetensors)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    elif p.suffix in (".pth", ".pt", ".bin"):
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"head_path: '{p.name}' is neither .pth / .pt nor .safetensors")
    if not isinstance(state, dict):
        raise ValueError(f"head_path: '{p}' holds a {type(state).__name__}, expected a state dict")
    head = AestheticMLP(input_size)
    missing, unexpected = head.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"head_path: '{p}' is not an aesthetic head {input_size}-1024-128-64-16-1 "
                         f"(missing keys {missing}, unexpected keys {unexpected})")
    return head


class AestheticReward(nn.Module):
    """a(x) = MLP(normalise(E_img(preprocess(x)))) on images in [0, 1] (B, 3, H, W) -> (B,), docs/theory.md (8.4).

    ``clip_path``: local folder of the CLIP ViT-L/14 image tower (a ``CLIPVisionModelWithProjection`` or a
    whole ``CLIPModel`` such as openai/clip-vit-large-patch14 saved with ``save_pretrained``; its
    ``preprocessor_config.json``, when present, sets the preprocessing). ``head_path``: the MLP weights.
    Or pass built modules (``vision``, ``head``, ``preprocess``), as the tests do. ``dtype``: cast both (e.g.
    torch.float16 on a GPU; float64 for gradient checks). Frozen; differentiable in x.
    """

    differentiable = True

    def __init__(self, clip_path=None, head_path=None, *, vision: Optional[nn.Module] = None,
                 head: Optional[nn.Module] = None, preprocess: Optional[ClipPreprocess] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        folder = None
        if vision is None:
            from transformers import CLIPVisionModelWithProjection

            folder = require_folder(clip_path, "clip_path", "the CLIP ViT-L/14 image tower (openai/clip-vit-large-patch14)")
            vision = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True)
        if dtype is not None:
            vision = vision.to(dtype)
        dim = vision.config.projection_dim
        if head is None:
            head = load_head(head_path, dim)
        if dtype is not None:
            head = head.to(dtype)
        if preprocess is None:
            size = vision.config.image_size
            preprocess = ClipPreprocess.from_folder(folder, size) if folder is not None else ClipPreprocess(size, (size, size))
        self.vision, self.head, self.preprocess = vision.eval(), head.eval(), preprocess
        self.requires_grad_(False)
        self.__name__ = "aesthetic"

    @classmethod
    def from_local(cls, clip_path, head_path, **kwargs) -> "AestheticReward":
        """``AestheticReward(clip_path, head_path, **kwargs)``: the tower's folder and the head's file."""
        return cls(clip_path, head_path, **kwargs)

    def embed(self, img: torch.Tensor) -> torch.Tensor:
        """Unit-norm CLIP image embeddings (B, D)."""
        p = next(self.vision.parameters())
        x = img.to(p.device)
        # half-precision images (a bf16 / fp16 pipeline's) are preprocessed in float32: torch's bicubic
        # antialias resize has no bfloat16 kernel on the CPU
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        e = self.vision(pixel_values=self.preprocess(x).to(p.dtype)).image_embeds
        return F.normalize(e, dim=-1)

    def forward(self, img: torch.Tensor, cond=None) -> torch.Tensor:
        e = self.embed(img)
        return self.head(e.to(next(self.head.parameters()).dtype)).squeeze(-1).to(device=img.device, dtype=img.dtype)

    def train(self, mode: bool = True):
        """Always in eval mode: the head's dropout must not act on a reward."""
        return super().train(False)


AestheticScorer = AestheticReward  # the name imaging.ctrl reads it by (``AestheticScorer.from_local``)
