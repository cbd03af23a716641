"""The fine-tuning loop of theory.engine: exact resume after a kill, errors on
non-finite rewards and wrong shapes that name the step, samples or callable, the augmented model equal to
the pre-trained one at initialisation and its NULL embedding still zero after training, LoRA save/load/
scale/sum, and DDPO raising a thresholded reward."""
import copy

import pytest
import torch

from theory.engine import DDPO, DRaFTK, FinetuneConfig, NonFiniteRewardError, SteeredModel, finetune
from theory.lora import add_lora, load_lora, save_lora, set_active_adapters, set_lora_scale
from theory.nets import EpsMLP
from theory.schedules import LinearVP

SCH = LinearVP()


def _model(seed=0, labels=None):
    torch.manual_seed(seed)
    base = EpsMLP(2, hidden=16, depth=2)
    return base, SteeredModel(copy.deepcopy(base), lora_rank=2, n_labels=labels)


class Toward:
    """r(x0) = -|x0 - c|^2 (differentiable)."""

    differentiable = True

    def __init__(self, c=(1.5, -0.5)):
        self.c = torch.tensor(c)

    def __call__(self, x0, cond=None):
        return -((x0 - self.c) ** 2).sum(1)


def _cfg(**kw):
    base = dict(steps=6, batch_size=16, n_steps=8, method="ddim", eta=1.0, lr=1e-2, seed=3, progress=False)
    base.update(kw)
    return FinetuneConfig(**base)


def _sampler(n, g):
    return torch.randn(n, 2, generator=g)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    """6 steps straight vs 3 steps, a 'kill' (an exception from the callback after the step-3
    checkpoint), and a resumed run to 6: identical parameters and history (CPU, same seed)."""
    _, straight = _model()
    h_straight = finetune(straight, SCH, Toward(), DRaFTK(2), _cfg(), x_T_sampler=_sampler)

    _, killed = _model()

    def kill(step, *a):
        if step == 4:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        finetune(killed, SCH, Toward(), DRaFTK(2), _cfg(ckpt_every=3, out_dir=str(tmp_path)), x_T_sampler=_sampler,
                 callback=kill)
    _, resumed = _model()  # a fresh process: new model, state only from the checkpoint
    h_resumed = finetune(resumed, SCH, Toward(), DRaFTK(2), _cfg(ckpt_every=3, out_dir=str(tmp_path)),
                         x_T_sampler=_sampler)
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["step"] for r in h_resumed] == list(range(1, 7))
    assert [r["reward_mean"] for r in h_resumed] == [r["reward_mean"] for r in h_straight]


def test_nonfinite_reward_names_step_and_samples_and_keeps_checkpoint(tmp_path):
    class Breaks(Toward):
        calls = 0

        def __call__(self, x0, cond=None):
            Breaks.calls += 1
            r = super().__call__(x0)
            if Breaks.calls == 3:
                r = r.clone()
                r[[2, 5]] = float("nan")
            return r

    _, model = _model()
    with pytest.raises(NonFiniteRewardError) as e:
        finetune(model, SCH, Breaks(), DRaFTK(1), _cfg(ckpt_every=1, out_dir=str(tmp_path)), x_T_sampler=_sampler)
    msg = str(e.value)
    assert "step 3" in msg and "2" in msg and "5" in msg
    # the last good checkpoint (step 2) is intact: resuming with a sane reward continues from step 3
    _, again = _model()
    h = finetune(again, SCH, Toward(), DRaFTK(1), _cfg(steps=4, ckpt_every=1, out_dir=str(tmp_path)),
                 x_T_sampler=_sampler)
    assert [r["step"] for r in h] == [1, 2, 3, 4]


def test_wrong_shapes_name_the_callable():
    _, model = _model()

    def bad_reward(x0, cond=None):
        return x0.sum()  # a scalar, not (B,)

    with pytest.raises(ValueError, match="bad_reward"):
        finetune(model, SCH, bad_reward, DRaFTK(1), _cfg(steps=1), x_T_sampler=_sampler)

    def bad_sampler(n, g):
        return torch.randn(n + 1, 2, generator=g)

    with pytest.raises(ValueError, match="bad_sampler"):
        finetune(model, SCH, Toward(), DRaFTK(1), _cfg(steps=1), x_T_sampler=bad_sampler)

    class BadEps(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def forward(self, x, t, cond=None):
            return self.lin(x)  # (B, 1): not x's shape

    with pytest.raises(ValueError, match=r"model: SteeredModel returned shape \(16, 1\)"):
        finetune(SteeredModel(BadEps(), lora_rank=1), SCH, Toward(), DRaFTK(1), _cfg(steps=1), x_T_sampler=_sampler)


def test_augmented_model_equals_pretrained_at_init_and_null_stays_zero():
    """LoRA B = 0 and zero embeddings: bit-for-bit the pre-trained output for every label; after
    training the labelled embeddings moved and the NULL one is still exactly zero."""
    base, model = _model(labels=3)
    x, t = torch.randn(9, 2), torch.rand(9)
    c = torch.tensor([0, 1, 2, -1, 0, 1, 2, -1, 0])
    with torch.no_grad():
        assert torch.equal(model(x, t, c), base(x, t))

    class PerLabel(Toward):
        def __call__(self, x0, cond=None):
            centres = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]])
            return -((x0 - centres[cond]) ** 2).sum(1)

    finetune(model, SCH, PerLabel(), DRaFTK(2), _cfg(steps=5), x_T_sampler=_sampler,
             cond_sampler=lambda n, g: torch.randint(0, 3, (n,), generator=g))
    assert float(model.embeddings[0].detach().abs().sum()) > 0
    assert torch.equal(model.null_embedding, torch.zeros_like(model.null_embedding))
    with torch.no_grad():
        assert torch.equal(model(x, t, None), model.base(x, t, None))  # NULL adds nothing


def test_lora_save_load_scale_and_sum(tmp_path):
    torch.manual_seed(0)
    base = EpsMLP(2, hidden=8, depth=1)
    m = add_lora(copy.deepcopy(base), rank=2)
    x, t = torch.randn(5, 2), torch.rand(5)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_()
        out = m(x, t)
        save_lora(m, tmp_path / "a.safetensors")
        m2 = add_lora(copy.deepcopy(base), rank=2)
        load_lora(m2, tmp_path / "a.safetensors")
        assert torch.equal(m2(x, t), out)
        set_lora_scale(m2, 0.0)
        assert torch.allclose(m2(x, t), base(x, t), atol=1e-7)
        set_lora_scale(m2, 0.5)
        mid = m2(x, t)
        # a linear path in the adapter's delta: the first layer is exactly halfway, so the output moves
        assert not torch.allclose(mid, out) and not torch.allclose(mid, base(x, t))
        # two adapters summed: adding "b" with the same weights at scales 0.5 + 0.5 equals "a" at 1
        m3 = add_lora(copy.deepcopy(base), rank=2, adapter_name="a")
        load_lora(m3, tmp_path / "a.safetensors", adapter_name="a")
        add_lora(m3, rank=2, adapter_name="b")
        load_lora(m3, tmp_path / "a.safetensors", adapter_name="b")
        set_active_adapters(m3, {"a": 0.5, "b": 0.5})
        assert torch.allclose(m3(x, t), out, atol=1e-6)


def test_ddpo_raises_a_thresholded_reward():
    """r = 1{|x0 - c| < 1} has no gradient; DDPO (PPO on the solver's transition log-probs) raises its
    mean over 30 steps: the last 5 steps' mean exceeds the first 5 steps' by > 2 standard errors."""
    class Hit:
        differentiable = False

        def __call__(self, x0, cond=None):
            return (((x0 - torch.tensor([1.0, 0.0])) ** 2).sum(1) < 1.0).to(x0.dtype)

    from theory.nets import DSMConfig, train_dsm

    torch.manual_seed(1)
    base = EpsMLP(2, hidden=16, depth=2)  # pre-trained on N(0, I) so that ~1/4 of the samples hit at first
    train_dsm(base, SCH, torch.randn(4096, 2, generator=torch.Generator().manual_seed(0)),
              DSMConfig(steps=300, batch_size=256, lr=1e-2))
    model = SteeredModel(base, lora_rank=2)
    h = finetune(model, SCH, Hit(), DDPO(clip=0.2, inner_steps=2), _cfg(steps=30, batch_size=64, lr=3e-2, t_min=1e-3),
                 x_T_sampler=_sampler).as_arrays()
    r = torch.as_tensor(h["reward_mean"], dtype=torch.float64)
    first, last = r[:5], r[-5:]
    se = (first.var() / 5 + last.var() / 5).sqrt()
    assert float(last.mean() - first.mean()) > 2 * float(se), (first.tolist(), last.tolist())
