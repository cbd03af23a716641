"""Reward fine-tuning of a Stable Diffusion pipeline with the package's one engine (``theory.engine``).

Nothing here is specific to images except the wiring: the UNet with prompt embeddings and
classifier-free guidance is an eps model over latents (``imaging.pipeline.LatentEps``), the reward
sees the latents through the VAE decoder (``imaging.rewards.LatentReward``), LoRA from peft goes on
the UNet's attention projections (and, if asked, its feed-forward layers), an optional CTRL label
embedding is added to the UNet's time embedding, and ``theory.engine.finetune`` runs DRaFT / DRaFT-K /
DRaFT-LV / ReFL / the adjoint / DDPO exactly as on the 2-D toys (DRaFT, Clark et al. 2024, sec. 4; CTRL's
KL term via ``lam``; docs/theory.md §6, §8).

Mixed precision as the papers ran it: the frozen pipeline (UNet, VAE, text encoder) in ``dtype``
(bfloat16 / float16 / float32), the LoRA factors, the label embedding, the optimiser state and the
sampler's latents in float32 (``LatentEps`` casts at the UNet's boundary).

Runs check every argument and that ``out`` is writable before a model is loaded, checkpoint atomically
into ``out`` and resume from there; the adapter leaves in the diffusers format
(``out/pytorch_lora_weights.safetensors``, loaded by stock ``pipe.load_lora_weights(out)``). With a
``theory.engine.Distributed`` (``imaging.distributed``, under ``accelerate launch``) the run is data
parallel and only the main process writes.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

__all__ = ["SDFinetuneConfig", "METHODS", "LORA_TARGETS", "UNET_LORA_TARGETS", "strategy_of", "build",
           "run_finetune", "check_out_dir", "parse_k", "lora_target_modules", "engine_config"]

#: LoRA target sets of the UNet's transformer blocks (peft suffix match on diffusers' module names):
#: 'attn' - the attention projections q, k, v, out of every self- and cross-attention (as diffusers' LoRA
#: training script); 'attn+ff' - also the feed-forward layers (GEGLU input projection and output), as in
#: DRaFT sec. 4 ("LoRA on the attention and feed-forward layers").
LORA_TARGETS = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "attn+ff": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
}
UNET_LORA_TARGETS = LORA_TARGETS["attn"]

METHODS = ("draft", "draftk", "draftlv", "refl", "adjoint", "ddpo")
LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class SDFinetuneConfig:
    """One SD fine-tuning run. ``model`` is a local pipeline folder; ``tiny`` builds an in-process toy
    pipeline instead (CPU smoke runs). ``method``: one of METHODS; ``k`` for DRaFT-K (an int, or
    "lo,hi" drawn once per sample), ``lv_n`` for DRaFT-LV, ``refl_steps`` (lo, hi) for ReFL (hi <=
    sample_steps). ``lora_targets``: 'attn', 'attn+ff' or a sequence of module names. ``dtype``: the
    frozen weights' dtype. ``reward_options``: keyword arguments of the reward for ``imaging.rewards.make_reward``
    (e.g. ``clip_path`` and ``head_path`` of 'aesthetic'; ``quality`` of the JPEG rewards). ``n_labels`` > 0
    adds a CTRL label embedding (n_labels classes + NULL) to the
    UNet's time embedding; the conditions are then (prompt, label) pairs. ``batch_size`` is per process."""

    model: Optional[str] = None
    tiny: bool = False
    prompts: Sequence[str] = ("a photo of a cat",)
    reward: str = "colourfulness"
    method: str = "draftk"
    k: Union[str, int, tuple] = "1"
    lv_n: int = 2
    refl_steps: tuple = (1, 10)
    steps: int = 100
    batch_size: int = 2
    sample_steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 7.5
    lam: float = 0.0
    lr: float = 1e-4
    lr_embed: Optional[float] = None
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    grad_clip: float = 1.0
    lora_rank: int = 4
    lora_targets: Union[str, Sequence[str]] = "attn"
    n_labels: int = 0
    grad_checkpoint: bool = False
    seed: int = 0
    out: str = "runs/sd-finetune"
    ckpt_every: int = 10
    device: Optional[str] = None
    dtype: str = "float32"
    progress: bool = True
    reward_options: Optional[dict] = None


def parse_k(k) -> Union[int, tuple]:
    """DRaFT-K's K: an int >= 1, or 'lo,hi' (an inclusive range, 1 <= lo <= hi) drawn once per sample."""
    if isinstance(k, bool):
        raise ValueError(f"--k: expected an int or 'lo,hi', got {k!r}")
    if isinstance(k, int):
        parts = [k]
    elif isinstance(k, tuple):
        parts = list(k)
    else:
        m = re.fullmatch(r"\s*(\d+)\s*(?:,\s*(\d+)\s*)?", str(k))
        if m is None:
            raise ValueError(f"--k: expected a positive int K or a range 'lo,hi' of positive ints, got {k!r}")
        parts = [int(v) for v in m.groups() if v is not None]
    if not all(isinstance(v, int) and v >= 1 for v in parts) or len(parts) not in (1, 2):
        raise ValueError(f"--k: K must be >= 1 (or 'lo,hi' with 1 <= lo <= hi), got {k!r}")
    if len(parts) == 2:
        if parts[0] > parts[1]:
            raise ValueError(f"--k: the range 'lo,hi' needs lo <= hi, got {k!r}")
        return (parts[0], parts[1])
    return parts[0]


_parse_k = parse_k  # the name used before


def lora_target_modules(targets) -> tuple:
    """Module-name suffixes for peft from 'attn' / 'attn+ff' or an explicit sequence."""
    if isinstance(targets, str):
        if targets not in LORA_TARGETS:
            raise ValueError(f"--lora-targets: expected one of {', '.join(LORA_TARGETS)}, got {targets!r}")
        return LORA_TARGETS[targets]
    t = tuple(targets)
    if not t or not all(isinstance(v, str) and v for v in t):
        raise ValueError(f"--lora-targets: give 'attn', 'attn+ff' or module names, got {targets!r}")
    return t


def _finite(name: str, v, lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name}: must be a finite number, got {v!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name}: must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name}: must be <= {hi}, got {v}")


def _int(name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}: must be an int >= {lo}, got {v!r}")


def strategy_of(cfg: SDFinetuneConfig):
    """The engine strategy named by ``cfg.method`` (``theory.engine.make_strategy``; its own checks against
    the config run in ``validate``)."""
    from theory.engine import make_strategy

    if cfg.method not in METHODS:
        raise ValueError(f"--method: unknown '{cfg.method}', choose from {', '.join(METHODS)}")
    return make_strategy(cfg.method, k=parse_k(cfg.k) if cfg.method == "draftk" else None, n=cfg.lv_n,
                         steps=tuple(cfg.refl_steps))


def engine_config(cfg: SDFinetuneConfig):
    """The ``theory.engine.FinetuneConfig`` of ``cfg``."""
    from theory.engine import FinetuneConfig

    return FinetuneConfig(steps=cfg.steps, batch_size=cfg.batch_size, n_steps=cfg.sample_steps, method="ddim",
                          eta=cfg.eta, lam=cfg.lam, lr=cfg.lr, lr_embed=cfg.lr_embed, weight_decay=cfg.weight_decay,
                          lr_schedule=cfg.lr_schedule, grad_clip=cfg.grad_clip, checkpoint=cfg.grad_checkpoint,
                          seed=cfg.seed, ckpt_every=cfg.ckpt_every, out_dir=str(cfg.out), progress=cfg.progress)


def validate(cfg: SDFinetuneConfig):
    """Every check that needs no model: returns (strategy, engine config). Errors name the CLI option."""
    from .pipeline import DTYPES, check_pipeline_folder, resolve_device, resolve_dtype
    from .rewards import IMAGE_REWARDS, reward_names

    if cfg.tiny == (cfg.model is not None):
        raise ValueError("--model: pass the local folder of a diffusers pipeline, or --tiny for a toy pipeline (one of the two)")
    if not cfg.prompts or not all(isinstance(p, str) for p in cfg.prompts):
        raise ValueError("--prompt: give at least one prompt")
    for name, v in (("--steps", cfg.steps), ("--batch-size", cfg.batch_size), ("--sample-steps", cfg.sample_steps),
                    ("--lora-rank", cfg.lora_rank), ("--lv-n", cfg.lv_n)):
        _int(name, v, 1)
    _int("--ckpt-every", cfg.ckpt_every, 0)
    _int("--labels", cfg.n_labels, 0)
    _int("--seed", cfg.seed, 0)
    _finite("--eta", cfg.eta, 0.0, 1.0)
    _finite("--guidance-scale", cfg.guidance_scale, 0.0)
    _finite("--lam", cfg.lam, 0.0)
    _finite("--lr", cfg.lr, 0.0, lo_open=True)
    if cfg.lr_embed is not None:
        _finite("--lr-embed", cfg.lr_embed, 0.0, lo_open=True)
    _finite("--weight-decay", cfg.weight_decay, 0.0)
    _finite("--grad-clip", cfg.grad_clip, 0.0)
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"--lr-schedule: expected one of {', '.join(LR_SCHEDULES)}, got {cfg.lr_schedule!r}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    lora_target_modules(cfg.lora_targets)
    if cfg.reward not in IMAGE_REWARDS and cfg.reward not in reward_names():
        raise ValueError(f"--reward: unknown '{cfg.reward}', choose from {', '.join(sorted(set(IMAGE_REWARDS) | set(reward_names())))}")
    if cfg.reward_options is not None and not isinstance(cfg.reward_options, dict):
        raise ValueError(f"reward_options: a mapping of the reward's keyword arguments, got {cfg.reward_options!r}")
    if cfg.method != "ddpo" and not getattr(IMAGE_REWARDS.get(cfg.reward), "differentiable", True):
        raise ValueError(f"--reward: '{cfg.reward}' has no gradient; use --method ddpo for it")
    if cfg.method == "refl":
        lo_hi = tuple(cfg.refl_steps)
        if len(lo_hi) != 2 or not all(isinstance(v, int) and v >= 1 for v in lo_hi) or lo_hi[0] > lo_hi[1]:
            raise ValueError(f"--refl-steps: expected 'lo,hi' with 1 <= lo <= hi, got {cfg.refl_steps!r}")
        if lo_hi[1] > cfg.sample_steps:
            raise ValueError(f"--refl-steps: ReFL stops m in [{lo_hi[0]}, {lo_hi[1]}] steps before the end, more than "
                             f"--sample-steps={cfg.sample_steps}; lower --refl-steps (e.g. 1,{cfg.sample_steps}) or "
                             "raise --sample-steps")
    if cfg.method == "draftk":
        k = parse_k(cfg.k)
        hi = k if isinstance(k, int) else k[1]
        if hi > cfg.sample_steps:
            raise ValueError(f"--k: K={hi} exceeds --sample-steps={cfg.sample_steps}; lower --k or raise --sample-steps")
    if cfg.method == "ddpo" and not cfg.eta > 0:
        raise ValueError("--eta: DDPO needs a stochastic sampler; give --eta > 0 (e.g. 1)")
    if cfg.lam > 0 and not cfg.eta > 0:
        raise ValueError("--lam: the path KL needs stochastic transitions; give --eta > 0 (e.g. 1)")
    strategy = strategy_of(cfg)
    fcfg = engine_config(cfg)
    fcfg.validate()
    strategy.validate(cfg.sample_steps, fcfg)
    resolve_dtype(cfg.dtype, resolve_device(cfg.device))  # --device exists here, --dtype runs on it
    if cfg.model is not None:
        check_pipeline_folder(cfg.model)
    return strategy, fcfg


def check_out_dir(out: Union[str, Path], option: str = "--out") -> Path:
    """Create ``out`` (and parents) if needed and prove it writable, before any work; a file in the way or a
    folder without write permission is a ValueError naming ``option`` (``theory.io.check_writable``)."""
    from theory.io import check_writable

    return check_writable(out, option)


def build(cfg: SDFinetuneConfig, device: Optional[str] = None):
    """(pipe, steered model, schedule, time grid, reward) for ``cfg``; no training."""
    from theory.engine import SteeredModel

    from .pipeline import (
        LatentEps,
        encode_prompts,
        load_pipeline,
        resolve_device,
        resolve_dtype,
        schedule_of,
        scheduler_grid,
    )
    from .rewards import IMAGE_REWARDS, LatentReward

    device = resolve_device(device or cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.tiny:
        from .tiny import tiny_pipeline

        pipe = tiny_pipeline(seed=cfg.seed).to(device)
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        pipe = load_pipeline(cfg.model, dtype=dtype, device=device)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    cond, unc = encode_prompts(pipe, list(cfg.prompts), device=device)
    sch = schedule_of(pipe)
    base = LatentEps(pipe.unet, sch, cond, unc, cfg.guidance_scale)
    targets = list(lora_target_modules(cfg.lora_targets))
    kw = {}
    if cfg.n_labels:
        # CTRL's augmented model: a zero-initialised table added to the output of the UNet's time embedding
        # (CTRL sec. 4); the conditions are PromptLabel(prompt index, label), the prompt reaches the UNet
        kw = dict(n_labels=cfg.n_labels, label_mode="module", label_module="unet.time_embedding",
                  label_shape=(int(pipe.unet.time_embedding.linear_2.out_features),))
    # the engine keeps the trainable parts (LoRA, table) in float32 over a bf16 / fp16 base
    model = SteeredModel(base, lora_rank=cfg.lora_rank, lora_targets=targets, **kw)
    model.to(device)
    ts = scheduler_grid(pipe.scheduler, cfg.sample_steps)
    if cfg.reward in IMAGE_REWARDS and not cfg.reward_options:
        reward = LatentReward(pipe, cfg.reward)
    else:  # a learnt reward (weights from local files) or options: imaging.rewards.make_reward
        from .rewards import make_reward

        reward = make_reward(pipe, cfg.reward, **(cfg.reward_options or {}))
    return pipe, model, sch, ts, reward


def _conditions(cfg: SDFinetuneConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    """Training conditions: a uniform prompt index per sample; with labels, (prompt, label) pairs with the
    label uniform over the n_labels classes."""
    from theory.engine import PromptLabel

    P = len(cfg.prompts)
    c = torch.randint(0, P, (n,), generator=generator)
    if cfg.n_labels:
        return PromptLabel(c, torch.randint(0, cfg.n_labels, (n,), generator=generator))
    return c


#: fields of SDFinetuneConfig a resumed run may change (the engine checks its own config and the strategy)
RESUMABLE_CHANGES = ("steps", "ckpt_every", "device", "progress", "out")
RUN_FILE = "sd_finetune_config.json"


def check_resume(cfg: SDFinetuneConfig) -> None:
    """If ``cfg.out`` holds a checkpoint, the run it belongs to must have the same settings (the pipeline,
    prompts, reward, LoRA, dtype, labels, ... as recorded in ``out/sd_finetune_config.json``); else a
    ValueError listing each differing field. Cheap: runs before a model is loaded."""
    import json

    from theory.engine import find_checkpoint

    out = Path(cfg.out)
    rec = out / RUN_FILE
    if not out.is_dir() or find_checkpoint(out) is None or not rec.is_file():
        return
    try:
        old = json.loads(rec.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--out: {rec} is not valid JSON ({e}); restore it or start a fresh --out") from None
    from theory.io import to_strict_json

    new = to_strict_json(asdict(cfg))
    diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)]
    if diff:
        raise ValueError(f"--out: {out} holds a checkpoint of a run with other settings ({'; '.join(diff)}); "
                         f"rerun with the recorded values, or pass a fresh --out (only "
                         f"{', '.join('--' + k.replace('_', '-') for k in RESUMABLE_CHANGES[:3])} may change)")


def run_finetune(cfg: SDFinetuneConfig, dist=None) -> dict:
    """Fine-tune, writing into ``cfg.out``: ``checkpoint/`` (atomic, resumed from if present),
    ``pytorch_lora_weights.safetensors`` (the trained adapter, diffusers format), ``label_embedding.safetensors``
    (with labels), ``history.json`` and ``summary.json`` (mean reward of the pre-trained and the fine-tuned
    model on the same fixed noise). ``dist``: a ``theory.engine.Distributed`` (data-parallel; only its main
    process writes); default one process."""
    from theory.engine import finetune
    from theory.io import atomic_save_tensors, atomic_write_json
    from theory.solvers import sample

    from .lora_io import save_diffusers_lora
    from .pipeline import latent_shape

    strategy, fcfg = validate(cfg)
    is_main = dist is None or dist.is_main
    out = Path(cfg.out)
    if is_main:
        check_out_dir(out)
    check_resume(cfg)
    device = None
    if dist is not None and int(dist.world_size) > 1 and getattr(dist, "device", None) is not None:
        # each process on its own device: the launcher's (cuda:LOCAL_RANK), unless --device names an index
        if cfg.device is None or torch.device(cfg.device).index is None:
            device = str(dist.device)
    pipe, model, sch, ts, reward = build(cfg, device=device)
    device = next(model.parameters()).device
    shape = latent_shape(pipe)
    P = len(cfg.prompts)

    def x_T_sampler(n, generator):
        return torch.randn((n, *shape), generator=generator, dtype=torch.float32).to(device)

    def cond_sampler(n, generator):
        return _conditions(cfg, n, generator).to(device)

    @torch.no_grad()
    def mean_reward(eps_model, seed=12345, n=None):
        n = n or max(P, cfg.batch_size)
        g = torch.Generator().manual_seed(seed)
        x = x_T_sampler(n, g)
        c = torch.arange(n, device=device) % P
        if cfg.n_labels:
            from theory.engine import PromptLabel

            c = PromptLabel(c, torch.arange(n, device=device) % cfg.n_labels)
        x0 = sample(eps_model, sch, x, ts, method="ddim", eta=cfg.eta, cond=c, generator=g).x0
        return float(reward(x0, c).float().mean())

    if is_main and not (out / RUN_FILE).is_file():
        atomic_write_json(out / RUN_FILE, asdict(cfg))
    before = mean_reward(model.reference)
    hist = finetune(model, sch, reward, strategy, fcfg, x_T_sampler=x_T_sampler, cond_sampler=cond_sampler, ts=ts,
                    dist=dist)
    model.eval()
    after = mean_reward(model)
    summary = {"config": asdict(cfg), "reward_before": before, "reward_after": after, "steps": len(list(hist)),
               "world_size": 1 if dist is None else int(dist.world_size)}
    if is_main:
        save_diffusers_lora(model, out)
        if cfg.n_labels:
            atomic_save_tensors({"embedding": model.label_parameters()[0].detach()}, out / "label_embedding.safetensors")
        atomic_write_json(out / "summary.json", summary)
    if dist is not None:
        dist.barrier()
    return summary
