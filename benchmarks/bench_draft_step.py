"""DRaFT-1 step time against a no-gradient sampling pass, on an image pipeline (docs/theory.md §6, §8).

A DRaFT-K step samples S DDIM steps, the first S - K without gradient, then back-propagates the reward
through the last K. For K = 1 it costs S - 1 no-gradient UNet evaluations, one with gradient and its
backward (about two more), so at best (S + 2) / S sampling passes of S steps: 1.10 at S = 20, 1.04 at
S = 50 (plus the VAE decoder and the reward, forward and backward, which the limit leaves out).

For each setting this prints, side by side, the time of one optimisation step of the engine's loop
(``theory.engine.finetune`` with DRaFT-K(1): sampling, reward through the VAE decoder, backward, AdamW)
and the time of one ``torch.no_grad`` sampling pass of S steps of the same steered model on the same
batch, their ratio, the limit (S + 2) / S and ratio / limit (the target is <= 1.10). Steps and passes
alternate (a pass runs in the loop's callback after each step); the ratio is the median over repeats of
each step's time over the pass right after it (same machine load), the minima of both are printed beside.

    python benchmarks/bench_draft_step.py                 # the tiny pipeline
    python benchmarks/bench_draft_step.py --digits        # the digits pipeline from the cache, if built
    python benchmarks/bench_draft_step.py --model DIR     # any local SD-style pipeline folder

Settings: float32; bfloat16 frozen weights (LoRA float32); float32 with a CTRL label embedding on the
UNet's time embedding (prompt + label conditions).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch


def _digits_dir() -> Path | None:
    cache = Path(os.environ.get("DIFFSTEER_CACHE", "~/.cache/diffsteer")).expanduser()
    for d in sorted(cache.glob("digits-pipeline-*")):
        if d.is_dir() and (d / "model_index.json").is_file():
            return d
    return None


def measure(cfg_kw: dict, S: int, batch: int, repeats: int) -> dict:
    from imaging.finetune import SDFinetuneConfig, build, validate
    from imaging.pipeline import latent_shape
    from theory.engine import PromptLabel, finetune
    from theory.solvers import sample

    cfg = SDFinetuneConfig(method="draftk", k="1", steps=repeats + 1, batch_size=batch, sample_steps=S, eta=0.0,
                           lr=1e-4, ckpt_every=0, progress=False, device="cpu", **cfg_kw)
    strategy, fcfg = validate(cfg)
    from dataclasses import replace

    fcfg = replace(fcfg, out_dir=None, steps=repeats + 1)
    pipe, model, sch, ts, reward = build(cfg)
    shape = latent_shape(pipe)
    P = len(cfg.prompts)

    def cond_of(n, g):
        c = torch.randint(0, P, (n,), generator=g)
        return PromptLabel(c, torch.randint(0, cfg.n_labels, (n,), generator=g)) if cfg.n_labels else c

    def x_T(n, g):
        return torch.randn((n, *shape), generator=g)

    # one run of the engine's loop; between its steps (in the callback) one no-gradient sampling pass, so
    # steps and passes alternate under the same machine load; the pass's own time is not counted in a step
    step_times, pass_times = [], []
    g = torch.Generator().manual_seed(0)
    mark = [time.perf_counter()]

    def between(step, row):
        t1 = time.perf_counter()
        with torch.no_grad():
            sample(model, sch, x_T(batch, g), ts, method="ddim", eta=0.0, cond=cond_of(batch, g))
        t2 = time.perf_counter()
        if step > 1:  # the first step and pass are warm-ups
            step_times.append(t1 - mark[0])
            pass_times.append(t2 - t1)
        mark[0] = time.perf_counter()

    mark[0] = time.perf_counter()
    finetune(model, sch, reward, strategy, fcfg, x_T_sampler=x_T, cond_sampler=cond_of, ts=ts, callback=between)
    step, sp = min(step_times), min(pass_times)
    # each step is paired with the pass right after it (same machine load); the median of the pairs' ratios
    # is the figure, the ratio of the minima beside it
    ratio = statistics.median(a / b for a, b in zip(step_times, pass_times))
    return {"step_s": step, "pass_s": sp, "ratio": ratio, "ratio_min": step / sp, "limit": (S + 2) / S,
            "of_limit": ratio / ((S + 2) / S)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="a local SD-style pipeline folder")
    src.add_argument("--digits", action="store_true", help="the digits pipeline from DIFFSTEER_CACHE")
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 50], help="sampler steps S")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--guidance-scale", type=float, default=3.0)
    ap.add_argument("--prompt", nargs="+", default=None,
                    help="prompts (default: two digit captions for --digits, else 'a photo of a cat', 'a red dog')")
    ap.add_argument("--settings", nargs="+", default=["fp32", "bf16", "fp32+labels"],
                    choices=["fp32", "bf16", "fp32+labels"])
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.digits:
        d = _digits_dir()
        if d is None:
            raise SystemExit("--digits: no digits-pipeline-* folder with a model_index.json in DIFFSTEER_CACHE; "
                             "build it with `diffsteer digits-pipeline`")
        src, name = {"model": str(d)}, f"digits ({d.name})"
    elif args.model:
        src, name = {"model": args.model}, args.model
    else:
        src, name = {"tiny": True}, "tiny"
    prompts = tuple(args.prompt or (("a handwritten digit 3", "a handwritten digit 7") if args.digits
                                    else ("a photo of a cat", "a red dog")))
    settings = {"fp32": {}, "bf16": {"dtype": "bfloat16"}, "fp32+labels": {"n_labels": 4}}
    print(f"pipeline: {name}; prompts {list(prompts)}; batch {args.batch}; CFG {args.guidance_scale}; min of {args.repeats} repeats; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'setting':<12} {'S':>3} {'step s':>9} {'pass s':>9} {'ratio':>7} {'min/min':>7} {'limit':>6} "
          f"{'ratio/limit':>11}")
    for s in args.settings:
        for S in args.steps:
            r = measure(dict(src, prompts=prompts, guidance_scale=args.guidance_scale,
                             **settings[s]), S, args.batch, args.repeats)
            print(f"{s:<12} {S:>3} {r['step_s']:>9.3f} {r['pass_s']:>9.3f} {r['ratio']:>7.3f} {r['ratio_min']:>7.3f} "
                  f"{r['limit']:>6.3f} {r['of_limit']:>11.3f}", flush=True)


if __name__ == "__main__":
    main()
