"""SteeredModel's label embedding in 'module' mode (added to a named submodule's output through a hook):
equal to the pre-trained model at initialisation and for the NULL label, a working gradient path, clear
errors, and copies that carry their own hook."""
import copy

import pytest
import torch

from theory.engine import SteeredModel
from theory.nets import EpsMLP


def _pair(seed=0):
    torch.manual_seed(seed)
    base = EpsMLP(3, hidden=16, depth=2, time_dim=8)
    return base, SteeredModel(copy.deepcopy(base), lora_rank=2, n_labels=4, label_mode="module",
                              label_module="time", label_shape=(8,))


def test_module_mode_init_null_and_reference():
    base, m = _pair()
    x, t = torch.randn(6, 3), torch.rand(6)
    c = torch.tensor([0, 1, 2, 3, -1, 2])
    with torch.no_grad():
        assert torch.equal(m(x, t, c), base(x, t))  # bit for bit at initialisation
        m.embeddings[0].normal_()
        out = m(x, t, c)
        assert torch.equal(out[4], base(x, t)[4])  # NULL label reads the zero buffer
        assert bool(((out - base(x, t)).abs().sum(1)[[0, 1, 2, 3, 5]] > 0).all())
        assert torch.equal(m.reference(x, t, c), base(x, t))
        # the embedding enters through the time features, so the correction depends on x and t
        same_c = torch.zeros(6, dtype=torch.long)
        d = m(x, t, same_c) - base(x, t)
        assert not torch.allclose(d, d[:1].expand_as(d))


def test_module_mode_gradient_reaches_embedding_and_copy_is_independent():
    base, m = _pair(1)
    x, t, c = torch.randn(5, 3), torch.rand(5), torch.tensor([0, 1, 1, -1, 3])
    m(x, t, c).pow(2).sum().backward()
    g = m.embeddings[0].grad
    assert g is not None and bool((g[[0, 1, 3]].abs().sum(1) > 0).all()) and float(g[2].abs().sum()) == 0.0
    m2 = copy.deepcopy(m)
    with torch.no_grad():
        m.embeddings[0].normal_()
        assert torch.equal(m2(x, t, c), base(x, t))  # the copy's hook reads the copy's (zero) embedding


def test_module_mode_bad_input():
    base = EpsMLP(3, hidden=8, depth=1, time_dim=8)
    with pytest.raises(ValueError, match="label_module"):
        SteeredModel(copy.deepcopy(base), n_labels=2, label_mode="module", label_module="nope", label_shape=(8,))
    with pytest.raises(ValueError, match="label_module, label_shape"):
        SteeredModel(copy.deepcopy(base), n_labels=2, label_mode="module")
    with pytest.raises(ValueError, match="label_mode"):
        SteeredModel(copy.deepcopy(base), n_labels=2, label_mode="input")
    m = SteeredModel(copy.deepcopy(base), n_labels=2, label_mode="module", label_module="time", label_shape=(6,))
    with pytest.raises(ValueError, match="label_shape"):
        m(torch.randn(2, 3), torch.rand(2), torch.tensor([0, 1]))


class PromptBase(torch.nn.Module):
    """A stand-in conditional base: eps = MLP(x, t) + W[prompt] * (1 + tanh(x)) (prompt indices; None = 0)."""

    def __init__(self, n_prompts=3):
        super().__init__()
        self.mlp = EpsMLP(2, hidden=8, depth=1)
        self.W = torch.nn.Parameter(0.5 * torch.randn(n_prompts, 2))
        self.dim = 2

    def forward(self, x, t, cond=None):
        p = torch.zeros(x.shape[0], dtype=torch.long) if cond is None else torch.as_tensor(cond).long()
        return self.mlp(x, t) + self.W[p] * (1 + torch.tanh(x))


@pytest.mark.parametrize("mode", ["output", "module", "network"])
def test_prompt_and_label_together(mode):
    """cond = PromptLabel(prompt, label): the prompt reaches the base, the label adds its correction. Two
    prompts under the same label give different eps; the NULL label gives the base exactly for every
    prompt (also after the label parameters moved); the reference and CFG keep the prompt."""
    from theory.engine import PromptLabel

    torch.manual_seed(0)
    base = PromptBase()
    kw = dict(label_mode="module", label_module="mlp.time", label_shape=(32,)) if mode == "module" else \
        dict(label_mode=mode)
    m = SteeredModel(copy.deepcopy(base), lora_rank=2, n_labels=4, **kw)
    with torch.no_grad():
        for p in m.label_parameters():
            p.normal_()
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_()
    x, t = torch.randn(6, 2), torch.rand(6)
    label = torch.tensor([1, 1, 1, 2, 2, 2])
    with torch.no_grad():
        e0 = m(x, t, PromptLabel(torch.zeros(6, dtype=torch.long), label))
        e1 = m(x, t, PromptLabel(torch.ones(6, dtype=torch.long), label))
        assert bool(((e0 - e1).abs().sum(1) > 0).all())
        null = torch.full((6,), -1)
        for prompt in range(3):
            p = torch.full((6,), prompt)
            with_lora_base = m.base(x, t, p)  # the base with its LoRA, no label
            assert torch.equal(m(x, t, PromptLabel(p, null)), with_lora_base)
            assert torch.equal(m.reference(x, t, PromptLabel(p, label)), base(x, t, p))
            assert torch.equal(m.cfg(0.0)(x, t, PromptLabel(p, label)), with_lora_base)
            one = m.cfg(1.0)(x, t, PromptLabel(p, label))
            assert torch.allclose(one, m(x, t, PromptLabel(p, label)), atol=1e-6)
    with pytest.raises(ValueError, match="PromptLabel"):
        SteeredModel(copy.deepcopy(base), lora_rank=2)(x, t, PromptLabel(torch.zeros(6, dtype=torch.long), label))


def test_prompt_label_conditions_through_finetune():
    """The loop carries PromptLabel conditions through every strategy's path (slicing, repeats, per-
    condition advantages) and the label table learns."""
    from theory.engine import DDPO, DRaFTK, DRaFTLV, FinetuneConfig, PromptLabel, finetune
    from theory.schedules import LinearVP

    def reward(x0, cond):
        return -((x0 - cond.label[:, None].to(x0.dtype)) ** 2).sum(1) - 0.1 * cond.prompt.to(x0.dtype)

    def cond_sampler(n, g):
        return PromptLabel(torch.randint(0, 3, (n,), generator=g), torch.randint(0, 4, (n,), generator=g))

    for strategy in (DRaFTK(2), DRaFTLV(2), DDPO(inner_steps=1, minibatches=2)):
        torch.manual_seed(0)
        m = SteeredModel(PromptBase(), lora_rank=2, n_labels=4)
        finetune(m, LinearVP(), reward, strategy, FinetuneConfig(steps=2, batch_size=8, n_steps=3, lr=1e-2,
                                                                  progress=False, lam=0.1, t_min=1e-3),
                 x_T_sampler=lambda n, g: torch.randn(n, 2, generator=g), cond_sampler=cond_sampler)
        assert float(m.embeddings[0].detach().abs().sum()) > 0, strategy
