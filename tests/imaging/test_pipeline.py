"""The SD wrapper on a tiny in-process pipeline: the theory solver reproduces diffusers' own sampler,
the loader refuses what is not a local pipeline folder, batching and save/load do not change eps."""
import pytest
import torch

pytest.importorskip("diffusers")

from imaging.pipeline import (
    LatentEps,
    decode_latents,
    encode_prompts,
    latent_shape,
    load_pipeline,
    schedule_of,
    scheduler_grid,
)
from imaging.tiny import tiny_pipeline
from theory.solvers import sample


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def embeds(pipe):
    return encode_prompts(pipe, ["a photo of a cat", "a red dog"])


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_theory_ddim_equals_diffusers_pipeline(pipe, embeds, eta):
    """Same latents, same noise stream: theory.solvers.sample(ddim, eta) on LatentEps over the
    scheduler's own grid equals StableDiffusionPipeline's DDIM loop up to float32 round-off."""
    cond, unc = embeds
    sch = schedule_of(pipe)
    model = LatentEps(pipe.unet, sch, cond, unc, guidance_scale=3.0)
    x = torch.randn(2, *latent_shape(pipe), generator=torch.Generator().manual_seed(0))
    ts = scheduler_grid(pipe.scheduler, 8)
    with torch.no_grad():
        ours = sample(model, sch, x, ts, method="ddim", eta=eta, cond=torch.tensor([0, 1]),
                      generator=torch.Generator().manual_seed(1)).x0
        ref = pipe(prompt_embeds=cond, negative_prompt_embeds=unc.expand(2, -1, -1), latents=x.clone(),
                   num_inference_steps=8, guidance_scale=3.0, output_type="latent", eta=eta,
                   generator=torch.Generator().manual_seed(1)).images
    # float32 round-off over 8 steps of a UNet: relative 1e-5 of the latents' scale
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_batched_equals_single_and_cfg_scale_one(pipe, embeds):
    cond, unc = embeds
    sch = schedule_of(pipe)
    m = LatentEps(pipe.unet, sch, cond, unc, guidance_scale=5.0)
    x = torch.randn(3, *latent_shape(pipe), generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500.0, 20.0, 900.0])
    c = torch.tensor([1, 0, 1])
    with torch.no_grad():
        both = m(x, t, c)
        single = torch.cat([m(x[i:i + 1], t[i:i + 1], c[i:i + 1]) for i in range(3)])
        assert torch.allclose(both, single, atol=1e-5)
        m1 = LatentEps(pipe.unet, sch, cond, None, guidance_scale=1.0)
        direct = pipe.unet(x, sch.model_timestep(t).float(), encoder_hidden_states=cond[c]).sample
        assert torch.equal(m1(x, t, c), direct)


def test_save_load_round_trip(pipe, embeds, tmp_path):
    pipe.save_pretrained(tmp_path / "tiny")
    q = load_pipeline(tmp_path / "tiny")
    cond, unc = embeds
    x = torch.randn(1, *latent_shape(pipe), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([300.0])
    with torch.no_grad():
        a = LatentEps(pipe.unet, schedule_of(pipe), cond, unc, 2.0)(x, t)
        b = LatentEps(q.unet, schedule_of(q), cond, unc, 2.0)(x, t)
    assert torch.equal(a, b)
    img = decode_latents(q, x)
    assert img.shape == (1, 3, 16, 16) and img.min() >= 0 and img.max() <= 1


def test_bad_input(pipe, embeds, tmp_path):
    with pytest.raises(FileNotFoundError, match="model_path"):
        load_pipeline(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(tmp_path / "empty")
    cond, unc = embeds
    with pytest.raises(ValueError, match="uncond_embeds"):
        LatentEps(pipe.unet, schedule_of(pipe), cond, None, guidance_scale=7.5)
    m = LatentEps(pipe.unet, schedule_of(pipe), cond, unc, 2.0)
    with pytest.raises(ValueError, match="cond"):
        m(torch.zeros(1, *latent_shape(pipe)), torch.tensor([10.0]), torch.tensor([5]))
    with pytest.raises(ValueError, match="n_steps"):
        scheduler_grid(pipe.scheduler, 0)
