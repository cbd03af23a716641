"""Mixed precision as the papers ran it (frozen base in bf16, LoRA / label table / AdamW state in float32),
LoRA target groups, and the learning-rate schedule of the engine's config."""
import copy
import math

import pytest
import torch
from torch import nn

from theory.engine import DRaFTK, FinetuneConfig, SteeredModel, finetune, lr_factor, objective
from theory.lora import LORA_TARGET_GROUPS, resolve_targets
from theory.nets import EpsMLP
from theory.schedules import LinearVP

SCH = LinearVP()


class HalfBase(nn.Module):
    """A base kept in ``dtype`` that takes and returns float32 (as a UNet wrapper casts latents)."""

    def __init__(self, net: EpsMLP, dtype):
        super().__init__()
        self.net, self.dim = net.to(dtype), net.dim
        self.dtype = dtype

    def forward(self, x, t, cond=None):
        return self.net(x.to(self.dtype), torch.as_tensor(t).to(self.dtype), cond).to(x.dtype)


def _pair(seed=0):
    torch.manual_seed(seed)
    net = EpsMLP(2, hidden=32, depth=2)
    models = [SteeredModel(HalfBase(copy.deepcopy(net), dt), lora_rank=4, n_labels=3)
              for dt in (torch.float32, torch.bfloat16)]
    g = torch.Generator().manual_seed(seed + 1)
    b_init = {n: 0.1 * torch.randn(p.shape, generator=g) for n, p in models[0].named_parameters() if "lora_B" in n}
    with torch.no_grad():
        for m in models:  # the same float32 LoRA (B away from 0, so A has a gradient too) in both
            for n, p in m.named_parameters():
                if n in b_init:
                    p.copy_(b_init[n])
            a_src = dict(models[0].named_parameters())
            for n, p in m.named_parameters():
                if "lora_A" in n:
                    p.copy_(a_src[n])
    return models


def reward(x0, cond=None):
    return -((x0 - torch.tensor([1.0, 0.5])) ** 2).sum(1)


def _cfg(**kw):
    return FinetuneConfig(**dict(dict(steps=5, batch_size=16, n_steps=6, eta=1.0, lr=1e-2, seed=0, progress=False),
                                 **kw))


def _grads(model, cfg):
    g = torch.Generator().manual_seed(7)
    x_T = torch.randn(16, 2, generator=g)
    cond = torch.randint(0, 3, (16,), generator=g)
    J, _, _ = objective(model, SCH, reward, DRaFTK(3), cfg, x_T, cond=cond, generator=g)
    model.zero_grad()
    (-J).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def test_bf16_base_trains_float32_lora_and_first_gradient_matches_fp32(tmp_path):
    """Trainable parameters and AdamW moments are float32 with a bf16 base; parameters stay finite over 5
    steps; the first-step gradient of the bf16 run is within 5 % (relative, 2-norm) of the float32 run's.
    Tolerance: bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per weight and activation);
    the gradient passes ~10 roundings in sequence through 3 layers and 3 sampling steps with gradient
    (forward and backward), about 10 * 2e-3 = 2e-2 if they add up in the worst case; 5e-2 leaves a margin
    of 2.5 without accepting an O(1) error (a cast at the wrong place gives a gradient off by 100 %)."""
    fp32, bf16 = _pair()
    assert {p.dtype for p in bf16.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for n, p in bf16.base.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    g32, g16 = _grads(fp32, _cfg()), _grads(bf16, _cfg())
    rel = float((g16 - g32).norm() / g32.norm())
    assert rel < 5e-2, rel
    def record(step, row):
        assert all(bool(torch.isfinite(p).all()) for p in bf16.parameters() if p.requires_grad), step

    finetune(bf16, SCH, reward, DRaFTK(3), _cfg(), x_T_sampler=lambda n, g: torch.randn(n, 2, generator=g),
             cond_sampler=lambda n, g: torch.randint(0, 3, (n,), generator=g), callback=record)
    assert all(bool(torch.isfinite(p).all()) for p in bf16.parameters())
    from safetensors.torch import load_file

    finetune(bf16, SCH, reward, DRaFTK(3), _cfg(steps=1, out_dir=str(tmp_path)),
             x_T_sampler=lambda n, g: torch.randn(n, 2, generator=g),
             cond_sampler=lambda n, g: torch.randint(0, 3, (n,), generator=g))
    moments = {k: v for k, v in load_file(str(tmp_path / "checkpoint" / "optimizer.safetensors")).items()
               if k.endswith("exp_avg") or k.endswith("exp_avg_sq")}
    assert moments and {v.dtype for v in moments.values()} == {torch.float32}


def test_lora_target_groups():
    assert resolve_targets(["attention", "feedforward", "to_q"]) == list(LORA_TARGET_GROUPS["attention"]) + list(
        LORA_TARGET_GROUPS["feedforward"])
    assert resolve_targets("net.0") == ["net.0"]
    torch.manual_seed(0)
    m = SteeredModel(EpsMLP(2, hidden=8, depth=2), lora_rank=2, lora_targets=["net.0"])
    assert {n.split(".lora_")[0] for n, p in m.named_parameters() if "lora_" in n} == {"base.net.0"}


def test_lr_schedule_warmup_then_decay():
    """Multiplier after k steps: (k + 1) / W during the warm-up, then 1 / linear / cosine over the rest."""
    S, W = 10, 4
    f = lr_factor(_cfg(steps=S, warmup_steps=W, lr_schedule="cosine"))
    assert [f(k) for k in range(W)] == [(k + 1) / W for k in range(W)]
    for k in range(W, S + 1):
        assert f(k) == pytest.approx(0.5 * (1 + math.cos(math.pi * (k - W) / (S - W))), abs=1e-15)
    f = lr_factor(_cfg(steps=S, warmup_steps=W, lr_schedule="linear"))
    assert f(W) == 1.0 and f(S) == 0.0 and f(7) == pytest.approx(1 - 3 / 6)
    f = lr_factor(_cfg(steps=S, lr_schedule="constant"))
    assert {f(k) for k in range(S)} == {1.0}
    with pytest.raises(ValueError, match="warmup_steps"):
        _cfg(steps=3, warmup_steps=4).validate()
    # AdamW's weight decay reaches the optimiser (decoupled: theta <- theta (1 - lr wd) on a zero gradient)
    torch.manual_seed(0)
    m = SteeredModel(EpsMLP(2, hidden=8, depth=1), n_labels=2)
    with torch.no_grad():
        m.embeddings[0].fill_(1.0)

    def flat(x0, cond=None):  # no gradient reaches the table: only the decay moves it
        return x0.sum(1) * 0

    finetune(m, SCH, flat, DRaFTK(1), _cfg(steps=1, lr=0.1, weight_decay=0.5),
             x_T_sampler=lambda n, g: torch.randn(n, 2, generator=g),
             cond_sampler=lambda n, g: torch.randint(0, 2, (n,), generator=g))
    assert torch.allclose(m.embeddings[0], torch.full_like(m.embeddings[0], 1 - 0.1 * 0.5))
