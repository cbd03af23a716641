"""A small Stable-Diffusion-shaped pipeline trained here, on scikit-learn's 8x8 digits (docs/theory.md §8).

The image-scale numbers of the package need a real pipeline, and none can be downloaded; this one is
trained in minutes on a CPU and has Stable Diffusion's structure, so every imaging code path that runs
on it runs unchanged on SD v1.5:

- data: the 1,797 digits, split 80/20 stratified with a fixed seed (the 20 % trains only the judge),
  upscaled bilinearly to 32x32 RGB (grey in three channels), lightly augmented (random rotation, scale
  and shift);
- ``AutoencoderKL`` (trained here, L1 + MSE + a small KL) with latents 4x8x8; its ``scaling_factor`` is
  1 / std of the training latents, as in SD (docs/theory.md §8: the diffusion runs on scaled latents
  z = scaling_factor * E(x), the decoder maps z / scaling_factor back to pixels);
- a ``CLIPTokenizer`` built from a vocabulary and merges written here (byte-level alphabet + whole
  words), a small ``CLIPTextModel`` trained jointly with the UNet on captions such as
  "a handwritten digit 7" or "seven", with 15 % of the captions dropped to "" so that classifier-free
  guidance works (docs/theory.md §6, CFG);
- a ``UNet2DConditionModel`` predicting eps, with cross-attention in its mid block only (a feasibility
  probe measured this layout twice as fast per step and more accurate per second than cross-attention
  at every level), trained by denoising score matching on the cosine DDPM schedule with 1000 steps
  (docs/theory.md §1-2), AdamW with warm-up, gradient clipping and an EMA of the weights;
- a ``DDIMScheduler`` (``clip_sample=False``: the latents are not in [-1, 1]; ``steps_offset=1`` with
  SD's "leading" spacing, which starts sampling at alpha_bar = 3.5e-3 rather than at the cosine
  schedule's degenerate last step, alpha_bar = 2.4e-9, where DDIM would multiply the net's eps error
  by alpha_s / alpha_t ~ 1e3).

It is saved with ``StableDiffusionPipeline.save_pretrained`` and loads offline with
``DiffusionPipeline.from_pretrained(DIR)`` or ``imaging.pipeline.load_pipeline(DIR)``. Its quality is
measured by a judge: a logistic regression on the 8x8 digits fitted on the held-out 20 %, applied to
generated images averaged back to 8x8; ``judge_accuracy`` samples through ``theory.solvers.sample``.

``ensure_digits_pipeline()`` builds the default pipeline once into the cache
(``$DIFFSTEER_CACHE/digits-pipeline-<config hash>``) and returns its folder; with ``evaluate=True`` (the
``diffsteer digits-pipeline`` command) it also measures it (``evaluate_digits_pipeline``).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from theory.registry import prerequisite

from .cache import atomic_build, build_lock, cache_root

__all__ = [
    "PROMPTS",
    "TINY_CONFIG",
    "DigitsPipelineConfig",
    "build_digits_pipeline",
    "default_pipeline_dir",
    "digits_images",
    "digits_split",
    "digits_tokenizer",
    "ensure_digits_pipeline",
    "evaluate_digits_pipeline",
    "fit_judge",
    "is_evaluated",
    "is_digits_pipeline",
    "jpeg_sizes",
    "judge_accuracy",
    "judge_features",
    "sample_digits",
]

#: bump when the training code changes what a config produces (it is part of the cache key).
FORMAT_VERSION = 1
#: the file the build writes last; its presence marks a complete pipeline folder.
INFO_FILE = "digits_pipeline.json"
SPLIT_FILE = "split.json"

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: training captions; {n} is the numeral, {w} the word.
CAPTION_TEMPLATES = ("a handwritten digit {n}", "a handwritten digit {w}", "{w}", "{n}", "the number {w}",
                     "a digit {n}")
#: the prompt of digit d used for sampling and judging.
PROMPTS = tuple(f"a handwritten digit {d}" for d in range(10))


@dataclass(frozen=True)
class DigitsPipelineConfig:
    """Everything that determines the trained pipeline; its hash (``key()``) names the cache folder."""

    seed: int = 0
    split_seed: int = 0  # the stratified 80/20 split (the 20 % is the judge's)
    heldout_fraction: float = 0.2
    image_size: int = 32
    # augmentation (uniform in +-): rotation in degrees, relative scale, shift in pixels
    aug_rotate: float = 10.0
    aug_scale: float = 0.1
    aug_shift: float = 2.0
    n_aug: int = 16  # augmented copies of the training set encoded once into latents for the UNet
    # AutoencoderKL
    vae_channels: tuple = (32, 64, 64)
    vae_groups: int = 32
    latent_channels: int = 4
    vae_steps: int = 150
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    # CLIP text encoder
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 8
    # UNet2DConditionModel (cross-attention in the mid block only)
    unet_channels: tuple = (32, 64)
    unet_layers: int = 2
    unet_groups: int = 32
    unet_heads: int = 4
    unet_steps: int = 2500
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # upper bound; EMA warm-up (power 2/3) ramps towards it
    caption_dropout: float = 0.15
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    timestep_spacing: str = "leading"
    # evaluation written into the folder's JSON
    eval_steps: int = 25
    eval_n_per_class: int = 50
    eval_cfg: tuple = (1.0, 3.0, 7.5)
    eval_jpeg_n: int = 256

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):  # from JSON: keep the dataclass hashable
                object.__setattr__(self, f.name, tuple(v))
        for name in ("vae_steps", "unet_steps", "batch_size", "n_aug", "eval_steps", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction: must be in (0, 1), got {self.heldout_fraction}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout: must be in [0, 1), got {self.caption_dropout}")
        if self.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"timestep_spacing: 'leading', 'trailing' or 'linspace', got '{self.timestep_spacing}'")

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self) -> str:
        """A 12-hex-digit hash of the config (and of FORMAT_VERSION): the cache folder's suffix."""
        blob = json.dumps({"format": FORMAT_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


#: seconds-scale sizes for the tests: every code path of the real build, tiny nets, a few steps.
TINY_CONFIG = DigitsPipelineConfig(
    n_aug=1, vae_channels=(8, 16, 16), vae_groups=4, vae_steps=2, text_hidden=16, text_layers=1, text_heads=2,
    unet_channels=(16, 32), unet_layers=1, unet_groups=8, unet_heads=2, unet_steps=3, batch_size=8, warmup=1,
    eval_steps=2, eval_n_per_class=1, eval_cfg=(1.0, 7.5), eval_jpeg_n=4,
)


# ----------------------------------------------------------------------------- data


def digits_split(seed: int = 0, heldout_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """(train, heldout) indices into ``sklearn.datasets.load_digits()``, stratified by label."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    train, held = train_test_split(np.arange(len(y)), test_size=heldout_fraction, stratify=y, random_state=seed)
    return np.sort(train), np.sort(held)


def digits_images(idx: np.ndarray | None = None, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits ``idx`` as (N, 3, size, size) float images in [0, 1] (bilinear upscale of the 8x8 grey
    levels 0-16, copied to three channels) and their (N,) labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.arange(len(d.target)) if idx is None else np.asarray(idx)
    x = torch.as_tensor(d.images[idx] / 16.0, dtype=torch.float32)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.as_tensor(d.target[idx], dtype=torch.long)


def augment(x: torch.Tensor, cfg: DigitsPipelineConfig, generator: torch.Generator) -> torch.Tensor:
    """Random similarity transform per image (rotation, scale, shift; zero = background padding)."""
    B, _, H, _ = x.shape
    u = torch.rand(B, 4, generator=generator) * 2 - 1
    ang = u[:, 0] * math.radians(cfg.aug_rotate)
    sc = 1.0 + u[:, 1] * cfg.aug_scale
    sh = u[:, 2:] * cfg.aug_shift * 2.0 / H  # pixels -> affine_grid's [-1, 1] coordinates
    theta = torch.stack([
        torch.stack([torch.cos(ang) / sc, -torch.sin(ang) / sc, sh[:, 0]], 1),
        torch.stack([torch.sin(ang) / sc, torch.cos(ang) / sc, sh[:, 1]], 1),
    ], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def captions_for(label: int) -> list[str]:
    return [t.format(n=label, w=NUMBER_WORDS[label]) for t in CAPTION_TEMPLATES]


# ----------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters (the base alphabet of a
    byte-level BPE). Written here because transformers 5 no longer exports it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def digits_tokenizer(folder: str | Path, max_length: int = 8):
    """A ``CLIPTokenizer`` written into ``folder`` (vocab.json + merges.txt, no download): the full
    byte-level alphabet (each character alone and word-final), so any text tokenizes, plus merges that
    make every caption word ("handwritten", "seven", ...) one token; digits are single characters, so
    "7" is one token too."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in alphabet:
        vocab.setdefault(c, len(vocab))
    for c in alphabet:
        vocab.setdefault(c + "</w>", len(vocab))
    words = sorted({w for d in range(10) for cap in captions_for(d) for w in cap.split() if len(w) > 1})
    merges = []
    for w in words:  # left-to-right merges build each word; CLIP marks a word's end with </w>
        cur = w[0]
        for i, c in enumerate(w[1:], start=1):
            nxt = c + ("</w>" if i == len(w) - 1 else "")
            merges.append(f"{cur} {nxt}")
            cur += nxt
            vocab.setdefault(cur, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    merges = list(dict.fromkeys(merges))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def _token_ids(tok, texts: Sequence[str]) -> torch.Tensor:
    """Token ids exactly as ``StableDiffusionPipeline.encode_prompt`` makes them (padded to max length)."""
    return tok(list(texts), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


# ----------------------------------------------------------------------------- models


def _make_vae(cfg: DigitsPipelineConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.vae_channels),
                         layers_per_block=1, latent_channels=cfg.latent_channels, norm_num_groups=cfg.vae_groups,
                         sample_size=cfg.image_size)


def _make_text(cfg: DigitsPipelineConfig, tok):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=cfg.text_hidden, intermediate_size=2 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    ))


def _make_unet(cfg: DigitsPipelineConfig):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    f = 2 ** (len(cfg.vae_channels) - 1)
    # diffusers' legacy naming: attention_head_dim here is the number of heads
    return UNet2DConditionModel(
        sample_size=cfg.image_size // f, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
        mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.unet_layers, norm_num_groups=cfg.unet_groups, cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_heads,
    )


def _progress(it, progress: bool, desc: str):
    if not progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False)


# ----------------------------------------------------------------------------- training


def _train_vae(cfg, x_train, g, progress):
    """AutoencoderKL by L1 + MSE reconstruction + vae_kl * KL(q(z|x) || N(0, I)) on augmented digits."""
    vae = _make_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    vae.train()
    losses = []
    for _ in _progress(range(cfg.vae_steps), progress, "digits pipeline: VAE"):
        i = torch.randint(len(x_train), (cfg.batch_size,), generator=g)
        x = augment(x_train[i], cfg, g) * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = (rec - x).abs().mean() + F.mse_loss(rec, x) + cfg.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
    vae.eval()
    return vae, losses


@torch.no_grad()
def _encode_copies(cfg, vae, x_train, g, chunk=256):
    """Posterior mean and std of n_aug augmented copies of the training set (the first copy plain)."""
    means, stds = [], []
    for k in range(cfg.n_aug):
        xa = x_train if k == 0 else augment(x_train, cfg, g)
        for j in range(0, len(xa), chunk):
            d = vae.encode(xa[j:j + chunk] * 2 - 1).latent_dist
            means.append(d.mean)
            stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def _train_unet(cfg, tok, mean, std, labels, scaling, g, progress):
    """Joint training of text encoder and UNet by the eps-prediction loss |eps - eps_theta(z_t, t, c)|^2,
    z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps (docs/theory.md §1-2), with caption dropout;
    z_0 = scaling * (posterior mean + std * noise) of a random latent, ``labels`` its digit."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    noise_sched = DDPMScheduler(num_train_timesteps=cfg.train_timesteps, beta_schedule=cfg.beta_schedule)
    text, unet = _make_text(cfg, tok), _make_unet(cfg)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = get_cosine_schedule_with_warmup(opt, cfg.warmup, cfg.unet_steps)
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True)
    # one row per (digit, template) caption, plus the empty caption at the end
    n_t = len(CAPTION_TEMPLATES)
    table = _token_ids(tok, [c for d in range(10) for c in captions_for(d)] + [""])
    empty = len(table) - 1
    n_lat = len(labels)
    unet.train()
    text.train()
    losses = []
    for _ in _progress(range(cfg.unet_steps), progress, "digits pipeline: UNet + text encoder"):
        i = torch.randint(n_lat, (cfg.batch_size,), generator=g)
        z0 = (mean[i] + std[i] * torch.randn(mean[i].shape, generator=g)) * scaling
        row = labels[i] * n_t + torch.randint(n_t, (cfg.batch_size,), generator=g)
        row = torch.where(torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout, torch.full_like(row, empty), row)
        emb = text(table)[0][row]
        t = torch.randint(cfg.train_timesteps, (cfg.batch_size,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        zt = noise_sched.add_noise(z0, eps, t)
        loss = F.mse_loss(unet(zt, t, encoder_hidden_states=emb).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        lr_sched.step()
        ema.step(params)
        losses.append(loss.item())
    ema.copy_to(params)
    unet.eval()
    text.eval()
    return text, unet, noise_sched, losses


def build_digits_pipeline(config: DigitsPipelineConfig | None = None, out: str | Path | None = None,
                          progress: bool = True) -> Path:
    """Train the digits pipeline of ``config`` and save it into ``out`` (created; must not hold another
    pipeline's files), with ``split.json`` (train/heldout indices) and ``digits_pipeline.json`` (config,
    cache key, steps, wall times, VAE reconstruction MSE; ``evaluate_digits_pipeline`` adds the judged
    accuracies and JPEG sizes). Returns ``out``. Deterministic given the config and the torch thread count."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    cfg = config or DigitsPipelineConfig()
    if out is None:
        raise ValueError("out: pass the folder to write the pipeline into (or use ensure_digits_pipeline())")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    train_idx, held_idx = digits_split(cfg.split_seed, cfg.heldout_fraction)
    (out / SPLIT_FILE).write_text(json.dumps({"split_seed": cfg.split_seed, "train": train_idx.tolist(),
                                              "heldout": held_idx.tolist()}))
    x_train, y_train = digits_images(train_idx, cfg.image_size)
    x_held, _ = digits_images(held_idx, cfg.image_size)

    t0 = time.perf_counter()
    vae, vae_losses = _train_vae(cfg, x_train, g, progress)
    t_vae = time.perf_counter() - t0
    with torch.no_grad():
        rec = torch.cat([vae.decode(vae.encode(x_held[j:j + 256] * 2 - 1).latent_dist.mode()).sample
                         for j in range(0, len(x_held), 256)])
        vae_mse = float(F.mse_loss((rec / 2 + 0.5).clamp(0, 1), x_held))  # on the [0, 1] pixel scale
    mean, std = _encode_copies(cfg, vae, x_train, g)
    with torch.no_grad():
        z = mean + std * torch.randn(mean.shape, generator=g)
        latent_std = float(z.std())
    scaling = 1.0 / latent_std  # SD's convention: scaled latents have unit variance (docs/theory.md §8)
    vae.register_to_config(scaling_factor=scaling)

    import tempfile

    with tempfile.TemporaryDirectory(prefix="diffsteer-digits-tok-") as td:
        tok = digits_tokenizer(td, cfg.max_length)
        t0 = time.perf_counter()
        text, unet, noise_sched, unet_losses = _train_unet(cfg, tok, mean, std, y_train.repeat(cfg.n_aug), scaling,
                                                           g, progress)
        t_unet = time.perf_counter() - t0
        sched = DDIMScheduler.from_config(noise_sched.config, clip_sample=False, set_alpha_to_one=True,
                                          steps_offset=1, timestep_spacing=cfg.timestep_spacing)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(str(out), safe_serialization=True)
    t_train = time.perf_counter() - t_start

    info = {
        "config": cfg.to_dict(), "key": cfg.key(), "format": FORMAT_VERSION,
        "torch_threads": torch.get_num_threads(),
        "params": {"vae": sum(p.numel() for p in vae.parameters()), "unet": sum(p.numel() for p in unet.parameters()),
                   "text_encoder": sum(p.numel() for p in text.parameters())},
        "vae_steps": cfg.vae_steps, "unet_steps": cfg.unet_steps,
        "wall_s": {"vae": t_vae, "unet_text": t_unet, "train_total": t_train},
        "vae_recon_mse": vae_mse, "latent_std": latent_std, "scaling_factor": scaling,
        "loss_final": {"vae": float(np.mean(vae_losses[-20:])), "unet": float(np.mean(unet_losses[-50:]))},
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=1))  # written last: marks the folder complete
    return out


#: the keys ``evaluate_digits_pipeline`` adds to the info file.
EVAL_KEYS = ("judge", "judged_accuracy", "jpeg_q95_bytes")


def is_evaluated(folder: str | Path) -> bool:
    """The pipeline folder's info file holds the evaluation (``evaluate_digits_pipeline``)."""
    try:
        info = json.loads((Path(folder) / INFO_FILE).read_text())
    except (OSError, ValueError):
        return False
    return all(k in info for k in EVAL_KEYS)


def evaluate_digits_pipeline(folder: str | Path, config: DigitsPipelineConfig | None = None) -> dict:
    """Measure the pipeline saved in ``folder`` (reloaded from disk) and add the numbers to its info file,
    rewritten atomically: the judge's accuracy on real held-out digits, the judged accuracy of generated
    digits at each ``config.eval_cfg`` guidance weight, and JPEG sizes of ``eval_jpeg_n`` samples. Returns
    the info. ``config`` defaults to the one the info file records.

    A report, not part of the model: nothing that samples from the pipeline needs it, so the figures
    command's build skips it (its 40-50 s would sit on the default run's critical path) and
    ``diffsteer digits-pipeline`` runs it once. Every draw is seeded from the config, so the numbers do
    not depend on when it runs."""
    from theory.io import atomic_write_json

    from .pipeline import load_pipeline

    folder = Path(folder)
    info = json.loads((folder / INFO_FILE).read_text())
    cfg = config or DigitsPipelineConfig(**info["config"])
    t0 = time.perf_counter()
    loaded = load_pipeline(folder)
    judge = fit_judge(cfg.split_seed, cfg.heldout_fraction)
    info["judge"] = judge_real_accuracy(judge, cfg.split_seed, cfg.heldout_fraction, cfg.image_size)
    info["judged_accuracy"] = {}
    for w in cfg.eval_cfg:
        r = judge_accuracy(loaded, w, cfg.eval_n_per_class, seed=cfg.seed, judge=judge, steps=cfg.eval_steps)
        info["judged_accuracy"][str(w)] = r
    imgs = sample_digits(loaded, torch.arange(cfg.eval_jpeg_n) % 10, max(cfg.eval_cfg), seed=cfg.seed + 1,
                         steps=cfg.eval_steps)
    info["jpeg_q95_bytes"] = {"guidance_scale": max(cfg.eval_cfg), "n": cfg.eval_jpeg_n,
                              "32px": _quantiles(jpeg_sizes(imgs)), "128px_nearest": _quantiles(jpeg_sizes(imgs, 128))}
    info["wall_s"]["eval"] = time.perf_counter() - t0
    atomic_write_json(folder / INFO_FILE, info)
    return info


def _quantiles(v: np.ndarray) -> dict:
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "iqr_over_median": float((q3 - q1) / med),
            "min": float(v.min()), "max": float(v.max())}


# ----------------------------------------------------------------------------- cache


def default_pipeline_dir(config: DigitsPipelineConfig | None = None) -> Path:
    """``<cache root>/digits-pipeline-<config hash>`` (cache root: ``$DIFFSTEER_CACHE`` or the user cache)."""
    return cache_root() / f"digits-pipeline-{(config or DigitsPipelineConfig()).key()}"


def is_digits_pipeline(folder: str | Path, config: DigitsPipelineConfig | None = None) -> bool:
    """A complete pipeline folder: model_index.json and the info file (written last) are there; with
    ``config``, also built from that config (same cache key)."""
    p = Path(folder)
    if not ((p / "model_index.json").is_file() and (p / INFO_FILE).is_file()):
        return False
    if config is None:
        return True
    try:
        return json.loads((p / INFO_FILE).read_text()).get("key") == config.key()
    except (OSError, ValueError):
        return False


def ensure_digits_pipeline(config: DigitsPipelineConfig | None = None, progress: bool = True,
                           out: str | Path | None = None, evaluate: bool = False) -> Path:
    """The folder of the digits pipeline of ``config`` (default config: the embedded default model),
    building it on first use (minutes on a CPU, with a progress display). The build goes into a
    temporary folder renamed into place under a lock file, so concurrent callers wait for one build and
    an interrupted build leaves nothing half-written. ``out``: a folder instead of the cache's; it must
    be absent, empty, or hold the pipeline of this same config (then it is reused). ``evaluate``: also
    measure it (``evaluate_digits_pipeline``) unless its info file already holds the numbers, under the
    same lock file, so that concurrent callers evaluate it once."""
    cfg = config or DigitsPipelineConfig()
    target = Path(out).expanduser() if out is not None else default_pipeline_dir(cfg)
    if not is_digits_pipeline(target, cfg):
        if out is not None and target.exists():
            if not target.is_dir():
                raise ValueError(f"out: '{target}' is a file; pass a folder for the pipeline")
            if is_digits_pipeline(target):
                raise ValueError(f"out: '{target}' holds a digits pipeline of another config; pass a new folder")
            if any(target.iterdir()):
                raise ValueError(f"out: '{target}' is not empty; pass a new or empty folder for the pipeline")
        if progress:
            print(f"building the digits pipeline into {target} (once; cached)", flush=True)
        target = atomic_build(target, lambda tmp: build_digits_pipeline(cfg, tmp, progress=progress),
                              lambda p: is_digits_pipeline(p, cfg))
    if evaluate and not is_evaluated(target):
        with build_lock(target):  # concurrent callers: one evaluates, the others wait and find the numbers
            if not is_evaluated(target):
                evaluate_digits_pipeline(target, cfg)
    return target


#: the figures command builds the default pipeline first in one worker while the others run figures
#: that do not need it (theory.registry.needs); 410 s is its measured training time on one idle thread
#: (406 s; the evaluation, which no figure needs, is left to ``diffsteer digits-pipeline``).
prerequisite("digits-pipeline", ready=lambda: is_digits_pipeline(default_pipeline_dir()),
             build=lambda: ensure_digits_pipeline(progress=False), cost_s=410.0)

# ----------------------------------------------------------------------------- judge


def judge_features(images: torch.Tensor) -> np.ndarray:
    """Images (N, 3, H, W) in [0, 1] -> the judge's input: grey levels averaged down to 8x8, scaled to
    the digits' 0-16 range, flattened (N, 64)."""
    x = images.float().mean(1, keepdim=True)
    x = F.adaptive_avg_pool2d(x, (8, 8)) * 16.0
    return x.flatten(1).cpu().numpy()


def fit_judge(split_seed: int = 0, heldout_fraction: float = 0.2):
    """The judge: multinomial logistic regression on the 8x8 digits (0-16) of the held-out split only
    (no digit the generator trained on)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    d = load_digits()
    _, held = digits_split(split_seed, heldout_fraction)
    return LogisticRegression(max_iter=5000).fit(d.data[held], d.target[held])


def judge_real_accuracy(judge, split_seed: int = 0, heldout_fraction: float = 0.2, image_size: int = 32) -> dict:
    """The judge's accuracy on the real digits it was not fitted on (the generator's training split):
    on the 8x8 originals, and after the upscale to ``image_size`` and the judge's average back to 8x8
    (the ceiling for generated images judged that way)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    train, _ = digits_split(split_seed, heldout_fraction)
    x_up, y = digits_images(train, image_size)
    return {"n": len(train), "real_8x8": float(judge.score(d.data[train], d.target[train])),
            "real_upscaled": float(judge.score(judge_features(x_up), y.numpy()))}


@torch.no_grad()
def sample_digits(pipe, labels: torch.Tensor, cfg_scale: float, seed: int = 0, steps: int = 25, eta: float = 0.0,
                  batch: int = 250) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] of the digits ``labels`` (prompts ``PROMPTS``), sampled by
    ``theory.solvers.sample`` (DDIM(eta) on the scheduler's grid, docs/theory.md §3) on
    ``imaging.pipeline.LatentEps`` with classifier-free guidance weight ``cfg_scale`` (docs/theory.md §6),
    decoded by the VAE (docs/theory.md §8)."""
    from theory.solvers import sample

    from .pipeline import (
        LatentEps,
        decode_latents,
        encode_prompts,
        latent_shape,
        schedule_of,
        scheduler_grid,
    )

    labels = torch.as_tensor(labels).long().reshape(-1)
    if labels.numel() and (labels.min() < 0 or labels.max() > 9):
        raise ValueError("labels: digits must be in 0..9")
    device = pipe.unet.device
    cond, unc = encode_prompts(pipe, list(PROMPTS), device=device)
    sch = schedule_of(pipe)
    model = LatentEps(pipe.unet, sch, cond, unc, cfg_scale)
    ts = scheduler_grid(pipe.scheduler, steps)
    g = torch.Generator(device=device).manual_seed(seed)
    x_T = torch.randn((len(labels), *latent_shape(pipe)), generator=g, device=device, dtype=pipe.unet.dtype)
    out = []
    for j in range(0, len(labels), batch):
        y = labels[j:j + batch].to(device)
        z = sample(model, sch, x_T[j:j + batch], ts, method="ddim", eta=eta, cond=y, generator=g).x0
        out.append(decode_latents(pipe, z).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def judge_accuracy(pipe, cfg_scale: float, n_per_class: int = 50, seed: int = 0, judge=None, steps: int = 25,
                   split_seed: int = 0) -> dict:
    """Conditional accuracy of the pipeline: ``n_per_class`` samples of each digit at guidance weight
    ``cfg_scale`` (``sample_digits``: the package's DDIM solver, ``steps`` steps), classified by the
    judge (default: ``fit_judge(split_seed)``). Returns accuracy, its binomial standard error, per-class
    accuracies and n."""
    if n_per_class < 1:
        raise ValueError(f"n_per_class: must be >= 1, got {n_per_class}")
    judge = judge if judge is not None else fit_judge(split_seed)
    labels = torch.arange(10).repeat_interleave(n_per_class)
    imgs = sample_digits(pipe, labels, cfg_scale, seed=seed, steps=steps)
    pred = judge.predict(judge_features(imgs))
    hit = pred == labels.numpy()
    acc = float(hit.mean())
    return {"guidance_scale": float(cfg_scale), "n": len(labels), "accuracy": acc,
            "stderr": math.sqrt(acc * (1 - acc) / len(labels)),
            "per_class": [float(hit[labels.numpy() == d].mean()) for d in range(10)]}


def jpeg_sizes(images: torch.Tensor, size: int | None = None, quality: int = 95) -> np.ndarray:
    """Bytes of each image (N, 3, H, W) in [0, 1] saved as JPEG by PIL at ``quality`` (the CTRL/DDPO
    compressibility measure, docs/theory.md §8); ``size``: nearest-neighbour upscale first."""
    from PIL import Image

    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    sizes = []
    for a in arr:
        im = Image.fromarray(a)
        if size is not None:
            im = im.resize((size, size), Image.NEAREST)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell())
    return np.asarray(sizes, dtype=np.float64)
