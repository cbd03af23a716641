"""Mixed precision as the papers ran it (DRaFT sec. 4): the frozen pipeline in bfloat16, the LoRA factors,
their gradients and the AdamW state in float32, on the tiny pipeline on the CPU."""
import pytest
import torch

pytest.importorskip("diffusers")

from imaging.finetune import SDFinetuneConfig, build, run_finetune, validate
from theory.engine import objective


def _first_gradient(dtype: str, sample_steps: int = 4, k: str = "1"):
    """The LoRA gradient of DRaFT-K's objective at initialisation, same pipeline weights (seed 0), same
    LoRA initialisation (torch seed 0), same latents and prompts, only the frozen weights' dtype differs."""
    cfg = SDFinetuneConfig(tiny=True, prompts=("a red dog", "a photo of a cat"), method="draftk", k=k, steps=1,
                           batch_size=2, sample_steps=sample_steps, guidance_scale=3.0, dtype=dtype, out="unused",
                           progress=False, device="cpu")
    strategy, fcfg = validate(cfg)
    torch.manual_seed(0)
    pipe, model, sch, ts, reward = build(cfg)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    J, _, _ = objective(model, sch, reward, strategy, fcfg, x, cond=torch.tensor([0, 1]), ts=ts,
                        generator=torch.Generator().manual_seed(1))
    J.backward()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return pipe, named


@pytest.mark.parametrize("k", ["1", "4"])
def test_bf16_first_step_gradient_matches_fp32(k):
    """bfloat16 base: every trainable parameter and its gradient is float32, the UNet is bfloat16, and the
    first-step LoRA gradient matches the float32 run: relative L2 difference <= 0.2 and cosine >= 0.99.

    Tolerance: bfloat16 keeps 8 significant bits (unit roundoff u = 2^-9 ~ 2e-3 per rounding); the gradient
    passes forward and back through ~40 rounded layers of the UNet and the VAE decoder plus the no-gradient
    part of the chain, so its relative error is tens of u. Measured here (tiny pipeline, 4 DDIM steps):
    0.076 for K = 1 and 0.046 for K = 4 (cosine 0.997, 0.999); 0.14 for K = 1 over 20 steps (the
    no-gradient part of the chain drifts further). 0.2 leaves room for that, not for a wrong gradient
    (an unrelated direction has relative difference ~ 1.4 and cosine ~ 0)."""
    pipe16, g16 = _first_gradient("bfloat16", k=k)
    _, g32 = _first_gradient("float32", k=k)
    assert pipe16.unet.dtype == torch.bfloat16 and pipe16.vae.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for _, p in g16)
    assert [n for n, _ in g16] == [n for n, _ in g32]
    a = torch.cat([p.grad.flatten() for _, p in g32])
    b = torch.cat([p.grad.flatten() for _, p in g16])
    assert a.norm() > 0 and torch.isfinite(b).all()
    rel = float((a - b).norm() / a.norm())
    cos = float(torch.nn.functional.cosine_similarity(a, b, 0))
    assert rel <= 0.2 and cos >= 0.99, (rel, cos)


def test_bf16_training_stays_finite_and_float32(tmp_path):
    """Three AdamW steps at a large learning rate with a bfloat16 base: the LoRA (checkpointed and exported)
    is finite and float32; the run resumes."""
    from safetensors.torch import load_file

    cfg = SDFinetuneConfig(tiny=True, prompts=("a red dog",), method="draftk", k="2", steps=3, batch_size=2,
                           sample_steps=2, guidance_scale=1.0, lr=5e-2, dtype="bfloat16", ckpt_every=2,
                           out=str(tmp_path), progress=False, device="cpu")
    s = run_finetune(cfg)
    assert s["steps"] == 3
    for f in (tmp_path / "checkpoint" / "params.safetensors", tmp_path / "pytorch_lora_weights.safetensors"):
        t = load_file(str(f))
        assert t and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in t.values())
    from dataclasses import replace

    assert run_finetune(replace(cfg, steps=4))["steps"] == 4


def test_fp16_on_cpu_is_a_clear_error(tmp_path):
    """float16 needs a GPU: on the CPU the run stops before loading anything, naming --dtype."""
    cfg = SDFinetuneConfig(tiny=True, dtype="float16", device="cpu", out=str(tmp_path / "o"), progress=False)
    with pytest.raises(ValueError, match="--dtype: float16 needs a GPU"):
        run_finetune(cfg)
    from diffsteer.cli import main

    assert main(["sd-sample", "--tiny", "--fp16", "--device", "cpu", "--out", str(tmp_path / "s")]) == 2


def test_tiny_bf16_cli_runs(tmp_path, capsys):
    """``diffsteer sd-finetune --tiny --dtype bfloat16`` (crashed on a dtype mismatch) and ``sd-sample --tiny
    --dtype bfloat16`` run to the end."""
    from diffsteer.cli import main

    rc = main(["sd-finetune", "--tiny", "--dtype", "bfloat16", "--steps", "1", "--sample-steps", "2",
               "--guidance-scale", "1", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "f")])
    assert rc == 0, capsys.readouterr().err
    rc = main(["sd-sample", "--tiny", "--dtype", "bfloat16", "--steps", "2", "--device", "cpu",
               "--out", str(tmp_path / "s")])
    assert rc == 0 and (tmp_path / "s" / "sample_000.png").is_file()
