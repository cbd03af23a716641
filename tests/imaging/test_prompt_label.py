"""Prompt and label together: the CTRL-augmented UNet (label embedding added to the UNet's time
embedding, CTRL sec. 4) keeps its prompt conditioning; the NULL label is the base UNet exactly."""
import pytest
import torch

pytest.importorskip("diffusers")

from imaging.pipeline import LatentEps, encode_prompts, latent_shape, schedule_of
from imaging.tiny import tiny_pipeline
from theory.engine import PromptLabel, SteeredModel

PROMPTS = ["a photo of a cat", "a red dog", "a blue painting"]


@pytest.fixture(scope="module")
def model():
    pipe = tiny_pipeline(seed=0)
    cond, unc = encode_prompts(pipe, PROMPTS)
    base = LatentEps(pipe.unet, schedule_of(pipe), cond, unc, guidance_scale=3.0)
    m = SteeredModel(base, lora_rank=2, n_labels=4, label_mode="module", label_module="unet.time_embedding",
                     label_shape=(pipe.unet.time_embedding.linear_2.out_features,))
    (E,) = m.label_parameters()
    with torch.no_grad():  # a trained-looking embedding table (zero at initialisation)
        E.copy_(torch.randn(E.shape, generator=torch.Generator().manual_seed(0)))
    return pipe, base, m


def _x(pipe, n):
    return torch.randn(n, *latent_shape(pipe), generator=torch.Generator().manual_seed(1))


def test_two_prompts_differ_under_one_label(model):
    """Same latents, same time, same label 2: prompts 0, 1 and 2 give three different eps (each prompt's
    eps equals the base's for that prompt plus the label's effect, not prompt 0's)."""
    pipe, base, m = model
    x = _x(pipe, 1).expand(3, -1, -1, -1)
    t = torch.full((3,), 600.0)
    cond = PromptLabel(torch.tensor([0, 1, 2]), torch.tensor([2, 2, 2]))
    with torch.no_grad():
        e = m(x, t, cond)
    for i in range(3):
        for j in range(i + 1, 3):
            assert (e[i] - e[j]).abs().max() > 1e-4
    with torch.no_grad():  # the label changes eps for every prompt
        assert all((e[i] - base(x[:1], t[:1], torch.tensor([i]))[0]).abs().max() > 1e-4 for i in range(3))


def test_null_label_is_the_base_exactly_for_every_prompt(model):
    """Label -1 (NULL, a frozen zero row) with LoRA at initialisation: eps equal to the base UNet's with
    the same prompt, bit for bit, for each prompt and a mixed batch."""
    pipe, base, m = model
    x = _x(pipe, 3)
    t = torch.tensor([900.0, 300.0, 20.0])
    with torch.no_grad():
        for p in range(len(PROMPTS)):
            c = PromptLabel(torch.full((3,), p), torch.full((3,), -1))
            assert torch.equal(m(x, t, c), base(x, t, torch.full((3,), p)))
        p = torch.tensor([2, 0, 1])
        assert torch.equal(m(x, t, PromptLabel(p, torch.full((3,), -1))), base(x, t, p))
        assert torch.equal(m.reference(x, t, PromptLabel(p, torch.tensor([3, 1, 0]))), base(x, t, p))
        # a label moves eps away from the base for the same prompts
        assert (m(x, t, PromptLabel(p, torch.tensor([3, 1, 0]))) - base(x, t, p)).abs().max() > 1e-4


def test_sd_finetune_with_labels_trains_embedding_and_lora(tmp_path):
    """``SDFinetuneConfig(n_labels=...)``: the engine trains the label table and the LoRA on (prompt, label)
    conditions and the table is exported next to the diffusers LoRA."""
    from safetensors.torch import load_file

    from imaging.finetune import SDFinetuneConfig, run_finetune

    cfg = SDFinetuneConfig(tiny=True, prompts=("a red dog", "a photo of a cat"), n_labels=3, method="draftk", k="2",
                           steps=2, batch_size=2, sample_steps=3, guidance_scale=2.0, lr=1e-2, ckpt_every=0,
                           out=str(tmp_path), progress=False, device="cpu")
    run_finetune(cfg)
    E = load_file(str(tmp_path / "label_embedding.safetensors"))["embedding"]
    assert E.shape[0] == 3 and E.abs().max() > 0
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
