"""DRaFT at image scale (imaging.draft, imaging.draft_figures, imaging/configs/draft_sd15.json) on the tiny
pipeline: the SD config runs through sd-finetune, every experiment runs at a tiny setting and its JSON
draws, and the equal reward-query budget comes from the strategies' own declared costs."""
import copy
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("diffusers")

from imaging import draft  # noqa: E402
from imaging.draft import METHOD_LABELS, DraftImageConfig, budget_steps, strategy_for  # noqa: E402

CONFIG = Path(draft.__file__).with_name("configs") / "draft_sd15.json"


def _tiny_cfg(**kw):
    base = dict(prompts=("a photo of a cat",), guidance_scale=2.0, sample_steps=3, batch_size=2, budget=4, k=2,
                refl_steps=(1, 2), lr=1e-3, seeds=(0,), n_eval=2, eval_every=2, n_show=1,
                lora_targets=("to_q", "to_k", "to_v", "to_out.0"), lora_scales=(0.0, 1.0), mix_weights=(0.0, 1.0),
                n_lora=2, div_budget=2, div_method="DRaFT-K", div_lams=(0.0, 1e-3), div_eps=(1e-3,), div_prompts=1, div_per_prompt=2)
    base.update(kw)
    return DraftImageConfig(**base)


# ----------------------------------------------------------------------------- equal budget in reward queries


def test_budget_uses_the_strategies_declared_costs():
    """Steps x the strategy's own queries(batch) equal the budget for every method; DRaFT-LV (n queries per
    sample) gets 1/n of the steps of the one-query methods."""
    cfg = DraftImageConfig(budget=96, batch_size=4, lv_n=2)
    for label in METHOD_LABELS:
        steps, qps = budget_steps(label, cfg)
        assert qps == strategy_for(label, cfg)[0].queries(cfg.batch_size)
        assert steps * qps == 96, label
    assert budget_steps("DRaFT-LV", cfg)[0] * 2 == budget_steps("DRaFT-1", cfg)[0]


@settings(max_examples=40, deadline=None)
@given(budget=st.integers(1, 2000), batch=st.integers(1, 16), n=st.integers(1, 6),
       label=st.sampled_from(METHOD_LABELS))
def test_budget_never_exceeds_and_wastes_less_than_one_step(budget, batch, n, label):
    """For any budget >= one step's cost: steps * q <= budget < (steps + 1) * q, q the declared cost."""
    cfg = DraftImageConfig(budget=budget, batch_size=batch, lv_n=n)
    steps, q = budget_steps(label, cfg)
    if budget >= q:
        assert steps * q <= budget < (steps + 1) * q
    else:
        assert steps == 1  # a budget below one step still makes one step


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="methods"):
        DraftImageConfig(methods=("DRaFT", "nope")).validate()
    with pytest.raises(ValueError, match="ddpo_eta"):
        DraftImageConfig(ddpo_eta=0.0).validate()  # DDPO needs the stochastic sampler
    with pytest.raises(ValueError, match="unknown key"):
        draft.load_config(None, budget_queries=3)


def test_pairwise_diversity_closed_form():
    """Two groups: {0, 3} (distance 3) and {(0,0), (3,4), (0,4)} (distances 5, 3, 4 -> mean 4): mean 3.5;
    identical samples give 0."""
    f = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 0.0], [3.0, 4.0], [0.0, 4.0]]).numpy()
    g = torch.tensor([0, 0, 1, 1, 1]).numpy()
    assert draft.pairwise_diversity(f, g) == pytest.approx(3.5)
    assert draft.pairwise_diversity(f[[0, 0, 0]], g[:3] * 0) == 0.0


# ----------------------------------------------------------------------------- the experiments on the tiny pipeline


@pytest.fixture(scope="module")
def tiny_ctx():
    from imaging.tiny import tiny_pipeline

    pipe = tiny_pipeline(seed=0)
    return pipe, draft.build_context(_tiny_cfg(), pipe=copy.deepcopy(pipe))


def _roundtrip(d):
    from theory.registry import to_jsonable

    return json.loads(json.dumps(to_jsonable(d)))


def test_experiments_run_tiny_and_their_json_draws(tiny_ctx, tmp_path):
    """compare -> lora -> diversity at a tiny setting through the engine; every run spends exactly the
    budget; the figures draw from the JSON; the diffusers adapter at scale 0 is the pre-trained model and
    at scale 1 the fine-tuned one (same noise)."""
    import matplotlib

    matplotlib.use("Agg")
    from imaging import draft_figures as df

    pipe, ctx = tiny_ctx
    cfg = _tiny_cfg()
    cmp = draft.compare(cfg, ctx, adapter_dir=tmp_path / "ad")
    for r in cfg.rewards:
        for m in cfg.methods:
            run = cmp["runs"][r][m][0]
            steps, q = budget_steps(m, cfg)
            assert run["curve"][-1]["queries"] == steps * q == run["history"][-1]["reward_queries_total"]
            assert run["curve"][0]["compress"] == pytest.approx(cmp["pretrained"]["compress"], rel=1e-9)
    assert set(cmp["adapters"]) == set(cfg.lora_rewards)
    assert "lv_vs_refl" in cmp["claims"]["compress"] and "gradient_vs_ddpo" in cmp["claims"]["compress"]
    df.draw_compare(_roundtrip(df._strip_compare(cmp)))

    lo = draft.lora(cfg, cmp["adapters"], ctx=ctx, pipe=copy.deepcopy(pipe))
    s0 = next(s for s in lo["scales"] if s["scale"] == 0.0)
    pre = draft.evaluate(ctx, cfg, ctx.base, cfg.n_lora)
    assert s0["compress"] == pytest.approx(pre["compress"], rel=1e-6)
    df.draw_lora(_roundtrip(lo))

    dv = draft.diversity(cfg, ctx)
    assert len(dv["runs"]) == len(cfg.div_lams) + len(cfg.div_eps)
    assert all(r["kl_last"] is not None for r in dv["runs"])
    df.draw_diversity(_roundtrip(dv))


def test_lora_scale_one_is_the_fine_tuned_model(tiny_ctx, tmp_path):
    """The exported adapter loaded by stock diffusers at scale 1 reproduces the fine-tuned steered model's
    evaluation on the same noise (float32 round-off only)."""
    from imaging.lora_io import save_diffusers_lora

    pipe, ctx = tiny_ctx
    cfg = _tiny_cfg(budget=2)
    model, _ = draft.train_run(ctx, cfg, "DRaFT-1", "compress", 0)
    save_diffusers_lora(model, tmp_path / "a")
    ev = draft.evaluate(ctx, cfg, model, cfg.n_lora)
    lo = draft.lora(replace_scales(cfg), {"compress": tmp_path / "a", "incompress": tmp_path / "a"}, ctx=ctx,
                    pipe=copy.deepcopy(pipe))
    s1 = next(s for s in lo["scales"] if s["scale"] == 1.0)
    assert s1["compress"] == pytest.approx(ev["compress"], rel=1e-4)


def replace_scales(cfg):
    from dataclasses import replace

    return replace(cfg, lora_scales=(1.0,), mix_weights=(0.0,))


# ----------------------------------------------------------------------------- the SD config through sd-finetune
# (tiny_aesthetic: tests/imaging/conftest.py)


def test_sd_config_is_the_papers_setting():
    cfg = json.loads(CONFIG.read_text())
    assert (cfg["reward"], cfg["method"], cfg["lv_n"], cfg["lora_rank"], cfg["lora_targets"]) == \
        ("aesthetic", "draftlv", 2, 8, "attn+ff")
    assert (cfg["lr"], cfg["batch_size"], cfg["steps"], cfg["sample_steps"], cfg["guidance_scale"], cfg["dtype"],
            cfg["weight_decay"], cfg["eta"]) == (4e-4, 4, 2000, 50, 7.5, "bfloat16", 0.1, 0.0)
    assert len(cfg["prompts"]) == 45


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_sd_config_runs_two_steps_on_the_tiny_pipeline(tiny_aesthetic, tmp_path, capsys, dtype):
    """`sd-finetune --config draft_sd15.json --tiny --steps 2 --sample-steps 4 --prompt cat`: the file's settings
    (the reward paths pointed at tiny local files) reach the run, the command line overrides the file, and
    the rank-8 attention + feed-forward adapter leaves in the diffusers format. The file's bfloat16 base is
    slow on a CPU (slow mark); the default suite runs the same file with dtype float32."""
    from safetensors import safe_open

    from diffsteer.cli import main

    folder, head = tiny_aesthetic
    cfg = json.loads(CONFIG.read_text())
    cfg["reward_options"] = {"clip_path": str(folder), "head_path": str(head)}
    cfg["dtype"] = dtype
    path = tmp_path / "sd.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    rc = main(["sd-finetune", "--config", str(path), "--tiny", "--steps", "2", "--sample-steps", "4", "--prompt", "cat",
               "--device", "cpu", "--no-progress", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    c = s["config"]
    assert s["steps"] == 2 and c["steps"] == 2 and c["sample_steps"] == 4 and c["prompts"] == ["cat"]  # CLI wins
    assert c["dtype"] == dtype
    for k in ("reward", "method", "lv_n", "lr", "batch_size", "guidance_scale", "lora_rank",
              "lora_targets", "weight_decay"):
        assert c[k] == cfg[k], k
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        ff = [k for k in keys if ".ff.net." in k and ("lora.down" in k or "lora_A" in k)]
        assert ff and all(f.get_tensor(k).shape[0] == 8 for k in ff)


def test_config_file_errors_are_one_line(tmp_path, capsys):
    from diffsteer.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"lr": 1e-3, "learning_rate": 2}))
    assert main(["sd-finetune", "--config", str(bad), "--tiny", "--out", str(tmp_path / "o")]) == 2
    assert "--config: unknown key(s) ['learning_rate']" in capsys.readouterr().err
    assert main(["sd-finetune", "--config", str(tmp_path / "missing.json"), "--tiny"]) == 2
    assert "--config: no file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- speed-ups and verdicts (synthetic)

Q = [0, 32, 64, 96, 128]


def _run(slope, seconds_per_query=0.1, start=0.0, key_sign=1.0):
    """A run whose evaluated reward rises linearly in the queries (linear interpolation is then exact)."""
    return {"curve": [{"queries": q, "wall_time": q * seconds_per_query, "compress": key_sign * (start + slope * q),
                       "compress_se": 0.01, "jpeg_kb": 5.0 - slope * q, "jpeg_kb_se": 0.01} for q in Q],
            "steps": 32, "queries_per_step": 4, "seconds_per_step": 0.4}


def test_censored_ratio_closed_forms():
    """Both reach: b / a; only the fast one: >= the slow budget / a; only the slow one: <= b / the fast budget."""
    assert draft.censored_ratio(32.0, 96.0, 128.0, 128.0) == (3.0, "=")
    assert draft.censored_ratio(32.0, float("inf"), 128.0, 128.0) == (4.0, ">=")
    assert draft.censored_ratio(float("inf"), 64.0, 128.0, 128.0) == (0.5, "<=")
    v, b = draft.censored_ratio(float("inf"), float("inf"), 128.0, 128.0)
    assert b == "none" and v != v


def test_speedup_levels_of_the_larger_gain_with_a_method_that_never_reaches():
    """Fast y = q/64 (final 2), slow y = q/128 (final 1): levels at 25/50/75% of the larger gain 2 are 0.5, 1,
    1.5, reached by the fast run at 32, 64, 96 queries and by the slow one at 64, 128, never: ratios 2, 2 and
    the bound >= 128/96; a flat method (DDPO-like) reaches none, every ratio a lower bound."""
    s = draft.speedup([_run(1 / 64)], [_run(1 / 128)])
    assert [lv["bound"] for lv in s["levels"]] == ["=", "=", ">="]
    assert [lv["ratio"] for lv in s["levels"]] == pytest.approx([2.0, 2.0, 128 / 96])
    assert "never reaches" in s["levels"][2]["text"] and "nan" not in s["levels"][2]["text"]
    flat = draft.speedup([_run(1 / 64)], [_run(0.0)])
    assert all(lv["bound"] == ">=" for lv in flat["levels"])
    assert flat["levels"][1]["ratio"] == pytest.approx(128 / 64)
    none = draft.speedup([_run(0.0)], [_run(-1e-3)])  # neither gains: no level
    assert none["levels"] == []


def test_speedup_per_seed_mean_and_se():
    """Per seed i the ratio is slope_fast_i / slope_slow_i (linear curves that both reach the level); their
    mean and se are numpy's."""
    import numpy as np

    f, s = [1 / 50, 1.02 / 50, 0.98 / 50], [1 / 90, 0.98 / 90, 1.02 / 90]
    out = draft.speedup([_run(a) for a in f], [_run(b) for b in s])
    lv = out["levels"][1]
    want = np.array(f) / np.array(s)
    assert [x["ratio"] for x in lv["seeds"]] == pytest.approx(want.tolist())
    assert lv["ratio_mean"] == pytest.approx(want.mean())
    assert lv["ratio_se"] == pytest.approx(want.std(ddof=1) / np.sqrt(3))
    assert lv["n_censored"] == 0


def _compare_data(lv_slope, refl_slope, ddpo_slope=0.0, jitter=(1.0, 1.02, 0.98)):
    cfg = DraftImageConfig().to_json()
    runs = {}
    for r, sg in (("compress", 1.0), ("incompress", -1.0)):
        runs[r] = {"DRaFT-K": [_run(lv_slope * 1.5 * j, key_sign=sg) for j in jitter],
                   "DRaFT-LV": [_run(lv_slope * j, key_sign=sg) for j in jitter],
                   "ReFL": [_run(refl_slope * j, key_sign=sg) for j in reversed(jitter)],
                   "DDPO": [_run(ddpo_slope + 1e-5 * (i - 1), key_sign=sg) for i in range(len(jitter))]}
    data = {"config": cfg, "runs": runs}
    data["claims"] = draft.claims(data)
    return _roundtrip(data)


def test_verdicts_compare_follow_the_numbers():
    """LV 1.8x ReFL's slope (per-seed ratios 1.8 +- ~0.04): holds; LV 1.2x: short of ~2x, does not hold;
    gradient methods against a flat DDPO: holds. The registry accepts the verdicts."""
    from theory.registry import check_verdicts, verdict_word

    good = draft.verdicts_compare(_compare_data(1 / 50, 1 / 90))
    check_verdicts("draft_image_compare", good)
    assert [verdict_word(v["verdict"]) for v in good] == ["holds", "holds"]
    assert "1.80x" in good[0]["numbers"]
    bad = draft.verdicts_compare(_compare_data(1.2 / 90, 1 / 90))
    assert verdict_word(bad[0]["verdict"]) == "does not hold" and "short of 2x" in bad[0]["verdict"]
    one_seed = draft.verdicts_compare(_compare_data(1 / 50, 1 / 90, jitter=(1.0,)))
    assert verdict_word(one_seed[0]["verdict"]) == "not resolved"  # no se with one seed
    # DDPO's slope 1.2x ReFL's and LV's, 0.8x DRaFT-K's; per-seed jitter +-60 %: every gradient method's gain
    # within 2 se of DDPO's, not resolved either way
    tied = draft.verdicts_compare(_compare_data(1 / 90, 1 / 90, ddpo_slope=1.2 / 90, jitter=(1.0, 1.6, 0.4)))
    assert verdict_word(tied[1]["verdict"]) == "not resolved", tied[1]


def _div_data(divs, lost=True):
    cfg = DraftImageConfig().to_json()
    mk = lambda lam, eps, d: {"lam": lam, "eps_penalty": eps, "judge_diversity": d, "judge_diversity_se": 0.3,  # noqa: E731
                              "compress": -1e-3, "compress_se": 1e-5, "kl_last": 1.0}
    runs = [mk(0.0, 0.0, divs[0]), mk(1e-3, 0.0, divs[1]), mk(1e-2, 0.0, divs[2]), mk(0.0, 1e-2, divs[3])]
    return {"config": cfg, "runs": runs, "pretrained": {"judge_diversity": 20.0 if lost else divs[0], "compress": -1e-3}}


def test_verdicts_diversity_follow_the_numbers():
    """se 0.3 per setting, so a difference resolves above 2 * 0.3 * sqrt 2 = 0.85."""
    from theory.registry import verdict_word

    assert verdict_word(draft.verdicts_diversity(_div_data([14, 19, 20, 18]))[0]["verdict"]) == "holds"
    v = draft.verdicts_diversity(_div_data([14, 14.5, 20, 14.2]))[0]["verdict"]
    assert v.startswith("holds only when lam = 0.01 ") and "lam = 0.001" in v.split("not for")[1]
    # every setting within 0.85 of lam = 0 (either way): not resolved; every setting below it by more: does not hold
    assert verdict_word(draft.verdicts_diversity(_div_data([14, 14.5, 14, 14.2]))[0]["verdict"]) == "not resolved"
    assert verdict_word(draft.verdicts_diversity(_div_data([16, 14, 14, 14.5]))[0]["verdict"]) == "does not hold"
    # below lam = 0 by more for two settings, within 0.85 for lam = 0.01: does not hold, and it names which is which
    v = draft.verdicts_diversity(_div_data([16, 14, 16.2, 14.5]))[0]["verdict"]
    assert verdict_word(v) == "does not hold" and "lam = 0.001" in v.split("less diversity")[0]
    assert "lam = 0.01 within 2 se of it" in v
    assert "no resolved loss" in draft.verdicts_diversity(_div_data([20, 20, 20, 20], lost=False))[0]["verdict"]


def _lora_data(per_scale, mix_vals):
    """One adapter pair; per_scale {scale: per-sample values}, mix_vals {(w_a, w_b): values}."""
    cfg = DraftImageConfig().to_json()
    sc = [{"scale": s, "compress": sum(v) / len(v), "compress_se": 0.0, "compress_values": v} for s, v in per_scale.items()]
    mix = [{"w_a": a, "w_b": b, "compress_values": v} for (a, b), v in mix_vals.items()]
    return {"config": cfg, "reward_a": "compress", "reward_b": "incompress", "scales": sc,
            "per_adapter": [{"scales": sc, "mix": mix}]}


def test_verdicts_lora_follow_the_numbers():
    """Per-sample paired differences: a rise of 1 per unit scale with sample noise 0.1 holds; a fall after
    s = 1 gives 'holds only when s <= 1'; the sum between the two adapters' rewards mixes them."""
    import numpy as np

    from theory.registry import verdict_word

    rng = np.random.default_rng(0)

    def noisy(m):  # independent sample noise per setting: paired differences have se ~0.1 * sqrt(2) / 4
        return (m + rng.normal(0, 0.1, 16)).tolist()

    up = {s: noisy(s) for s in (0.0, 0.5, 1.0, 1.5)}
    mix = {(1.0, 0.0): noisy(1), (1.0, 1.0): noisy(0), (0.0, 1.0): noisy(-1), (0.0, 0.0): noisy(0)}
    v = draft.verdicts_lora(_lora_data(up, mix))
    assert [verdict_word(x["verdict"]) for x in v] == ["holds", "holds"]
    fall = {**up, 1.5: noisy(0.5)}
    assert draft.verdicts_lora(_lora_data(fall, mix))[0]["verdict"].startswith("holds only when s <= 1 ")
    flat_mix = {**mix, (1.0, 1.0): noisy(1)}
    # the sum equal to adapter A alone (within noise): not resolved; the sum above A alone (resolved): does not hold
    assert verdict_word(draft.verdicts_lora(_lora_data(up, flat_mix))[1]["verdict"]) == "not resolved"
    above_mix = {**mix, (1.0, 1.0): noisy(2)}
    assert verdict_word(draft.verdicts_lora(_lora_data(up, above_mix))[1]["verdict"]) == "does not hold"
    # a flat scale curve (no rise, no fall beyond 2 se): not resolved; a falling one: does not hold
    flat = draft.verdicts_lora(_lora_data({s: noisy(0) for s in up}, mix))[0]["verdict"]
    assert verdict_word(flat) == "not resolved", flat
    down = {s: noisy(-s) for s in up}
    assert verdict_word(draft.verdicts_lora(_lora_data(down, mix))[0]["verdict"]) == "does not hold"
