"""A tiny Stable-Diffusion-shaped pipeline built in-process from small configs (no download).

As diffusers' own fast tests do (``get_dummy_components``), but with the CLIP tokenizer built from a
vocabulary written here instead of fetched from a hub. Used by the tests and by ``--tiny`` runs of the
imaging commands, so that every code path of a full SD run is exercised on a CPU in seconds.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

__all__ = ["tiny_tokenizer", "tiny_pipeline"]

_WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "green", "painting", "an", "image", "the"]


def tiny_tokenizer(folder: str | Path | None = None):
    """A CLIPTokenizer over a 12-word vocabulary (whole words; unknown words map to <|endoftext|>).

    The vocabulary files are written into ``folder`` (kept) or, by default, into a temporary folder that
    is removed once the tokenizer has read them (the tokenizer keeps its vocabulary in memory and
    ``save_pretrained`` writes it from there)."""
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="diffsteer-tok-") as tmp:
            return _write_and_load(Path(tmp))
    return _write_and_load(Path(folder))


def _write_and_load(folder: Path):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    # byte-level BPE: single characters, then merges building each word (CLIP marks word ends with </w>)
    chars = sorted({c for w in _WORDS for c in w})
    vocab, merges = {}, []
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for w in _WORDS:
        cur = w[0]
        for i, c in enumerate(w[1:], start=1):
            nxt = c + ("</w>" if i == len(w) - 1 else "")
            merges.append(f"{cur} {nxt}")
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    for special in ["<|startoftext|>", "<|endoftext|>"]:
        vocab[special] = len(vocab)
    merges = list(dict.fromkeys(merges))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def tiny_pipeline(seed: int = 0, sample_size: int = 8):
    """A StableDiffusionPipeline with a ~100k-parameter UNet, VAE and text encoder; latents (4, s, s)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=2 * sample_size,
    )
    text = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
        vocab_size=len(tok), max_position_embeddings=16,
    ))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
