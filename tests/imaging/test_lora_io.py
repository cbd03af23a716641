"""LoRA in the diffusers format, both ways, on the tiny pipeline saved with ``save_pretrained``:
the package's fine-tuned UNet is what stock ``pipe.load_lora_weights(out)`` gives (bit for bit), a LoRA
written by stock diffusers/peft is what ``sd-sample --lora`` samples with, and several ``--lora PATH:SCALE``
are summed with their scales (0 = the pre-trained model)."""
import json

import pytest
import torch

pytest.importorskip("diffusers")

from imaging.finetune import LORA_TARGETS, SDFinetuneConfig, run_finetune
from imaging.lora_io import LORA_WEIGHT_NAME, load_diffusers_loras, parse_lora_spec, save_diffusers_lora
from imaging.pipeline import LatentEps, encode_prompts, latent_shape, load_pipeline, schedule_of
from imaging.tiny import tiny_pipeline

PROMPTS = ["a photo of a cat", "a red dog"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny pipeline as a user's folder (save_pretrained), and its prompt embeddings."""
    d = tmp_path_factory.mktemp("pipe")
    pipe = tiny_pipeline(seed=0)
    pipe.save_pretrained(d)
    cond, unc = encode_prompts(pipe, PROMPTS)
    return d, cond, unc


def _eps(unet, pipe_dir, cond, unc, w=2.0):
    q = load_pipeline(pipe_dir)
    x = torch.randn(2, *latent_shape(q), generator=torch.Generator().manual_seed(5))
    t = torch.tensor([700.0, 80.0])
    with torch.no_grad():
        return LatentEps(unet, schedule_of(q), cond, unc, w)(x, t, torch.tensor([0, 1]))


def _randomise_lora(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("targets", ["attn", "attn+ff"])
def test_package_lora_loads_in_stock_diffusers_exactly(saved, tmp_path, targets):
    """A steered UNet (LoRA B randomised so the adapter matters) written by ``save_diffusers_lora`` and loaded
    by stock ``load_lora_weights(dir)`` into a fresh pipeline: eps equal bit for bit (the same peft layers
    compute the same float operations), and different from the pre-trained eps."""
    from theory.engine import SteeredModel

    d, cond, unc = saved
    q = load_pipeline(d)
    steered = SteeredModel(LatentEps(q.unet, schedule_of(q), cond, unc, 2.0), lora_rank=2,
                           lora_targets=list(LORA_TARGETS[targets]))
    _randomise_lora(steered, 0)
    f = save_diffusers_lora(steered, tmp_path)
    assert f == tmp_path / LORA_WEIGHT_NAME
    from safetensors import safe_open

    with safe_open(str(f), "pt") as h:
        keys = list(h.keys())
    assert keys and all(k.startswith("unet.") for k in keys)
    assert any("ff.net" in k for k in keys) == (targets == "attn+ff")

    stock = load_pipeline(d)
    stock.load_lora_weights(tmp_path)
    x = torch.randn(2, *latent_shape(q), generator=torch.Generator().manual_seed(5))
    t = torch.tensor([700.0, 80.0])
    c = torch.tensor([0, 1])
    with torch.no_grad():
        ours = steered(x, t, c)
        theirs = LatentEps(stock.unet, schedule_of(stock), cond, unc, 2.0)(x, t, c)
        base = steered.reference(x, t, c)
    assert torch.equal(ours, theirs)
    assert (ours - base).abs().max() > 1e-3


def test_sd_finetune_output_loads_in_stock_diffusers(saved, tmp_path):
    """End to end: ``sd-finetune`` on the saved folder writes OUT/pytorch_lora_weights.safetensors; the stock
    pipeline + load_lora_weights(OUT) reproduces the trained model's eps exactly (the trained model rebuilt
    from the checkpoint's own LoRA parameters)."""
    from safetensors.torch import load_file

    from imaging.finetune import build

    d, cond, unc = saved
    cfg = SDFinetuneConfig(model=str(d), prompts=tuple(PROMPTS), method="draftk", k="1", steps=2, batch_size=2,
                           sample_steps=3, guidance_scale=2.0, lr=5e-2, ckpt_every=0, out=str(tmp_path / "run"),
                           progress=False, device="cpu")
    run_finetune(cfg)
    _, model, _, _, _ = build(cfg)
    params = load_file(str(tmp_path / "run" / "checkpoint" / "params.safetensors"))
    named = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in params.items():
            named[k].copy_(v)
    stock = load_pipeline(d)
    stock.load_lora_weights(tmp_path / "run")
    x = torch.randn(2, *latent_shape(stock), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([900.0, 30.0])
    c = torch.tensor([1, 0])
    with torch.no_grad():
        ours = model(x, t, c)
        theirs = LatentEps(stock.unet, schedule_of(stock), model.base.prompt_embeds, model.base.uncond_embeds, 2.0)(x, t, c)
        base = model.reference(x, t, c)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, base)  # two steps at lr 5e-2 moved the LoRA


def _stock_lora(pipe_dir, out, seed, targets=("to_q", "to_k", "to_v", "to_out.0")):
    """A LoRA made the way diffusers' training scripts make one: unet.add_adapter(LoraConfig) + save."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    p = load_pipeline(pipe_dir)
    p.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=list(targets), init_lora_weights="gaussian"))
    _randomise_lora(p.unet, seed)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=convert_state_dict_to_diffusers(
        get_peft_model_state_dict(p.unet)))
    return out


def test_stock_lora_samples_the_same_in_sd_sample(saved, tmp_path):
    """A stock LoRA: the package's sampler (``load_diffusers_loras`` + LatentEps + theory DDIM, as
    ``sd-sample --lora`` runs it) equals stock ``pipe(...)`` with ``load_lora_weights`` on the same latents
    and noise, to float32 round-off (the test_pipeline tolerance: relative 1e-5 over 6 steps)."""
    from imaging.pipeline import scheduler_grid
    from theory.solvers import sample

    d, cond, unc = saved
    lora = _stock_lora(d, tmp_path / "stock", seed=3)
    ours_pipe = load_pipeline(d)
    load_diffusers_loras(ours_pipe, [(lora, 1.0)])
    stock = load_pipeline(d)
    stock.load_lora_weights(lora)
    sch = schedule_of(stock)
    x = torch.randn(2, *latent_shape(stock), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = sample(LatentEps(ours_pipe.unet, sch, cond, unc, 3.0), sch, x, scheduler_grid(ours_pipe.scheduler, 6),
                      method="ddim", eta=0.0, cond=torch.tensor([0, 1])).x0
        ref = stock(prompt_embeds=cond, negative_prompt_embeds=unc.expand(2, -1, -1), latents=x.clone(),
                    num_inference_steps=6, guidance_scale=3.0, output_type="latent").images
        plain = load_pipeline(d)(prompt_embeds=cond, negative_prompt_embeds=unc.expand(2, -1, -1), latents=x.clone(),
                                 num_inference_steps=6, guidance_scale=3.0, output_type="latent").images
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (ref - plain).abs().max() > 1e-3  # the LoRA changes the samples


def test_lora_scales_sum_and_interpolate(saved, tmp_path):
    """Two adapters with scales s1, s2 on one adapted projection give W x + s1 dW1 x + s2 dW2 x (float32
    round-off, 1e-5 relative), scale 0 for both gives the pre-trained UNet exactly."""
    d, cond, unc = saved
    a = _stock_lora(d, tmp_path / "a", seed=1)
    b = _stock_lora(d, tmp_path / "b", seed=2)

    def to_q(specs):
        p = load_pipeline(d)
        names = load_diffusers_loras(p, specs)
        layer = p.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
        return p, layer, names

    h = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    _, layer, names = to_q([(a, 0.5), (b, -1.5)])
    assert names == ["lora0", "lora1"]
    with torch.no_grad():
        got = layer(h)
        W = layer.base_layer(h)
        d1 = layer.lora_B["lora0"](layer.lora_A["lora0"](h))
        d2 = layer.lora_B["lora1"](layer.lora_A["lora1"](h))
    want = W + 0.5 * d1 - 1.5 * d2
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    p0, _, _ = to_q([(a, 0.0), (b, 0.0)])
    base = load_pipeline(d)
    x = torch.randn(1, *latent_shape(base), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        e0 = LatentEps(p0.unet, schedule_of(p0), cond, unc, 2.0)(x, torch.tensor([400.0]))
        eb = LatentEps(base.unet, schedule_of(base), cond, unc, 2.0)(x, torch.tensor([400.0]))
    assert torch.equal(e0, eb)


def test_lora_spec_parsing_and_errors(tmp_path):
    assert parse_lora_spec("runs/x") == (parse_lora_spec("runs/x:1")[0], 1.0)
    assert parse_lora_spec("runs/x:0.25")[1] == 0.25
    assert parse_lora_spec("a:b/c")[0].name == "c"  # a ':' inside the path is part of the path
    with pytest.raises(ValueError, match="--lora"):
        parse_lora_spec("runs/x:nan")
    (tmp_path / "empty").mkdir()
    p = tiny_pipeline()
    with pytest.raises(FileNotFoundError, match="--lora"):
        load_diffusers_loras(p, [(tmp_path / "empty", 1.0)])
    # a file without UNet keys diffusers recognises (the old 'base.unet.' layout) is refused, not a no-op
    from safetensors.torch import save_file

    save_file({"base.unet.conv_in.lora_A.weight": torch.zeros(2, 4)}, str(tmp_path / "old.safetensors"))
    with pytest.raises(ValueError, match="--lora"):
        load_diffusers_loras(p, [(tmp_path / "old.safetensors", 1.0)])


def test_sd_sample_cli_with_two_loras(saved, tmp_path):
    """``diffsteer sd-sample --lora A:0.5 --lora B`` runs and records its settings."""
    from diffsteer.cli import main

    d, _, _ = saved
    a = _stock_lora(d, tmp_path / "a", seed=1)
    b = _stock_lora(d, tmp_path / "b", seed=2)
    out = tmp_path / "s"
    rc = main(["sd-sample", "--model", str(d), "--steps", "3", "--guidance-scale", "2", "--device", "cpu",
               "--lora", f"{a}:0.5", "--lora", str(b), "--out", str(out)])
    assert rc == 0
    assert (out / "sample_000.png").is_file()
    assert json.loads((out / "config.json").read_text())["lora"] == [f"{a}:0.5", str(b)]
