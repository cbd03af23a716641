"""CTRL on scikit-learn's 8x8 digits (imaging.digits) at a tiny setting: the splits are disjoint and cover
the data set, the pipeline runs end to end through the engine, and fine-tuning raises the CTRL reward."""
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from imaging.digits import DigitsConfig, load_digits, run


def test_splits_disjoint_scaled_and_complete():
    d = load_digits(seed=3)
    xs = [d[k][0] for k in ("train", "held", "judge")]
    assert sum(x.shape[0] for x in xs) == 1797
    assert all(x.shape[1] == 64 for x in xs)
    assert min(float(x.min()) for x in xs) >= -1.0 and max(float(x.max()) for x in xs) <= 1.0
    rows = {tuple(r.tolist()) for r in torch.cat(xs)}
    assert len(rows) > 1700  # a handful of digits occur twice in the data set itself
    assert all(set(d[k][1].tolist()) == set(range(10)) for k in ("train", "held", "judge"))


def test_tiny_run_end_to_end_raises_reward():
    # a score model good enough to sample digit-like images (nearest-training-digit distance ~3 against
    # ~2.6 for the full model) in ~10 s; CTRL then starts from rewards around -7
    cfg = replace(DigitsConfig(), hidden=256, depth=2, dsm_steps=1500, clf_steps=800, ft_steps=40, ft_batch=30,
                  ft_k=10, n_eval=4, lora_rank=4)
    res = run(cfg)
    assert set(res["metrics"]) == {"real digits", "pre-trained", "DPS", "CTRL (eps embedding)", "CTRL (time embedding)"}
    for name, tr in res["training"].items():
        r = np.asarray(tr["reward_mean"])
        assert r.shape == (40,) and np.isfinite(r).all()
        # the reward of the first and last 10 steps (batches of 20 fresh samples each): a rise of more than
        # two standard errors of the difference of the 10-step means, not a single lucky batch
        first, last = r[:10], r[-10:]
        se = np.sqrt(first.var(ddof=1) / 10 + last.var(ddof=1) / 10)
        assert last.mean() - first.mean() > 2 * se, (name, first, last)
