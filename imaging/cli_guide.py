"""``diffsteer guide``: gradient guidance as an optimiser on an image pipeline (argparse only at import time;
the work is ``imaging.guide.run``)."""
from __future__ import annotations

_DESCRIPTION = """\
Gradient guidance as an optimiser (Algorithm 1, or Algorithm 2 with score fine-tuning) on the latents of a
local diffusers pipeline, toward a differentiable reward seen through the VAE decoder:

  round 0: unguided samples of the pipeline (one prompt, classifier-free guidance);
  round k: g = grad f(x), target y = g.x + delta, new samples guided by G (the naive gradient guidance)
           or G_loss (the look-ahead guidance: one vector-Jacobian product through the UNet per step),
           from the same noise as round 0 (--noise fixed) or from fresh noise (--noise fresh).

f is the reward standardised by the pre-trained samples' mean and sd, so --strengths (delta per round)
and --sigma-y are in units of the pre-trained reward's spread. Every (method, strength) pair runs from the
same noise, all chains in one network call per step. Also measured: the reward per round, the true JPEG
size, how far the latents leave the data (the share of their energy outside the top principal directions
of --pca-n pre-trained latents holding --pca-var of the variance), the judge's probability of the
prompt's digit (digits pipeline), and the runtime row (a round with G / G_loss against one unguided pass).

Writes OUT/results.json and OUT/samples.safetensors (uint8 images of the kept rounds).
Config file for Stable Diffusion v1.5 with the aesthetic reward: imaging/configs/guide_sd15.json (needs
--model with your local copy, the aesthetic weights named in it, and a GPU). Command-line options override
the config file."""


def add_parser(sub) -> None:
    import argparse

    from .cli import add_model_arguments

    p = sub.add_parser("guide", help="gradient guidance (G, G_loss; Algorithms 1 and 2) on an image pipeline",
                       description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, from_config=True)
    p.add_argument("--config", default=None, metavar="FILE",
                   help="JSON config (keys of imaging.guide.GuideConfig; '_'-keys are comments); default: the "
                        "built-in digits settings")
    p.add_argument("--reward", default=None, metavar="NAME",
                   help="a differentiable reward of imaging.rewards.make_reward (default diff-compressibility; "
                        "'aesthetic' on SD with the config's reward_kwargs), or digit-logprob (digits pipeline: "
                        "log p(digit) of a classifier on the decoded image; --set 'reward_kwargs={\"digit\": 8}')")
    p.add_argument("--method", choices=["g", "g_loss", "both"], default=None,
                   help="guidance: g (naive G), g_loss (look-ahead G_loss) or both (default both)")
    p.add_argument("--strengths", default=None, metavar="S1,S2,...",
                   help="guidance strengths: delta, the intended reward gain per round, in pre-trained reward "
                        "sds, comma-separated (default 0.25,0.5,1)")
    p.add_argument("--sigma-y", type=float, default=None,
                   help="reward-noise level sigma_y of the guidance, in pre-trained reward sds (default 0.1)")
    p.add_argument("--rounds", type=int, default=None, help="optimisation rounds K (default 8)")
    p.add_argument("--n", type=int, default=None, help="chains (samples) per configuration (default 8)")
    p.add_argument("--algorithm", type=int, choices=[1, 2], default=None,
                   help="1: fixed pre-trained score; 2: also fine-tune a copy of the UNet on each round's samples "
                        "(score matching, --ft-lr, --ft-start) (default 1)")
    p.add_argument("--noise", choices=["fixed", "fresh"], default=None,
                   help="fixed: each chain keeps its starting noise and sampler noise in every round (Algorithm 1 "
                        "only; the grid shows one image evolving); fresh: new noise every round (default fixed; "
                        "Algorithm 2 needs fresh)")
    p.add_argument("--ft-lr", type=float, default=None, help="Algorithm 2: Adam learning rate (default 1e-5)")
    p.add_argument("--ft-start", type=int, default=None, help="Algorithm 2: first round that fine-tunes (default 0)")
    p.add_argument("--prompt", default=None, help="the prompt (default 'a handwritten digit 3')")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance weight on the prompt (default 3)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps on the scheduler's grid (default 20)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "em"], default=None,
                   help="solver: ddpm (ancestral, default), ddim (eta 0) or em (Euler-Maruyama)")
    p.add_argument("--pca-n", type=int, default=None,
                   help="pre-trained latents for the reward scale and the data subspace (default 512)")
    p.add_argument("--pca-var", type=float, default=None,
                   help="variance share the data subspace holds, in (0, 1) (default 0.95)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the frozen weights (default float32; float16 needs a GPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: the config's, else cuda if available)")
    p.add_argument("--no-timing", action="store_true", help="skip the runtime row (unguided pass vs G / G_loss round)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (VALUE parsed as JSON, else a string), repeatable; "
                        "e.g. --set grid_n=6 --set 'grid_rounds=[0, 4, 8]'")
    p.add_argument("--seed", type=int, default=None, help="seed of the noise (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no per-stage lines")
    p.add_argument("--out", default="runs/guide", metavar="DIR", help="output folder (default runs/guide)")
    p.set_defaults(func=run_guide_cmd)


def _strengths(text: str) -> list:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--strengths: expected comma-separated numbers, e.g. 0.25,0.5,1; got {text!r}") from None
    if not vals:
        raise ValueError("--strengths: give at least one strength")
    return vals


def overrides_of(args) -> dict:
    """The config keys the command line sets (None = not given)."""
    from .cli_ctrl import parse_overrides

    over = parse_overrides(args.set)
    simple = {"model": args.model, "reward": args.reward, "sigma_y": args.sigma_y, "rounds": args.rounds, "n": args.n,
              "algorithm": args.algorithm, "noise": args.noise, "ft_lr": args.ft_lr, "ft_start": args.ft_start, "prompt": args.prompt,
              "guidance_scale": args.guidance_scale, "steps": args.steps, "method": args.sampler,
              "pca_n": args.pca_n, "pca_var": args.pca_var, "dtype": args.dtype, "device": args.device,
              "seed": args.seed}
    over.update({k: v for k, v in simple.items() if v is not None})
    if args.method is not None:
        over["methods"] = {"g": ["G"], "g_loss": ["G_loss"], "both": ["G", "G_loss"]}[args.method]
    if args.strengths is not None:
        over["strengths"] = _strengths(args.strengths)
    if args.no_timing:
        over["timing"] = False
    return over


def run_guide_cmd(args) -> int:
    from .guide import load_config, run

    cfg = load_config(args.config, **overrides_of(args))
    pipe = None
    if args.tiny:
        if args.model is not None:
            raise ValueError("--tiny, --model: give one of them")
        from .tiny import tiny_pipeline

        pipe = tiny_pipeline(seed=cfg.seed)
    res = run(cfg, args.out, pipe=pipe, progress=not args.no_progress)
    ref = res["reference"]
    print(f"pre-trained reward {ref['reward_mean']:.5g} +- {ref['reward_sd']:.3g}; data subspace k={ref['pca_k']} "
          f"of D={ref['D']} ({ref['explained_at_k']:.1%} of the variance)")
    for c in res["configs"]:
        r0, rK = c["rounds"][0], c["rounds"][-1]
        print(f"  {c['method']:6s} strength {c['strength']:<5g} reward {r0['reward_raw']:.5g} -> {rK['reward_raw']:.5g} "
              f"({c['gain_std']:+.2f} sd)  off-subspace {r0['off_subspace']:.4f} -> {rK['off_subspace']:.4f}")
    t = res["timing"]
    if t:
        print("  runtime: unguided pass {:.3g}s; ".format(t["unguided_pass_s"]) +
              "; ".join(f"round with {m} {t[f'round_{m}_s']:.3g}s ({t[f'ratio_{m}']:.2f}x)" for m in res["config"]["methods"]))
    print(f"wrote {args.out}/results.json")
    return 0
