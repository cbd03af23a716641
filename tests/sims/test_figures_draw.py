"""The gradient-guidance figures compute their JSON numbers and draw from those numbers alone: each figure
function runs on tiny exact-score configurations (a few rounds, no trained network; the pass timings of
gg_runtime are stood in for) and its draw function
draws from the JSON round trip of what it returned."""
import json

import pytest

import sims.gradguide.figures as F
from sims.gradguide.config import RunConfig
from theory.registry import FIGURES, to_jsonable

TINY = dict(model="exact", rounds=3, n=4, seeds=(1, 2), n_steps=4)


def _alg_runs(quick=False):
    return {"alg1_G": RunConfig(guidance="G", delta=0.9, **TINY), "alg1_G_loss": RunConfig(delta=0.2, **TINY),
            "alg2_G": RunConfig(guidance="G", delta=0.8, **TINY), "alg2_G_loss": RunConfig(delta=0.3, **TINY)}


def _conv_runs(quick=False):
    pairs = (("f1_theta1", "f1_theta1"), ("f1_theta2", "f1_theta2"), ("f2_b1_exact", "f2_b1"),
             ("f2_b2_exact", "f2_b2"), ("f2_b1_trained", "f2_b1"), ("f2_b2_trained", "f2_b2"))
    return {k: RunConfig(objective=o, delta=1.0, **TINY) for k, o in pairs}


@pytest.mark.parametrize("name", ["gg_roff", "gg_objective", "gg_convergence", "gg_distributions", "gg_runtime"])
def test_gradguide_figure_draws_from_its_json(name, monkeypatch):
    import matplotlib.pyplot as plt

    monkeypatch.setattr(F, "alg_runs", _alg_runs)
    monkeypatch.setattr(F, "convergence_runs", _conv_runs)
    # gg_runtime also times passes of the trained network: a stand-in (no network to train in a unit test)
    monkeypatch.setattr(F, "pass_times", lambda setup, model, n, n_steps, repeats: {"unguided": 1.0, "G": 1.4, "G_loss": 2.5})
    spec = FIGURES[name]
    data = json.loads(json.dumps(to_jsonable(spec.fn(quick=True))))
    fig = spec.draw(data)
    assert data["quick"] is True and len(fig.axes) >= 1
    plt.close(fig)
