"""CTRL on image pipelines end to end (Zhao et al. 2024, Algorithm 1), measured with the true measure.

One experiment, a function of a frozen :class:`CtrlConfig` and a diffusers SD-style pipeline (the digits
pipeline trained here by default, a user's local Stable Diffusion v1.5 with ``configs/ctrl_sd15.json``):

1. **Offline data** (``offline_data``): N images sampled from the pre-trained pipeline over the prompts
   (or read from a folder), each with its true measures: the JPEG size in kB (PIL, quality from the
   config) and a second, prompt-independent measure (ink mass, or the aesthetic score where weights are
   given). Labels are size classes with thresholds from the config (the paper's > 110, 85-110, 60-85,
   <= 60 kB at 512 px) or, when none are given, the quantiles of the sampled sizes, written into the
   run's resolved config.
2. **Classifier** (``ResidualCNN``, ``fit_classifier``): the paper's small residual CNN with batch norm on
   the decoded images, maximum likelihood (``theory.classifiers.fit_mle``), then one temperature on a
   held-out split (``fit_temperature``); accuracy, NLL and ECE on a third split before / after.
3. **Planning** (``finetune_ctrl``): the pre-trained UNet wrapped as an eps model over latents
   (``imaging.pipeline.LatentEps``, prompts + CFG), augmented with LoRA and a zero-initialised label
   embedding added to the UNet's time embedding (NULL frozen at zero; ``make_steered``), trained
   by ``theory.engine.finetune`` - the package's one loop - to maximise
   E[gamma log p_phi(y | x0)] - lam KL(path || pre-trained path)  (docs/theory.md §4, §6; CTRL eq. 5),
   the path KL summed over latent dimensions, gradients through a fixed last-K window (DRaFT-K), DDIM
   eta = 1; or, with ``planner='ppo'``, the engine's DDPO strategy (CTRL remark 2). Checkpoints and exact
   resume are the engine's.
4. **Evaluation with the true measure** (``evaluate``): equal numbers of samples per class from fixed
   seeds, scored by the real JPEG size: accuracy, macro-F1, confusion matrix, mean size per class - for
   the pre-trained model, CTRL, CTRL with classifier-free mixing at inference (CTRL appendix B:
   eps_null + w (eps_y - eps_null) rescales gamma to about w gamma) and DPS over a strength sweep.
5. **Multi-task** (``multitask``): compressibility (two classes) x the second measure (two classes), two
   classifiers, four compositional classes, the same evaluation.

Every result is plain JSON-serialisable data; ``run`` writes it into ``out/results.json``.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from theory.classifiers import ClassifierMLP, FitConfig, expected_calibration_error, fit_mle, fit_temperature

from .configfile import load_dataclass

__all__ = [
    "CtrlConfig", "load_config", "jpeg_kb", "ink_mass", "classes_from_thresholds", "quantile_thresholds",
    "ResidualCNN", "fit_classifier", "make_steered", "as_cond", "ClassifierLogLik",
    "build_context", "offline_data", "finetune_ctrl", "evaluate", "run", "CONFIG_DIR",
]

CONFIG_DIR = Path(__file__).with_name("configs")
PLANNERS = ("backprop", "ppo")
SECOND_MEASURES = ("ink", "aesthetic")


# ============================================================================ configuration


@dataclass(frozen=True)
class CtrlConfig:
    """One CTRL experiment. Sizes are the digits pipeline's quick defaults; the SD v1.5 setting is the
    file ``imaging/configs/ctrl_sd15.json``.

    Pipeline: ``model`` (a local diffusers folder; None = the digits pipeline), ``prompts``, CFG weight
    ``guidance_scale`` on the prompts, ``sample_steps`` DDIM steps with ``eta`` (1 = the stochastic sampler
    CTRL's path KL needs), ``dtype`` of the frozen weights.
    Measure: JPEG at ``jpeg_quality``; ``measure_upscale`` > 1 nearest-upscales the decoded image by that
    factor before encoding. ``thresholds_kb``: descending class edges (class 0 = larger than the first);
    None = the ``n_classes`` quantiles of the offline sizes.
    Classifier: ``clf_channels`` of the three residual blocks, ``clf_steps`` Adam steps of ``clf_batch``.
    Planning: ``gamma`` (weight of log p_phi), ``kl_weight`` (lam, on the path KL summed over dimensions;
    the tilt is gamma / lam), ``truncation_k`` fixed, LoRA ``lora_rank`` on ``lora_targets``, AdamW ``lr``
    (LoRA) / ``lr_embed`` (label embedding), ``weight_decay``, ``grad_clip``, ``steps`` updates of
    ``batch_size``; ``planner`` 'backprop' (DRaFT-K) or 'ppo' (DDPO: ``ppo_clip``, ``ppo_inner``).
    Evaluation: ``n_eval`` samples per class, ``dps_strengths`` (zeta of DPS), ``cfg_weights`` (w of the
    appendix-B mixing); ``curve_every`` / ``curve_n`` for the training curve. ``multitask``: also run the
    compressibility x ``second_measure`` experiment.
    """

    model: Optional[str] = None
    prompts: tuple = ()
    image_size: Optional[int] = None
    guidance_scale: float = 7.5
    sample_steps: int = 20
    eta: float = 1.0
    dtype: str = "float32"
    device: Optional[str] = None
    # offline data and the true measures
    n_offline: int = 512
    image_folder: Optional[str] = None
    jpeg_quality: int = 95
    measure_upscale: int = 4
    thresholds_kb: Optional[tuple] = None
    n_classes: int = 4
    second_measure: str = "ink"
    second_threshold: Optional[float] = None
    aesthetic_weights: Optional[str] = None
    aesthetic_clip: Optional[str] = None
    # classifier
    clf_channels: tuple = (16, 32, 64)
    clf_steps: int = 600
    clf_batch: int = 64
    clf_lr: float = 1e-3
    split: tuple = (0.7, 0.15, 0.15)
    # planning
    planner: str = "backprop"
    gamma: float = 1.0
    kl_weight: float = 0.1
    truncation_k: int = 5
    lora_rank: int = 4
    lora_targets: tuple = ("to_q", "to_k", "to_v", "to_out.0")
    lr: float = 1e-3
    lr_embed: float = 1e-2
    weight_decay: float = 0.1
    grad_clip: float = 5.0
    steps: int = 60
    batch_size: int = 8
    grad_checkpoint: bool = False
    ppo_clip: float = 1e-4
    ppo_inner: int = 1
    ckpt_every: int = 10
    # evaluation
    n_eval: int = 16
    eval_batch: int = 64
    dps_strengths: tuple = (0.3, 1.0, 3.0)
    cfg_weights: tuple = (2.0,)
    curve_every: int = 10
    curve_n: int = 8
    multitask: bool = True
    seed: int = 0

    def validate(self) -> None:
        if not self.prompts:
            raise ValueError("prompts: give at least one prompt (config key 'prompts')")
        for k in ("sample_steps", "n_offline", "clf_steps", "clf_batch", "steps", "batch_size", "n_eval",
                  "eval_batch", "curve_n", "truncation_k", "lora_rank", "measure_upscale", "n_classes"):
            v = getattr(self, k)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{k}: must be an int >= 1, got {v!r}")
        if self.truncation_k > self.sample_steps:
            raise ValueError(f"truncation_k: {self.truncation_k} exceeds sample_steps={self.sample_steps}; lower it")
        if self.planner not in PLANNERS:
            raise ValueError(f"planner: 'backprop' (DRaFT-K) or 'ppo' (DDPO), got {self.planner!r}")
        if self.second_measure not in SECOND_MEASURES:
            raise ValueError(f"second_measure: one of {SECOND_MEASURES}, got {self.second_measure!r}")
        if self.multitask and self.second_measure == "aesthetic" and (self.aesthetic_weights is None or self.aesthetic_clip is None):
            raise ValueError("aesthetic_weights, aesthetic_clip: the aesthetic measure needs the local MLP-head "
                             "weights file and the local CLIP ViT-L/14 folder")
        if self.thresholds_kb is not None:
            t = [float(v) for v in self.thresholds_kb]
            if len(t) < 1 or any(a <= b for a, b in zip(t, t[1:])):
                raise ValueError(f"thresholds_kb: give strictly decreasing class edges in kB, e.g. [110, 85, 60]; "
                                 f"got {self.thresholds_kb}")
        if len(self.split) != 3 or abs(sum(self.split) - 1) > 1e-6 or min(self.split) <= 0:
            raise ValueError(f"split: three positive fractions (train, temperature, test) summing to 1, got {self.split}")
        if not (self.gamma > 0 and self.kl_weight >= 0):
            raise ValueError(f"gamma, kl_weight: need gamma > 0 and kl_weight >= 0, got {self.gamma}, {self.kl_weight}")
        if self.kl_weight > 0 and not self.eta > 0:
            raise ValueError("eta: the path KL needs the stochastic sampler (eta > 0; CTRL uses 1)")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype: float32, float16 or bfloat16, got {self.dtype!r}")
        if any(not w > 0 for w in self.cfg_weights) or any(not z > 0 for z in self.dps_strengths):
            raise ValueError("cfg_weights, dps_strengths: every weight must be > 0")

    @property
    def n_cp(self) -> int:
        return len(self.thresholds_kb) + 1 if self.thresholds_kb is not None else self.n_classes

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def load_config(path, **overrides) -> CtrlConfig:
    """A CtrlConfig from a JSON file (keys starting with '_' are comments), then ``overrides``. Unknown
    keys are an error that names them."""
    return load_dataclass(CtrlConfig, path, overrides)


# ============================================================================ the true measures


def jpeg_kb(img: torch.Tensor, quality: int = 95, upscale: int = 1) -> np.ndarray:
    """The true compressibility measure (docs/theory.md (8.2); DDPO's and CTRL's measure): the JPEG file size
    in kB of each image in [0, 1], by ``imaging.rewards.jpeg_size_kb``. ``upscale`` > 1 nearest-upscales
    first: at 32 px the fixed JPEG headers (~0.6 kB) dominate a file of ~1.3 kB and the sizes span a few
    per cent, while at 4x the entropy-coded payload dominates and each 8x8 DCT block sees 2x2 original
    pixels, so the measure resolves the image's own structure as at the paper's 512 px."""
    from .rewards import jpeg_size_kb

    return jpeg_size_kb(img.detach().double().cpu(), quality=int(quality), upscale=int(upscale)).numpy()


def ink_mass(img: torch.Tensor) -> np.ndarray:
    """A prompt-independent second measure for the digits pipeline: the mean absolute deviation of the
    grey level from the image's border (background) level, in [0, 1] - how much of the canvas the stroke
    covers, independent of the stroke's polarity and of which digit the prompt asks for."""
    g = img.detach().float().cpu().clamp(0, 1).mean(1)  # (B, H, W)
    border = torch.cat([g[:, 0], g[:, -1], g[:, :, 0], g[:, :, -1]], 1).mean(1)
    return (g - border[:, None, None]).abs().flatten(1).mean(1).numpy().astype(np.float64)


def classes_from_thresholds(values, thresholds) -> np.ndarray:
    """Class of each value for strictly decreasing edges t_0 > t_1 > ... > t_{k-2}: class 0 is v > t_0,
    class j is t_j < v <= t_{j-1}, the last class v <= t_{k-2} (the paper's > 110, 85-110, 60-85, <= 60 kB:
    a size of exactly 110 kB is class 1)."""
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim != 1 or t.size < 1 or np.any(np.diff(t) >= 0):
        raise ValueError(f"thresholds: strictly decreasing edges expected, got {list(thresholds)}")
    v = np.asarray(values, dtype=np.float64)
    return (v[..., None] <= t).sum(-1).astype(np.int64)


def quantile_thresholds(values, n_classes: int) -> list:
    """Decreasing edges at the quantiles 1 - j / n_classes (j = 1..n-1) of ``values``: classes of equal
    frequency, class 0 the largest values."""
    if n_classes < 2:
        raise ValueError(f"n_classes: need >= 2, got {n_classes}")
    v = np.asarray(values, dtype=np.float64)
    if v.size < n_classes:
        raise ValueError(f"values: {v.size} values cannot define {n_classes} quantile classes; draw more")
    qs = np.quantile(v, [1 - j / n_classes for j in range(1, n_classes)])
    if np.any(np.diff(qs) >= 0):
        raise ValueError(f"values: the quantiles {qs.tolist()} are not distinct; the measure is too coarse for "
                         f"{n_classes} classes (raise measure_upscale or give thresholds_kb)")
    return [float(q) for q in qs]


# ============================================================================ the classifier


class ResidualBlock(nn.Module):
    """conv3x3(stride 2) - BN - ReLU - conv3x3 - BN, plus a 1x1 strided projection, then ReLU (the CTRL
    compressibility classifier's block, appendix D table 2; the stride is ours: without it a 512-px image
    would keep full resolution through 256 channels)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=2, bias=False), nn.BatchNorm2d(c_out))

    @property
    def weight(self) -> torch.Tensor:
        """The first convolution's weight (theory.classifiers reads ``net[0].weight.dtype``)."""
        return self.conv1.weight

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.skip(x))


class ResidualCNN(ClassifierMLP):
    """p_phi(y | image): three residual blocks with batch norm, global average pooling, a linear head
    (CTRL appendix D, table 2; channels 64/128/256 there). Takes images in [0, 1] either as (B, C, H, W)
    or flattened (B, C*H*W) - the flattened form lets ``theory.classifiers.fit_mle`` / ``fit_temperature``
    train and calibrate it unchanged. ``temperature`` and ``log_lik`` are ClassifierMLP's."""

    def __init__(self, image_shape: Sequence[int], n_classes: int, channels: Sequence[int] = (64, 128, 256)):
        nn.Module.__init__(self)
        if n_classes < 2:
            raise ValueError(f"n_classes: need >= 2, got {n_classes}")
        self.image_shape = tuple(int(v) for v in image_shape)
        self.dim, self.n_classes = int(np.prod(self.image_shape)), n_classes
        chans = [self.image_shape[0], *[int(c) for c in channels]]
        blocks: list[nn.Module] = [ResidualBlock(a, b) for a, b in zip(chans, chans[1:])]
        self.net = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chans[-1], n_classes))
        self.register_buffer("temperature", torch.ones(()))

    def logits(self, x, t=None):
        if x.ndim == 2 and x.shape[1] == self.dim:
            x = x.reshape(x.shape[0], *self.image_shape)
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x: classifier expects images of shape (B, {', '.join(map(str, self.image_shape))}) "
                             f"or flattened (B, {self.dim}), got {tuple(x.shape)}")
        return self.net((x.to(self.net[0].weight.dtype) - 0.5) * 2.0).to(x.dtype)


def _nll_acc_ece(clf, x, y) -> dict:
    with torch.no_grad():
        lp = clf(x)
    return {"accuracy": float((lp.argmax(1) == y).float().mean()),
            "nll": float(-lp.gather(1, y[:, None]).mean()),
            "ece": expected_calibration_error(lp, y)}


def _splits(y: torch.Tensor, fracs, seed: int):
    """Stratified (train, held-out, test) indices: each class split in the proportions ``fracs`` (at least one
    sample of every class in each part where the class has three or more), by a seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    parts: list = [[], [], []]
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = len(idx)
        a = max(1, int(round(fracs[0] * n))) if n >= 3 else n
        b = a + (max(1, int(round(fracs[1] * n))) if n >= 3 else 0)
        b = min(b, n - 1) if n >= 3 else b
        for j, sl in enumerate((idx[:a], idx[a:b], idx[b:])):
            parts[j].append(sl)
    return tuple(torch.cat(p)[torch.randperm(sum(len(q) for q in p), generator=g)] for p in parts)


def fit_classifier(images: torch.Tensor, y: torch.Tensor, n_classes: int, cfg: CtrlConfig, seed: int = 0):
    """Maximum likelihood on the train split, temperature on the held-out split, metrics on the test split
    (before and after temperature scaling). Returns (classifier, report)."""
    tr, he, te = _splits(y, cfg.split, seed)
    x = images.flatten(1)
    clf = ResidualCNN(images.shape[1:], n_classes, cfg.clf_channels)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    losses = fit_mle(clf, x[tr], y[tr], FitConfig(steps=cfg.clf_steps, batch_size=min(cfg.clf_batch, len(tr)),
                                                  lr=cfg.clf_lr, seed=seed))
    before = _nll_acc_ece(clf, x[te], y[te])
    T = fit_temperature(clf, x[he], y[he])
    after = _nll_acc_ece(clf, x[te], y[te])
    rep = {"temperature": T, "test_before": before, "test_after": after,
           "heldout_after": _nll_acc_ece(clf, x[he], y[he]), "final_train_loss": float(np.mean(losses[-20:])),
           "n_train": len(tr), "n_heldout": len(he), "n_test": len(te),
           "class_counts": torch.bincount(y, minlength=n_classes).tolist(), "seconds": time.perf_counter() - t0}
    return clf, rep


class ClassifierLogLik:
    """The CTRL reward r(x0, c) = gamma * sum_j log p_phi_j(y_j | decode(x0)) (docs/theory.md (8.6); CTRL eq. 5
    with calibrated classifiers): ``imaging.rewards.classifier_reward`` (VAE decoder, then the classifiers'
    calibrated log-likelihoods) scaled by gamma. ``cond`` is the engine's ``PromptLabel`` (its labels are
    used) or the labels themselves, (B,) or (B, m)."""

    differentiable = True

    def __init__(self, pipe, classifiers: Sequence[ResidualCNN], gamma: float = 1.0):
        from .rewards import classifier_reward

        self.gamma = float(gamma)
        self._r = classifier_reward(pipe, *classifiers, on="images")
        self.__name__ = "ctrl_log_lik"

    def log_lik(self, x0, labels) -> torch.Tensor:
        return self._r(x0, _labels_of(labels, x0.shape[0], x0.device))

    def __call__(self, x0, cond):
        return self.gamma * self.log_lik(x0, cond)


# ============================================================================ the augmented model


def make_steered(base: nn.Module, n_labels, lora_rank: Optional[int] = 4, lora_targets=None,
                 label_module: str = "unet.time_embedding"):
    """The CTRL-augmented UNet (CTRL sec. 4.2 step 1, appendix D), ``theory.engine.SteeredModel`` over the
    prompt-conditioned eps model ``base`` (``imaging.pipeline.LatentEps``): LoRA on ``lora_targets`` and a
    zero-initialised label table added to the output of the UNet's time embedding (``label_mode='module'``),
    so eps(x, t, PromptLabel(p, y)) = UNet_{theta + LoRA}(x, t-embedding + E[y], prompt p) under the prompt
    CFG of the base; the NULL label (-1) reads a frozen zero row, so it gives the pre-trained UNet exactly."""
    from theory.engine import SteeredModel

    try:
        tmod = base.get_submodule(label_module)
    except AttributeError:
        raise ValueError(f"label_module: the base has no submodule {label_module!r}") from None
    lin = getattr(tmod, "linear_2", None)
    if not hasattr(lin, "out_features"):
        raise ValueError(f"label_module: {label_module!r} is not a diffusers TimestepEmbedding (no linear_2)")
    return SteeredModel(base, lora_rank=lora_rank, lora_targets=list(lora_targets) if lora_targets else None,
                        n_labels=n_labels, label_shape=(int(lin.out_features),), label_mode="module",
                        label_module=label_module)


def as_cond(rows: torch.Tensor, multi: bool):
    """Rows [prompt index, y_1..y_m] (N, 1 + m) -> the engine's ``PromptLabel`` (label (N,) or (N, m))."""
    from theory.engine import PromptLabel

    return PromptLabel(rows[:, 0], rows[:, 1:] if multi else rows[:, 1])


def _labels_of(cond, B: int, device) -> torch.Tensor:
    lab = cond.label if hasattr(cond, "label") else cond
    return torch.as_tensor(lab, device=device).long().reshape(B, -1)


# ============================================================================ pipeline context


@dataclass
class Context:
    """The loaded pipeline and everything derived from it once."""

    pipe: object
    base: nn.Module  # LatentEps (prompts + CFG)
    schedule: object
    ts: torch.Tensor
    shape: tuple  # latent shape
    device: str
    dtype: torch.dtype
    model_dir: Optional[str]


def resolve_model(model: Optional[str], progress: bool = True) -> str:
    """The pipeline folder: ``model``, else the digits pipeline trained here (built and cached on first use
    by ``imaging.digits_pipeline.ensure_digits_pipeline``)."""
    if model is not None:
        return model
    from .digits_pipeline import ensure_digits_pipeline

    return str(ensure_digits_pipeline(progress=progress))


def build_context(cfg: CtrlConfig, pipe=None) -> Context:
    """Load the pipeline (or take ``pipe``), freeze it, encode the prompts, wrap the UNet as an eps model."""
    from .pipeline import LatentEps, encode_prompts, freeze, latent_shape, load_pipeline, schedule_of, scheduler_grid

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, cfg.dtype)
    model_dir = None
    if pipe is None:
        model_dir = resolve_model(cfg.model)
        pipe = load_pipeline(model_dir, dtype=dtype, device=device)
    freeze(pipe)
    cond, unc = encode_prompts(pipe, list(cfg.prompts), device=device)
    sch = schedule_of(pipe)
    base = LatentEps(pipe.unet, sch, cond, unc, cfg.guidance_scale)
    ts = scheduler_grid(pipe.scheduler, cfg.sample_steps)
    shape = latent_shape(pipe, cfg.image_size, cfg.image_size)
    return Context(pipe, base, sch, ts, shape, device, dtype, model_dir)


def _decode(ctx: Context, lat: torch.Tensor, batch: int = 64) -> torch.Tensor:
    from .pipeline import decode_latents

    with torch.no_grad():
        return torch.cat([decode_latents(ctx.pipe, lat[i:i + batch]).float().cpu() for i in range(0, len(lat), batch)])


def draw(ctx: Context, model, cond: torch.Tensor, seed: int, batch: int = 64, guidance_for=None) -> torch.Tensor:
    """Latents for each row of ``cond`` (prompt indices (N,) or rows (N, 1 + m)), DDIM(eta) on the
    scheduler's grid, from noise fixed by ``seed`` (batch b of the run uses seed + b). With
    ``guidance_for(rows) -> field`` the model (the pre-trained one) sees only the prompt column."""
    from theory.solvers import sample

    out = []
    for b, i in enumerate(range(0, len(cond), batch)):
        c = cond[i:i + batch].to(ctx.device)
        g = torch.Generator().manual_seed(seed + b)
        x_T = torch.randn((len(c), *ctx.shape), generator=g, dtype=ctx.dtype).to(ctx.device)
        field = guidance_for(c) if guidance_for is not None else None
        if c.ndim == 2:  # rows [p, y...]: the pre-trained model under guidance sees the prompt, CTRL both
            mc = c[:, 0] if field is not None else as_cond(c, multi=c.shape[1] > 2)
        else:
            mc = c
        with torch.no_grad():
            out.append(sample(model, ctx.schedule, x_T, ctx.ts, method="ddim", eta=_ETA[0], cond=mc, guidance=field,
                              generator=g if ctx.device == "cpu" else None).x0.detach().float().cpu())
    return torch.cat(out)


_ETA = [1.0]  # the eta of ``draw`` (set from the config by ``run``)


# ============================================================================ offline data


def _second(cfg: CtrlConfig, images: torch.Tensor) -> np.ndarray:
    if cfg.second_measure == "ink":
        return ink_mass(images)
    try:
        from . import aesthetic
    except ImportError as e:
        raise ValueError("second_measure: 'aesthetic' needs imaging.aesthetic (the LAION predictor)") from e
    scorer = aesthetic.AestheticScorer.from_local(cfg.aesthetic_clip, cfg.aesthetic_weights)
    with torch.no_grad():
        return scorer(images).float().cpu().numpy().astype(np.float64)


def _read_folder(folder: str, size: int) -> torch.Tensor:
    from PIL import Image

    p = Path(folder).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"image_folder: no folder at '{p}'")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
    if not files:
        raise FileNotFoundError(f"image_folder: '{p}' holds no .png/.jpg/.webp/.bmp images")
    ims = []
    for f in files:
        im = Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)
        ims.append(torch.from_numpy(np.asarray(im)).permute(2, 0, 1).float() / 255.0)
    return torch.stack(ims)


def offline_data(ctx: Context, cfg: CtrlConfig, progress: bool = False) -> dict:
    """N decoded images (float, [0, 1]) with their true measures: sampled from the pre-trained pipeline over
    the prompts (prompt i mod P), or read from ``cfg.image_folder`` (resized to the pipeline's size)."""
    t0 = time.perf_counter()
    if cfg.image_folder is not None:
        f = 2 ** (len(ctx.pipe.vae.config.block_out_channels) - 1)
        images = _read_folder(cfg.image_folder, ctx.shape[-1] * f)
        source = f"folder {cfg.image_folder}"
    else:
        prompts = torch.arange(cfg.n_offline) % len(cfg.prompts)
        lat = draw(ctx, ctx.base, prompts, seed=10_000 + cfg.seed, batch=cfg.eval_batch)
        images = _decode(ctx, lat.to(ctx.device, ctx.dtype))
        source = "pre-trained pipeline"
    kb = jpeg_kb(images, cfg.jpeg_quality, cfg.measure_upscale)
    second = _second(cfg, images) if cfg.multitask else None
    return {"images": images, "kb": kb, "second": second, "source": source, "seconds": time.perf_counter() - t0}


# ============================================================================ planning


def _make_steered(ctx: Context, cfg: CtrlConfig, n_labels):
    # LoRA is injected into the module it is given: a copy, so that ctx.base stays the pre-trained model
    return make_steered(copy.deepcopy(ctx.base), n_labels, cfg.lora_rank, cfg.lora_targets).to(ctx.device)


def finetune_ctrl(ctx: Context, cfg: CtrlConfig, classifiers, n_labels, out_dir: Path, *,
                  curve: Optional[Callable] = None, interrupt_after: Optional[int] = None, progress: bool = False):
    """CTRL planning with the engine (``theory.engine.finetune``): reward gamma * sum_j log p_phi_j, KL weight
    ``kl_weight``, DRaFT-K(K) or DDPO, LoRA lr / embedding lr_embed, checkpoints every ``ckpt_every`` into
    ``out_dir`` (resumed from there). ``curve(step, model)`` is called every ``curve_every`` steps.
    ``interrupt_after`` (tests) stops the run with ``KeyboardInterrupt`` in that step's callback, before its
    checkpoint is written - as a kill would. Returns (model, history rows)."""
    from theory.engine import DDPO, DRaFTK, FinetuneConfig, finetune

    model = _make_steered(ctx, cfg, n_labels)
    reward = ClassifierLogLik(ctx.pipe, classifiers, cfg.gamma)
    strategy = DRaFTK(cfg.truncation_k) if cfg.planner == "backprop" else DDPO(clip=cfg.ppo_clip,
                                                                                inner_steps=cfg.ppo_inner)
    ks = (n_labels,) if isinstance(n_labels, int) else tuple(n_labels)
    P = len(cfg.prompts)

    def cond_sampler(n, g):
        p = torch.randint(0, P, (n, 1), generator=g)
        ys = [torch.randint(0, k, (n, 1), generator=g) for k in ks]
        return as_cond(torch.cat([p, *ys], 1), multi=len(ks) > 1).to(ctx.device)

    def x_T_sampler(n, g):
        return torch.randn((n, *ctx.shape), generator=g, dtype=ctx.dtype).to(ctx.device)

    fcfg = FinetuneConfig(steps=cfg.steps, batch_size=cfg.batch_size, n_steps=cfg.sample_steps, method="ddim",
                          eta=cfg.eta, lam=cfg.kl_weight, lr=cfg.lr, lr_embed=cfg.lr_embed,
                          weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, checkpoint=cfg.grad_checkpoint,
                          seed=cfg.seed, ckpt_every=cfg.ckpt_every, out_dir=str(out_dir), progress=progress,
                          log_kl=cfg.kl_weight == 0 and cfg.eta > 0)

    def callback(step, row):
        if curve is not None and step % cfg.curve_every == 0:
            model.eval()
            curve(step, row, model)
        if interrupt_after is not None and step >= interrupt_after:
            raise KeyboardInterrupt(f"interrupted after step {step} (test)")

    if curve is not None and not (out_dir / "checkpoint").exists():
        curve(0, {"reward_queries_total": 0}, model)
    hist = finetune(model, ctx.schedule, reward, strategy, fcfg, x_T_sampler=x_T_sampler, cond_sampler=cond_sampler,
                    ts=ctx.ts, callback=callback)
    return model.eval(), list(hist)


# ============================================================================ evaluation


def _f1_confusion(target: np.ndarray, got: np.ndarray, k: int) -> dict:
    from sklearn.metrics import confusion_matrix, f1_score

    return {"accuracy": float((target == got).mean()),
            "macro_f1": float(f1_score(target, got, labels=list(range(k)), average="macro", zero_division=0)),
            "confusion": confusion_matrix(target, got, labels=list(range(k))).tolist()}


def _eval_rows(cfg: CtrlConfig, ks: Sequence[int], n: int) -> torch.Tensor:
    """n rows per compositional class: [prompt (cycled), y_1..y_m]; class index = mixed radix of the ys."""
    combos = list(np.ndindex(*ks))
    rows = []
    for ys in combos:
        for i in range(n):
            rows.append([i % len(cfg.prompts), *ys])
    return torch.tensor(rows, dtype=torch.long)


def _paired_draw(ctx, cfg, model, rows, n, guidance_for=None):
    """Latents for ``rows``; every class uses the same noise (seed cfg.seed + 777), so methods and classes are
    compared on the same x_T."""
    out = []
    K = len(rows) // n
    for k in range(K):
        out.append(draw(ctx, model, rows[k * n:(k + 1) * n], seed=cfg.seed + 777, batch=cfg.eval_batch,
                        guidance_for=guidance_for))
    return torch.cat(out)


def score(cfg: CtrlConfig, images: torch.Tensor, task: dict) -> dict:
    """True measures of ``images`` and their classes under ``task`` (thresholds)."""
    kb = jpeg_kb(images, cfg.jpeg_quality, cfg.measure_upscale)
    out = {"kb": kb, "classes": [classes_from_thresholds(kb, task["thresholds"][0])]}
    if len(task["thresholds"]) > 1:
        s2 = _second(cfg, images)
        out["second"] = s2
        out["classes"].append(classes_from_thresholds(s2, task["thresholds"][1]))
    return out


def evaluate(ctx: Context, cfg: CtrlConfig, task: dict, images: torch.Tensor, rows: torch.Tensor) -> dict:
    """Accuracy, macro-F1, confusion (requested x obtained), mean true size per requested class (and per-task
    accuracies for a multi-label task) of ``images`` generated for ``rows``."""
    ks = task["n_labels"]
    s = score(cfg, images, task)
    req = rows[:, 1:].numpy()
    radix = np.cumprod([1, *ks[::-1]])[:-1][::-1]
    target = (req * radix).sum(1)
    got = (np.stack(s["classes"], 1) * radix).sum(1)
    K = int(np.prod(ks))
    res = _f1_confusion(target, got, K)
    res["mean_kb"] = [float(s["kb"][target == k].mean()) for k in range(K)]
    res["std_kb"] = [float(s["kb"][target == k].std()) for k in range(K)]
    if len(ks) > 1:
        res["per_task_accuracy"] = [float((req[:, j] == s["classes"][j]).mean()) for j in range(len(ks))]
        res["mean_second"] = [float(s["second"][target == k].mean()) for k in range(K)]
    return res


def _dps(ctx, clf_reward: ClassifierLogLik, zeta: float):
    from theory.guidance import dps_guidance

    def guidance_for(c):
        return dps_guidance(ctx.base, ctx.schedule, lambda x0, y: clf_reward.log_lik(x0, y), c[:, 1:], zeta=zeta,
                            cond=c[:, 0])

    return guidance_for


def compare(ctx, cfg, task, model, classifiers, n: int, progress: bool = False) -> tuple[dict, dict]:
    """Every method on the same requested rows and noise: pre-trained, CTRL, CTRL + CFG mixing (each w), DPS
    (each zeta; 'DPS best' = the highest accuracy). Returns (metrics, images per method (K, 6 max, ...))."""
    ks = task["n_labels"]
    rows = _eval_rows(cfg, ks, n)
    methods: dict = {}
    imgs: dict = {}
    t0 = time.perf_counter()

    def add(name, lat):
        im = _decode(ctx, lat.to(ctx.device, ctx.dtype))
        methods[name] = evaluate(ctx, cfg, task, im, rows)
        methods[name]["seconds"] = time.perf_counter() - t0
        imgs[name] = im.reshape(-1, n, *im.shape[1:])[:, : min(n, 6)]
        if progress:
            print(f"  {name}: accuracy {methods[name]['accuracy']:.3f}, macro-F1 {methods[name]['macro_f1']:.3f}",
                  flush=True)

    # the pre-trained model ignores the label: one draw on the shared noise serves every requested class
    base_lat = draw(ctx, ctx.base, rows[:n, 0], seed=cfg.seed + 777, batch=cfg.eval_batch)
    add("pre-trained", base_lat.repeat(len(rows) // n, *([1] * (base_lat.ndim - 1))))
    add("CTRL", _paired_draw(ctx, cfg, model, rows, n))
    for w in cfg.cfg_weights:
        add(f"CTRL + CFG w={w:g}", _paired_draw(ctx, cfg, model.cfg(w), rows, n))
    reward = ClassifierLogLik(ctx.pipe, classifiers, 1.0)
    for z in cfg.dps_strengths:
        add(f"DPS zeta={z:g}", _paired_draw(ctx, cfg, ctx.base, rows, n, guidance_for=_dps(ctx, reward, z)))
    dps = [k for k in methods if k.startswith("DPS")]
    if dps:
        best = max(dps, key=lambda k: (methods[k]["accuracy"], methods[k]["macro_f1"]))
        methods["DPS best"] = dict(methods[best], strength=best)
    return methods, imgs


# ============================================================================ the experiment


def _tasks(cfg: CtrlConfig, off: dict) -> dict:
    """The label tasks and their thresholds, resolved from the offline data where the config leaves them open."""
    th = list(cfg.thresholds_kb) if cfg.thresholds_kb is not None else quantile_thresholds(off["kb"], cfg.n_classes)
    tasks = {"compress": {"n_labels": (len(th) + 1,), "thresholds": [th],
                          "threshold_source": "config" if cfg.thresholds_kb is not None else "quantiles"}}
    if cfg.multitask:
        cp = [float(np.median(off["kb"]))]
        s2 = [float(cfg.second_threshold) if cfg.second_threshold is not None else float(np.median(off["second"]))]
        tasks["multitask"] = {"n_labels": (2, 2), "thresholds": [cp, s2],
                              "threshold_source": "medians" if cfg.second_threshold is None else "config+median"}
    return tasks


def _save_classifier(clf: ResidualCNN, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in clf.state_dict().items()}, str(path))


def run(cfg: CtrlConfig, out, *, pipe=None, progress: bool = False, interrupt_after: Optional[int] = None) -> dict:
    """The whole experiment into folder ``out`` (resumable: a rerun with the same config reuses the offline
    data and classifiers and resumes the fine-tuning from its checkpoint). Writes ``config.json`` (the
    config + resolved thresholds), ``classifier_*.safetensors``, ``ft_<task>/`` (engine checkpoints, history),
    ``curve.json`` and ``results.json``; returns the results (plain data)."""
    from safetensors.torch import load_file, save_file

    cfg.validate()
    _ETA[0] = cfg.eta
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    ctx = build_context(cfg, pipe)
    t_all = time.perf_counter()
    cfg_path = out / "config.json"
    if cfg_path.exists():
        prev = json.loads(cfg_path.read_text())
        if prev.get("config") != json.loads(json.dumps(cfg.to_json())):
            raise ValueError(f"out: '{out}' holds a run with a different config; use a fresh --out or the same config")

    # -- 1. offline data (cached in out/offline.safetensors)
    off_path = out / "offline.safetensors"
    if off_path.exists():
        d = load_file(str(off_path))
        off = {"images": d["images"], "kb": d["kb"].numpy(), "second": d["second"].numpy() if "second" in d else None,
               "source": "cached", "seconds": 0.0}
    else:
        off = offline_data(ctx, cfg, progress)
        t = {"images": off["images"].contiguous(), "kb": torch.from_numpy(off["kb"])}
        if off["second"] is not None:
            t["second"] = torch.from_numpy(off["second"])
        save_file(t, str(off_path))
    tasks = _tasks(cfg, off)
    cfg_path.write_text(json.dumps({"config": cfg.to_json(), "model_dir": ctx.model_dir,
                                    "resolved": {k: {"thresholds": v["thresholds"], "source": v["threshold_source"]}
                                                 for k, v in tasks.items()}}, indent=1))
    results: dict = {"config": cfg.to_json(), "model_dir": ctx.model_dir,
                     "offline": {"n": int(off["images"].shape[0]), "source": off["source"], "seconds": off["seconds"],
                                 "kb_quantiles": np.quantile(off["kb"], [0, .25, .5, .75, 1]).round(4).tolist(),
                                 "image_shape": list(off["images"].shape[1:])},
                     "tasks": {}}
    if off["second"] is not None:
        results["offline"]["second_quantiles"] = np.quantile(off["second"], [0, .25, .5, .75, 1]).round(5).tolist()

    for tname, task in tasks.items():
        # -- 2. labels and classifiers (one per condition)
        measures = [off["kb"]] + ([off["second"]] if len(task["thresholds"]) > 1 else [])
        classifiers, clf_reports = [], []
        for j, (vals, th) in enumerate(zip(measures, task["thresholds"])):
            y = torch.from_numpy(classes_from_thresholds(vals, th))
            path = out / f"classifier_{tname}_{j}.safetensors"
            rep_path = path.with_suffix(".json")
            if path.exists() and rep_path.exists():
                clf = ResidualCNN(off["images"].shape[1:], len(th) + 1, cfg.clf_channels)
                clf.load_state_dict(load_file(str(path)))
                clf.eval().requires_grad_(False)
                rep = json.loads(rep_path.read_text())
            else:
                clf, rep = fit_classifier(off["images"], y, len(th) + 1, cfg, seed=cfg.seed + j)
                _save_classifier(clf, path)
                rep_path.write_text(json.dumps(rep, indent=1))
            classifiers.append(clf.to(ctx.device))
            clf_reports.append(rep)
            if progress:
                print(f"[{tname}] classifier {j}: test accuracy {rep['test_after']['accuracy']:.3f}, "
                      f"NLL {rep['test_before']['nll']:.3f} -> {rep['test_after']['nll']:.3f}, "
                      f"ECE {rep['test_before']['ece']:.3f} -> {rep['test_after']['ece']:.3f} (T={rep['temperature']:.2f})",
                      flush=True)

        # -- 3. planning, with the training curve of per-class mean true size (CTRL fig. 2a)
        ks = task["n_labels"]
        n_lab = ks[0] if len(ks) == 1 else ks
        curve_path = out / f"curve_{tname}.json"
        curve_rows = json.loads(curve_path.read_text()) if (out / f"ft_{tname}" / "checkpoint").exists() and \
            curve_path.exists() else []
        crow = _eval_rows(cfg, ks, cfg.curve_n)

        def curve(step, row, model, _rows=crow, _task=task, _store=curve_rows, _path=curve_path):
            im = _decode(ctx, _paired_draw(ctx, cfg, model, _rows, cfg.curve_n).to(ctx.device, ctx.dtype))
            ev = evaluate(ctx, cfg, _task, im, _rows)
            _store[:] = [r for r in _store if r["step"] != step]  # a resumed step replaces its earlier record
            _store.append({"step": step, "reward_queries": int(row.get("reward_queries_total", 0)),
                           "mean_kb": ev["mean_kb"], "accuracy": ev["accuracy"], "macro_f1": ev["macro_f1"]})
            _path.write_text(json.dumps(_store))

        t0 = time.perf_counter()
        model, hist = finetune_ctrl(ctx, cfg, classifiers, n_lab, out / f"ft_{tname}",
                                    curve=curve if cfg.curve_every <= cfg.steps else None,
                                    interrupt_after=interrupt_after, progress=progress)
        ft_seconds = time.perf_counter() - t0
        # -- 4. evaluation with the true measure
        metrics, imgs = compare(ctx, cfg, task, model, classifiers, cfg.n_eval, progress)
        save_file({k.replace(" ", "_"): v.contiguous() for k, v in imgs.items()}, str(out / f"samples_{tname}.safetensors"))
        results["tasks"][tname] = {
            "n_labels": list(ks), "thresholds": task["thresholds"], "threshold_source": task["threshold_source"],
            "offline_class_counts": [np.bincount(classes_from_thresholds(v, th), minlength=len(th) + 1).tolist()
                                     for v, th in zip(measures, task["thresholds"])],
            "classifiers": clf_reports,
            "training": {"reward_mean": [round(r["reward_mean"], 5) for r in hist],
                         "kl": [None if not math.isfinite(r["kl"]) else round(r["kl"], 5) for r in hist],
                         "reward_queries_total": [r["reward_queries_total"] for r in hist],
                         "seconds": ft_seconds},
            "curve": curve_rows,
            "metrics": metrics,
        }
    results["seconds"] = time.perf_counter() - t_all
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    return results
