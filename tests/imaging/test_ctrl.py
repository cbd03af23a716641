"""CTRL on image pipelines (imaging.ctrl) on the tiny pipeline: the label pipeline (thresholds, quantile
classes), temperature scaling, the prompt+label steered UNet (NULL label = the pre-trained UNet exactly),
exact resume of an interrupted run, and the SD v1.5 config through the CLI for a few steps."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from hypothesis import given, settings
from hypothesis import strategies as st

from imaging.ctrl import (
    CONFIG_DIR,
    CtrlConfig,
    ResidualCNN,
    classes_from_thresholds,
    fit_classifier,
    jpeg_kb,
    load_config,
    make_steered,
    quantile_thresholds,
    run,
)
from imaging.pipeline import LatentEps, encode_prompts, schedule_of
from imaging.tiny import tiny_pipeline

PROMPTS = ("a photo of a cat", "a photo of a dog", "a red painting")


def test_paper_thresholds_classes():
    # the paper's classes: y0 > 110 kB, y1 85-110, y2 60-85, y3 <= 60; a size on an edge belongs to the lower class
    kb = [250.0, 110.01, 110.0, 85.5, 85.0, 60.01, 60.0, 1.0]
    assert classes_from_thresholds(kb, [110, 85, 60]).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="thresholds"):
        classes_from_thresholds(kb, [60, 85, 110])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.5, 500.0, allow_nan=False), min_size=8, max_size=200, unique=True),
       st.integers(2, 5))
def test_quantile_classes_are_equal_frequency(values, k):
    # k quantile classes of distinct values: each class holds n/k values up to one (the interpolated quantile
    # moves at most one value across an edge), and class 0 holds the largest values
    if len(values) < k:
        return
    th = quantile_thresholds(values, k)
    assert all(a > b for a, b in zip(th, th[1:]))
    cls = classes_from_thresholds(values, th)
    counts = np.bincount(cls, minlength=k)
    assert np.all(np.abs(counts - len(values) / k) <= 1.0 + 1e-9), counts
    v = np.asarray(values)
    assert v[cls == 0].min() > v[cls == k - 1].max()


def test_quantiles_of_a_coarse_measure_are_an_error():
    with pytest.raises(ValueError, match="measure_upscale"):
        quantile_thresholds([1.0] * 10 + [2.0], 4)


def test_jpeg_size_grows_with_detail_and_upscale():
    g = torch.Generator().manual_seed(0)
    flat = torch.full((1, 3, 32, 32), 0.5)
    noisy = torch.rand((1, 3, 32, 32), generator=g)
    assert jpeg_kb(noisy)[0] > jpeg_kb(flat)[0]
    assert jpeg_kb(noisy, upscale=4)[0] > 4 * jpeg_kb(noisy)[0] / 2  # the payload, not the headers, scales


def test_temperature_scaling_lowers_test_nll_of_an_overconfident_classifier():
    # Constructed miscalibration: the label is "brighter than the median" flipped with probability 0.3, so
    # the Bayes classifier is at most 70 % sure; a CNN trained long on 420 images memorises the flips and
    # is overconfident. Temperature scaling on the held-out split must find T > 1 and lower the NLL on the
    # untouched test split (180 images; the measured drop is far above its sampling noise).
    g = torch.Generator().manual_seed(1)
    n = 1200
    img = torch.rand((n, 3, 8, 8), generator=g) * torch.rand((n, 1, 1, 1), generator=g)
    y = (img.mean((1, 2, 3)) > img.mean((1, 2, 3)).median()).long()
    flip = torch.rand(n, generator=g) < 0.3
    y = torch.where(flip, 1 - y, y)
    cfg = CtrlConfig(prompts=("x",), clf_channels=(16, 16, 16), clf_steps=400, clf_batch=64, clf_lr=3e-3,
                     split=(0.5, 0.25, 0.25))
    clf, rep = fit_classifier(img, y, 2, cfg, seed=0)
    assert rep["temperature"] > 1.0
    assert rep["test_after"]["nll"] < rep["test_before"]["nll"]
    assert rep["test_after"]["accuracy"] == rep["test_before"]["accuracy"]  # T never changes the argmax
    assert isinstance(clf, ResidualCNN)


@pytest.fixture(scope="module")
def tiny():
    pipe = tiny_pipeline(seed=0)
    cond, unc = encode_prompts(pipe, list(PROMPTS))
    sch = schedule_of(pipe)
    return pipe, LatentEps(pipe.unet, sch, cond, unc, guidance_scale=3.0), sch


def _perturb(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=g))


def test_null_label_is_the_pretrained_unet_for_every_prompt(tiny):
    import copy

    from theory.engine import PromptLabel
    from theory.lora import disabled_lora

    pipe, base, sch = tiny
    model = make_steered(copy.deepcopy(base), 4, lora_rank=2)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900.0, 500.0, 20.0])
    prompts = torch.arange(3)
    with torch.no_grad():
        ref = base(x, t, prompts)
        # at initialisation every label gives the base UNet bit for bit (LoRA B = 0, embedding = 0)
        for y in (-1, 0, 3):
            assert torch.equal(model(x, t, PromptLabel(prompts, torch.full((3,), y))), ref)
        _perturb(model)  # trained LoRA and embedding: the reference is still the base exactly, prompt kept
        null = PromptLabel(prompts, torch.full((3,), -1))
        assert torch.equal(model.reference(x, t, null), ref)
        # the embedding's NULL row stays zero: with LoRA disabled, NULL = base exactly for every prompt,
        # while a label moves eps (it enters through the time embedding)
        with disabled_lora(model.base):
            assert torch.equal(model(x, t, null), ref)
            assert not torch.allclose(model(x, t, PromptLabel(prompts, torch.full((3,), 2))), ref)
        # the prompt still matters under a label: same x, t and label, two prompts, different eps
        e = model(x[:1].expand(2, -1, -1, -1), torch.tensor([500.0, 500.0]), PromptLabel(torch.tensor([0, 1]),
                                                                                         torch.tensor([1, 1])))
        assert not torch.allclose(e[0], e[1])
        # classifier-free mixing over the label with w = 1 is the conditional model (prompt kept)
        c = PromptLabel(prompts, torch.tensor([0, 1, 3]))
        assert torch.allclose(model.cfg(1.0)(x, t, c), model(x, t, c), atol=1e-6, rtol=1e-5)


def test_trainable_parameters_are_lora_and_embedding_only(tiny):
    import copy

    _, base, _ = tiny
    model = make_steered(copy.deepcopy(base), (2, 2), lora_rank=2)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(("lora_" in n) or ("embeddings" in n) for n in names)
    groups = model.param_groups(1e-3, 1e-2)
    assert sorted(g["lr"] for g in groups) == [1e-3, 1e-2]
    with pytest.raises(ValueError, match="label_module"):
        make_steered(copy.deepcopy(base), 2, label_module="unet.nothing")


def _small(**kw):
    base = dict(prompts=PROMPTS, n_offline=48, clf_steps=10, clf_batch=16, steps=2, batch_size=2, sample_steps=3,
                truncation_k=1, n_eval=1, dps_strengths=(), cfg_weights=(), curve_every=1, curve_n=1,
                measure_upscale=1, ckpt_every=1, multitask=False, eval_batch=16, guidance_scale=3.0)
    base.update(kw)
    return CtrlConfig(**base)


def _params(out: Path):
    from safetensors.torch import load_file

    return load_file(str(out / "ft_compress" / "checkpoint" / "params.safetensors"))


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    cfg = _small()
    full = run(cfg, tmp_path / "a", pipe=tiny_pipeline(seed=0))
    with pytest.raises(KeyboardInterrupt):  # killed in step 2, after the step-1 checkpoint
        run(cfg, tmp_path / "b", pipe=tiny_pipeline(seed=0), interrupt_after=2)
    resumed = run(cfg, tmp_path / "b", pipe=tiny_pipeline(seed=0))
    pa, pb = _params(tmp_path / "a"), _params(tmp_path / "b")
    assert pa.keys() == pb.keys() and len(pa) > 0
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    assert full["tasks"]["compress"]["training"]["reward_mean"] == resumed["tasks"]["compress"]["training"]["reward_mean"]
    def no_time(m):
        return {k: {kk: vv for kk, vv in v.items() if kk != "seconds"} for k, v in m.items()}

    assert no_time(full["tasks"]["compress"]["metrics"]) == no_time(resumed["tasks"]["compress"]["metrics"])
    assert [r["step"] for r in resumed["tasks"]["compress"]["curve"]] == [0, 1, 2]
    with pytest.raises(ValueError, match="different config"):
        run(_small(seed=1), tmp_path / "b", pipe=tiny_pipeline(seed=0))


def test_sd15_config_runs_a_few_steps_on_the_tiny_pipeline(tmp_path, capsys):
    # The SD v1.5 file as shipped except the sizes (images, counts, steps): the tiny pipeline's 16-px images
    # are far below the paper's 60-110 kB edges, so the classes come from quantiles here.
    from diffsteer.cli import main

    sd = json.loads((CONFIG_DIR / "ctrl_sd15.json").read_text())
    assert sd["thresholds_kb"] == [110, 85, 60] and sd["sample_steps"] == 50 and sd["guidance_scale"] == 7.5
    assert sd["lora_rank"] == 4 and sd["lr"] == 1e-3 and sd["lr_embed"] == 1e-2 and sd["eta"] == 1.0
    sets = ["image_size=null", "thresholds_kb=null", "n_offline=80", "clf_steps=5", "steps=2", "batch_size=2",
            "sample_steps=3", "truncation_k=2", "n_eval=1", "dps_strengths=[1.0]", "cfg_weights=[2.0]",
            "curve_every=1000", "eval_batch=8"]
    args = ["ctrl", "--tiny", "--config", str(CONFIG_DIR / "ctrl_sd15.json"), "--no-progress", "--out", str(tmp_path)]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    m = res["tasks"]["compress"]["metrics"]
    assert {"pre-trained", "CTRL", "CTRL + CFG w=2", "DPS zeta=1", "DPS best"} <= set(m)
    assert len(res["tasks"]["compress"]["training"]["reward_mean"]) == 2
    assert np.asarray(m["CTRL"]["confusion"]).sum() == 4
    saved = json.loads((tmp_path / "config.json").read_text())
    assert len(saved["resolved"]["compress"]["thresholds"][0]) == 3


def test_cli_help_documents_every_option(capsys):
    from diffsteer.cli import main

    with pytest.raises(SystemExit):
        main(["ctrl", "--help"])
    out = capsys.readouterr().out
    for opt in ("--model", "--tiny", "--config", "--set", "--planner", "--no-multitask", "--device", "--seed",
                "--no-progress", "--out"):
        assert opt in out
    assert out.count("help") >= 1


def test_bad_config_is_named(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"prompts": ["a"], "gama": 2}))
    with pytest.raises(ValueError, match="gama"):
        load_config(p)
    with pytest.raises(ValueError, match="truncation_k"):
        load_config(p.with_name("d.json") if False else CONFIG_DIR / "ctrl_sd15.json", truncation_k=99).validate()
    with pytest.raises(FileNotFoundError, match="config"):
        load_config(tmp_path / "missing.json")


def test_figures_draw_from_their_json(tmp_path):
    # the registered figures are drawn from the JSON as stored (replot), for both tasks
    import matplotlib

    matplotlib.use("Agg")
    from imaging import ctrl_figures as cf
    from theory.registry import FIGURES, to_jsonable

    assert {"ctrl_digits", "ctrl_digits_multitask"} <= set(FIGURES)
    res = run(_small(multitask=True, dps_strengths=(1.0,), n_eval=2, n_offline=64), tmp_path, pipe=tiny_pipeline(seed=0))
    res["grids"] = cf._grids(tmp_path, res)
    for task, draw in (("compress", cf.draw_compress), ("multitask", cf.draw_multitask)):
        d = json.loads(json.dumps(to_jsonable(cf._strip(res, task))))
        assert d["metrics"]["DPS best"]["strength"] == "DPS zeta=1"
        assert np.asarray(d["grid"]["CTRL"]).shape[:2] == (4, 2)
        draw(d).savefig(tmp_path / f"{task}.png")


def test_ppo_planner_runs_through_the_engine(tmp_path):
    # CTRL remark 2: the policy-gradient route (the engine's DDPO strategy) for a classifier used without
    # gradients; one update, with the path-KL weight on (eta = 1)
    res = run(_small(planner="ppo", steps=1, curve_every=5), tmp_path, pipe=tiny_pipeline(seed=0))
    tr = res["tasks"]["compress"]["training"]
    assert len(tr["reward_mean"]) == 1 and np.isfinite(tr["reward_mean"][0])
    assert (tmp_path / "ft_compress" / "checkpoint").is_dir()
