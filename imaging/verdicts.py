"""Verdicts of the image-scale figures on the papers' claims, computed from each figure's JSON data
(``theory.registry.figure(verdicts=...)``; helpers and standard errors of ``theory.verdicts``: accuracies
carry binomial standard errors over the evaluated samples; gradient-guidance differences the paired
standard errors the experiment stored)."""
from __future__ import annotations

import math

from theory.verdicts import Z, binom_se, by_condition, num, pm, settings_note, side, verdict

CTRL = "CTRL (Zhao et al.)"
GG = "Gradient guidance (Guo et al.)"
CLAIM_CTRL_PRE = f"{CTRL}: CTRL raises the accuracy of the class asked for above the pre-trained model's"
CLAIM_CTRL_DPS = f"{CTRL}: CTRL is more accurate than DPS (at DPS's best strength)"
CLAIM_GG_OFF = f"{GG}: G_loss keeps the latents closer to the data's subspace than G (paired chains)"
CLAIM_GG_GAIN = f"{GG}: guidance raises the reward over the rounds"
CLAIM_GG_RUNTIME = (f"{GG}: a G_loss pass costs one forward and one vector-Jacobian product per step, at most 3 "
                    "unguided passes")


def _accuracy_verdicts(acc: dict, n: int, pre: str, dps: str, regime: str, budget: str, what: str,
                       exact: frozenset = frozenset()) -> list[dict]:
    """Both CTRL verdicts from {method: accuracy} measured on n samples each: every method whose name
    starts with "CTRL" against ``pre`` and against ``dps`` (difference beyond Z binomial se; "not resolved"
    when no variant is beyond Z se either way, ``theory.verdicts.side``). A reference
    named in ``exact`` has no sampling error (its accuracy is fixed by the design, see ``ctrl_digits``):
    the se of the difference is then the variant's binomial se alone."""
    variants = {k: float(v) for k, v in acc.items() if k.startswith("CTRL")}
    out = []
    for claim, ref in ((CLAIM_CTRL_PRE, pre), (CLAIM_CTRL_DPS, dps)):
        a0 = float(acc[ref])
        ok, words = {}, []
        for k, a in variants.items():
            se = math.hypot(binom_se(a, n), 0.0 if ref in exact else binom_se(a0, n))
            ok[k] = side(a - a0, se)
            words.append(f"{k} {num(a)} ({pm(a - a0, se)} over {ref})")
        note = (f"; {ref}'s accuracy is exactly 1/K by design, no se" if ref in exact else "")
        out.append(verdict(claim, f"{by_condition(ok, 'variant')} (criterion: {what} above {ref}'s {num(a0)} by "
                                  f"{num(Z)} binomial se, {n} samples each{note}; not resolved when within "
                                  f"{num(Z)} se either way)", "; ".join(words), regime, budget))
    return out


def ctrl_digits(data: dict) -> list[dict]:
    """ctrl_digits / ctrl_digits_multitask: accuracy of the true class (JPEG size, or size x ink) of each
    method's samples; n = the samples in the method's confusion matrix."""
    m = data["metrics"]
    n = int(sum(sum(row) for row in m["pre-trained"]["confusion"]))
    dps = "DPS best" if "DPS best" in m else max((k for k in m if k.startswith("DPS")), key=lambda k: m[k]["accuracy"])
    c = data["config"]
    classes = len(m["pre-trained"]["confusion"])
    regime = (f"digits pipeline (32 px latents), {classes} classes by the true measure ({data.get('task', '?')}), "
              f"offline {data.get('offline', {}).get('n', '?')} images, gamma {num(c.get('gamma'))}"
              + settings_note(c.get("quick", data.get("quick"))))
    budget = (f"{c.get('steps', '?')} fine-tuning steps of batch {c.get('batch_size', '?')}, LoRA rank "
              f"{c.get('lora_rank', '?')}; {n} evaluation samples per method; 1 seed")
    acc = {k: v["accuracy"] for k, v in m.items() if isinstance(v, dict) and "accuracy" in v}
    # The pre-trained model ignores the requested class and is drawn once on the noise every class shares
    # (``imaging.ctrl.compare``): each of its samples lands in exactly one class, so its accuracy is exactly
    # 1/K whatever the samples - a constant, not an estimate. Its confusion rows are then identical; only
    # then is its binomial se dropped from the difference.
    conf = m["pre-trained"]["confusion"]
    exact = frozenset({"pre-trained"}) if all(row == conf[0] for row in conf) else frozenset()
    return _accuracy_verdicts(acc, n, "pre-trained", dps, regime, budget, "accuracy", exact)


def digits_ctrl(data: dict) -> list[dict]:
    """digits_ctrl: accuracy under the independent judge; n = labels x samples per label."""
    m = data["metrics"]
    c = data["config"]
    n = int(c["n_eval"]) * len(m["pre-trained"]["per_label_accuracy"])
    regime = (f"scikit-learn 8x8 digits in pixel space, eps MLP (hidden {c.get('hidden', '?')}), gamma "
              f"{num(c.get('gamma'))}; judge: a classifier neither model saw")
    budget = (f"{c.get('ft_steps', '?')} fine-tuning steps of batch {c.get('ft_batch', '?')}, LoRA rank "
              f"{c.get('lora_rank', '?')}; {n} evaluation samples per method; 1 seed")
    acc = {k: v["judge_accuracy"] for k, v in m.items() if k != "real digits"}
    return _accuracy_verdicts(acc, n, "pre-trained", "DPS", regime, budget, "judged accuracy")


def guide(data: dict) -> list[dict]:
    """gg_image_*: per strength, the paired last-round difference of the off-subspace share (G_loss - G)
    below 0 by Z of its stored se; per configuration, the reward gain over the rounds (in pre-trained
    reward sd) above 0 by Z se (both "not resolved" when nothing is beyond Z se either way, ``side``); a
    G_loss round over an unguided pass at most 3 (measured side by side, no se)."""
    c = data["config"]
    regime = (f"digits pipeline latents {data.get('latent_shape')}, prompt {c.get('prompt')!r}, reward {c.get('reward')}"
              f"{' ' + str(c.get('reward_kwargs')) if c.get('reward_kwargs') else ''}, Algorithm {c.get('algorithm')}, "
              f"{c.get('noise')} noise" + settings_note(c.get("quick", data.get("quick"))))
    budget = f"{c.get('rounds')} rounds of {c.get('n')} chains, {c.get('steps')} sampler steps; strengths " \
             f"{c.get('strengths')}; 1 seed"
    ok, words = {}, []
    for key, v in data["verdicts"].items():
        if "off-subspace" not in key or "difference" not in v:
            continue
        s = key.rsplit("strength", 1)[-1].strip()
        ok[s] = side(-float(v["difference"]), float(v["se"]))
        words.append(f"strength {s}: {pm(v['difference'], v['se'])} (G_loss lower in {v.get('rounds_with_G_loss_lower')} "
                     "rounds)")
    out = [verdict(CLAIM_GG_OFF, f"{by_condition(ok, 'strength')} (criterion: last-round G_loss - G share below 0 "
                                 f"by {num(Z)} paired se; not resolved when within {num(Z)} se either way)",
                 "; ".join(words), regime, budget)]
    ok, words = {}, []
    for k, v in data["summary"].items():
        ok[k] = side(float(v["gain_sd"]), float(v["gain_sd_se"]))
        words.append(f"{k}: {pm(v['gain_sd'], v['gain_sd_se'])}")
    out.append(verdict(CLAIM_GG_GAIN, f"{by_condition(ok, 'configuration')} (criterion: gain in pre-trained reward sd "
                                      f"above 0 by {num(Z)} se; not resolved when within {num(Z)} se either way)",
                       "; ".join(words), regime, budget))
    t = data.get("timing")
    if t:
        r = float(t["ratio_G_loss"])
        out.append(verdict(CLAIM_GG_RUNTIME, ("holds" if r <= 3.0 else "does not hold")
                           + f" (criterion: G_loss round / unguided pass {num(r)} at most 3)",
                           f"G_loss {num(r)}x, G {num(t['ratio_G'])}x an unguided pass of {num(t['unguided_pass_s'])} s "
                           f"(best of {t.get('repeats')} interleaved repeats, no se)", regime,
                           f"{t.get('n_chains')} chains, {t.get('steps')} steps"))
    return out
