"""Steering a (tiny, in-process) Stable Diffusion pipeline with the package's own fields and engine:
reward guidance raises the reward on the same noise, LoRA on the UNet leaves the model unchanged at
initialisation, and ``sd-finetune`` trains, checkpoints and resumes through ``theory.engine``."""
import json

import pytest
import torch

pytest.importorskip("diffusers")

from imaging.pipeline import LatentEps, encode_prompts, latent_shape, schedule_of, scheduler_grid
from imaging.rewards import LatentReward, brightness, colourfulness, jpeg_compressibility
from imaging.tiny import tiny_pipeline
from theory.guidance import dps_guidance
from theory.solvers import sample


@pytest.fixture(scope="module")
def setup():
    pipe = tiny_pipeline(seed=0)
    cond, unc = encode_prompts(pipe, ["a photo of a cat"])
    sch = schedule_of(pipe)
    return pipe, LatentEps(pipe.unet, sch, cond, unc, guidance_scale=3.0), sch


def test_image_rewards_shapes_and_values():
    img = torch.zeros(2, 3, 4, 4)
    img[1, 0] = 1.0  # pure red: saturation 1, brightness 1/3
    assert torch.equal(colourfulness(img), torch.tensor([0.0, 1.0]))
    assert torch.allclose(brightness(img), torch.tensor([0.0, 1 / 3]))
    assert jpeg_compressibility(img).shape == (2,)
    assert jpeg_compressibility.differentiable is False


def test_unknown_reward_is_named(setup):
    pipe, _, _ = setup
    with pytest.raises(ValueError, match="image_reward"):
        LatentReward(pipe, "aesthetics-from-the-hub")


def test_reward_guidance_raises_reward_on_same_noise(setup):
    """The look-ahead (DPS / G_loss) field grad_x r(decode(x0_hat(x_t))) on the tiny pipeline: on the same
    initial latents, every guided sample is brighter than its unguided twin, and more so at a larger
    strength (deterministic DDIM, so the comparison is exact, not statistical)."""
    pipe, model, sch = setup
    reward = LatentReward(pipe, "brightness")
    x = torch.randn(4, *latent_shape(pipe), generator=torch.Generator().manual_seed(0))
    ts = scheduler_grid(pipe.scheduler, 10)
    rs = []
    for zeta in (None, 50.0, 500.0):
        field = None if zeta is None else dps_guidance(model, sch, lambda x0, y: reward(x0, y), None, zeta=zeta)
        with torch.no_grad():
            rs.append(reward(sample(model, sch, x, ts, method="ddim", eta=0.0, guidance=field).x0))
    assert bool((rs[1] > rs[0]).all()) and bool((rs[2] > rs[1]).all())


def test_steered_unet_equals_pretrained_at_init(setup):
    from theory.engine import SteeredModel

    pipe, model, sch = setup
    steered = SteeredModel(model, lora_rank=2, lora_targets=["to_q", "to_k", "to_v", "to_out.0"])
    n_lora = sum(p.numel() for p in steered.parameters() if p.requires_grad)
    assert n_lora > 0
    x = torch.randn(2, *latent_shape(pipe), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([700.0, 100.0])
    with torch.no_grad():
        assert torch.equal(steered(x, t, None), steered.reference(x, t, None))


def test_sd_finetune_tiny_trains_and_resumes(tmp_path):
    """Three DRaFT-1 steps on the tiny pipeline write a LoRA, a history and a summary; running again with
    more steps resumes from the checkpoint (the history continues where it stopped)."""
    from imaging.finetune import SDFinetuneConfig, run_finetune

    cfg = SDFinetuneConfig(tiny=True, prompts=("a red dog",), reward="colourfulness", method="draftk", k="1",
                           steps=3, batch_size=2, sample_steps=4, guidance_scale=1.0, lr=1e-2, ckpt_every=1,
                           out=str(tmp_path), progress=False)
    s = run_finetune(cfg)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    hist = json.loads((tmp_path / "history.json").read_text())
    rows = hist if isinstance(hist, list) else hist["history"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["grad_norm"] > 0 for r in rows)
    from dataclasses import replace

    s2 = run_finetune(replace(cfg, steps=5))
    hist2 = json.loads((tmp_path / "history.json").read_text())
    rows2 = hist2 if isinstance(hist2, list) else hist2["history"]
    assert [r["step"] for r in rows2] == [1, 2, 3, 4, 5]
    assert rows2[:3] == rows
    assert s2["steps"] == 5 and s["steps"] == 3


def test_sd_finetune_bad_method(tmp_path):
    from imaging.finetune import SDFinetuneConfig, run_finetune

    with pytest.raises(ValueError, match="method"):
        run_finetune(SDFinetuneConfig(tiny=True, method="sgd", out=str(tmp_path), progress=False))
    with pytest.raises(ValueError, match="reward"):
        run_finetune(SDFinetuneConfig(tiny=True, method="draftk", reward="compressibility", out=str(tmp_path),
                                      progress=False))


def test_sd_finetune_resume_refuses_other_settings(tmp_path, monkeypatch):
    """Resuming into an --out whose run had other prompts / reward / LoRA rank / dtype is refused before a
    model is loaded, naming each differing field; --steps may change."""
    from dataclasses import replace

    from imaging.finetune import SDFinetuneConfig, run_finetune

    cfg = SDFinetuneConfig(tiny=True, prompts=("a red dog",), method="draftk", k="1", steps=1, batch_size=1,
                           sample_steps=2, guidance_scale=1.0, lr=1e-2, ckpt_every=1, out=str(tmp_path),
                           progress=False, device="cpu")
    run_finetune(cfg)
    import imaging.tiny

    def boom(*a, **k):
        raise AssertionError("loaded a pipeline before refusing the resume")

    monkeypatch.setattr(imaging.tiny, "tiny_pipeline", boom)
    with pytest.raises(ValueError, match=r"prompts.*reward|reward.*prompts"):
        run_finetune(replace(cfg, prompts=("a blue cat",), reward="brightness", steps=2))
    with pytest.raises(ValueError, match="lora_rank"):
        run_finetune(replace(cfg, lora_rank=2, steps=2))
    monkeypatch.undo()
    assert run_finetune(replace(cfg, steps=2))["steps"] == 2
