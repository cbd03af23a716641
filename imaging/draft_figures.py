"""Figures of DRaFT on the digits pipeline (``diffsteer figures``), experiments of ``imaging.draft`` with
``DraftImageConfig()`` (full) or ``imaging.draft.QUICK`` on top of it (quick). The LoRA figure reuses the
adapters trained by the comparison of the same process (or trains the comparison first).

- ``draft_image_compare``: reward against reward queries and against training wall time per method, for the
  differentiable compressibility and incompressibility, with the true JPEG size, samples, and the paper's
  claims as numbers (DRaFT-LV against ReFL; gradient methods against DDPO).
- ``draft_image_lora``: one adapter scaled 0 .. 1.5, and two adapters (compressibility, incompressibility)
  summed with weights; samples and rewards per scale.
- ``draft_image_diversity``: diversity of samples against the KL weight and DRaFT+'s eps penalty.
"""
from __future__ import annotations

import math

import numpy as np

from theory.registry import figure, needs

from . import digits_pipeline as _digits_pipeline  # noqa: F401  (registers the prerequisite)

__all__ = ["config", "compare_data", "lora_data", "diversity_data", "draw_compare", "draw_lora", "draw_diversity",
           "verdicts_compare", "verdicts_lora", "verdicts_diversity"]

_COLORS = {"DRaFT": "C0", "DRaFT-1": "C1", "DRaFT-K": "C2", "DRaFT-LV": "C3", "ReFL": "C4", "DDPO": "C7"}
_RUNS: dict = {}

needs(__name__, "digits-pipeline")


def config(quick: bool):
    from .draft import QUICK, DraftImageConfig, load_config

    return load_config(None, **QUICK) if quick else DraftImageConfig()


def _adapter_dir(cfg):
    from .cache import cache_root

    return cache_root() / f"draft-image-{cfg.key()}" / "adapters"


def _context(quick: bool):
    from .draft import build_context

    key = ("ctx", quick)
    if key not in _RUNS:
        _RUNS[key] = build_context(config(quick))
    return _RUNS[key]


def compare_data(quick: bool) -> dict:
    """The method comparison (cached per process)."""
    from .draft import compare

    key = ("compare", quick)
    if key not in _RUNS:
        cfg = config(quick)
        _RUNS[key] = compare(cfg, _context(quick), adapter_dir=_adapter_dir(cfg), progress=True)
    return _RUNS[key]


def lora_data(quick: bool) -> dict:
    from .draft import lora

    key = ("lora", quick)
    if key not in _RUNS:
        c = compare_data(quick)
        _RUNS[key] = lora(config(quick), c.get("adapters_by_seed") or c["adapters"], ctx=_context(quick))
    return _RUNS[key]


def diversity_data(quick: bool) -> dict:
    from .draft import diversity

    key = ("diversity", quick)
    if key not in _RUNS:
        _RUNS[key] = diversity(config(quick), _context(quick), progress=True)
    return _RUNS[key]


# ----------------------------------------------------------------------------- drawing helpers


def _f(v) -> float:
    """A JSON number (non-finite floats are stored as the strings 'inf' / 'nan')."""
    return float(v) if v is not None else math.nan


def _tile(images, ncols: int, pad: int = 2) -> np.ndarray:
    """Grey images (N, H, W) uint8-valued lists -> one padded mosaic in [0, 1] with ``ncols`` columns."""
    a = np.asarray(images, dtype=float) / 255.0
    N, H, W = a.shape
    nrows = max(1, math.ceil(N / ncols))
    out = np.ones((nrows * (H + pad), ncols * (W + pad)))
    for i in range(N):
        r, c = divmod(i, ncols)
        out[r * (H + pad):r * (H + pad) + H, c * (W + pad):c * (W + pad) + W] = a[i]
    return out


def _claim_lines(d: dict) -> list[str]:
    lines = []
    for r, c in d["claims"].items():
        lv = c.get("lv_vs_refl", {})
        for key in ("diff_queries", "diff_wall_time", "true_size_queries", "true_size_wall_time"):
            s = lv.get(key)
            if s is None:
                continue
            ratios = [x.get("short", f"{_f(x['ratio']):.2f}") for x in s["levels"]]
            lines.append(f"{r}: DRaFT-LV vs ReFL, {key.replace('_', ' ')}: speed-up at 25/50/75% of the larger gain "
                         f"{' / '.join(ratios) if ratios else 'n/a (neither gained)'}; final gain ratio "
                         f"{_f(s['gain_ratio']):.2f}" + (f" +- {_f(s['gain_ratio_se']):.2f}"
                                                         if math.isfinite(_f(s.get('gain_ratio_se'))) else ""))
        g = c.get("gradient_vs_ddpo", {})
        parts = []
        for m, v in g.items():
            lv = next((x for x in v["diff_queries"]["levels"] if abs(_f(x["fraction"]) - 0.5) < 1e-9), None)
            parts.append(f"{m} {lv.get('short', '') if lv else 'n/a'}")
        if parts:
            lines.append(f"{r}: speed-up over DDPO per query to half the larger gain (diff. reward): " + ", ".join(parts))
    return lines


def draw_compare(d: dict):
    import matplotlib.pyplot as plt

    rewards = list(d["runs"])
    fig, axes = plt.subplots(len(rewards), 4, figsize=(21, 4.2 * len(rewards) + 2.0), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 1, 1.1]})
    for i, r in enumerate(rewards):
        sign = -1.0 if r == "incompress" else 1.0
        names = list(d["runs"][r])
        for m, runs in d["runs"][r].items():
            col = _COLORS.get(m)
            q = np.array([c["queries"] for c in runs[0]["curve"]], float)
            Y = sign * np.array([[_f(c["compress"]) for c in run["curve"]] for run in runs]) * 1e3
            K = np.array([[_f(c["jpeg_kb"]) for c in run["curve"]] for run in runs])
            W = np.array([[_f(c["wall_time"]) for c in run["curve"]] for run in runs]).mean(0)
            axes[i, 0].plot(q, Y.mean(0), "o-", ms=3, color=col, label=m)
            if Y.shape[0] > 1:
                axes[i, 0].fill_between(q, Y.min(0), Y.max(0), color=col, alpha=0.15, lw=0)
            axes[i, 1].plot(W, Y.mean(0), "o-", ms=3, color=col, label=m)
            axes[i, 2].plot(q, K.mean(0), "o-", ms=3, color=col, label=m)
        lab = "diff. compressibility" if r == "compress" else "diff. incompressibility"
        axes[i, 0].set(xlabel="reward queries", ylabel=f"{lab} (x1e-3, eval)", title=f"trained on {r}: per reward query")
        axes[i, 1].set(xlabel="training wall time (s, 1 thread, shared CPU)", ylabel=f"{lab} (x1e-3)",
                       title="per second of training")
        axes[i, 2].set(xlabel="reward queries", ylabel="true JPEG size (kB, q95, 4x upscale)",
                       title="the true measure (not trained on)")
        axes[i, 0].legend(fontsize=7, ncol=2)
        # samples: pre-trained and each method's final model (first seed), same noise
        rows = [d["pretrained"]["images"]] + [d["runs"][r][m][0]["curve"][-1].get("images", []) for m in names]
        n = len(rows[0])
        mosaic = _tile([im for row in rows for im in (row or [[[255] * 32] * 32] * n)], n)
        axes[i, 3].imshow(mosaic, cmap="gray", vmin=0, vmax=1)
        axes[i, 3].set_yticks([(k + 0.5) * mosaic.shape[0] / len(rows) for k in range(len(rows))],
                              ["pre-trained", *names], fontsize=7)
        axes[i, 3].set_xticks([])
        axes[i, 3].set_title("samples after the budget (seed 0, same noise)", fontsize=9)
    cfg = d["config"]
    lines = _claim_lines(d)
    fig.suptitle(f"DRaFT family on the digits pipeline: {cfg['budget']} reward queries per run, batch "
                 f"{cfg['batch_size']}, {cfg['sample_steps']} DDIM steps (eta {cfg['eta']}; DDPO trains at {cfg['ddpo_eta']}), CFG "
                 f"{cfg['guidance_scale']}, LoRA r{cfg['lora_rank']}, lr {cfg['lr']}, seeds {cfg['seeds']}\n"
                 + "\n".join(lines), fontsize=8)
    H = fig.get_figheight()
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.06, hspace=0.35, wspace=0.3,
                        top=1 - (0.14 * (len(lines) + 2) + 0.3) / H)
    return fig


def draw_lora(d: dict):
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(19, 5))
    gs = fig.add_gridspec(1, 4, width_ratios=[0.9, 1.0, 0.8, 0.8])
    ax = fig.add_subplot(gs[0])
    sc = d["scales"]
    n = len(sc[0]["images"])
    mosaic = _tile([im for s in sc for im in s["images"]], n)
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1)
    ax.set_yticks([(k + 0.5) * mosaic.shape[0] / len(sc) for k in range(len(sc))], [f"s={_f(s['scale']):g}" for s in sc])
    ax.set_xticks([])
    ax.set_title(f"{d['reward_a']} adapter x scale s (same noise)", fontsize=9)
    ax = fig.add_subplot(gs[1])
    s = [_f(r["scale"]) for r in sc]
    paired = "compress_change" in sc[0]  # the change from scale 0 on the same noise (smaller se than the levels)
    ck, jk = ("compress_change", "jpeg_kb_change") if paired else ("compress", "jpeg_kb")
    ax.errorbar(s, [_f(r[ck]) * 1e3 for r in sc], [_f(r[ck + "_se"]) * 1e3 for r in sc], fmt="o-", color="C0",
                capsize=3)
    ax.set_xlabel("LoRA scale s (0 = pre-trained, 1 = fine-tuned)")
    what = "change from s = 0 in " if paired else ""
    ax.set_ylabel(f"{what}diff. compressibility (x1e-3)", color="C0")
    ax2 = ax.twinx()
    ax2.errorbar(s, [_f(r[jk]) for r in sc], [_f(r[jk + "_se"]) for r in sc], fmt="s--", color="C3", capsize=3)
    ax2.set_ylabel(f"{what}true JPEG size (kB)", color="C3")
    ax.set_title(f"rewards per scale (mean +- se over {d.get('se_over', 'samples')})", fontsize=9)
    ws = sorted({_f(m["w_a"]) for m in d["mix"]})
    for j, (key, lab) in enumerate((("compress", "diff. compressibility (x1e-3)"), ("jpeg_kb", "true JPEG size (kB)"))):
        ax = fig.add_subplot(gs[2 + j])
        M = np.full((len(ws), len(ws)), np.nan)
        for m in d["mix"]:
            M[ws.index(_f(m["w_a"])), ws.index(_f(m["w_b"]))] = _f(m[key]) * (1e3 if key == "compress" else 1)
        im = ax.imshow(M, origin="lower", cmap="viridis")
        for a in range(len(ws)):
            for b in range(len(ws)):
                ax.text(b, a, f"{M[a, b]:.3g}", ha="center", va="center", fontsize=7, color="w")
        ax.set_xticks(range(len(ws)), [f"{w:g}" for w in ws])
        ax.set_yticks(range(len(ws)), [f"{w:g}" for w in ws])
        ax.set(xlabel=f"weight of the {d['reward_b']} adapter", ylabel=f"weight of the {d['reward_a']} adapter")
        ax.set_title(f"sum of two adapters: {lab}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"LoRA scaling and mixing of {d['config']['lora_method']} adapters ({d.get('n_adapters', 1)} seed(s)) "
                 "through the diffusers format (stock load_lora_weights + set_adapters)", fontsize=10)
    fig.tight_layout()
    return fig


def draw_diversity(d: dict):
    import matplotlib.pyplot as plt

    runs = d["runs"]
    labels = ["pre-trained"] + [f"lam={_f(r['lam']):g}" if _f(r["eps_penalty"]) == 0 else f"eps-pen={_f(r['eps_penalty']):g}"
                                for r in runs]
    rows = [d["pretrained"], *runs]
    fig = plt.figure(figsize=(17, 4.8))
    gs = fig.add_gridspec(1, 3, width_ratios=[1, 1, 1.1])
    ax = fig.add_subplot(gs[0])
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [_f(r["judge_diversity"]) for r in rows], 0.4, label="judge features (8x8)",
           yerr=[_f(r.get("judge_diversity_se", 0.0)) for r in rows])
    ax.bar(x + 0.2, [_f(r["pixel_diversity"]) * 10 for r in rows], 0.4, label="pixels (x10)",
           yerr=[_f(r.get("pixel_diversity_se", 0.0)) * 10 for r in rows])
    ax.set_xticks(x, labels, rotation=20, fontsize=8)
    ax.set_ylabel("mean pairwise distance within a prompt")
    ax.legend(fontsize=7)
    ax.set_title(f"diversity (mean +- se over {len(d['config']['seeds'])} seed(s))", fontsize=9)
    ax = fig.add_subplot(gs[1])
    for i, r in enumerate(rows):
        ax.errorbar(_f(r["compress"]) * 1e3, _f(r["judge_diversity"]), xerr=_f(r.get("compress_se", 0.0)) * 1e3,
                    yerr=_f(r.get("judge_diversity_se", 0.0)), fmt="o", color=f"C{i}", label=labels[i])
    ax.set(xlabel="diff. compressibility (x1e-3)", ylabel="judge diversity")
    ax.legend(fontsize=7)
    ax.set_title("reward against diversity", fontsize=9)
    ax = fig.add_subplot(gs[2])
    n = len(rows[0]["images"])
    mosaic = _tile([im for r in rows for im in r["images"]], n)
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1)
    ax.set_yticks([(k + 0.5) * mosaic.shape[0] / len(rows) for k in range(len(rows))], labels, fontsize=7)
    ax.set_xticks([])
    ax.set_title("samples (3 per prompt, first prompts)", fontsize=9)
    cfg = d["config"]
    kls = ", ".join(f"{lab}: {_f(r['kl_last']):.3g}" for lab, r in zip(labels[1:], runs) if r.get("kl_last") is not None)
    fig.suptitle(f"{cfg['div_method']} on {cfg['div_reward']}, {cfg['div_budget']} reward queries, eta {cfg['div_eta']}; "
                 f"path KL at the end: {kls}", fontsize=9)
    fig.tight_layout()
    return fig


def verdicts_compare(d: dict) -> list:
    from .draft import verdicts_compare as v

    return v(d)


def verdicts_lora(d: dict) -> list:
    from .draft import verdicts_lora as v

    return v(d)


def verdicts_diversity(d: dict) -> list:
    from .draft import verdicts_diversity as v

    return v(d)


def _strip_compare(d: dict) -> dict:
    out = {k: v for k, v in d.items() if k != "runs"}
    out["runs"] = {r: {m: [{k: v for k, v in run.items() if k != "history"} | {
        "reward_mean": [h["reward_mean"] for h in run["history"]]} for run in runs]
        for m, runs in ms.items()} for r, ms in d["runs"].items()}
    return out


@figure("draft_image_compare", "DRaFT, DRaFT-1, DRaFT-K, DRaFT-LV, ReFL, DDPO on the digits pipeline: differentiable "
                               "JPEG (in)compressibility and true JPEG size vs reward queries and wall time",
        draw=draw_compare, verdicts=verdicts_compare)
def fig_draft_image_compare(quick: bool) -> dict:
    return _strip_compare(compare_data(quick))


@figure("draft_image_lora", "DRaFT LoRA scaling 0..1.5 and the sum of two adapters on the digits pipeline",
        draw=draw_lora, verdicts=verdicts_lora)
def fig_draft_image_lora(quick: bool) -> dict:
    return lora_data(quick)


@figure("draft_image_diversity", "Sample diversity against the KL weight and DRaFT+'s eps penalty on the digits pipeline",
        draw=draw_diversity, verdicts=verdicts_diversity)
def fig_draft_image_diversity(quick: bool) -> dict:
    return diversity_data(quick)
