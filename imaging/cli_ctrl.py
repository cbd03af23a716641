"""``diffsteer ctrl``: CTRL on an image pipeline end to end (argparse only at import time; the work is
``imaging.ctrl.run``)."""
from __future__ import annotations

_DESCRIPTION = """\
CTRL (conditioning a pre-trained diffusion model by reinforcement learning) on a local diffusers
pipeline, end to end, measured with the true measure:

  1. offline data: N images sampled from the pre-trained pipeline over the config's prompts (or read
     from image_folder), labelled by their true JPEG size class (thresholds_kb from the config, e.g. the
     paper's > 110, 85-110, 60-85, <= 60 kB at 512 px; without thresholds, the quantiles of the sampled
     sizes, written into OUT/config.json) and, for the multi-task run, by a second measure (ink mass on
     the digits pipeline, or the aesthetic score with local weights);
  2. classifier: a small residual CNN with batch norm on the decoded images, maximum likelihood, then
     temperature scaling on a held-out split (accuracy, NLL, ECE before/after on a test split);
  3. planning: LoRA + a zero-initialised label embedding added to the UNet's time embedding (NULL
     frozen at zero), reward gamma log p(y|x0), path KL to the pre-trained model summed over dimensions,
     a fixed truncation K, DDIM eta = 1, through the package's one fine-tuning engine (or PPO);
     checkpoints into OUT/ft_<task>/ and exact resume from them;
  4. evaluation: equal samples per class from fixed seeds scored by the real JPEG size: accuracy,
     macro-F1, confusion matrix, mean size per class, for the pre-trained model, CTRL, CTRL with
     classifier-free mixing over the label (rescaled gamma) and DPS over a strength sweep.

Writes OUT/config.json, OUT/results.json, OUT/curve_<task>.json, the classifiers and sample tensors.
Rerunning with the same --out and config resumes; a different config in the same OUT is an error.
Config files: imaging/configs/ctrl_digits.json (default), imaging/configs/ctrl_sd15.json (the paper's SD
v1.5 setting; needs --model with your local copy and a GPU)."""


def add_parser(sub) -> None:
    import argparse

    from .cli import add_model_arguments

    p = sub.add_parser("ctrl", help="CTRL on an image pipeline: offline labels, classifier, fine-tuning, evaluation",
                       description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, from_config=True)
    p.add_argument("--config", default=None, metavar="FILE",
                   help="JSON config (keys of imaging.ctrl.CtrlConfig; '_'-keys are comments); default "
                        "imaging/configs/ctrl_digits.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (VALUE parsed as JSON, else taken as a string), repeatable; "
                        "e.g. --set steps=20 --set 'dps_strengths=[1, 3]'")
    p.add_argument("--planner", choices=["backprop", "ppo"], default=None,
                   help="override the config's planner: 'backprop' (reward gradient through the last K steps) or "
                        "'ppo' (policy gradient, for a classifier without gradients)")
    p.add_argument("--no-multitask", action="store_true", help="skip the two-label (compressibility x second "
                                                               "measure) experiment")
    p.add_argument("--device", default=None, help="cuda or cpu (default: the config's, else cuda if available)")
    p.add_argument("--seed", type=int, default=None, help="override the config's seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or per-stage lines")
    p.add_argument("--out", default="runs/ctrl", metavar="DIR",
                   help="output folder (resumed from if it holds a run of the same config)")
    p.set_defaults(func=run_ctrl_cmd)


def parse_overrides(items) -> dict:
    import json

    out = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"--set: expected KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def run_ctrl_cmd(args) -> int:
    from .ctrl import CONFIG_DIR, load_config, run

    path = args.config or str(CONFIG_DIR / "ctrl_digits.json")
    over = parse_overrides(args.set)
    if args.model is not None:
        over["model"] = args.model
    if args.planner is not None:
        over["planner"] = args.planner
    if args.no_multitask:
        over["multitask"] = False
    if args.device is not None:
        over["device"] = args.device
    if args.seed is not None:
        over["seed"] = args.seed
    cfg = load_config(path, **over)
    pipe = None
    if args.tiny:
        if args.model is not None:
            raise ValueError("--tiny, --model: give one of them")
        from .tiny import tiny_pipeline

        pipe = tiny_pipeline(seed=cfg.seed)
    res = run(cfg, args.out, pipe=pipe, progress=not args.no_progress)
    for tname, t in res["tasks"].items():
        print(f"[{tname}] thresholds {t['thresholds']} ({t['threshold_source']})")
        for name, m in t["metrics"].items():
            extra = f" ({m['strength']})" if "strength" in m else ""
            print(f"  {name:22s} accuracy {m['accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}{extra}")
    print(f"wrote {args.out}/results.json")
    return 0
