"""LoRA on any ``nn.Module`` through peft (docs/theory.md §8; Hu et al. 2022).

A LoRA adapter replaces a linear map W by W + s (alpha / r) B A with A (r x in), B (out x r); B starts at
zero, so the adapted module equals the pre-trained one bit for bit at initialisation (x + 0 = x in floating
point). ``s`` is the adapter scale of ``set_lora_scale`` (s = 0: pre-trained, s = 1: fine-tuned; in between
the weights interpolate linearly, DRaFT sec. 5.1). Several adapters can be active at once; peft sums their
deltas (``set_active_adapters``, combining two fine-tunes). The layers are peft's (``inject_adapter_in_model``
with a ``LoraConfig``), so module names contain ``lora_A`` / ``lora_B`` and ``.scaling[adapter]`` holds
s alpha / r. Only saving/loading (safetensors, atomic) and the disable context are written here.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .io import atomic_save_tensors

__all__ = [
    "add_lora",
    "lora_layers",
    "lora_parameters",
    "lora_state_dict",
    "save_lora",
    "load_lora",
    "set_lora_scale",
    "set_active_adapters",
    "disabled_lora",
    "adapter_names",
    "LORA_TARGET_GROUPS",
    "resolve_targets",
]

#: Named groups of LoRA targets in a diffusers UNet's transformer blocks (peft suffix match): the attention
#: projections q, k, v, out of every self- and cross-attention (diffusers' LoRA training script) and the
#: feed-forward layers (GEGLU input projection and output; DRaFT sec. 4 adapts attention and feed-forward).
LORA_TARGET_GROUPS = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "feedforward": ("ff.net.0.proj", "ff.net.2"),
}


def resolve_targets(targets: Sequence[str]) -> list[str]:
    """Module names for peft: each entry a module name (suffix match) or a group of ``LORA_TARGET_GROUPS``
    ('attention', 'feedforward'), expanded in place; duplicates dropped, order kept."""
    if isinstance(targets, str):
        targets = [targets]
    out: list[str] = []
    for t in targets:
        for name in LORA_TARGET_GROUPS.get(t, (t,)):
            if name not in out:
                out.append(name)
    return out


def _default_targets(model: nn.Module) -> list[str]:
    """Every nn.Linear / nn.Conv2d (or a layer peft already adapted), not the LoRA factors themselves."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, m in model.named_modules():
        if not name or "lora_" in name or name.endswith("base_layer"):
            continue
        if isinstance(m, LoraLayer) or isinstance(m, (nn.Linear, nn.Conv2d)):
            out.append(name)
    return out


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The peft LoRA layers inside ``model`` (modules with ``lora_A``, ``lora_B`` and ``scaling``)."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters injected into ``model``, in order of first appearance."""
    names: list[str] = []
    for layer in lora_layers(model):
        for a in layer.lora_A.keys():
            if a not in names:
                names.append(a)
    return names


def add_lora(model: nn.Module, rank: int = 4, alpha: Optional[float] = None,
             target_modules: Optional[Sequence[str]] = None, adapter_name: str = "default",
             init: str = "zeros") -> nn.Module:
    """Inject a LoRA adapter of rank ``rank`` into ``model`` in place (peft ``inject_adapter_in_model``).

    ``target_modules``: module names (peft's suffix match, e.g. ["to_q", "to_k", "to_v", "to_out.0"]) or
    groups of ``LORA_TARGET_GROUPS`` ('attention', 'feedforward'); default every ``nn.Linear`` and
    ``nn.Conv2d``. A half-precision (bf16 / fp16) base gets a float32 adapter. ``alpha`` defaults to ``rank`` (scaling alpha / r = 1).
    All non-LoRA parameters of ``model`` are frozen. ``init='zeros'``: peft's default (A Kaiming-uniform,
    B = 0), so the output is unchanged bit for bit; ``init='gaussian'``: A ~ N(0, 1/r), B = 0."""
    from peft import LoraConfig, inject_adapter_in_model

    if not isinstance(model, nn.Module):
        raise ValueError(f"model: LoRA needs an nn.Module, got {type(model).__name__}")
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"rank: must be an int >= 1, got {rank!r}")
    if init not in ("zeros", "gaussian"):
        raise ValueError(f"init: 'zeros' (peft default, B = 0) or 'gaussian', got {init!r}")
    if adapter_name in adapter_names(model):
        raise ValueError(f"adapter_name: '{adapter_name}' already exists in the model; pick another name")
    targets = resolve_targets(target_modules) if target_modules is not None else _default_targets(model)
    if not targets:
        raise ValueError("target_modules: the model has no nn.Linear / nn.Conv2d; name the modules to adapt")
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha), target_modules=targets,
                     lora_dropout=0.0, bias="none", init_lora_weights=True if init == "zeros" else "gaussian")
    with warnings.catch_warnings():  # a second adapter: peft warns that several adapters coexist (intended)
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(cfg, model, adapter_name=adapter_name)
    layers = [m for m in lora_layers(model) if adapter_name in m.lora_A]
    if not layers:
        raise ValueError(f"target_modules: none of {targets[:5]} matched a module of the model")
    for m in layers:  # half-precision base: the adapter trains in float32 (peft casts x in and the delta out)
        for factors in (m.lora_A, m.lora_B):
            if factors[adapter_name].weight.dtype in (torch.float16, torch.bfloat16):
                factors[adapter_name].float()
        m._diffsteer_base_scaling = dict(getattr(m, "_diffsteer_base_scaling", {}))
        m._diffsteer_base_scaling[adapter_name] = float(m.scaling[adapter_name])
    # trainable: this adapter's parameters only (peft also marks them; make it explicit)
    for n, p in model.named_parameters():
        p.requires_grad_(("lora_" in n) and f".{adapter_name}." in n)
    return model


def lora_parameters(model: nn.Module, adapter_name: Optional[str] = None) -> list[nn.Parameter]:
    """LoRA parameters of ``model`` (of one adapter if ``adapter_name`` is given)."""
    return [p for n, p in model.named_parameters()
            if "lora_" in n and (adapter_name is None or f".{adapter_name}." in n)]


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """{module path + lora_A/lora_B + '.weight': tensor} of one adapter, the adapter name removed from the
    keys (so it can be loaded into an adapter of another name)."""
    out = {}
    for n, p in model.named_parameters():
        if "lora_" in n and f".{adapter_name}." in n:
            out[n.replace(f".{adapter_name}.", ".")] = p.detach().clone().contiguous()
    if not out:
        raise ValueError(f"adapter_name: model has no LoRA adapter '{adapter_name}' (has {adapter_names(model)})")
    return out


def save_lora(model: nn.Module, path: Union[str, Path], adapter_name: str = "default") -> None:
    """Write one adapter's weights to ``path`` as safetensors, atomically (temp file + os.replace)."""
    atomic_save_tensors(lora_state_dict(model, adapter_name), path, metadata={"adapter": adapter_name})


def load_lora(model: nn.Module, path: Union[str, Path], adapter_name: str = "default") -> None:
    """Load weights saved by ``save_lora`` into the existing adapter ``adapter_name`` of ``model``
    (``add_lora`` it first with the same targets and rank). Every key must match in name and shape."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    params = {n.replace(f".{adapter_name}.", "."): p for n, p in model.named_parameters()
              if "lora_" in n and f".{adapter_name}." in n}
    if not params:
        raise ValueError(f"adapter_name: model has no LoRA adapter '{adapter_name}'; call add_lora first")
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise ValueError(f"path: {path} does not match the model's adapter '{adapter_name}' "
                         f"(missing {missing[:3]}, unexpected {extra[:3]}); same targets and rank needed")
    with torch.no_grad():
        for k, p in params.items():
            if tensors[k].shape != p.shape:
                raise ValueError(f"path: {k} has shape {tuple(tensors[k].shape)} in {path}, model has {tuple(p.shape)}")
            p.copy_(tensors[k].to(p.dtype))


def set_lora_scale(model: nn.Module, scale: float, adapter_name: Optional[str] = None) -> None:
    """Multiply the delta of an adapter (every adapter if None) by ``scale`` relative to its scaling at
    creation: W + scale (alpha / r) B A (0 = pre-trained, 1 = as trained)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model: has no LoRA layers; call add_lora first")
    names = adapter_names(model) if adapter_name is None else [adapter_name]
    for a in names:
        found = False
        for m in layers:
            if a in m.scaling:
                base = getattr(m, "_diffsteer_base_scaling", {}).get(a, m.lora_alpha[a] / m.r[a])
                m.scaling[a] = base * float(scale)
                found = True
        if not found:
            raise ValueError(f"adapter_name: no adapter '{a}' in the model (has {adapter_names(model)})")


def set_active_adapters(model: nn.Module, scales: dict) -> None:
    """Activate several adapters at once, each with its scale; peft sums their deltas:
    W + sum_a s_a (alpha_a / r_a) B_a A_a (combining fine-tunes, DRaFT sec. 5.1). Adapters not named are
    inactive. Which parameters require gradients is left unchanged."""
    if not scales:
        raise ValueError("scales: give at least one {adapter_name: scale}")
    known = adapter_names(model)
    for a in scales:
        if a not in known:
            raise ValueError(f"scales: no adapter '{a}' in the model (has {known})")
    req = {id(p): p.requires_grad for p in model.parameters()}
    for m in lora_layers(model):
        active = [a for a in scales if a in m.lora_A]
        m.set_adapter(active)
    for p in model.parameters():
        p.requires_grad_(req[id(p)])
    for a, s in scales.items():
        set_lora_scale(model, float(s), a)


@contextlib.contextmanager
def disabled_lora(model: nn.Module):
    """Context in which every LoRA layer of ``model`` is bypassed (the pre-trained model). Only peft's
    disable flag is touched; ``requires_grad`` flags are left as they are."""
    layers = lora_layers(model)
    old = [m._disable_adapters for m in layers]
    try:
        for m in layers:
            m._disable_adapters = True
        yield model
    finally:
        for m, o in zip(layers, old):
            m._disable_adapters = o
