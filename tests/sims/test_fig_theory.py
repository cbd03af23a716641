"""The theory figure: ``theory_tilting`` is registered, draws, and its numbers say
what the theory says. Monte Carlo comparisons use the standard error sqrt(tr Cov / N) that the figure
itself records, at 4-5 SE (two-sided p < 1e-4 under normality) plus, where a discretised chain is
compared with a continuous-time closed form, the solver's bias, bounded here by the step count (60 DDPM
steps on a quadratic grid: measured under 2.5 SE in the full run)."""
import json

import pytest

from diffsteer.cmd_figures import figure_modules
from sims.fig_theory import TiltConfig, run
from theory import registry


@pytest.fixture(scope="module")
def res():
    # quick settings but enough samples for the statistical claims (about 6 s on 2 cores)
    cfg = TiltConfig(n_steps=60, n=3000, n_quad=300, quad_nodes=6, bias_T=(0.5, 1.0, 6.0), grid_n=151)
    return run(cfg)


def test_h_transform_reaches_the_tilted_targets(res):
    """(b, c) From p*_T the h-transform's samples are as close to the exact target as exact-target samples
    of the same size (the histogram-KL floor; its sampling spread is about 15% at these sizes, so 1.3x)."""
    for g, ent in res["tilted"].items():
        assert ent["kl"] < 1.3 * ent["kl_floor"] + 0.01, (g, ent["kl"], ent["kl_floor"])
        assert abs(ent["label_mass"] - ent["target_label_mass"]) < 0.02


def test_scaled_classifier_guidance_is_not_the_gamma_tilt(res):
    """(d) gamma grad log p(y | x_t) over-concentrates: its label mass exceeds the target's and its KL is
    above the h-transform's."""
    ent = res["tilted"]["4.0"]
    assert ent["scaled_cg"]["kl"] > ent["kl"]
    assert ent["scaled_cg"]["label_mass"] > ent["target_label_mass"]


def test_terminal_bias_shrinks_with_alpha_T(res):
    """(e, f) From the untilted p_T the terminal law is biased by far more than the Monte Carlo error when
    alpha(T) is large and the bias vanishes (within 4 SE + solver bias) at alpha(T) = 0.05; the tilted
    start is unbiased at every T; the Gaussian Monte Carlo matches the closed-form biased law."""
    rows = {r["T"]: r for r in res["bias_mixture"]}
    assert rows[0.5]["untilted_mean_err"] > 10 * rows[0.5]["untilted_se"]
    assert rows[0.5]["untilted_mean_err"] > rows[1.0]["untilted_mean_err"] > rows[6.0]["untilted_mean_err"]
    assert rows[6.0]["untilted_mean_err"] < 5 * rows[6.0]["untilted_se"]
    for r in rows.values():
        assert r["tilted_mean_err"] < 5 * r["tilted_se"], r
    for r in res["bias_gaussian"]["monte_carlo"]:
        assert r["mc_vs_closed_form_in_se"] < 5, r
    # closed form: |(S - C_T) b| ~ alpha^2 as alpha -> 0 (docs/theory.md §4)
    assert abs(res["bias_gaussian"]["loglog_slope_mean_err_vs_alpha"] - 2.0) < 0.1


def test_figure_registered_written_and_redrawn_from_its_json(tmp_path):
    import imaging.digits  # noqa: F401  (imported first on purpose: drawing order must not depend on it)

    modules = figure_modules()
    names = registry.ordered_names(modules)
    assert names[0] == "theory_tilting"
    ranks = [modules.index(registry.FIGURES[n].module) for n in names]
    assert ranks == sorted(ranks) and "digits_ctrl" in names  # drawing order = the modules' order
    out = registry.run_figures(["theory_tilting"], out=tmp_path, quick=True, progress=False, log=lambda s: None)
    png = (tmp_path / "theory_tilting.png").read_bytes()
    assert len(png) > 10_000
    data = json.loads((tmp_path / "theory_tilting.json").read_text())
    assert "bias_mixture" in data["data"] and "theory_tilting" in out and data["quick"] is True
    assert len(data["data"]["pretrained"]["samples"]) == 1000  # the drawn samples are in the JSON
    # the figure is drawn from its JSON alone: re-drawing it gives the same PNG, byte for byte
    (tmp_path / "theory_tilting.png").unlink()
    assert registry.replot_figures(["theory_tilting"], tmp_path, log=lambda s: None) == {}
    assert (tmp_path / "theory_tilting.png").read_bytes() == png
