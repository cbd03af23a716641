"""Render ``docs/results.md`` from ``paper_figs/*.json``, so the measured numbers cannot go stale.

Usage (from the repository root, standard library only):

    python tools/make_results.py            # (re)write docs/results.md and README's verdict table
    python -m tools.make_results --check    # exit 1 if either differs from what the JSONs give
    python tools/make_results.py --summary  # print README's agree / not resolved / disagree counts
    python tools/make_results.py --compare RUN_DIR  # a figures run of yours (--out RUN_DIR) against the
                                                    # committed verdicts at the same settings; exit 1 if any differ

Every figure's JSON (written by ``diffsteer figures``) holds ``figure``, ``description``, ``quick``,
``wall_time_s`` and ``data``; newer ones may also hold ``settings``/``config``, ``verdicts`` and
``threads``. Per figure the page shows its description, settings, the key numbers and its verdicts (a
table claim | verdict | numbers | regime | budget from the JSON's top-level ``verdicts``).

README.md's table of verdicts, between the markers ``<!-- verdicts:begin -->`` and ``<!-- verdicts:end -->``,
has one row per verdict of every figure in ``paper_figs/``, and a column saying whether the run at the
default (reduced) settings, ``paper_figs/default/<figure>.json``, reaches the same leading verdict word
("holds", "does not hold", "holds only when", "not resolved") for the same claim. README's table of run
times, between ``<!-- times:begin -->`` and ``<!-- times:end -->``, lists each figure's recorded wall time in the default
run and in the full run (the ``wall_time_s`` of both JSONs) and their sums; between ``<!-- agreement:begin -->``
and ``<!-- agreement:end -->`` it gets the sentence counting how many default verdicts agree, are not resolved at
the default budget, or disagree (``agreement_summary``).
Known figures have a renderer below that picks their key numbers into tables; any other figure gets a
generic listing of the scalars in its data. The short notes in ``NOTES`` explain how to read a figure;
they hold no measured numbers (those come from the JSONs only).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
FIG_DIR = ROOT / "paper_figs"
OUT = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
DEFAULT_DIR = "default"  # the default-settings run's JSONs, inside the figures folder
BEGIN, END = "<!-- verdicts:begin -->", "<!-- verdicts:end -->"
TIMES_BEGIN, TIMES_END = "<!-- times:begin -->", "<!-- times:end -->"
AGREE_BEGIN, AGREE_END = "<!-- agreement:begin -->", "<!-- agreement:end -->"
#: README's verdict rows are grouped by paper, in this order (by the claim's start), then in page order
PAPERS = ("Theory", "Gradient guidance", "CTRL", "DRaFT")
#: the words a verdict starts with (theory.registry.VERDICT_WORDS; longest first)
VERDICT_WORDS = ("holds only when", "does not hold", "not resolved", "holds")
VERDICT_KEYS = ("claim", "verdict", "numbers", "regime", "budget")
NUMBERS_SHOWN = 120  # characters of a verdict's numbers in README's table (docs/results.md has them all)
SETTINGS_SHOWN = 40  # settings listed per figure (the JSON holds them all)

#: (name prefix, section title), in page order; figures matching no prefix go last.
SECTIONS = [
    ("theory_", "Theory: exact steering of a 2-D mixture"),
    ("gg_image_", "Gradient guidance at image scale (digits pipeline)"),
    ("gg_", "Gradient guidance (Guo et al.)"),
    ("ctrl_toy_", "CTRL at toy scale"),
    ("ctrl_digits", "CTRL at image scale (digits pipeline)"),
    ("digits_", "CTRL on 8x8 pixels"),
    ("draft_toy_", "DRaFT at toy scale"),
    ("draft_image_", "DRaFT at image scale (digits pipeline)"),
    ("claims_", "The papers' claims in their own regimes"),
]

#: How to read a figure (no numbers here: every number on the page comes from the JSONs).
NOTES = {
    "theory_tilting": (
        "Everything is exact: the mixture's eps, the noisy classifier and the tilted targets. KL is the "
        "histogram KL of the samples to the binned exact target; its floor is that of as many exact-target "
        "samples. Scaled classifier guidance is shown as a contrast: scaling the classifier's gradient is "
        "not the gamma-tilt (docs/theory.md §6.1-6.3), which is why CTRL learns the tilt. The bias rows "
        "start the optimal drift from the untilted p_T (docs/theory.md §4, (4.10)-(4.11)); the error should "
        "fall like alpha(T)^2."),
    "gg_roff": (
        "G drives samples off the data's subspace; G_loss keeps them near the pre-trained model's r_off "
        "(docs/theory.md §7). With a learned score G_loss is not exactly subspace-preserving, so its r_off "
        "may grow a little."),
    "gg_objective": (
        "Algorithm 1 plateaus at a regularised optimum below the global maximum when the maximiser lies off "
        "the data; Algorithm 2 fine-tunes the score and can approach the maximum. Quick settings run a tenth "
        "of the paper's rounds, too few for Algorithm 2 to separate from Algorithm 1."),
    "gg_convergence": (
        "With the exact score the samples stay in span(A) up to round-off, so f2 cannot exceed its best "
        "value on the subspace (docs/theory.md (7.7)): the 'max excess over best on span' must be negative."),
    "gg_sphere": (
        "The paper claims G_loss's (reward, ||x| - 1|) front dominates G's. The sphere is not a linear "
        "subspace, so the subspace theorem does not cover it, and the learned sphere score is rough."),
    "gg_distributions": "Norms of the samples' parts on and off span(A), and along theta's two parts, before and after.",
    "gg_runtime": (
        "A G_loss round costs one extra vector-Jacobian product per step over an unguided pass; ratios are "
        "measured side by side in one run."),
    "ctrl_toy_density": "Per label, the histogram KL of each method's samples to the exact target p(y|x)^gamma p(x).",
    "ctrl_toy_table": (
        "Metrics under the true p(y|x): prediction = argmax of the true p(y|x); KL = histogram KL to the "
        "binned exact target (floor: exact-target samples). DPS is reported at its best-KL strength; a "
        "larger strength buys accuracy by overshooting the target."),
    "ctrl_toy_efficiency": (
        "CTRL against classifier-free guidance as the offline set grows; temperatures are fitted on a "
        "quarter of each set, so the smallest sets calibrate on a handful of pairs and get a too-sharp or "
        "too-soft reward. Where CTRL's KL stops falling as the set grows, its gap is optimisation, not data. "
        "The toy's CFG baseline is easy (a 2-D conditional model learns from few pairs), the opposite of "
        "the paper's high-dimensional regime."),
    "ctrl_toy_gamma": (
        "CTRL trained at one gamma and rescaled at inference by classifier-free mixing with w = gamma "
        "(CTRL appendix B, docs/theory.md (6.3)), against CFG with the same w and the exact target."),
    "ctrl_toy_two_labels": (
        "One augmented model with two conditionally independent labels, reward log p1 + log p2 "
        "(docs/theory.md (6.5)), against the sum of two classifier-guidance fields."),
    "draft_toy_compare": (
        "Ratios compare how fast two methods reach 25/50/75% of the slower method's final gain, from the "
        "mean curves (> 1: the first-named method is faster). Per reward query, per optimiser update and "
        "per second tell different stories: with AdamW the adapter moves by about lr per update whatever "
        "the gradient's quality, so on this small problem progress counts updates. Wall-clock curves share the "
        "CPU with other jobs; compare them with care."),
    "draft_toy_grad_k": "Norm of the DRaFT-K gradient and its angle to the DRaFT-1 gradient, at a random LoRA.",
    "draft_toy_lora": (
        "Scale 0 is the pre-trained model exactly; the adapters A and B were trained on the two rewards and "
        "summed with their scales (DRaFT's LoRA mixing, docs/theory.md (8.7)); 'first'/'last' apply the "
        "adapter on the first or last m sampler steps only."),
    "draft_toy_diversity": (
        "DRaFT-1 with a KL term barely moves: truncated to the last step, the KL's gradient pins the model "
        "while the tilt has to be built over the chain. The exact optimum is the tilted ring law; its "
        "objective lam log Z bounds every run (docs/theory.md §4)."),
    "ctrl_digits": (
        "Four classes of the true JPEG size (docs/theory.md (8.2)): the quartiles of the pre-trained pipeline's "
        "own sizes, measured after upscaling the 32 px images. Accuracy and macro-F1 are those of the true size "
        "of each method's samples against the class asked for (chance: one in four); 'mean_kb' lists the mean "
        "size per class asked for. The size is a narrow measure on this pipeline, so the classes are close."),
    "ctrl_digits_multitask": (
        "Two labels at once from two classifiers (JPEG size above or below the median, ink mass above or "
        "below the median): four compositional classes, reward log p1 + log p2 (docs/theory.md (6.5))."),
    "gg_image_alg1": (
        "Algorithm 1 on the latents of the digits pipeline (docs/theory.md §8): the reward is standardised by "
        "the pre-trained samples, G and G_loss start every round from the same per-chain noise, so their "
        "differences are paired; the off-subspace share is (8.8)."),
    "gg_image_jpeg": (
        "As gg_image_alg1, toward the differentiable JPEG compressibility (docs/theory.md (8.3)), with the "
        "true JPEG size of the samples beside it."),
    "gg_image_alg2": (
        "Algorithm 2 (score fine-tuning each round) with fresh noise per round, so its G - G_loss differences "
        "are not paired and their standard errors are larger."),
    "draft_image_compare": (
        "Every method gets the same budget of reward queries; DRaFT-LV spends n queries per sample, so it "
        "takes fewer optimisation steps. The true JPEG size is measured on the samples but never trained on."),
    "digits_ctrl": (
        "The judge is a classifier neither model saw. CTRL's paper form adds the label embedding to the eps "
        "output, where it cannot depend on x or t; added to the time features instead it passes through "
        "the network (docs/theory.md (6.10))."),
}

TRAILER = """\
## Numbers that are not figures

Some measured numbers are not drawn in a figure; they are printed by the scripts that measure them, so
run those to see them on your machine:

- weak orders of the solvers and the DDPM log factor: asserted by `tests/theory/test_solvers.py`;
- HJB residuals of the closed-form values: asserted by `tests/theory/test_values.py`;
- memory kept for the backward pass and time per gradient of each DRaFT estimator:
  `python benchmarks/bench_memory.py`;
- pass times of unguided sampling, G and G_loss: `python benchmarks/bench_guidance.py`;
- the DRaFT step against no-grad sampling passes: `python benchmarks/bench_draft_step.py`.
"""


# ------------------------------------------------------------------------------------------ formatting


def fmt(v) -> str:
    """A number with 4 significant digits (ints and strings as they are)."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v == 0:
            return "0"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(fmt(x) for x in v) + ")"
    return str(v).replace("|", "\\|").replace("\n", " ")


def cell(c) -> str:
    """A table cell: numbers through ``fmt``, a literal '|' escaped so that it does not split the row."""
    s = c if isinstance(c, str) else fmt(c)
    return s.replace("\\|", "|").replace("|", "\\|").replace("\n", " ")


def table(headers, rows) -> list[str]:
    out = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        out.append("| " + " | ".join(cell(c) for c in r) + " |")
    return out + [""]


def flat(d, prefix="", max_list=8):
    """(dotted key, value) of every scalar or short list of scalars in a nested dict."""
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict):
                out += flat(v, key, max_list)
            elif isinstance(v, list):
                if len(v) <= max_list and all(not isinstance(x, (dict, list)) for x in v):
                    out.append((key, v))
            else:
                out.append((key, v))
    return out


def last(seq):
    return seq[-1] if isinstance(seq, list) and seq else None


def first(seq):
    return seq[0] if isinstance(seq, list) and seq else None


# ------------------------------------------------------------------------------------------ renderers
# Each takes the JSON's "data" and returns markdown lines; a KeyError/TypeError/IndexError falls back to
# the generic listing (so a changed JSON never breaks the page, it only renders more plainly).


def r_theory_tilting(d):
    lines = [f"alpha(T) = {fmt(d['alpha_T'])}.", ""]
    rows = [["pre-trained", d["pretrained"]["kl"], d["pretrained"]["kl_floor"], d["pretrained"]["label_mass"], "-"]]
    for g, v in d["tilted"].items():
        rows.append([f"gamma = {g}: h-transform ({v.get('h', '')})", v["kl"], v["kl_floor"], v["label_mass"],
                     v["target_label_mass"]])
        if "scaled_cg" in v:
            rows.append([f"gamma = {g}: scaled classifier guidance", v["scaled_cg"]["kl"], v["kl_floor"],
                         v["scaled_cg"]["label_mass"], v["target_label_mass"]])
    lines += table(["samples", "KL to target", "KL floor", "P(y = label)", "target P(y = label)"], rows)
    lines += ["Terminal bias of the optimal drift, mixture, gamma = 1 (mean error and its standard error):", ""]
    lines += table(["T", "alpha(T)", "from untilted p_T", "s.e.", "from tilted p*_T", "s.e."],
                   [[b["T"], b["alpha_T"], b["untilted_mean_err"], b["untilted_se"], b["tilted_mean_err"],
                     b["tilted_se"]] for b in d["bias_mixture"]])
    g = d["bias_gaussian"]
    lines += ["Gaussian data, linear reward: Monte Carlo mean error against the closed form (4.11):", ""]
    lines += table(["T", "alpha(T)", "Monte Carlo", "closed form", "difference in s.e."],
                   [[m["T"], m["alpha_T"], m["mean_err"], m["closed_form_mean_err"], m["mc_vs_closed_form_in_se"]]
                    for m in g["monte_carlo"]])
    lines += [f"Log-log slope of the closed-form mean error against alpha(T): "
              f"{fmt(g['loglog_slope_mean_err_vs_alpha'])}.", ""]
    return lines


def _runs(d, key):
    return {k: v for k, v in d.items() if isinstance(v, dict) and key in v}


def r_gg_roff(d):
    rows = []
    for name, v in _runs(d, "roff_mean").items():
        m = v["roff_mean"]
        rows.append([name, v.get("delta"), v.get("rounds"), first(m["mean"]), last(m["mean"]),
                     fmt(m.get("final_per_seed")), fmt(v.get("roff_top4"))])
    lines = [f"Pre-trained model's r_off: {fmt(d.get('pretrained_roff'))}.", ""]
    return lines + table(["run", "delta", "rounds", "r_off, round 0", "r_off, final", "final per seed",
                          "final top-4 per seed"], rows)


def r_gg_objective(d):
    rows = []
    for name, v in _runs(d, "f_mean").items():
        m = v["f_mean"]
        rows.append([name, first(m["mean"]), last(m["mean"]), fmt(m.get("final_per_seed")), fmt(v.get("f_top4"))])
    lines = table(["run", "f1 mean, round 0", "f1 mean, final", "final per seed", "final top-4 per seed"], rows)
    return lines + [f"Global maximum {fmt(d.get('global_max'))}; best value on span(A) within the data's radius "
                    f"{fmt(d.get('best_on_span_data_radius'))}; |theta_par| = {fmt(d.get('theta_par_norm'))}.", ""]


def r_gg_convergence(d):
    rows = []
    for name, v in _runs(d, "f_mean").items():
        fm, fx, ro = v["f_mean"], v["f_max"], v["roff_mean"]
        b = v.get("bounds", {})
        rows.append([name, v.get("delta"), first(fm["mean"]), last(fm["mean"]), last(fx["mean"]),
                     b.get("best_on_span"), first(ro["mean"]), last(ro["mean"]),
                     v.get("max_excess_over_best_on_span"), v.get("max_roff_any_round")])
    return table(["run", "delta", "f mean, round 0", "f mean, final", "best sample, final", "best on span(A)",
                  "r_off, round 0", "r_off, final", "max excess over best on span", "max r_off, any round"], rows)


def r_gg_sphere(d):
    rows = []
    for i, delta in enumerate(d["deltas"]):
        rows.append([delta] + [f"{fmt(d['final'][k]['reward'][i])} / {fmt(d['final'][k]['dev_abs'][i])}"
                               for k in d["final"]])
    p = d["pretrained"]
    lines = [f"Final reward / mean ||x| - 1| per delta; pre-trained: {fmt(p['reward'])} / {fmt(p['dev_abs'])}.", ""]
    return lines + table(["delta"] + list(d["final"]), rows)


def r_gg_distributions(d):
    rows = []
    for name, v in d.items():
        if not isinstance(v, dict) or "perp_norm_mean" not in v:
            continue
        ks = list(v["perp_norm_mean"])
        k0, k1 = ks[0], ks[-1]
        rows.append([name, f"{k0} -> {k1}"] + [f"{fmt(v[q][k0])} -> {fmt(v[q][k1])}" for q in
                    ("par_norm_mean", "perp_norm_mean", "along_theta_par_mean", "along_theta_perp_mean")])
    return table(["run", "rounds", "|x_par|", "|x_perp|", "along theta_par", "along theta_perp"], rows)


def r_gg_runtime(d):
    rows = [[k, v["rounds_to_converge"], v["time_per_round_s"], v["unguided_pass_s"], v["ratio_round_unguided"],
             v["total_s"], v["ratio_total_unguided"]] for k, v in d.items() if isinstance(v, dict)
            and "rounds_to_converge" in v]
    lines = table(["objective", "rounds to converge", "s / round", "s / unguided pass", "round / pass", "total s",
                   "total / pass"], rows)
    if "pass_times_s" in d:
        lines += ["One pass (seconds and ratios):", ""]
        lines += table(list(d["pass_times_s"]), [list(d["pass_times_s"].values())])
    return lines


def r_ctrl_toy_density(d):
    rows = []
    for k, v in d["numbers"].items():
        label, method, _ = k.split("/")
        rows.append([label, method, v])
    return table(["label", "method", "KL to the exact target"], rows)


def r_ctrl_toy_table(d):
    rows = []
    for label, res in d["results"].items():
        for method, m in res["methods"].items():
            if m.get("accuracy") is None:
                continue
            rows.append([label, method, m.get("accuracy"), m.get("macro_f1"), m.get("log_lik"), m.get("kl")])
    lines = table(["label", "method", "accuracy", "macro-F1", "E log p(y|x)", "KL"], rows)
    ece_rows = [[label, res["ece"].get("temperature"), res["ece"].get("test_nll_before"), res["ece"].get("test_nll_after"),
                 res["ece"].get("test_before"), res["ece"].get("test_after")]
                for label, res in d["results"].items() if "ece" in res]
    if ece_rows:
        lines += ["Temperature scaling (fresh pairs):", ""]
        lines += table(["label", "T", "NLL before", "NLL after", "ECE before", "ECE after"], ece_rows)
    return lines


def r_claims_ctrl_convergence(d):
    """CTRL's learning curve and sweeps against DPS / classifier guidance (mean +- se over seeds)."""
    s = d["summary"]

    def pm(x):
        return f"{fmt(x['mean'])} +- {fmt(x['se'])}" if isinstance(x, dict) else "-"

    rows = []
    for name in ("CTRL default budget", "CTRL equal queries", "CTRL end of curve"):
        r = s.get(name)
        if r:
            rows.append([name, r["step"], r["queries"]["mean"], r["train_wall_s"]["mean"], pm(r["kl"]),
                         pm(r["accuracy"]), pm(r["d_kl_vs_dps"]), pm(r.get("objective_gap"))])
    for name, r in s.get("sweep end", {}).items():
        rows.append([f"sweep end: {name}", r["step"], r["queries"]["mean"], r["train_wall_s"]["mean"], pm(r["kl"]),
                     pm(r["accuracy"]), pm(r["d_kl_vs_dps"]), pm(r.get("objective_gap"))])
    for name in ("DPS", "classifier guidance", "CTRL optimum (this classifier)", "exact floor"):
        r = s[name]
        rows.append([name + (f" ({r['zeta']})" if "zeta" in r else ""), "-", r.get("queries"),
                     r["wall_s"]["mean"] if "wall_s" in r else None, pm(r["kl"]), pm(r["accuracy"]), "-", "-"])
    return table(["run", "steps", "reward queries", "wall (s)", "KL to target", "accuracy", "KL - DPS",
                  "objective gap J* - J"], rows)


def r_claims_ctrl_scalar(d):
    """Per setting and offline size N: CTRL (trained), CTRL's optimum with its classifier, CFG (mean +- se)."""
    def pm(x):
        return f"{fmt(x[0])} +- {fmt(x[1])}"

    lines = []
    for name, by_n in d["summary"].items():
        lines += [f"*{name}*: {d['descriptions'][name]}; exact-sample floor KL {fmt(d['floors'][name]['kl'])}, "
                  f"accuracy {fmt(d['floors'][name]['accuracy'])}.", ""]
        rows = [[n, pm(e["ctrl"]["kl"]), pm(e["cfg"]["kl"]), pm(e["cfg_minus_ctrl_kl"]), pm(e["ctrl_optimum"]["kl"]),
                 pm(e["ctrl"]["accuracy"]), pm(e["cfg"]["accuracy"]), pm(e["clf_accuracy"])] for n, e in by_n.items()]
        lines += table(["N", "CTRL KL", "CFG KL", "CFG - CTRL", "CTRL optimum KL", "CTRL accuracy", "CFG accuracy",
                        "classifier accuracy"], rows)
    return lines


def r_ctrl_toy_efficiency(d):
    s = d["summary"]
    rows = [[n, s["ctrl_kl_mean"][i], f"{fmt(s['ctrl_kl_min'][i])} .. {fmt(s['ctrl_kl_max'][i])}", s["cfg_kl_mean"][i],
             f"{fmt(s['cfg_kl_min'][i])} .. {fmt(s['cfg_kl_max'][i])}", s["ctrl_acc_mean"][i], s["cfg_acc_mean"][i]]
            for i, n in enumerate(d["sizes"])]
    lines = [f"KL floor (exact-target samples): {fmt(d.get('kl_floor'))}; mean and range over seeds.", ""]
    lines += table(["offline pairs", "KL CTRL", "range", "KL CFG", "range", "accuracy CTRL", "accuracy CFG"], rows)
    temps = {}
    for r in d.get("rows", []):
        temps.setdefault(r["size"], []).append(r.get("ece", {}).get("temperature"))
    if temps:
        lines += ["Fitted temperatures per size (one per seed): " +
                  "; ".join(f"{n}: {fmt(t)}" for n, t in temps.items()) + ".", ""]
    return lines


def r_ctrl_toy_gamma(d):
    rows = [[r["gamma"], r["w"], r["ctrl_kl"], r["cfg_kl"], r["floor_kl"], r["ctrl_loglik"], r["cfg_loglik"],
             r["floor_loglik"]] for r in d["rows"]]
    return [f"Trained at gamma = {fmt(d.get('gamma_train'))}.", ""] + table(
        ["gamma", "w", "KL CTRL", "KL CFG", "KL floor", "E log p CTRL", "E log p CFG", "E log p exact"], rows)


def r_ctrl_toy_two_labels(d):
    methods = list(d["mean_kl"])
    rows = [[m, d["mean_kl"][m], d.get("mean_joint_accuracy", {}).get(m)] for m in methods]
    return table(["method", "mean KL", "mean joint accuracy"], rows)


def r_digits_ctrl(d):
    rows = [[k, v.get("judge_accuracy"), v.get("nn_distance_mean")] for k, v in d["metrics"].items()]
    lines = table(["samples", "accuracy under the independent judge", "distance to the nearest training digit"], rows)
    c = d.get("classifier", {})
    if c:
        lines += [f"Temperature scaling: T = {fmt(c.get('temperature'))}, held-out ECE {fmt(c.get('ece_before'))} -> "
                  f"{fmt(c.get('ece_after'))}; the judge scores {fmt(c.get('judge_split_accuracy'))} on its own split.", ""]
    return lines


def _claim_rows(group):
    rows = []
    for name, c in group.items():
        if isinstance(c, dict) and "levels" not in c:
            rows += _claim_rows(c)  # grouped by axis
            continue
        if not isinstance(c, dict):
            continue
        lv = c["levels"]
        mid = next((x for x in lv if x.get("fraction") == 0.5), None)
        seeds = mid.get("per_seed") if mid else None
        rows.append([f"{c.get('fast', name)} vs {c.get('slow', '')}", c.get("axis"), c.get("key")]
                    + [x.get("ratio") for x in lv]
                    + [f"{fmt(min(seeds))} .. {fmt(max(seeds))}" if seeds else "-"])
    return rows


def r_draft_toy_compare(d):
    lines = []
    for key in ("summary_reward_a", "summary_threshold"):
        s = d.get(key)
        if not s:
            continue
        lines += [f"Reward `{s['key']}`: pre-trained {fmt(s['pretrained'])}, half level {fmt(s['half_level'])}.", ""]
        lines += table(["method", "final mean", "final std", "queries to half the best gain", "wall s / run", "queries"],
                       [[m, v.get("final_mean"), v.get("final_std"), v.get("queries_to_half_best_gain"),
                         v.get("wall_time_s"), v.get("queries")] for m, v in s["methods"].items()])
    for name, group in d.get("claims", {}).items():
        rows = _claim_rows(group)
        if rows:
            lines += [f"Speed ratios, `{name}` (at 25 / 50 / 75 % of the gain; per-seed range at 50 %):", ""]
            lines += table(["comparison", "axis", "reward", "25 %", "50 %", "75 %", "per seed, 50 %"], rows)
    return lines


def r_draft_toy_grad_k(d):
    return table(["K", "gradient norm (mean over seeds)", "angle to DRaFT-1, deg"],
                 [[k, n, a] for k, n, a in zip(d["ks"], d["grad_norm_mean"], d["angle_mean"])])


def r_draft_toy_lora(d):
    lines = ["LoRA scale sweep:", ""]
    lines += table(["scale", "r_A", "r_B", "path KL"],
                   [[r["scale"], r["reward_a"], r["reward_b"], r.get("kl")] for r in d["scale"]])
    lines += ["Adapters combined:", ""]
    lines += table(["model", "r_A", "r_B", "r_A + r_B", "spread", "modes"],
                   [[k, v["reward_a"], v["reward_b"], v.get("reward_a+b"), v.get("spread"), v.get("modes_covered")]
                    for k, v in d["combine"].items()])
    w = d.get("window", {})
    if w:
        lines += ["Adapter on part of the chain only (r_A):", ""]
        lines += table(["m"] + list(w), [[w[list(w)[0]][i]["m"]] + [w[k][i]["reward_a"] for k in w]
                                         for i in range(len(w[list(w)[0]]))])
    return lines


def r_draft_toy_diversity(d):
    rows = []
    for name, run in d["runs"].items():
        f = run["curve"][-1]
        rows.append([name, f.get("queries"), f.get("reward_a"), f.get("spread"), f.get("modes_covered"), f.get("kl")])
    for o in {o["lam"]: o for o in d.get("optimum", {}).values()}.values():  # one row per lam
        rows.append([f"exact optimum, lam = {fmt(o['lam'])}", "-", o["reward"], o["spread"], o["modes_2pct"], o["kl"]])
    lines = table(["run", "queries", "r_A", "spread sqrt(tr Cov)", "modes", "path KL"], rows)
    lines += ["Objective r - lam KL of the exact optimum = lam log Z: " + "; ".join(
        f"lam = {fmt(o['lam'])}: {fmt(o['objective'])}" for o in
        {o["lam"]: o for o in d.get("optimum", {}).values()}.values()) + ".", ""]
    return lines


def r_draft_image_compare(d):
    lines = table(["method", "optimisation steps", "reward queries per step", "queries"],
                  [[m, v.get("steps"), v.get("queries_per_step"), v.get("queries")] for m, v in d["budget_steps"].items()])
    for task, c in d["claims"].items():
        lines += [f"Trained on `{task}` (the differentiable JPEG reward; the true JPEG size in kB is never "
                  "trained on), start -> final mean over seeds:", ""]
        lines += table(["method", "differentiable reward", "true JPEG size in kB, signed as the task (- for compress)"],
                       [[m, f"{fmt(f['diff']['start'])} -> {fmt(f['diff']['final'])}",
                         f"{fmt(f['true_size']['start'])} -> {fmt(f['true_size']['final'])}"]
                        for m, f in c["finals"].items()])
        rows = [["DRaFT-LV vs ReFL", k, v.get("gain_ratio")] for k, v in c.get("lv_vs_refl", {}).items()
                if k.endswith("queries")]
        rows += [[f"{m} vs DDPO", k, v.get("gain_ratio")] for m, g in c.get("gradient_vs_ddpo", {}).items()
                 for k, v in g.items() if k.endswith("queries")]
        if rows:
            lines += ["Ratio of the gains at the end of the equal query budget (first-named over second):", ""]
            lines += table(["comparison", "measure", "gain ratio"], rows)
    return lines


RENDERERS = {name[2:]: fn for name, fn in globals().items() if name.startswith("r_") and callable(fn)}


def _scalar(v) -> bool:
    return not isinstance(v, (dict, list)) or (isinstance(v, list) and len(v) <= 8
                                               and all(not isinstance(x, (dict, list)) for x in v))


def _records(v) -> list | None:
    """(row name, {column: scalar}) when ``v`` is a table: a dict of >= 2 dicts or a list of >= 2 dicts whose
    scalar entries share at least one key; else None."""
    items = list(v.items()) if isinstance(v, dict) else list(enumerate(v)) if isinstance(v, list) else []
    if len(items) < 2 or not all(isinstance(r, dict) for _, r in items):
        return None
    rows = [(k, {c: x for c, x in r.items() if _scalar(x)}) for k, r in items]
    if not rows[0][1] or not set.intersection(*(set(r) for _, r in rows)):
        return None
    return rows


def _generic_tables(d, prefix: str, out: list, used: set, max_rows: int = 30, max_cols: int = 10) -> None:
    if not isinstance(d, dict):
        return
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if key.startswith(("config", "settings", "verdict")):
            continue
        rows = _records(v)
        if rows is not None:
            cols = []
            for _, r in rows:
                cols += [c for c in r if c not in cols]
            cols = cols[:max_cols]
            out += [f"`{key}`:", ""]
            def short(v):  # long messages (e.g. why a run diverged) stay in the JSON
                return v if not isinstance(v, str) or len(v) <= 60 else v[:57] + "..."

            out += table([""] + cols, [[str(name)] + [short(r.get(c)) for c in cols] for name, r in rows[:max_rows]])
            if len(rows) > max_rows:
                out += [f"... and {len(rows) - max_rows} more rows in the JSON.", ""]
            used.add(key)
        elif isinstance(v, dict):
            _generic_tables(v, key, out, used, max_rows, max_cols)


def generic(d, limit: int = 40) -> list[str]:
    """A figure without a renderer: its tables (dicts or lists of records), then its other scalars."""
    lines: list = []
    used: set = set()
    _generic_tables(d, "", lines, used)
    items = [(k, v) for k, v in flat(d) if not k.startswith(("config", "settings", "verdict"))
             and not any(k == u or k.startswith(u + ".") for u in used)
             and not (isinstance(v, str) and v.startswith("/"))]  # a machine's own paths say nothing
    if items:
        more = len(items) - limit
        lines += table(["quantity", "value"], [[f"`{k}`", v] for k, v in items[:limit]])
        if more > 0:
            lines += [f"... and {more} more in the JSON.", ""]
    return lines or ["(no scalar numbers in this figure's data)", ""]


# ------------------------------------------------------------------------------------------ page


def _settings(doc) -> dict:
    for holder in (doc, doc.get("data", {})):
        for key in ("settings", "config"):
            if isinstance(holder.get(key), dict):
                return holder[key]
    return {}


def _verdicts(doc) -> list[str]:
    """The figure's verdicts: a table when the JSON's top-level ``verdicts`` is the registry's list of verdict
    dicts, else a bullet list of whatever verdicts the JSON or its data holds (older JSONs)."""
    if _verdict_list(doc):
        return table(["claim", "verdict", "numbers", "regime", "budget"],
                     [[v[k] for k in VERDICT_KEYS] for v in _verdict_list(doc)])[:-1]
    v = doc.get("verdicts", doc.get("data", {}).get("verdicts"))
    if v is None:
        v = doc.get("verdict", doc.get("data", {}).get("verdict"))
    if v is None:
        return []
    out = []
    if isinstance(v, dict):
        for k, x in v.items():
            if isinstance(x, dict):
                head = x.get("verdict", "")
                rest = "; ".join(f"{kk}: {fmt(vv)}" for kk, vv in x.items() if kk != "verdict"
                                 and not isinstance(vv, dict) and (not isinstance(vv, list) or len(vv) <= 8))
                out.append(f"- **{k}**: {fmt(head)}" + (f" ({rest})" if rest else ""))
            else:
                out.append(f"- **{k}**: {fmt(x)}")
    elif isinstance(v, list):
        out += [f"- {fmt(x) if not isinstance(x, dict) else '; '.join(f'{a}: {fmt(b)}' for a, b in x.items())}" for x in v]
    else:
        out.append(f"- {fmt(v)}")
    return out


def _verdict_list(doc) -> list[dict]:
    """The JSON's top-level verdicts when they are the registry's list of verdict dicts, else []."""
    v = doc.get("verdicts") if isinstance(doc, dict) else None
    if isinstance(v, list) and v and all(isinstance(x, dict) and all(isinstance(x.get(k), str) for k in VERDICT_KEYS)
                                         for x in v):
        return v
    return []


def verdict_word(verdict: str) -> str:
    """The leading word of a verdict ("holds", "does not hold", "holds only when", "not resolved"), or "?"
    if none."""
    return next((w for w in VERDICT_WORDS if verdict.startswith(w)), "?")


def render_figure(doc: dict, fig_dir: Path) -> list[str]:
    name = doc.get("figure", "?")
    data = doc.get("data", {})
    mode = ({"default": "default (reduced) settings", "full": "full settings"}.get(doc.get("settings"))
            or ("quick settings" if doc.get("quick") else "full settings"))
    wall = doc.get("wall_time_s")
    head = [f"### `{name}`", ""]
    png = fig_dir / f"{name}.png"
    if png.exists():
        head += [f"[![{name}](../paper_figs/{name}.png)](../paper_figs/{name}.png)", ""]
    head += [doc.get("description", ""), ""]
    meta = [mode]
    if wall is not None:
        meta.append(f"wall time {fmt(float(wall))} s")
    if doc.get("threads") is not None:
        meta.append(f"{doc['threads']} torch thread(s)")
    head += ["*" + ", ".join(meta) + ".*", ""]
    if name in NOTES:
        head += [NOTES[name], ""]
    verdicts = _verdicts(doc)
    if verdicts:
        head += ["**Verdicts on the papers' claims**", ""] + verdicts + [""]
    body = []
    fn = RENDERERS.get(name)
    if fn is not None:
        try:
            body = fn(data)
        except (KeyError, TypeError, IndexError, ValueError, AttributeError):
            body = []
    if not body:
        body = generic(data)
    settings = flat(_settings(doc))
    if settings:
        shown = settings[:SETTINGS_SHOWN]
        more = f" ... ({len(settings) - len(shown)} more in the JSON)" if len(settings) > len(shown) else ""
        body += ["<details><summary>Settings</summary>", ""]
        body += [", ".join(f"`{k}` = {fmt(v)}" for k, v in shown) + more, "", "</details>", ""]
    return head + body


def _load(fig_dir: Path) -> list[dict]:
    docs = []
    for p in sorted(Path(fig_dir).glob("*.json")):
        doc = json.loads(p.read_text())
        doc.setdefault("figure", p.stem)
        docs.append(doc)
    return docs


def _grouped(docs: list[dict]) -> list[tuple[str, list[dict]]]:
    """(section title, its figures) in page order: by the SECTIONS prefixes, then the rest."""
    out, placed = [], set()
    for prefix, title in SECTIONS + [("", "Other figures")]:
        group = [d for d in docs if d["figure"].startswith(prefix) and d["figure"] not in placed]
        if group:
            placed.update(d["figure"] for d in group)
            out.append((title, group))
    return out


def render(fig_dir: Path = FIG_DIR) -> str:
    docs = _load(fig_dir)
    lines = [
        "# Measured results",
        "",
        "<!-- Generated by `python tools/make_results.py` from paper_figs/*.json; do not edit by hand. -->",
        "",
        "Every number on this page is read from the JSON that `diffsteer figures` wrote next to each figure in",
        "`paper_figs/`, by `tools/make_results.py`; a test re-renders the page and fails if it is out of date.",
        "Each figure says whether it holds the papers' full settings or the default (reduced) ones. Wall times",
        "are those the producing run recorded, on a shared 2-core CPU machine. Each verdict on a paper's claim",
        "is computed from the figure's numbers by its verdict function (thresholds in standard errors; the",
        "criterion is stated in the verdict). The mathematics behind the quantities is in [theory.md](theory.md).",
        "",
    ]
    index = []
    body = []
    for title, group in _grouped(docs):
        index.append(f"- {title}: " + ", ".join(f"`{d['figure']}`" for d in group))
        body += [f"## {title}", ""]
        for d in group:
            body += render_figure(d, fig_dir)
    lines += index + [""] + body + [TRAILER]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------ README's verdicts


def _strip_criterion(verdict: str) -> str:
    """The verdict without its parenthesised "(criterion: ...)" (parentheses inside it balanced)."""
    i = verdict.find(" (criterion:")
    if i < 0:
        return verdict
    depth = 0
    for j in range(i + 1, len(verdict)):
        depth += {"(": 1, ")": -1}.get(verdict[j], 0)
        if depth == 0:
            return (verdict[:i] + verdict[j + 1:]).strip()
    return verdict[:i].strip()


def _split_claim(claim: str) -> tuple[str, str]:
    """(paper, the claim itself) from "Paper (authors): the claim"."""
    head, sep, rest = claim.partition(": ")
    return (head, rest) if sep and len(head) < 80 else ("", claim)


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3].rstrip() + "..."


def _verdicts_by_claim(path: Path) -> Optional[dict]:
    """{claim: verdict dict} of the figure JSON at ``path``, or None when there is no readable JSON there."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return {x["claim"]: x for x in _verdict_list(doc)}


def _agreement(name: str, v: dict, fig_dir: Path) -> tuple[str, str, str]:
    """(kind, the full run's word, the default run's word) for verdict ``v`` of figure ``name``: kind is
    "agrees", "not resolved" (the default run resolves neither the claim nor its opposite where the full
    run resolves it), "disagrees", "no verdict" (the default JSON lacks the claim) or "not run" (no
    default JSON); the words are "" where there is no default verdict."""
    by_claim = _verdicts_by_claim(Path(fig_dir) / DEFAULT_DIR / f"{name}.json")
    if by_claim is None:
        return "not run", "", ""
    other = by_claim.get(v["claim"])
    if other is None:
        return "no verdict", "", ""
    a, b = verdict_word(v["verdict"]), verdict_word(other["verdict"])
    return ("agrees" if a == b else "not resolved" if b == "not resolved" else "disagrees"), a, b


def default_agrees(name: str, v: dict, fig_dir: Path) -> str:
    """Whether the default-settings run (``<fig_dir>/default/<name>.json``) states the same leading verdict
    word for the same claim: "yes", "not resolved by default (full: <word>)" (the default run resolves
    neither the claim nor its opposite where the full run gives <word>), "no (default: <word>)", "no
    verdict" (its JSON lacks the claim) or "not run" (no JSON)."""
    kind, a, b = _agreement(name, v, fig_dir)
    return {"agrees": "yes", "not resolved": f"not resolved by default (full: {a})",
            "disagrees": f"no (default: {b})"}.get(kind, kind)


def agreement_counts(fig_dir: Path = FIG_DIR) -> dict:
    """Over the verdicts of every figure in ``fig_dir`` (README's table rows): how many the default run
    ``agrees`` with, leaves ``not resolved`` where the full run resolves them, ``disagrees`` with, and has
    ``no verdict`` for (its JSON lacks the claim, or no JSON)."""
    counts = {"agrees": 0, "not resolved": 0, "disagrees": 0, "no verdict": 0}
    for doc in _load(fig_dir):
        for v in _verdict_list(doc):
            kind = _agreement(doc["figure"], v, fig_dir)[0]
            counts["no verdict" if kind == "not run" else kind] += 1
    return counts


def agreement_summary(fig_dir: Path = FIG_DIR) -> str:
    """README's summary sentence of ``agreement_counts`` (printed by ``--summary``, and written into README
    between its agreement markers)."""
    c = agreement_counts(fig_dir)
    total = c["agrees"] + c["not resolved"] + c["disagrees"]
    return (f"{c['agrees']} of the {total} verdicts of the default run agree with the full run's, {c['not resolved']} "
            f"are not resolved at the default budget (within 2 standard errors either way) and {c['disagrees']} "
            "disagree" + (f" ({c['no verdict']} without a default verdict)" if c["no verdict"] else ""))


def _run_settings(doc: dict) -> str:
    """"full" or "default": the settings a figure JSON records (``settings``; older JSONs: ``quick``)."""
    s = doc.get("settings")
    if s in ("full", "default"):
        return s
    return "default" if doc.get("quick") else "full"


def compare_runs(run_dir: Path, fig_dir: Path = FIG_DIR) -> tuple[list[str], dict]:
    """Verdict by verdict, a run of ``diffsteer figures`` in ``run_dir`` (say, on another machine) against the
    committed run at the same settings: ``<fig_dir>/<name>.json`` for a full-settings JSON,
    ``<fig_dir>/default/<name>.json`` for a default one. Returns (one line per verdict whose leading word
    differs, or whose figure or claim has no committed counterpart; counts {"same", "differs", "no committed"}).
    The same code on another CPU rounds differently (vectorised kernels, BLAS code paths), trained networks
    drift apart, and a verdict near its threshold can change word: this says which."""
    run_dir = Path(run_dir)
    docs = _load(run_dir)
    if not docs:
        raise FileNotFoundError(f"run_dir: no figure JSON in {run_dir}; pass the --out folder of a diffsteer "
                                "figures run")
    lines, counts = [], {"same": 0, "differs": 0, "no committed": 0}
    for doc in docs:
        name, mode = doc["figure"], _run_settings(doc)
        ref_verdicts = _verdicts_by_claim(Path(fig_dir) / (DEFAULT_DIR if mode == "default" else "") / f"{name}.json") or {}
        for v in _verdict_list(doc):
            other = ref_verdicts.get(v["claim"])
            if other is None:
                counts["no committed"] += 1
                lines.append(f"{name} ({mode}): no committed verdict for: {_short(v['claim'], 90)}")
                continue
            a, b = verdict_word(v["verdict"]), verdict_word(other["verdict"])
            if a == b:
                counts["same"] += 1
                continue
            counts["differs"] += 1
            lines.append(f"{name} ({mode}): {_short(_split_claim(v['claim'])[1], 90)}: this run {a!r}, "
                         f"committed {b!r}")
    return lines, counts


def render_verdict_table(fig_dir: Path = FIG_DIR) -> str:
    """README's verdict table: one row per verdict of every figure in ``fig_dir``, in page order."""
    rows = []
    for _, group in _grouped(_load(fig_dir)):
        for doc in group:
            name = doc["figure"]
            for v in _verdict_list(doc):
                paper, claim = _split_claim(v["claim"])
                rows.append([paper, claim, _strip_criterion(v["verdict"]), _short(v["numbers"], NUMBERS_SHOWN),
                             f"[`{name}`](docs/results.md#{name.lower()})", default_agrees(name, v, fig_dir)])
    if not rows:
        return "No figure in paper_figs/ states verdicts yet.\n"
    rank = {p: i for i, p in enumerate(PAPERS)}
    rows.sort(key=lambda r: next((rank[p] for p in PAPERS if r[0].startswith(p)), len(PAPERS)))  # stable
    lines = table(["paper", "claim", "verdict", "numbers", "figure", "default run agrees"], rows)
    return "\n".join(lines).rstrip() + "\n"


def _wall(doc: Optional[dict]) -> Optional[float]:
    w = (doc or {}).get("wall_time_s")
    return float(w) if isinstance(w, (int, float)) and math.isfinite(w) else None


def _secs(s: Optional[float]) -> str:
    if s is None:
        return "-"
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


def render_times_table(fig_dir: Path = FIG_DIR) -> str:
    """README's run-time table: per figure (page order) the wall time its default-settings JSON
    (``<fig_dir>/default/``) and its full-settings JSON (``<fig_dir>``) recorded, and the sums. A figure
    that shares its computation with an earlier one of its module records only its own remainder."""
    full = {d["figure"]: d for d in _load(fig_dir)}
    dflt = {d["figure"]: d for d in _load(Path(fig_dir) / DEFAULT_DIR)}  # none when the folder is missing
    names = [d["figure"] for _, g in _grouped(list(full.values()) + [d for n, d in dflt.items() if n not in full])
             for d in g]
    rows, tot = [], [0.0, 0.0]
    for n in names:
        f = full.get(n, {})
        a = _wall(dflt.get(n))
        b = _wall(f) if f.get("settings", "full") == "full" and not f.get("quick") else None  # full settings only
        tot[0] += a or 0.0
        tot[1] += b or 0.0
        rows.append([f"`{n}`", _secs(a), _secs(b)])
    if not rows:
        return "No figure in paper_figs/ records a wall time yet.\n"
    rows.append(["**sum of the figures' times** (a prerequisite build, the digits pipeline, not included; "
                 "networks trained inside a figure are)", f"**{_secs(tot[0])}**", f"**{_secs(tot[1])}**"])
    return "\n".join(table(["figure", "default settings", "full settings"], rows)).rstrip() + "\n"


def _replace_between(text: str, begin: str, end: str, body: str, what: str) -> str:
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"readme: README.md needs the markers {begin} and {end} (in this order) around the "
                         f"{what}; add them where the table belongs")
    return text[: i + len(begin)] + "\n" + body + text[j:]


def render_readme(text: str, fig_dir: Path = FIG_DIR) -> str:
    """``text`` (README.md) with the verdict table between its markers replaced by a fresh rendering, and
    the run-time table and the agreement sentence too where README has their markers."""
    text = _replace_between(text, BEGIN, END, render_verdict_table(fig_dir), "verdict table")
    if TIMES_BEGIN in text:
        text = _replace_between(text, TIMES_BEGIN, TIMES_END, render_times_table(fig_dir), "run-time table")
    if AGREE_BEGIN in text:
        text = _replace_between(text, AGREE_BEGIN, AGREE_END, "- " + agreement_summary(fig_dir) + ".\n",
                                "default-run agreement sentence")
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Render docs/results.md and README's verdict table from paper_figs/*.json.")
    ap.add_argument("--check", action="store_true",
                    help="do not write; exit 1 if docs/results.md or README's verdict table is out of date")
    ap.add_argument("--out", default=str(OUT), help="output file (default docs/results.md)")
    ap.add_argument("--readme", default=str(README), help="README whose verdict table to refresh (default README.md)")
    ap.add_argument("--figs", default=str(FIG_DIR), help="figures folder (default paper_figs/)")
    ap.add_argument("--summary", action="store_true", help="do not write; print how many of the default run's "
                    "verdicts agree with the full run's, are not resolved at the default budget, or disagree")
    ap.add_argument("--compare", metavar="RUN_DIR", default=None,
                    help="do not write; compare the verdicts of a figures run in RUN_DIR (e.g. `diffsteer figures --out "
                         "RUN_DIR` on your machine) with the committed ones at the same settings; exit 1 if a word differs")
    args = ap.parse_args(argv)
    fig_dir, out, readme = Path(args.figs), Path(args.out), Path(args.readme)
    if args.summary:
        print(agreement_summary(fig_dir))
        return 0
    if args.compare:
        lines, c = compare_runs(Path(args.compare), fig_dir)
        print("\n".join(lines + [f"{c['same']} of {c['same'] + c['differs']} verdicts state the committed run's word "
                                  f"at the same settings, {c['differs']} differ"
                                  + (f"; {c['no committed']} have no committed counterpart" if c["no committed"] else "")]))
        return 1 if c["differs"] else 0
    text = render(fig_dir)
    if not readme.exists():
        raise FileNotFoundError(f"readme: {readme} does not exist; pass --readme PATH")
    old_readme = readme.read_text()
    new_readme = render_readme(old_readme, fig_dir)
    if args.check:
        stale = [str(p) for p, ok in ((out, out.exists() and out.read_text() == text), (readme, old_readme == new_readme))
                 if not ok]
        if stale:
            print(f"{' and '.join(stale)} out of date: run python tools/make_results.py", file=sys.stderr)
            return 1
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if new_readme != old_readme:
        readme.write_text(new_readme)
    print(f"wrote {out} ({text.count(chr(10))} lines) and the verdict table of {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
