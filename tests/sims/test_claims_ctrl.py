"""Tests of sims.claims.ctrl_convergence: the grid KL between tilted targets and CTRL's optimal objective
against closed forms (docs/theory.md (4.1), (5.6)), the verdicts on synthetic numbers, and a tiny run of the
experiment's code path through the figure's JSON."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sims.claims import ctrl_convergence as cc
from sims.ctrl_toy.configs import CompareConfig, CTRLConfig, ToyConfig
from theory.classifiers import FitConfig
from theory.nets import DSMConfig
from theory.registry import to_jsonable

# one isotropic Gaussian N(mu, s^2 I): a linear reward b.x tilts it to N(mu + gamma s^2 b, s^2 I) ((5.6) with
# lam = 1/gamma), so KL(tilt b1 || tilt b2) = gamma^2 s^2 |b1 - b2|^2 / 2 and lam log Z = b.mu + gamma s^2 |b|^2 / 2
ONE = ToyConfig(n_modes=1, weights=(1.0,), radius=0.25)


def _lin(b):
    b = torch.tensor(b, dtype=torch.float64)
    return lambda p: p.double() @ b


@settings(max_examples=25, deadline=None)
@given(st.tuples(st.floats(-1, 1), st.floats(-1, 1)), st.tuples(st.floats(-1, 1), st.floats(-1, 1)),
       st.floats(0.25, 2.0))
def test_grid_target_kl_closed_form(b1, b2, gamma):
    """Grid quadrature of Gaussians whose means stay within |0.25| + 2 * 0.36 * sqrt(2) = 1.27 of the origin,
    i.e. >= 6.2 sd inside the grid's edge at 5, with 18 points per sd: the truncated mass (< 1e-9) and the
    rectangle rule's error are far below the 1e-6 tolerance (the KL is at most 0.72 here)."""
    s2 = ONE.mode_std**2
    want = gamma**2 * s2 * ((b1[0] - b2[0]) ** 2 + (b1[1] - b2[1]) ** 2) / 2
    got = cc.grid_target_kl(_lin(b1), _lin(b2), gamma, ONE)
    assert got == pytest.approx(want, abs=1e-6)


def test_grid_target_kl_zero_and_positive():
    lab = cc.data.true_label("component")
    f = lambda p: lab.log_prob(p)[:, 0]  # noqa: E731
    assert cc.grid_target_kl(f, f, 1.0, ToyConfig()) == pytest.approx(0.0, abs=1e-12)
    assert cc.grid_target_kl(f, lambda p: lab.log_prob(p)[:, 1], 1.0, ToyConfig()) > 0.5


class _LinearClf:
    """A 'classifier' whose log-likelihood of every label is b_y . x (not normalised: (4.1) holds for any reward)."""

    def __init__(self, bs):
        self.B = torch.tensor(bs, dtype=torch.float64)

    def log_lik(self, x, y):
        return (x.double() * self.B[y]).sum(-1).float()


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_optimal_objective_closed_form(gamma):
    """J* = mean_y lam log Z_y against (5.6): b.mu + gamma s^2 |b|^2 / 2, averaged over the labels. The
    classifier is read in float32 (as the toy's), so agreement to 1e-5."""
    bs = [[0.3, -0.2], [-0.5, 0.1]]
    mu = torch.tensor([ONE.radius, 0.0], dtype=torch.float64)
    s2 = ONE.mode_std**2
    want = sum(float(torch.tensor(b, dtype=torch.float64) @ mu) + gamma * s2 * (b[0] ** 2 + b[1] ** 2) / 2
               for b in bs) / len(bs)
    assert cc.optimal_objective(_LinearClf(bs), gamma, ONE, 2) == pytest.approx(want, abs=1e-5)


# --- verdicts on synthetic numbers ----------------------------------------------------------------------

def _synthetic(ctrl_kl_default, ctrl_kl_variant, dps_kl=0.13, opt_kl=0.12, noise=0.005):
    """A run's stored data with given per-step mean KLs (3 seeds), through summarise. CTRL's seed s is offset by
    d[s], the guided methods' and references' by d[s + 1]: every paired difference then has its nominal mean
    and a standard error of exactly ``noise``."""
    seeds = (0, 1, 2)
    d0 = [-noise, 0.0, noise]
    d = {s: d0[(s + 1) % 3] for s in seeds}
    steps = [100, 400, 800]
    refs = {s: {"exact floor": {"kl": 0.075 + d[s], "accuracy": 0.91},
                "CTRL optimum (this classifier)": {"kl": opt_kl + d[s], "accuracy": 0.88, "grid_kl": 0.06,
                                                   "objective": -1.5}} for s in seeds}
    guided = {s: {"DPS zeta 0.5": {"kl": dps_kl + d[s], "accuracy": 0.9, "wall_s": 2.0, "queries": 200_000},
                  "DPS zeta 1": {"kl": dps_kl + 0.3, "accuracy": 0.97, "wall_s": 2.0, "queries": 200_000},
                  "classifier guidance": {"kl": 0.11 + d[s], "accuracy": 0.95, "wall_s": 1.0, "queries": 200_000}}
              for s in seeds}

    def curve(kls, s, n_steps=25):
        return {"step": steps[:len(kls)], "queries": [128 * t for t in steps[:len(kls)]],
                "train_wall_s": [0.04 * t for t in steps[:len(kls)]], "kl": [k + d0[s] for k in kls],
                "accuracy": [0.8] * len(kls), "sample_wall_s": [0.5] * len(kls), "reward_mean": [-0.4] * len(kls),
                "path_kl": [1.3] * len(kls), "grad_norm": [1.0] * len(kls), "objective": [-1.7] * len(kls)}

    curves = {"default": {s: curve(ctrl_kl_default, s) for s in seeds},
              "sampler steps 50": {s: curve(ctrl_kl_variant, s) for s in seeds}}
    res = dict(references=refs, guided=guided, curves=curves, eq_steps=800, evals=steps, n_samples=4000,
               ece={}, wall_s=60.0)
    cfg = cc.ConvConfig(curve_steps=800, sweep_steps=400, evals=tuple(steps), default_steps=400)
    data = json.loads(json.dumps(to_jsonable({"config": cfg, "quick": False, **res,
                                              "summary": cc.summarise(res, cfg)})))
    return data


def _check_form(vs, n=3):
    assert len(vs) == n
    for v in vs:
        assert set(v) == {"claim", "verdict", "numbers", "regime", "budget"}
        assert v["verdict"].startswith(("holds: ", "does not hold", "holds only when ", "not resolved"))


def test_verdicts_ctrl_worse_everywhere():
    vs = cc.verdicts(_synthetic([0.4, 0.3, 0.25], [0.35, 0.28]))
    _check_form(vs)
    assert vs[0]["verdict"].startswith("holds: ")
    assert vs[1]["verdict"].startswith("holds")  # at equal queries (step 800) 0.25 > 0.13
    assert vs[2]["verdict"].startswith("does not hold")


def test_verdicts_gap_closed_by_a_variant():
    vs = cc.verdicts(_synthetic([0.4, 0.3, 0.25], [0.2, 0.125]))
    _check_form(vs)
    assert vs[0]["verdict"].startswith("holds only when ")
    assert "sampler steps 50" in vs[0]["verdict"]
    assert vs[2]["verdict"].startswith("holds only when trained with sampler steps 50")


def test_verdicts_ctrl_better_at_default_budget():
    vs = cc.verdicts(_synthetic([0.3, 0.10, 0.09], [0.2, 0.11]))
    _check_form(vs)
    assert vs[0]["verdict"].startswith("does not hold")
    assert vs[1]["verdict"].startswith("does not hold")
    assert vs[2]["verdict"].startswith("holds: ")


def test_verdicts_within_noise_is_not_a_difference():
    """A 0.005 difference with se 0.005 (1 se) resolves neither way: CTRL is not shown 'less accurate', nor
    shown more accurate: not resolved (the criterion says so)."""
    vs = cc.verdicts(_synthetic([0.3, 0.135, 0.135], [0.2, 0.14], noise=0.0087))
    assert vs[0]["verdict"].startswith("not resolved: ") and "not resolved when within 2 se" in vs[0]["verdict"]


def test_verdicts_two_budgets_follow_the_shared_word_rule():
    """The two budgets (default, converged) are two conditions of ``theory.verdicts.condition_word``: CTRL above
    DPS only when converged reads "holds only when ... convergence"; below DPS at the default budget with the
    converged run within 2 se reads "does not hold" (refuted at one budget, confirmed at none), as every other
    verdict module reads it. The curve rises after step 400, so the converged (least-KL) run is the end of
    the default curve, not its step 400."""
    vs = cc.verdicts(_synthetic([0.3, 0.10, 0.2], [0.3, 0.25]))  # default -0.03 (6 se), converged +0.07
    assert vs[0]["verdict"].startswith("holds only when CTRL is trained to convergence")
    vs = cc.verdicts(_synthetic([0.3, 0.10, 0.135], [0.3, 0.25]))  # default -0.03, converged +0.005 (1 se)
    assert vs[0]["verdict"].startswith("does not hold: CTRL's KL is below DPS's at the default 400 steps")
    assert "within 2 se of DPS's" in vs[0]["verdict"]


# --- a tiny run of the experiment's code path -------------------------------------------------------------

def test_tiny_run_and_figure(tmp_path):
    """Seconds: a small pre-trained MLP and classifiers, 2 seeds, 6 CTRL steps, one variant; summary, verdicts
    and the drawing from the JSON round trip."""
    toy = ToyConfig(hidden=16, depth=1, n_steps=8, dsm=DSMConfig(steps=30, batch_size=64, lr=2e-3, t_min=1e-3, seed=0),
                    grid_n=101)
    base = CompareConfig(toy=toy, labels=("component",), n_offline=200, clf=FitConfig(steps=30),
                         noisy_clf=FitConfig(steps=30), ctrl=CTRLConfig(steps=6, batch_size=8, n_steps=4, hidden=8))
    cfg = cc.ConvConfig(base=base, seeds=(0, 1), curve_steps=6, sweep_steps=3, evals=(2, 4, 6), n_eval=40,
                        default_steps=4, variants=(("truncated k = 2", (("k", 2),)),), dps_zetas=(0.5, 1.0))
    res = cc.run(cfg)
    assert res["eq_steps"] == 40 * 4 * 8 // 8
    c = res["curves"]["default"][0]
    assert c["step"] == [2, 4, 6] and c["queries"] == [16, 32, 48]
    assert all(b > a for a, b in zip(c["train_wall_s"], c["train_wall_s"][1:]))
    assert res["curves"]["truncated k = 2"][1]["step"] == [2, 3]
    data = json.loads(json.dumps(to_jsonable({"config": cfg, "quick": True, **res,
                                              "summary": cc.summarise(res, cfg)})))
    assert data["summary"]["CTRL equal queries"] is None  # DPS's 1280 queries are beyond the 48 of the curve
    _check_form(cc.verdicts(data), n=2)
    fig = cc.draw_figure(data)
    fig.savefig(tmp_path / "f.png")


def test_config_errors():
    with pytest.raises(ValueError, match="evals"):
        cc.ConvConfig(curve_steps=100, evals=(200,))
    with pytest.raises(ValueError, match="variants"):
        cc.ConvConfig(variants=(("x", (("width", 3),)),))
    with pytest.raises(ValueError, match="seeds"):
        replace(cc.ConvConfig(), seeds=())
