"""CLIP on decoded images, differentiably: the CLIP preprocessing in torch and a CLIP prompt-image score in
PickScore's format (docs/theory.md §8).

``ClipPreprocess`` is ``transformers.CLIPImageProcessor`` (resize the shortest side, centre crop, CLIP
normalisation) written with torch operations, so that a reward's gradient reaches the pixels: the processor
itself works on uint8 / PIL images and has no gradient. Its resize is PIL's bicubic filter (a = -0.5,
antialiased when shrinking), which ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)``
implements; PIL resizes the horizontal axis first, then the vertical one, clipping to the pixel range after
each pass, and so does this module. What remains different is PIL's rounding to uint8 after each pass.

``ClipScore`` is s(x, p) = exp(logit_scale) cos(E_img(x), E_txt(p)), the CLIP logit of an (image, prompt)
pair, as PickScore scores images (a CLIPModel fine-tuned on human preferences, read through transformers).
Weights come from local folders only. HPSv2 ships open_clip checkpoints, which this package does not read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "ClipPreprocess", "ClipScore", "require_folder", "shortest_side_size"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_BICUBIC = 3  # PIL.Image.BICUBIC, the resampling CLIP's processor uses


def require_folder(path, argument: str, expects: str) -> Path:
    """``path`` as an existing local folder holding ``config.json``, else FileNotFoundError naming the argument."""
    if path is None:
        raise FileNotFoundError(f"{argument}: not given; pass the local folder of {expects} (weights are never downloaded)")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{argument}: no folder at '{p}'; expected the local folder of {expects} "
                                "(saved with save_pretrained; weights are never downloaded)")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{argument}: '{p}' has no config.json; expected the local folder of {expects} "
                                "(saved with save_pretrained)")
    return p


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_h, new_w) with the shorter side equal to ``size`` and the longer one int(size * long / short),
    as transformers' ``get_resize_output_image_size(default_to_square=False)`` computes it."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


class ClipPreprocess(nn.Module):
    """Differentiable CLIP preprocessing of images in [0, 1] (B, 3, H, W) -> normalised (B, 3, crop_h, crop_w):

        resize shortest side to ``size`` (bicubic, width pass then height pass, each clamped to [0, 1]),
        centre crop at ((h - crop_h) // 2, (w - crop_w) // 2),  then (x - mean) / std per channel.
    """

    def __init__(self, size: int = 224, crop: Sequence[int] = (224, 224), mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 std: Sequence[float] = OPENAI_CLIP_STD):
        super().__init__()
        if int(size) < 1 or len(crop) != 2 or min(crop) < 1 or len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"size, crop, mean, std: need size >= 1, crop (h, w), 3 means and 3 positive stds; got "
                             f"{size}, {tuple(crop)}, {tuple(mean)}, {tuple(std)}")
        self.size, self.crop = int(size), (int(crop[0]), int(crop[1]))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_processor(cls, processor) -> "ClipPreprocess":
        """The same steps as a ``CLIPImageProcessor`` (shortest-edge resize, bicubic, centre crop, normalise)."""
        size = processor.size
        shortest = size.get("shortest_edge") if hasattr(size, "get") else getattr(size, "shortest_edge", None)
        if not shortest or not processor.do_resize or not processor.do_center_crop or not processor.do_normalize \
                or not processor.do_rescale or int(processor.resample) != _BICUBIC:
            raise ValueError("processor: expected a CLIP image processor (shortest-edge bicubic resize, centre crop, "
                             f"rescale, normalise); got size={size}, resample={processor.resample}")
        crop = processor.crop_size
        ch, cw = (crop["height"], crop["width"]) if hasattr(crop, "__getitem__") else (crop.height, crop.width)
        return cls(int(shortest), (int(ch), int(cw)), tuple(processor.image_mean), tuple(processor.image_std))

    @classmethod
    def from_folder(cls, folder: Path, image_size: int) -> "ClipPreprocess":
        """From the folder's ``preprocessor_config.json`` when present, else CLIP's defaults at ``image_size``."""
        if (Path(folder) / "preprocessor_config.json").is_file():
            from transformers import CLIPImageProcessor

            return cls.from_processor(CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True))
        return cls(image_size, (image_size, image_size))

    def resize(self, img: torch.Tensor) -> torch.Tensor:
        H, W = img.shape[-2:]
        h, w = shortest_side_size(H, W, self.size)
        # two 1-D passes, width first, each clamped to the pixel range, as PIL's ImagingResample does
        if w != W:
            img = F.interpolate(img, size=(H, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        if h != H:
            img = F.interpolate(img, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        return img

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if img.ndim != 4 or img.shape[1] != 3:
            raise ValueError(f"img: expected RGB images (B, 3, H, W) in [0, 1], got shape {tuple(img.shape)}")
        img = self.resize(img)
        h, w = img.shape[-2:]
        ch, cw = self.crop
        if ch > h or cw > w:
            raise ValueError(f"crop: {self.crop} is larger than the resized image ({h}, {w}); lower crop or raise size")
        top, left = (h - ch) // 2, (w - cw) // 2
        img = img[..., top:top + ch, left:left + cw]
        return (img - self.mean.to(img.dtype)) / self.std.to(img.dtype)


def _cond_rows(cond, batch: int, n_prompts: int, device) -> torch.Tensor:
    if cond is None:
        if n_prompts != 1:
            raise ValueError(f"cond: give the prompt index of each sample (B,), {n_prompts} prompts are known")
        return torch.zeros(batch, dtype=torch.long, device=device)
    idx = torch.as_tensor(cond, device=device).long().reshape(-1)
    if idx.numel() == 1:
        idx = idx.expand(batch)
    if idx.shape != (batch,) or int(idx.min()) < 0 or int(idx.max()) >= n_prompts:
        raise ValueError(f"cond: expected ({batch},) prompt indices in [0, {n_prompts})")
    return idx


class ClipScore(nn.Module):
    """CLIP prompt-image score (PickScore's format), docs/theory.md (8.5):

        s(x, p) = exp(logit_scale) * <E_img(x) / |E_img(x)|, E_txt(p) / |E_txt(p)|>,

    with E_img, E_txt a transformers ``CLIPModel``'s ``get_image_features`` / ``get_text_features`` and the
    image preprocessed by ``ClipPreprocess``. ``model_path``: local CLIPModel folder (PickScore:
    yuvalkirstain/PickScore_v1 saved locally); ``processor_path``: the folder with the tokenizer and
    ``preprocessor_config.json`` (PickScore: laion/CLIP-ViT-H-14-laion2B-s32B-b79K), default ``model_path``.
    ``prompts``: embedded once; ``cond`` then selects one per sample ((B,) indices, as the pipeline's
    prompt rows), or ``cond`` is a list of B prompt strings. ``dtype``: cast the model (float16 on a GPU).
    Differentiable in the image; CLIP is frozen."""

    differentiable = True

    def __init__(self, model_path=None, prompts: Optional[Sequence[str]] = None, processor_path=None, *,
                 model: Optional[nn.Module] = None, tokenizer=None, preprocess: Optional[ClipPreprocess] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        if model is None:
            from transformers import CLIPModel

            folder = require_folder(model_path, "model_path", "a CLIP model (transformers CLIPModel, e.g. PickScore)")
            model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
        if dtype is not None:
            model = model.to(dtype)
        proc = None if processor_path is None and model_path is None else \
            _require_processor(processor_path if processor_path is not None else model_path)
        if tokenizer is None:
            if proc is None:
                raise ValueError("tokenizer: pass a CLIP tokenizer or the folder holding one (processor_path)")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(proc), local_files_only=True)
        if preprocess is None:
            image_size = model.config.vision_config.image_size
            preprocess = ClipPreprocess.from_folder(proc, image_size) if proc is not None else \
                ClipPreprocess(image_size, (image_size, image_size))
        self.model, self.tokenizer, self.preprocess = model.eval().requires_grad_(False), tokenizer, preprocess
        self.prompts = list(prompts) if prompts is not None else []
        self.register_buffer("text_embeds", self.embed_text(self.prompts) if self.prompts else None, persistent=False)
        self.__name__ = "clip-score"

    def _param(self):
        return next(self.model.parameters())

    @torch.no_grad()
    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings (P, D)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts: expected a list of strings")
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt")
        p = self._param()
        e = self.model.get_text_features(input_ids=tok["input_ids"].to(p.device),
                                         attention_mask=tok["attention_mask"].to(p.device))
        e = getattr(e, "pooler_output", e)
        return F.normalize(e, dim=-1)

    def embed_image(self, img: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings (B, D) of images in [0, 1]; differentiable in ``img``."""
        p = self._param()
        e = self.model.get_image_features(pixel_values=self.preprocess(img.to(p.device)).to(p.dtype))
        e = getattr(e, "pooler_output", e)
        return F.normalize(e, dim=-1)

    def forward(self, img: torch.Tensor, cond=None) -> torch.Tensor:
        if isinstance(cond, (list, tuple)) and cond and isinstance(cond[0], str):
            if len(cond) != img.shape[0]:
                raise ValueError(f"cond: {len(cond)} prompts for {img.shape[0]} images")
            txt = self.embed_text(cond)
        else:
            if self.text_embeds is None:
                raise ValueError("prompts: this score was built without prompts; pass cond as a list of B prompt strings")
            txt = self.text_embeds[_cond_rows(cond, img.shape[0], len(self.prompts), self.text_embeds.device)]
        s = self.model.logit_scale.exp() * (self.embed_image(img) * txt.to(self._param().dtype)).sum(-1)
        return s.to(device=img.device, dtype=img.dtype)


def _require_processor(path) -> Path:
    """The folder holding the CLIP tokenizer (and preprocessor config); FileNotFoundError naming the argument."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"processor_path: no folder at '{p}'; expected the local folder of a CLIP processor "
                                "(tokenizer files and preprocessor_config.json, saved with save_pretrained)")
    if not any((p / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"processor_path: '{p}' has no tokenizer (tokenizer.json or vocab.json); expected the "
                                "local folder of a CLIP processor saved with save_pretrained")
    return p
