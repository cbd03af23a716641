"""Imaging subcommands of ``diffsteer`` (argparse only at import time; torch/diffusers in handlers)."""
from __future__ import annotations


def add_model_arguments(p, from_config: bool = False) -> None:
    """The model choice every image command shares: ``--model DIR`` or ``--tiny`` (one of them at most)."""
    src = p.add_mutually_exclusive_group(required=False)
    default = "the config's 'model', else " if from_config else ""
    src.add_argument("--model", default=None, metavar="DIR",
                     help="local folder of a diffusers SD-style pipeline (e.g. your SD v1.5 copy); default: "
                          f"{default}the digits pipeline trained here, built into the cache on first use "
                          "(prompts such as 'a handwritten digit 7')")
    src.add_argument("--tiny", action="store_true",
                     help="a tiny random pipeline built in-process instead of --model (smoke test of the code path)")


def add_parser(sub) -> None:
    p = sub.add_parser("sd-sample", help="sample a Stable Diffusion pipeline through the theory solver",
                       description="Sample a local diffusers SD-style pipeline with theory.solvers.sample "
                                   "(DDIM(eta) on the scheduler's own grid, classifier-free guidance). "
                                   "Writes PNGs and the latents' stats into OUT.")
    add_model_arguments(p)
    p.add_argument("--prompt", nargs="+", default=["a photo of a cat"], help="one or more prompts")
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=50, help="sampler steps")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 deterministic, 1 ~ DDPM)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="dtype of the pipeline's weights (float16 needs a GPU; default float32)")
    p.add_argument("--fp16", action="store_true", help="same as --dtype float16 (GPU)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA in the diffusers format (the folder sd-finetune wrote, or a .safetensors file), "
                        "times SCALE (default 1; 0 = the pre-trained model, in between the weights interpolate); "
                        "repeat to sum several adapters")
    p.add_argument("--guide", default=None, metavar="REWARD",
                   help="guide sampling toward an image reward (colourfulness, brightness) with the look-ahead "
                        "gradient at Tweedie's x0_hat (G_loss / DPS form; docs/theory.md §6-7)")
    p.add_argument("--guide-scale", type=float, default=1.0, help="strength of --guide")
    p.add_argument("--out", default="runs/sd-sample", help="output folder (must not be a file)")
    p.set_defaults(func=run_sample)

    f = sub.add_parser("sd-finetune", help="fine-tune a Stable Diffusion pipeline on an image reward (LoRA)",
                       description="Reward fine-tuning of a local diffusers SD-style pipeline with the engine of "
                                   "theory.engine: DRaFT, DRaFT-K, DRaFT-LV, ReFL, adjoint or DDPO, LoRA on the "
                                   "UNet's attention (and feed-forward layers), optional KL to the pre-trained "
                                   "model (--lam). Checkpoints atomically into OUT/checkpoint and resumes from it; "
                                   "writes OUT/pytorch_lora_weights.safetensors (diffusers format: "
                                   "pipe.load_lora_weights(OUT) loads it), OUT/history.json and OUT/summary.json. "
                                   "Under accelerate launch / torchrun with several processes it trains "
                                   "data-parallel (--batch-size per process).")
    add_model_arguments(f)
    f.add_argument("--config", default=None, metavar="FILE",
                   help="a JSON file of settings, keys = the fields of imaging.finetune.SDFinetuneConfig (e.g. "
                        "imaging/configs/draft_sd15.json, DRaFT's SD setting; keys starting with '_' are comments); "
                        "an option given here with a value other than its default overrides the file")
    f.add_argument("--prompt", nargs="+", default=["a photo of a cat"], help="training prompts")
    f.add_argument("--reward", default="colourfulness",
                   help="colourfulness, brightness, diff-compressibility, diff-incompressibility, compressibility "
                        "(DDPO only); learnt rewards (aesthetic, clip-score) need their local files as "
                        "reward_options in a --config file")
    f.add_argument("--method", default="draftk", help="draft, draftk, draftlv, refl, adjoint or ddpo")
    f.add_argument("--k", default="1", help="DRaFT-K: K, or 'lo,hi' drawn once per sample")
    f.add_argument("--lv-n", type=int, default=2, help="DRaFT-LV: re-noisings of the final sample")
    f.add_argument("--steps", type=int, default=100, help="optimisation steps")
    f.add_argument("--batch-size", type=int, default=2, help="trajectories per optimisation step")
    f.add_argument("--sample-steps", type=int, default=50, help="sampler steps per trajectory")
    f.add_argument("--eta", type=float, default=0.0, help="DDIM eta (DDPO and --lam > 0 need eta > 0)")
    f.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance weight")
    f.add_argument("--lam", type=float, default=0.0, help="weight of the path KL to the pre-trained model")
    f.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the LoRA")
    f.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (the DRaFT paper: 0.1)")
    f.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine", "linear"),
                   help="learning-rate schedule over --steps (cosine / linear decay to 0)")
    f.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clipping (0: none)")
    f.add_argument("--lora-rank", type=int, default=4, help="rank of the LoRA adapter")
    f.add_argument("--lora-targets", default="attn", choices=("attn", "attn+ff"),
                   help="LoRA on the UNet's attention projections (q, k, v, out) or also its feed-forward layers")
    f.add_argument("--refl-steps", default="1,10", metavar="LO,HI",
                   help="ReFL: stop m in [LO, HI] steps before the end (HI <= --sample-steps)")
    f.add_argument("--grad-checkpoint", action="store_true", help="gradient checkpointing of every sampler step")
    f.add_argument("--ckpt-every", type=int, default=10, help="checkpoint period in steps (0: never)")
    f.add_argument("--seed", type=int, default=0, help="seed of the training noise (and of the --tiny pipeline's weights)")
    f.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    f.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the frozen pipeline weights; LoRA and optimiser state stay float32 (float16 needs a GPU)")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.add_argument("--out", default="runs/sd-finetune", help="output folder (resumed from if it holds a checkpoint)")
    f.set_defaults(func=run_finetune_cmd, option_defaults={d: f.get_default(d) for d in _FILE_KEYS.values()})
    add_digits_parser(sub)


def _refl_steps(v: str) -> tuple:
    import re

    m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", v)
    if m is None:
        raise ValueError(f"--refl-steps: expected 'lo,hi' (two positive ints), got {v!r}")
    return (int(m.group(1)), int(m.group(2)))


#: SDFinetuneConfig field -> the sd-finetune option (dest) that sets it
_FILE_KEYS = {"model": "model", "tiny": "tiny", "prompts": "prompt", "reward": "reward", "method": "method", "k": "k",
              "lv_n": "lv_n", "refl_steps": "refl_steps", "steps": "steps", "batch_size": "batch_size",
              "sample_steps": "sample_steps", "eta": "eta", "guidance_scale": "guidance_scale", "lam": "lam",
              "lr": "lr", "weight_decay": "weight_decay", "lr_schedule": "lr_schedule", "grad_clip": "grad_clip",
              "lora_rank": "lora_rank", "lora_targets": "lora_targets", "grad_checkpoint": "grad_checkpoint",
              "seed": "seed", "ckpt_every": "ckpt_every", "device": "device", "dtype": "dtype", "out": "out"}


def _read_finetune_file(path: str) -> dict:
    """The settings of a --config file (keys: SDFinetuneConfig fields; '_'-keys are comments)."""
    import json
    from dataclasses import fields
    from pathlib import Path

    from .finetune import SDFinetuneConfig

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--config: no file at '{p}' (see imaging/configs/ for examples)")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--config: '{p}' is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--config: '{p}' must hold a JSON object of settings")
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    names = {f.name for f in fields(SDFinetuneConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"--config: unknown key(s) {unknown} in '{p}'; valid keys: {sorted(names)}")
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items()}


def run_finetune_cmd(args) -> int:
    from dataclasses import replace

    from .finetune import SDFinetuneConfig, run_finetune

    file_cfg = _read_finetune_file(args.config) if getattr(args, "config", None) else {}
    defaults = getattr(args, "option_defaults", {})
    # the file's value unless the command line set the option to something other than its default
    given = {k for k, dest in _FILE_KEYS.items() if getattr(args, dest) != defaults.get(dest, getattr(args, dest))}
    if not args.tiny and args.model is None and not file_cfg.get("tiny") and file_cfg.get("model") is not None:
        args.model = file_cfg["model"]
    file_cfg = {k: v for k, v in file_cfg.items() if k not in given and k not in ("model", "tiny")}
    cfg = SDFinetuneConfig(model=args.model, tiny=args.tiny, prompts=tuple(args.prompt), reward=args.reward,
                           method=args.method, k=args.k, lv_n=args.lv_n, refl_steps=_refl_steps(args.refl_steps),
                           steps=args.steps, batch_size=args.batch_size, sample_steps=args.sample_steps, eta=args.eta,
                           guidance_scale=args.guidance_scale, lam=args.lam, lr=args.lr,
                           weight_decay=args.weight_decay, lr_schedule=args.lr_schedule, grad_clip=args.grad_clip,
                           lora_rank=args.lora_rank, lora_targets=args.lora_targets,
                           grad_checkpoint=args.grad_checkpoint, seed=args.seed, out=args.out,
                           ckpt_every=args.ckpt_every, device=args.device, dtype=args.dtype,
                           progress=not args.no_progress)
    if file_cfg:
        cfg = replace(cfg, **file_cfg)
    if cfg.model is None and not cfg.tiny:
        # the default model may be trained on first use: every other argument and --out are checked first
        from .finetune import check_out_dir, validate

        validate(replace(cfg, tiny=True))
        check_out_dir(cfg.out)
        use_default_model(args)
        cfg = replace(cfg, model=args.model)
    from .distributed import from_environment

    dist = from_environment(args.device)  # an accelerate / torchrun launch with several processes, else None
    s = run_finetune(cfg, dist=dist)
    if dist is None or dist.is_main:
        print(f"mean reward {s['reward_before']:.4f} -> {s['reward_after']:.4f}; wrote {cfg.out}")
    return 0


def _check_sample_args(args) -> None:
    """Every check of sd-sample that needs no model (run before loading one)."""
    import math

    from .finetune import check_out_dir
    from .lora_io import lora_specs

    if args.n < 1 or args.steps < 1:
        raise ValueError(f"--n, --steps: must be >= 1, got {args.n}, {args.steps}")
    if not math.isfinite(args.eta) or not 0.0 <= args.eta <= 1.0:
        raise ValueError(f"--eta: DDIM's eta must lie in [0, 1] (0 deterministic, 1 DDPM-like), got {args.eta}")
    if not math.isfinite(args.guidance_scale) or args.guidance_scale < 0:
        raise ValueError(f"--guidance-scale: must be a finite number >= 0, got {args.guidance_scale}")
    if not math.isfinite(args.guide_scale):
        raise ValueError(f"--guide-scale: must be a finite number, got {args.guide_scale}")
    if args.fp16 and args.dtype not in (None, "float16"):
        raise ValueError(f"--fp16: conflicts with --dtype {args.dtype}; give one of them")
    if args.guide is not None:
        from .rewards import IMAGE_REWARDS

        if args.guide not in IMAGE_REWARDS:
            raise ValueError(f"--guide: unknown reward '{args.guide}', choose from {', '.join(sorted(IMAGE_REWARDS))}")
        if not getattr(IMAGE_REWARDS[args.guide], "differentiable", True):
            raise ValueError(f"--guide: reward '{args.guide}' has no gradient")
    if args.model is not None:
        from .pipeline import check_pipeline_folder

        check_pipeline_folder(args.model)
    args.lora_specs = lora_specs(args.lora)
    check_out_dir(args.out)


def run_sample(args) -> int:
    import json
    from pathlib import Path

    import torch

    from theory.solvers import sample

    from .pipeline import (
        LatentEps,
        decode_latents,
        encode_prompts,
        latent_shape,
        load_pipeline,
        resolve_device,
        resolve_dtype,
        schedule_of,
        scheduler_grid,
    )

    _check_sample_args(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype("float16" if args.fp16 else (args.dtype or "float32"), device)
    use_default_model(args)
    if args.tiny:
        from .tiny import tiny_pipeline

        pipe = tiny_pipeline().to(device)
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        pipe = load_pipeline(args.model, dtype=dtype, device=device)
    if args.lora_specs:
        from .lora_io import load_diffusers_loras

        load_diffusers_loras(pipe, args.lora_specs)
    cond, unc = encode_prompts(pipe, args.prompt, device=device)
    sch = schedule_of(pipe)
    model = LatentEps(pipe.unet, sch, cond, unc, args.guidance_scale)
    P = len(args.prompt)
    g = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.randn((P * args.n, *latent_shape(pipe)), generator=g, device=device, dtype=torch.float32)
    idx = torch.arange(P, device=device).repeat_interleave(args.n)
    guidance = None
    if args.guide is not None:
        from theory.guidance import dps_guidance

        from .rewards import LatentReward

        reward = LatentReward(pipe, args.guide)
        guidance = dps_guidance(model, sch, lambda x0, y: reward(x0, y), None, zeta=args.guide_scale, cond=idx)
    with torch.no_grad():
        lat = sample(model, sch, x, scheduler_grid(pipe.scheduler, args.steps), method="ddim", eta=args.eta,
                     cond=idx, guidance=guidance, generator=g, progress=True).x0
        imgs = decode_latents(pipe, lat).float().cpu()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for i, im in enumerate(imgs):
        Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(out / f"sample_{i:03d}.png")
    conf = {k: v for k, v in vars(args).items() if k not in ("func", "lora_specs")}
    (out / "config.json").write_text(json.dumps(conf, indent=1))
    print(f"wrote {len(imgs)} images to {out}")
    return 0


# ----------------------------------------------------------------------------- the digits pipeline (default model)


def use_default_model(args) -> None:
    """``--model`` absent and no ``--tiny``: the digits pipeline trained here (imaging.digits_pipeline),
    built into the cache on first use with a progress display."""
    if getattr(args, "tiny", False) or getattr(args, "model", None) is not None:
        return
    from .digits_pipeline import ensure_digits_pipeline

    args.model = str(ensure_digits_pipeline(progress=not getattr(args, "no_progress", False)))


def add_digits_parser(sub) -> None:
    d = sub.add_parser(
        "digits-pipeline", help="train the small SD-shaped pipeline on the 8x8 digits (the default model)",
        description="Train a Stable-Diffusion-shaped pipeline (AutoencoderKL, CLIP tokenizer and text encoder, "
                    "UNet2DConditionModel with cross-attention, DDIM) on scikit-learn's 8x8 digits, save it with "
                    "save_pretrained, and measure it with a judge fitted on held-out digits (accuracy at CFG 1, 3, "
                    "7.5). Without --out it goes into the cache ($DIFFSTEER_CACHE or the user cache folder, "
                    "keyed by the config) and is reused if already built; sd-sample and sd-finetune use it when "
                    "no --model is given.")
    d.add_argument("--out", default=None, help="folder to write the pipeline into (absent or empty; default: the cache)")
    d.add_argument("--steps", type=int, default=None, help="UNet + text-encoder training steps (default 2500)")
    d.add_argument("--vae-steps", type=int, default=None, help="VAE training steps (default 150)")
    d.add_argument("--seed", type=int, default=None, help="training seed (default 0)")
    d.add_argument("--eval-n", type=int, default=None, help="samples per digit for the judged accuracy (default 50)")
    d.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads for this process (default: 1, the fastest for these small networks on a "
                        "shared machine; see diffsteer.runtime)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=run_digits_pipeline_cmd, default_threads=1)  # diffsteer's main sets the threads


def run_digits_pipeline_cmd(args) -> int:
    import json
    from dataclasses import replace

    over = {"unet_steps": args.steps, "vae_steps": args.vae_steps, "seed": args.seed, "eval_n_per_class": args.eval_n}
    for opt, v in (("--steps", args.steps), ("--vae-steps", args.vae_steps), ("--eval-n", args.eval_n)):
        if v is not None and v < 1:
            raise ValueError(f"{opt}: must be >= 1, got {v}")
    from .digits_pipeline import INFO_FILE, DigitsPipelineConfig, ensure_digits_pipeline

    cfg = replace(DigitsPipelineConfig(), **{k: v for k, v in over.items() if v is not None})
    path = ensure_digits_pipeline(cfg, progress=not args.no_progress, out=args.out, evaluate=True)
    info = json.loads((path / INFO_FILE).read_text())
    acc = ", ".join(f"CFG {w}: {r['accuracy']:.3f}" for w, r in info["judged_accuracy"].items())
    print(f"digits pipeline at {path}\n  {info['unet_steps']} UNet steps, {info['vae_steps']} VAE steps, "
          f"training {info['wall_s']['train_total']:.0f} s; VAE reconstruction MSE {info['vae_recon_mse']:.4f}\n"
          f"  judged accuracy {acc} (judge on real digits {info['judge']['real_8x8']:.3f})")
    return 0
