"""Gradient guidance on an image pipeline (imaging.guide, ``diffsteer guide``), on the tiny pipeline."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imaging.guide import CONFIG_DIR, FlatEps, GuideConfig, load_config, off_subspace_fraction, run
from theory.gradient_guidance import r_off

TINY = dict(prompt="a photo of a cat", steps=3, rounds=2, n=2, strengths=(0.5, 1.0), pca_n=12, batch=16,
            jpeg_upscale=1, grid_n=2)


@pytest.fixture(scope="module")
def pipe():
    from imaging.tiny import tiny_pipeline

    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def alg1(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("guide")
    return run(GuideConfig(**TINY), out, pipe=pipe), out


def test_algorithm1_records_every_configuration_from_the_same_noise(alg1):
    res, out = alg1
    assert [(c["method"], c["strength"]) for c in res["configs"]] == [("G", 0.5), ("G", 1.0), ("G_loss", 0.5),
                                                                      ("G_loss", 1.0)]
    for c in res["configs"]:
        assert [r["round"] for r in c["rounds"]] == [0, 1, 2]
        for r in c["rounds"]:
            assert 0.0 <= r["off_subspace"] <= 1.0 and r["jpeg_kb"] > 0
        # round 0 is the unguided batch, drawn from the same seed for every configuration (common noise)
        assert c["rounds"][0] == res["configs"][0]["rounds"][0]
    # round 1 differs between G and G_loss (different fields from the same noise)
    assert res["configs"][0]["rounds"][1]["reward_raw"] != res["configs"][2]["rounds"][1]["reward_raw"]
    # the standardised reward is the raw one in units of the reference sd
    ref = res["reference"]
    r0 = res["configs"][0]["rounds"][0]
    assert r0["reward_std"] == pytest.approx((r0["reward_raw"] - ref["reward_mean"]) / ref["reward_sd"], rel=1e-5, abs=1e-6)
    assert 1 <= ref["pca_k"] <= min(ref["n"], ref["D"]) and ref["explained_at_k"] >= 0.95
    # paired G_loss - G per chain: its mean is the difference of the two configurations' means
    assert [p["strength"] for p in res["paired"]] == [0.5, 1.0]
    for p, g, gl in zip(res["paired"], res["configs"][:2], res["configs"][2:]):
        for row, rg, rgl in zip(p["rounds"], g["rounds"], gl["rounds"]):
            assert row["off_subspace"] == pytest.approx(rgl["off_subspace"] - rg["off_subspace"], abs=1e-7)
            assert row["reward_std"] == pytest.approx(rgl["reward_std"] - rg["reward_std"], abs=1e-6)
    assert res["paired"][0]["rounds"][0]["off_subspace"] == 0.0  # round 0: the same unguided batch
    t = res["timing"]
    assert t["interleaved"] and t["unguided_pass_s"] > 0 and t["ratio_G"] > 0 and t["ratio_G_loss"] > 0
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["configs"] == json.loads(json.dumps(res["configs"]))
    from safetensors.torch import load_file

    s = load_file(str(out / "samples.safetensors"))
    assert set(s) == {f"{m}_s{v:g}_r{k}" for m in ("G", "G_loss") for v in (0.5, 1.0) for k in res["kept_rounds"]}
    assert all(v.dtype == torch.uint8 and v.shape[:2] == (2, 3) for v in s.values())


def test_batched_configurations_equal_each_run_alone(alg1, pipe):
    """Fixed noise: the four configurations in one network call per step give, per configuration, what that
    configuration gives alone from the same seed, up to the round-off of a larger batch (float32)."""
    res, _ = alg1
    alone = run(GuideConfig(**dict(TINY, methods=("G_loss",), strengths=(1.0,), timing=False, grid_n=0)), None, pipe=pipe)
    a, b = alone["configs"][0]["rounds"], res["configs"][3]["rounds"]
    for ra, rb in zip(a, b):
        assert ra["reward_raw"] == pytest.approx(rb["reward_raw"], rel=1e-4)
        assert ra["off_subspace"] == pytest.approx(rb["off_subspace"], rel=1e-3)


def test_flat_eps_is_the_latent_eps_reshaped(pipe):
    from imaging.pipeline import LatentEps, encode_prompts, schedule_of

    c, u = encode_prompts(pipe, ["a photo of a cat"])
    base = LatentEps(pipe.unet, schedule_of(pipe), c, u, 3.0)
    flat = FlatEps(base, (4, 8, 8))
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((3,), 500.0)
    with torch.no_grad():
        assert torch.equal(flat(x.reshape(3, -1), t), base(x, t).reshape(3, -1))
    assert flat.dim == 256


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(0, 10_000))
def test_off_subspace_fraction_is_r_off_squared_over_one_plus(k, seed):
    """|P_perp c|^2 / |c|^2 = r^2 / (1 + r^2) with r = r_off(c, U) (docs/theory.md (5.11)) for c = x - m: an
    identity (|c|^2 = |c_par|^2 + |c_perp|^2); float64, tolerance round-off."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(8, k, generator=g, dtype=torch.float64))
    m = torch.randn(8, generator=g, dtype=torch.float64)
    x = torch.randn(5, 8, generator=g, dtype=torch.float64)
    r = r_off(x - m, U)
    assert torch.allclose(off_subspace_fraction(x, m, U), r**2 / (1 + r**2), rtol=1e-6, atol=1e-12)
    inside = m + torch.randn(4, k, generator=g, dtype=torch.float64) @ U.T
    assert off_subspace_fraction(inside, m, U).abs().max() < 1e-12


@pytest.mark.parametrize("over, match", [
    (dict(methods=("G", "X")), "methods"), (dict(strengths=(0.0,)), "strengths"), (dict(algorithm=3), "algorithm"),
    (dict(pca_var=1.0), "pca_var"), (dict(method="heun"), "method"), (dict(rounds=0), "rounds"),
    (dict(grid_rounds=(0, 9)), "grid_rounds"), (dict(prompt=""), "prompt"), (dict(noise="new"), "noise"),
    (dict(algorithm=2), "noise"),
])
def test_bad_config_names_the_key(over, match):
    with pytest.raises(ValueError, match=match):
        GuideConfig(**dict(TINY, **over)).validate()


def test_load_config_rejects_unknown_keys_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        load_config(None, stepz=3)
    with pytest.raises(FileNotFoundError, match="config"):
        load_config(tmp_path / "none.json")


def test_a_reward_without_gradient_is_refused(pipe):
    with pytest.raises(ValueError, match="differentiable"):
        run(GuideConfig(**dict(TINY, reward="jpeg-size")), None, pipe=pipe)


def test_algorithm2_fine_tunes_copies_and_leaves_the_pipeline_unchanged(pipe):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    res = run(GuideConfig(**dict(TINY, algorithm=2, noise="fresh", ft_lr=1e-3, timing=False, grid_n=0)), None, pipe=pipe)
    assert res["batched"] and res["timing"] is None and len(res["configs"]) == 4
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    # fine-tuning changes round 1's samples relative to Algorithm 1 from the same noise
    res1 = run(GuideConfig(**dict(TINY, noise="fresh", timing=False, grid_n=0)), None, pipe=pipe)
    # round 0 is the same pre-trained batch, up to the round-off of the copies' vmap evaluation
    r0, r0_1 = res["configs"][0]["rounds"][0]["reward_raw"], res1["configs"][0]["rounds"][0]["reward_raw"]
    assert r0 == pytest.approx(r0_1, rel=1e-5)
    d1 = abs(res["configs"][0]["rounds"][1]["reward_raw"] - res1["configs"][0]["rounds"][1]["reward_raw"])
    assert d1 > 100 * abs(r0 - r0_1)


def test_sd15_config_runs_two_rounds_on_the_tiny_pipeline(pipe, tiny_aesthetic):
    """imaging/configs/guide_sd15.json as shipped (aesthetic reward, CFG 7.5, both methods, three strengths),
    with only the sizes reduced and the weights' paths pointed at tiny local files."""
    folder, _ = tiny_aesthetic  # tests/imaging/conftest.py; this test reads the head in the .pth format
    raw = json.loads((CONFIG_DIR / "guide_sd15.json").read_text())
    assert raw["reward"] == "aesthetic" and raw["steps"] == 50 and raw["guidance_scale"] == 7.5
    cfg = load_config(CONFIG_DIR / "guide_sd15.json", steps=3, rounds=2, n=2, pca_n=8, image_size=None,
                      dtype="float32", device="cpu", prompt="a photo of a cat", timing=False, grid_n=1,
                      reward_kwargs={"clip_path": str(folder), "head_path": str(folder / "head.pth")})
    res = run(cfg, None, pipe=pipe)
    assert len(res["configs"]) == 6 and all(len(c["rounds"]) == 3 for c in res["configs"])
    assert res["reference"]["reward_sd"] > 0


def test_cli_help_documents_every_option_and_runs_tiny(tmp_path, capsys):
    from diffsteer.cli import build_parser, main

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["guide"]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"
    for opt in ("--model", "--reward", "--method", "--strengths", "--rounds", "--algorithm", "--prompt", "--steps",
                "--seed", "--out"):
        assert opt in sub.format_help()
    rc = main(["guide", "--tiny", "--prompt", "a photo of a cat", "--method", "g_loss", "--strengths", "0.5", "--noise", "fresh",
               "--rounds", "1", "--n", "2", "--steps", "2", "--pca-n", "6", "--no-timing", "--no-progress",
               "--set", "jpeg_upscale=1", "--out", str(tmp_path / "o")])
    assert rc == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [c["method"] for c in res["configs"]] == ["G_loss"] and res["config"]["rounds"] == 1
    assert res["config"]["noise"] == "fresh"
    assert main(["guide", "--tiny", "--strengths", "a,b", "--out", str(tmp_path / "p")]) == 2
    assert "--strengths" in capsys.readouterr().err


def test_figure_draws_from_its_json(alg1):
    """The registered figure's draw function on the tiny run's results as stored in JSON."""
    import matplotlib

    matplotlib.use("Agg")
    from imaging import guide_figures
    from theory.registry import FIGURES, to_jsonable

    assert FIGURES["gg_image_alg1"].draw is guide_figures.draw
    res, out = alg1
    d = json.loads(json.dumps(to_jsonable({k: v for k, v in res.items() if k != "samples"})))
    d["grids"] = {k: v.float().mean(1).round().to(torch.uint8).tolist() for k, v in res["samples"].items()}
    fig = guide_figures.draw(d)
    assert len(fig.axes) >= 3
    summ, verdicts = guide_figures.summary(d)
    assert set(summ) == {f"{m} s={v:g}" for m in ("G", "G_loss") for v in (0.5, 1.0)}
    c = d["configs"][2]
    assert summ["G_loss s=0.5"]["gain_sd"] == pytest.approx(c["rounds"][-1]["reward_std"] - c["rounds"][0]["reward_std"], rel=1e-5)  # float32 sums
    assert {"off-subspace share, G_loss - G (paired chains), last round, strength 0.5",
            "runtime: a round / one unguided pass"} <= set(verdicts)


def test_digit_logprob_is_the_fitted_logistic_regression_on_the_judge_features():
    """r(I) = log p(digit | I) equals scikit-learn's predict_log_proba of a model fitted on the same split, on
    the judge's features of the same images (float32 round-off), and autograd reaches the pixels."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from imaging.digits_pipeline import digits_images, digits_split, judge_features
    from imaging.guide import DigitLogProb

    r = DigitLogProb(digit=8)
    train, held = digits_split(0)
    d = load_digits()
    ref = LogisticRegression(max_iter=5000).fit(d.data[train], d.target[train])
    img, _ = digits_images(held[:16])
    expected = ref.predict_log_proba(judge_features(img))[:, 8]
    assert torch.allclose(r(img).double(), torch.as_tensor(expected), rtol=1e-4, atol=1e-4)
    x = img.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(r(x).sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    with pytest.raises(ValueError, match="digit"):
        DigitLogProb(digit=10)


def test_retime_measures_the_runtime_row_again_from_the_recorded_config(alg1, pipe):
    from imaging.guide import retime

    res, out = alg1
    t = retime(json.loads((out / "results.json").read_text()), pipe=pipe)
    assert t["repeats"] == 3 and t["n_chains"] == 2 and t["n_configs"] == 4
    assert all(t[k] > 0 for k in ("unguided_pass_s", "round_G_s", "round_G_loss_s", "ratio_G", "ratio_G_loss"))
