"""The third verdict word, "not resolved" (``theory.verdicts.side``, ``by_condition``, ``word``): property tests
of the three-valued rules, and per verdict module one directional claim whose difference lies within 2 standard
errors (either way) reading "not resolved", against a resolved opposite reading "does not hold"."""
from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from theory.registry import check_verdicts, verdict_word
from theory.verdicts import UNRESOLVED, beyond, both, by_condition, condition_word, side, word

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)


@given(finite, positive, st.floats(min_value=0.5, max_value=4.0))
def test_side_is_none_exactly_within_z_se(d, se, z):
    """For finite se > 0: None iff |d| <= z se, else the sign of d; the claim's side is True exactly when
    ``beyond`` says so."""
    s = side(d, se, z)
    assert (s is None) == (abs(d) <= z * se)
    if s is not None:
        assert s == (d > 0)
        assert side(-d, se, z) == (not s)  # the opposite claim is resolved the other way
    assert (s is True) == beyond(d, se, z)


@given(finite)
def test_side_without_a_finite_se_resolves_only_infinite_differences(d):
    """One seed (se nan) or an infinite se resolves no finite difference; +-inf keeps its sign; nan is never
    resolved."""
    for se in (math.nan, math.inf):
        assert side(d, se) is None
        assert side(math.inf, se) is True and side(-math.inf, se) is False
    assert side(math.nan, 1.0) is None


@given(st.dictionaries(st.text(alphabet="abcxyz", min_size=1, max_size=4), st.sampled_from([True, False, None]),
                       min_size=1, max_size=6))
def test_by_condition_three_valued_word_rules(ok):
    v = by_condition(ok, "c")
    good = [k for k, x in ok.items() if x is True]
    if len(good) == len(ok):
        assert v == "holds"
    elif good:
        assert v == "holds only when c in {" + "; ".join(good) + "}"
    elif any(x is False for x in ok.values()):
        assert v == "does not hold"  # refuted somewhere, confirmed nowhere
    else:
        assert v == UNRESOLVED
    assert verdict_word(v) in ("holds", "holds only when", UNRESOLVED, "does not hold")


three = st.sampled_from([True, False, None])


@given(st.lists(three, min_size=1, max_size=5))
def test_both_is_the_three_valued_and(oks):
    """Kleene's 'and': False dominates, then None; True only when all are True; numpy-style bools (any value
    whose bool() is the answer) enter as resolved conditions; associative, and ``word`` of it reads as the
    conjunction of the conditions."""
    r = both(*oks)
    assert r is (False if False in oks else None if None in oks else True)
    if len(oks) > 1:
        assert both(*oks[:1], both(*oks[1:])) is r
    assert both(*(1 if o is True else 0 if o is False else None for o in oks)) is r


@given(st.dictionaries(st.text(alphabet="abcxyz", min_size=1, max_size=4), three, min_size=1, max_size=6))
def test_condition_word_is_the_rule_every_module_reads(ok):
    """``condition_word`` is ``by_condition`` without the named set; the passing conditions come back in order;
    the modules that name their conditions differently (``sims.claims.ctrl_scalar._when`` over offline sizes)
    give the same word."""
    from sims.claims.ctrl_scalar import _when

    w, good = condition_word(ok)
    assert good == [k for k, v in ok.items() if v is True]
    assert by_condition(ok, "c").startswith(w)
    sizes = {str(10 * (i + 1)): v for i, v in enumerate(ok.values())}
    assert _when(sizes).startswith(w)


def test_word_and_the_registry_read_not_resolved():
    assert [word(x) for x in (True, False, None)] == ["holds", "does not hold", "not resolved"]
    assert verdict_word("not resolved (criterion: x)") == "not resolved"
    assert verdict_word("holds only when c in {a}") == "holds only when"


# --- per module: a difference within 2 se either way is "not resolved" ----------------------------------------


def test_ctrl_toy_efficiency_within_noise_is_not_resolved():
    """Paired CFG - CTRL KL over 3 seeds with seed noise 0.01 (se ~0.0058): 0.005 is within 2 se."""
    from sims.ctrl_toy.verdicts import efficiency

    def data(gaps):
        rows = [{"size": n, "seed": s, "ctrl_kl": 0.3, "cfg_kl": 0.3 + g + 0.01 * (s - 1)}
                for n, g in gaps.items() for s in range(3)]
        return {"rows": rows, "kl_floor": 0.07, "config": {"base": {"n_eval": 1000, "toy": {}, "ctrl": {}}}}

    v = efficiency(data({50: 0.005, 200: 0.01}))[0]["verdict"]
    assert v.startswith("not resolved (") and "not resolved when within" in v
    # refuted at one size, within noise at the other: does not hold
    assert efficiency(data({50: 0.005, 200: -0.1}))[0]["verdict"].startswith("does not hold (")
    assert efficiency(data({50: -0.05, 200: -0.1}))[0]["verdict"].startswith("does not hold (")


def test_claims_dimension_within_noise_is_not_resolved():
    """DDPO / best gradient method query ratios (1.2, 0.8, 1.0) over 3 seeds: mean 1, se 0.115: not resolved;
    (0.5, 0.52, 0.48): below 1 beyond 2 se: does not hold."""
    from sims.claims.verdicts import dimension

    def data(ratios):
        grad = [100.0] * len(ratios)
        return {"config": {"budget": 1000, "dims": [2]}, "crossings": None, "regime": "r", "budget": "b",
                "table": {"DDPO": {"2": {"score": 2.0, "queries_per_seed": [100 * r for r in ratios],
                                         "reached_all": True}},
                          "DRaFT-1": {"2": {"score": 1.0, "queries_per_seed": grad, "reached_all": True}}}}

    assert verdict_word(dimension(data([1.2, 0.8, 1.0]))[0]["verdict"]) == UNRESOLVED
    assert verdict_word(dimension(data([0.5, 0.52, 0.48]))[0]["verdict"]) == "does not hold"
    assert verdict_word(dimension(data([2.0, 2.1, 1.9]))[0]["verdict"]) == "holds"


def test_draft_toy_within_noise_is_not_resolved():
    """draft_toy: the best gradient method's query ratio over DDPO, the grad_K / grad_1 ratio, the LoRA scale's
    rise and the adapters' sum, each within 2 se of no effect, read "not resolved"."""
    from sims.draft_toy.verdicts import FRACTION, compare, grad_k, lora

    def cmp(per_seed):
        lv = {"levels": [{"fraction": FRACTION, "per_seed": per_seed}]}
        return {"curves": {"DDPO": [[0.0], [0.0], [0.0]]}, "config": {"train": {"budget": 100}},
                "claims": {"gradient_vs_ddpo": {"queries": {"ReFL": lv}}}}

    assert verdict_word(compare(cmp([1.2, 0.8, 1.0]))[0]["verdict"]) == UNRESOLVED  # mean 1, se 0.115
    assert verdict_word(compare(cmp([0.5, 0.52, 0.48]))[0]["verdict"]) == "does not hold"

    def gk(last):
        return {"ks": [1, 4], "grad_norm": [[1.0, 1.0, 1.0], last], "config": {}}

    assert verdict_word(grad_k(gk([1.2, 0.8, 1.05]))[0]["verdict"]) == UNRESOLVED  # mean 1.017, se 0.12
    assert verdict_word(grad_k(gk([2.0, 2.1, 1.9]))[0]["verdict"]) == "holds"
    assert verdict_word(grad_k(gk([0.5, 0.52, 0.48]))[0]["verdict"]) == "does not hold"  # norms fall

    def lo(rise, sum_excess):
        scale = [{"scale": s, "reward_a": rise * s, "reward_a_se": 0.1} for s in (0.0, 0.5, 1.0)]
        comb = {"A": {"reward_a+b": 1.0, "reward_a+b_se": 0.1}, "B": {"reward_a+b": 0.5, "reward_a+b_se": 0.1},
                "A+B": {"reward_a+b": 1.0 + sum_excess, "reward_a+b_se": 0.1}}
        return {"scale": scale, "combine": comb, "config": {}}

    v = lora(lo(0.2, 0.2))  # se of a difference 0.14: 0.2 is within 2 se
    check_verdicts("draft_toy_lora", v)
    assert [verdict_word(x["verdict"]) for x in v] == [UNRESOLVED, UNRESOLVED]
    assert [verdict_word(x["verdict"]) for x in lora(lo(1.0, -0.5))] == ["holds", "does not hold"]


def test_ctrl_scalar_within_noise_is_not_resolved():
    """claims_ctrl_scalar: CFG - CTRL KL 0 at N = 50 (within 2 se), CFG better at N = 25: no N where CTRL
    wins, one within noise, one refuted: does not hold; within noise at both: not resolved."""
    from sims.claims import ctrl_scalar as cs
    from tests.sims.test_claims_scalar import _data, _rows

    v = cs.verdicts(_data(_rows({25: -0.2, 50: 0.0})))
    check_verdicts("claims_ctrl_scalar", v)
    assert verdict_word(v[0]["verdict"]) == "does not hold" and "CFG better beyond 2.0 se at N in {25}" in v[0]["verdict"]
    assert verdict_word(cs.verdicts(_data(_rows({25: 0.0, 50: 0.0})))[0]["verdict"]) == UNRESOLVED


def test_imaging_verdicts_within_noise_are_not_resolved():
    """imaging.verdicts: CTRL accuracy 0.52 against DPS 0.5 over 100 samples each (se 0.071: within 2 se)
    reads not resolved, 0.2 below (resolved) does not hold; gradient guidance's G_loss - G share and reward
    gain within 2 of their stored se read not resolved."""
    from imaging.verdicts import digits_ctrl, guide

    def acc(ctrl, dps):
        per = [0.0] * 10  # 10 labels x n_eval 10 = 100 samples per method
        m = {"pre-trained": {"judge_accuracy": 0.1, "per_label_accuracy": per},
             "DPS": {"judge_accuracy": dps}, "CTRL": {"judge_accuracy": ctrl}}
        return {"metrics": m, "config": {"n_eval": 10}}

    v = digits_ctrl(acc(0.52, 0.5))
    check_verdicts("digits_ctrl", v)
    assert [verdict_word(x["verdict"]) for x in v] == ["holds", UNRESOLVED]
    assert verdict_word(digits_ctrl(acc(0.3, 0.5))[1]["verdict"]) == "does not hold"

    def gg(diff, gain):
        return {"config": {}, "verdicts": {"off-subspace share, strength 1": {"difference": diff, "se": 0.01}},
                "summary": {"G_loss": {"gain_sd": gain, "gain_sd_se": 0.1}}}

    assert [verdict_word(x["verdict"]) for x in guide(gg(-0.01, 0.1))] == [UNRESOLVED, UNRESOLVED]
    assert [verdict_word(x["verdict"]) for x in guide(gg(0.05, -0.5))] == ["does not hold", "does not hold"]
    assert [verdict_word(x["verdict"]) for x in guide(gg(-0.05, 0.5))] == ["holds", "holds"]


def test_gradguide_roff_within_noise_is_not_resolved():
    """gg_roff: G's final r_off 0.062 +- 0.002 (2 seeds) against NEAR x pre = 0.06 is within 2 se: with
    G_loss below NEAR x, not resolved; G_loss above NEAR x refutes it whatever G does."""
    from sims.gradguide.verdicts import NEAR, roff

    pre = 0.03

    def run(final):
        return {"roff_mean": {"mean": [pre, final[0]], "final_per_seed": final}, "rounds": 1, "delta": 0.2}

    def data(g, gl):
        return {"alg1_G": run(g), "alg1_G_loss": run(gl), "alg2_G": run(g), "alg2_G_loss": run(gl),
                "pretrained_roff": pre, "quick": True}

    near = NEAR * pre
    assert verdict_word(roff(data([near, near + 0.004], [0.035, 0.036]))[0]["verdict"]) == UNRESOLVED
    assert verdict_word(roff(data([near, near + 0.004], [0.40, 0.41]))[0]["verdict"]) == "does not hold"
    assert verdict_word(roff(data([0.30, 0.31], [0.035, 0.036]))[0]["verdict"]) == "holds"


def test_fig_theory_scaled_guidance_within_noise_is_not_resolved():
    """theory_tilting's scaled classifier guidance: KL 0.0505 against the floor 0.05 with 10^4 samples (sd of
    the gap ~0.0032) is within 2 sd: not resolved; 0.2 above the floor: holds."""
    from sims.fig_theory import CLAIM_SCALED, verdicts

    def data(ks):
        t = {"kl": 0.05, "kl_floor": 0.05, "label_mass": 0.5, "target_label_mass": 0.5, "scaled_cg": {"kl": ks}}
        return {"config": {"n": 10000, "T": 1.0, "label": 0, "n_steps": 10, "bins": 20}, "alpha_T": 0.1,
                "tilted": {"2": t},
                "bias_gaussian": {"monte_carlo": [{"T": 1.0, "mc_vs_closed_form_in_se": 0.5}],
                                  "loglog_slope_mean_err_vs_alpha": 1.0, "lam": 1.0}}

    def scaled(ks):
        return next(v for v in verdicts(data(ks)) if v["claim"] == CLAIM_SCALED)["verdict"]

    assert verdict_word(scaled(0.0505)) == UNRESOLVED
    assert verdict_word(scaled(0.25)) == "holds"
