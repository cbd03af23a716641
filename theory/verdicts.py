"""Small helpers for the figures' verdicts on the papers' claims (see ``theory.registry.figure(verdicts=...)``).

A verdict function reads a figure's data as stored in its JSON and returns dicts with the fields ``claim``,
``verdict``, ``numbers``, ``regime`` and ``budget``. The verdict starts with "holds", "does not hold", "holds only when
..." or "not resolved" and is decided by thresholds on standard errors computed here from the stored
numbers; the claim text names the paper and carries no measured number, so that the verdicts of two runs
(default and full settings) can be matched by their claim.

A directional claim ("A beats B") reads "holds" when the difference points the claimed way by more than
``Z`` standard errors, "does not hold" when it points the other way by more than ``Z`` standard errors, and
"not resolved" (``UNRESOLVED``) when neither the claim nor its opposite is beyond ``Z`` standard errors
(``side``): a run with too few seeds or samples then says so rather than reading as a refutation. A claim
that two numbers agree within a tolerance stays two-valued: "does not hold" there means the gap is
resolved.

Standard errors used:

- over seeds: the sample standard deviation over the seeds divided by sqrt(number of seeds);
- of a proportion p measured on n independent samples: sqrt(p (1 - p) / n) (binomial);
- of a histogram KL ``KL(q_hist || p_binned)`` of n samples (``sims.grid2d.grid_kl``): 2 n KL is the
  G-test statistic, approximately non-central chi-square with df = 2 n floor (``floor``: the KL of n
  exact-target samples) and non-centrality 2 n (KL - floor); its variance 2 (df + 2 lambda) gives the
  standard deviation sqrt((floor + 2 max(KL - floor, 0)) / n) of the KL.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional

__all__ = ["Z", "UNRESOLVED", "side", "word", "both", "z_family", "mean_se", "binom_se", "hist_kl_sd", "pm", "num",
           "verdict", "condition_word", "by_condition", "beyond", "settings_note"]

#: a difference counts as real when it exceeds this many standard errors
Z = 2.0

#: the verdict word when neither a directional claim nor its opposite is beyond ``Z`` standard errors
UNRESOLVED = "not resolved"


def z_family(m: int, z: float = Z) -> float:
    """The threshold in standard errors that keeps the two-sided level of ``z`` for a family of ``m`` normal
    comparisons at once (Bonferroni: level / m per comparison)."""
    from statistics import NormalDist

    if m < 1:
        raise ValueError(f"m: the number of comparisons must be at least 1, got {m}")
    level = 2 * (1 - NormalDist().cdf(z))
    return NormalDist().inv_cdf(1 - level / (2 * m))


def _floats(xs: Iterable) -> list[float]:
    out = []
    for x in xs:
        if x is None:
            continue
        v = float(x)  # "nan"/"inf" strings of the JSON parse too
        out.append(v)
    return out


def mean_se(xs: Iterable) -> tuple[float, float, int]:
    """(mean, standard error of the mean, n) of the finite values of ``xs``; se is nan for fewer than 2."""
    v = [x for x in _floats(xs) if math.isfinite(x)]
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0
    m = sum(v) / n
    if n < 2:
        return m, math.nan, n
    var = sum((x - m) ** 2 for x in v) / (n - 1)
    return m, math.sqrt(var / n), n


def binom_se(p: float, n: int) -> float:
    """Standard error sqrt(p (1 - p) / n) of a proportion p measured on n independent samples."""
    if n <= 0:
        raise ValueError(f"n: the number of samples must be positive, got {n}")
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def hist_kl_sd(kl: float, floor: float, n: int) -> float:
    """Standard deviation of a histogram KL of n samples whose exact-target floor is ``floor`` (the
    non-central chi-square approximation of the module docstring)."""
    if n <= 0:
        raise ValueError(f"n: the number of samples must be positive, got {n}")
    return math.sqrt(max(floor + 2.0 * max(kl - floor, 0.0), 0.0) / n)


def num(x, digits: int = 3) -> str:
    """A number with ``digits`` significant digits ("nan" / "inf" as they are)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(v):
        return str(v)
    if v == int(v) and abs(v) < 1e9:
        return str(int(v))
    return f"{v:.{digits}g}"


def pm(mean: float, se: Optional[float] = None, n: Optional[int] = None, unit: str = "seeds",
       digits: int = 3, suffix: str = "") -> str:
    """'mean<suffix> +- se (n unit)'; without a finite se: 'mean<suffix> (n unit, no se)'."""
    m = num(mean, digits) + suffix
    if se is None or not math.isfinite(float(se)):
        return f"{m} ({n} {unit}, no se)" if n is not None else f"{m} (no se)"
    return f"{m} +- {num(se, 2)}" + (f" ({n} {unit})" if n is not None else "")


def beyond(diff: float, se: float, z: float = Z) -> bool:
    """Whether ``diff`` > 0 by more than ``z`` standard errors; without a finite se (one seed) only its sign
    decides, and the verdict's numbers say "no se"."""
    diff, se = float(diff), float(se)
    if not math.isfinite(diff):
        return diff > 0
    return diff > z * se if math.isfinite(se) else diff > 0


def side(diff: float, se: float, z: float = Z) -> Optional[bool]:
    """Which side of 0 ``diff`` is resolved on: True when diff > z se, False when diff < -z se, None when
    neither (|diff| <= z se: not resolved). Without a finite se (one seed) nothing is resolved (None),
    unless ``diff`` itself is +-inf (then its sign decides)."""
    diff, se = float(diff), float(se)
    if math.isnan(diff):
        return None
    if math.isinf(diff):
        return diff > 0
    if not math.isfinite(se):
        return None
    if diff > z * se:
        return True
    if diff < -z * se:
        return False
    return None


def word(ok: Optional[bool]) -> str:
    """The verdict word of one condition: "holds" (True), "does not hold" (False), "not resolved" (None)."""
    return UNRESOLVED if ok is None else ("holds" if ok else "does not hold")


def both(*oks: Optional[bool]) -> Optional[bool]:
    """Three-valued (Kleene) 'and' of conditions, each True, False (resolved against) or None (not resolved):
    False when any is False, True when every one is True, else None. A plain bool among them (a point check
    such as "G_loss's r_off is below the line") enters as a resolved condition."""
    oks = [None if ok is None else bool(ok) for ok in oks]
    if any(ok is False for ok in oks):
        return False
    return True if all(ok is True for ok in oks) else None


def condition_word(ok: Mapping[str, Optional[bool]]) -> tuple[str, list]:
    """The one rule that turns conditions into a verdict word, shared by every verdict module: (word, the
    passing conditions in ``ok``'s order) with word "holds" when every condition passes, "holds only when" when
    some do; when none passes, "does not hold" if at least one fails (the claim is refuted somewhere and
    confirmed nowhere) and "not resolved" if none is resolved either way."""
    good = [k for k, v in ok.items() if v is True]
    if ok and len(good) == len(ok):
        return "holds", good
    if good:
        return "holds only when", good
    return ("does not hold" if any(v is False for v in ok.values()) else UNRESOLVED), good


def by_condition(ok: Mapping[str, Optional[bool]], what: str) -> str:
    """The verdict word over conditions (``condition_word``), with the passing ones named:
    "holds only when <what> in {the passing ones}" when some but not all pass."""
    w, good = condition_word(ok)
    return f"{w} {what} in {{{'; '.join(good)}}}" if w == "holds only when" else w


def settings_note(quick) -> str:
    """The regime's note on the settings a figure ran with: ``quick`` True (the default, reduced settings),
    False (full settings) or None (not recorded: nothing)."""
    return "" if quick is None else ("; default (reduced) settings" if quick else "; full settings")


def verdict(claim: str, verdict: str, numbers: str, regime: str, budget: str) -> dict:
    """One verdict dict with the five string fields ``theory.registry.check_verdicts`` expects."""
    return {"claim": claim, "verdict": verdict, "numbers": numbers, "regime": regime, "budget": budget}
