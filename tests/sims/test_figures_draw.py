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


def test_sphere_labels_cover_no_label_and_no_marker():
    """gg_sphere's delta labels, on crowded points (two series nearly on top of each other at small delta, as
    in the committed runs): no two labels overlap and no label covers a marker or a line (the checks the placer
    makes, redone here from the drawn texts; labels at fixed offsets fail the line check on these points)."""
    import matplotlib.pyplot as plt
    import numpy as np

    deltas = [0.02, 0.12, 0.22, 0.32, 0.42]
    final = {"G": {"dev_abs": [0.085, 0.068, 0.062, 0.14, 0.26], "reward": [0.03, 0.23, 0.43, 0.64, 0.85]},
             "G_loss": {"dev_abs": [0.084, 0.065, 0.072, 0.18, 0.35], "reward": [0.025, 0.235, 0.44, 0.65, 0.87]}}
    curves = {f"{k}@0.22": {"reward": [0.0, 0.3, 0.5]} for k in final}
    data = {"deltas": deltas, "final": final, "curves": curves, "pretrained": {"dev_abs": 0.075, "reward": -0.02},
            "config": {"D": 64, "n": 256, "rounds": 2}, "quick": False}
    fig = F.draw_sphere(data)
    ax = fig.axes[0]
    r = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(r) for t in ax.texts]
    assert len(boxes) == 2 * len(deltas)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    marks = np.concatenate([ax.transData.transform(np.column_stack(ln.get_data())) for ln in ax.get_lines()])
    segs = []
    for ln in ax.get_lines():
        xy = ax.transData.transform(np.column_stack(ln.get_data()))
        segs += [a + np.linspace(0, 1, 50)[:, None] * (b - a) for a, b in zip(xy[:-1], xy[1:])]
    on_lines = np.concatenate(segs)
    for b in boxes:
        for pts in (marks, on_lines):
            assert not np.any((pts[:, 0] > b.x0) & (pts[:, 0] < b.x1) & (pts[:, 1] > b.y0) & (pts[:, 1] < b.y1))
    plt.close(fig)
