"""Imaging subcommands of ``diffsteer`` (argparse only at import time; torch/diffusers in handlers)."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("sd-sample", help="sample a Stable Diffusion pipeline through the theory solver",
                       description="Sample a local diffusers SD-style pipeline with theory.solvers.sample "
                                   "(DDIM(eta) on the scheduler's own grid, classifier-free guidance). "
                                   "Writes PNGs and the latents' stats into OUT.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local folder of a diffusers pipeline (e.g. your SD v1.5 copy)")
    src.add_argument("--tiny", action="store_true", help="a tiny random pipeline built in-process (smoke test)")
    p.add_argument("--prompt", nargs="+", default=["a photo of a cat"], help="one or more prompts")
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=50, help="sampler steps")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 deterministic, 1 ~ DDPM)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--fp16", action="store_true", help="half precision (GPU)")
    p.add_argument("--out", default="runs/sd-sample", help="output folder")
    p.set_defaults(func=run_sample)


def run_sample(args) -> int:
    import json
    from pathlib import Path

    import torch

    from theory.solvers import sample

    from .pipeline import LatentEps, decode_latents, encode_prompts, latent_shape, load_pipeline, schedule_of, scheduler_grid

    if args.n < 1 or args.steps < 1:
        raise ValueError("--n, --steps: must be >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if args.fp16 else torch.float32
    if args.tiny:
        from .tiny import tiny_pipeline

        pipe = tiny_pipeline().to(device)
    else:
        pipe = load_pipeline(args.model, dtype=dtype, device=device)
    cond, unc = encode_prompts(pipe, args.prompt, device=device)
    sch = schedule_of(pipe)
    model = LatentEps(pipe.unet, sch, cond, unc, args.guidance_scale)
    P = len(args.prompt)
    g = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.randn((P * args.n, *latent_shape(pipe)), generator=g, device=device, dtype=dtype)
    idx = torch.arange(P, device=device).repeat_interleave(args.n)
    with torch.no_grad():
        lat = sample(model, sch, x, scheduler_grid(pipe.scheduler, args.steps), method="ddim", eta=args.eta,
                     cond=idx, generator=g, progress=True).x0
        imgs = decode_latents(pipe, lat).float().cpu()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for i, im in enumerate(imgs):
        Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(out / f"sample_{i:03d}.png")
    (out / "config.json").write_text(json.dumps({k: v for k, v in vars(args).items() if k != "func"}, indent=1))
    print(f"wrote {len(imgs)} images to {out}")
    return 0
