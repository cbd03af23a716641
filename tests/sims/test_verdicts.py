"""The figures' verdicts on the papers' claims: every verdict function accepts its committed JSON's data and
returns valid verdicts (the ones the JSON holds), the verdicts flip with the numbers they are computed
from, and the standard errors they use are right (``theory.verdicts``)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from theory import registry
from theory.verdicts import Z, by_condition, hist_kl_sd, z_family

ROOT = Path(__file__).resolve().parents[2]
FIGS = ROOT / "paper_figs"


def _with_verdicts() -> list[str]:
    from diffsteer.cmd_figures import figure_modules

    registry.load(figure_modules())  # a module whose extra is missing is simply not registered
    return [n for n, s in registry.FIGURES.items() if s.verdicts is not None and (FIGS / f"{n}.json").exists()]


def test_every_figure_with_a_verdict_function_is_covered():
    names = _with_verdicts()
    assert {"theory_tilting", "gg_roff", "ctrl_toy_table", "draft_toy_compare", "claims_dimension"} <= set(names)


@pytest.mark.parametrize("name", _with_verdicts())
def test_verdicts_of_the_committed_json_are_valid_and_current(name):
    """The verdict function accepts the committed JSON's data; its verdicts pass ``check_verdicts``, state an
    uncertainty (or say there is none) and are those the JSON holds (fix: ``diffsteer figures --replot --out
    paper_figs --only NAME``)."""
    rec = json.loads((FIGS / f"{name}.json").read_text())
    got = registry.check_verdicts(name, registry.FIGURES[name].verdicts(rec["data"]))
    assert got, f"{name}: no verdict"
    for v in got:
        assert any(s in v["numbers"] for s in ("+-", "no se", " se", " sd")), f"{name}: no uncertainty in {v['numbers']!r}"
        assert len({v["claim"] for v in got}) == len(got), f"{name}: two verdicts share a claim (the default run is " \
                                                            "matched by claim)"
    assert rec.get("verdicts") == got, f"{name}: the JSON's verdicts are stale; re-plot it"


# --- verdicts flip with their numbers ------------------------------------------------------------------------


def _roff_data(g_loss_final_alg1, g_loss_final_alg2, pre=0.03):
    def run(final, rounds=100, delta=0.2):
        return {"roff_mean": {"mean": [pre] + [final[0]] * rounds, "final_per_seed": final}, "rounds": rounds,
                "delta": delta}

    return {"alg1_G": run([0.30, 0.32], delta=0.9), "alg1_G_loss": run(g_loss_final_alg1),
            "alg2_G": run([0.35, 0.36], 120, 0.9), "alg2_G_loss": run(g_loss_final_alg2, 120), "pretrained_roff": pre,
            "quick": True}


def test_roff_verdict_flips_when_g_loss_leaves_the_subspace():
    from sims.gradguide.verdicts import roff

    assert roff(_roff_data([0.035, 0.036], [0.04, 0.041]))[0]["verdict"].startswith("holds (")
    assert roff(_roff_data([0.30, 0.31], [0.40, 0.41]))[0]["verdict"].startswith("does not hold")
    assert roff(_roff_data([0.035, 0.036], [0.40, 0.41]))[0]["verdict"].startswith("holds only when run in {Algorithm 1}")


def test_efficiency_verdict_follows_the_paired_differences():
    """CTRL below CFG beyond 2 se (3 seeds, paired) at N = 50 only -> "holds only when"; at no size, one size
    within 2 se (0.01 against se 0.0058) and one refuted -> does not hold; every size within 2 se -> not
    resolved; above CFG beyond 2 se at every size -> does not hold."""
    from sims.ctrl_toy.verdicts import efficiency

    def data(gaps):
        rows = [{"size": n, "seed": s, "ctrl_kl": 0.3, "cfg_kl": 0.3 + g + 0.01 * (s - 1)}
                for n, g in gaps.items() for s in range(3)]
        return {"rows": rows, "kl_floor": 0.07, "config": {"base": {"n_eval": 1000, "toy": {}, "ctrl": {}}}}

    assert efficiency(data({50: 0.2, 200: 0.0, 1000: -0.2}))[0]["verdict"].startswith(
        "holds only when offline pairs N in {50}")
    assert efficiency(data({50: 0.2, 200: 0.1}))[0]["verdict"].startswith("holds (")
    assert efficiency(data({50: 0.01, 200: -0.1}))[0]["verdict"].startswith("does not hold")
    assert efficiency(data({50: 0.01, 200: 0.0}))[0]["verdict"].startswith("not resolved")
    assert efficiency(data({50: -0.05, 200: -0.1}))[0]["verdict"].startswith("does not hold")


def test_ctrl_target_verdict_flips_with_the_kl_gap():
    """At the floor (gap 0.005, sd ~ 0.006 with 4000 samples) the claim holds; 0.1 above it, it does not."""
    from sims.ctrl_toy.verdicts import table

    def data(kl):
        m = {"kl": kl, "accuracy": 0.8, "kl_per_class": {str(c): kl for c in range(4)}}
        return {"results": {"component": {"methods": {
            "CTRL": m, "exact target (floor)": {"kl": 0.07, "accuracy": 0.9},
            "classifier guidance": {"kl": 0.09, "accuracy": 0.95}}}}, "config": {"n_eval": 1000}}

    near, far = table(data(0.075)), table(data(0.17))
    assert near[0]["verdict"].startswith("holds (") and near[1]["verdict"].startswith("holds (")
    assert far[0]["verdict"].startswith("does not hold") and far[1]["verdict"].startswith("does not hold")


def _sphere_final(rl, dl, sd_r=0.1, sd_d=0.05, rg=0.5, dg=0.1):
    """One delta of the sphere front: G at (reward rg, distance dg), G_loss at (rl, dl), per-sample sds."""
    return {"G": {"reward": [rg], "dev_abs": [dg], "reward_sd": [sd_r], "dev_abs_sd": [sd_d]},
            "G_loss": {"reward": [rl], "dev_abs": [dl], "reward_sd": [sd_r], "dev_abs_sd": [sd_d]}}


def test_sphere_dominance_is_judged_beyond_the_standard_errors():
    """n = 100 samples, per-sample sd 0.1 (reward) and 0.05 (distance): se of a difference 0.014 and 0.0071.
    A reward 0.01 below G's and a distance 0.01 above it (within 2 se) do not break dominance; 0.05 lower
    reward or 0.03 more distance (beyond 2 se) do; a distance within 1.05x the unguided floor passes."""
    from sims.gradguide.verdicts import dominance

    def ok(**kw):
        return dominance(_sphere_final(**kw), [0.1], floor=0.05, n=100, floor_sd=0.05)[0]["0.1"]

    assert ok(rl=0.49, dl=0.11)
    assert not ok(rl=0.45, dl=0.1)
    assert not ok(rl=0.5, dl=0.13)
    assert ok(rl=0.5, dl=0.0525, dg=0.02)  # G closer, but G_loss within 1.05x the floor
    with pytest.raises(ValueError, match="recompute"):
        dominance({k: {"reward": [0.5], "dev_abs": [0.1]} for k in ("G", "G_loss")}, [0.1], 0.05, 100, 0.05)


def test_truncation_verdict_leaves_out_the_untruncated_chain():
    """DRaFT-K with K = the sampler's steps is full DRaFT: it is reported, not judged, so DRaFT-50's ratio 1
    does not turn "does not hold" into "holds only when method in {DRaFT-50}"."""
    from sims.draft_toy.verdicts import CLAIM_TRUNC, compare

    def claim(per_seed):
        return {"levels": [{"fraction": 0.5, "per_seed": per_seed}]}

    slow = [0.85, 0.86, 0.87]
    data = {"curves": {"DRaFT": [[], [], []]}, "config": {"pretrain": {"n_steps": 50}, "train": {}},
            "claims": {"truncation_vs_full": {"DRaFT-1": claim(slow), "DRaFT-50": claim([1.0, 1.0, 1.0])}}}
    v = next(x for x in compare(data) if x["claim"] == CLAIM_TRUNC)
    assert v["verdict"].startswith("does not hold") and "DRaFT-50" in v["numbers"]
    data["claims"]["truncation_vs_full"]["DRaFT-5"] = claim([0.99, 1.01, 1.0])
    v = next(x for x in compare(data) if x["claim"] == CLAIM_TRUNC)
    assert v["verdict"].startswith("holds only when method in {DRaFT-5}")


# --- the standard errors and thresholds ------------------------------------------------------------------------


def test_hist_kl_sd_matches_monte_carlo():
    """The sd of the plug-in KL(q_hist || p) of n multinomial samples, over R = 2000 replicates, against
    sqrt(mean KL / n) (the chi-square approximation, good with ~100 expected counts per bin): the sd
    estimate's relative standard error is 1 / sqrt(2 (R - 1)) = 1.6 %, so 4 of them, 6.3 %, is the tolerance."""
    rng = np.random.default_rng(0)
    B, n, R = 20, 2000, 2000
    p = rng.dirichlet(np.full(B, 20.0))
    q = rng.multinomial(n, p, size=R) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(q > 0, q * np.log(q / p), 0.0).sum(1)
    mean = float(kl.mean())
    rel = float(kl.std(ddof=1)) / hist_kl_sd(mean, mean, n)
    assert abs(rel - 1) < 4 / math.sqrt(2 * (R - 1)), rel


@given(st.integers(min_value=1, max_value=1000))
def test_z_family_keeps_the_level_of_z(m):
    """m comparisons at z_family(m) have the two-sided level of one comparison at Z, divided by m (Bonferroni)."""
    tail = 2 * (1 - NormalDist().cdf(z_family(m)))
    assert math.isclose(tail * m, 2 * (1 - NormalDist().cdf(Z)), rel_tol=1e-6)
    assert z_family(m) >= Z - 1e-12


@given(st.dictionaries(st.text(alphabet="abcxyz", min_size=1, max_size=4), st.booleans(), min_size=1, max_size=6))
def test_by_condition_names_exactly_the_passing_conditions(ok):
    v = by_condition(ok, "c")
    good = [k for k, x in ok.items() if x]
    if len(good) == len(ok):
        assert v == "holds"
    elif not good:
        assert v == "does not hold"
    else:
        assert v == "holds only when c in {" + "; ".join(good) + "}"
