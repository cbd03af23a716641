"""The steered model: a frozen pre-trained eps model plus what fine-tuning trains (docs/theory.md §6, §8).

    eps(x, t, (prompt, y)) = eps_base+LoRA(x, t, prompt) + correction(x, t, y),   correction(., ., NULL) = 0

(CTRL sec. 4, eq. 3: the augmented model f_pre + g_psi.) LoRA (peft) adapts the base's linear layers; the
label correction has three modes:

- ``'output'``: a zero-initialised table E_j[y_j] per condition, added to eps (shape ``label_shape`` = x's);
- ``'module'``: the table's rows added to the output of the base's submodule ``label_module`` (e.g. the
  ``time`` features of an EpsMLP or the ``time_embedding`` of a diffusers UNet, the usual entry of class
  labels) through a forward hook, so the correction depends on x and t;
- ``'network'``: CTRL's correction network g_psi(x, t, y), an MLP on [x, time features, one-hot labels]
  with a zero-initialised last layer, multiplied by 0 when every label is NULL.

At initialisation (LoRA B = 0, zero tables / last layer) the output equals the base's bit for bit, and the
NULL label (-1, or no label) gives the base exactly, always.

Conditioning: ``cond`` is a label tensor ((B,) for one condition, (B, m) for several, -1 = NULL) when the
model has labels, the base's own conditioning (e.g. prompt indices) when it has none, and a
``PromptLabel(prompt, label)`` to give both; the prompt always reaches the base.

Precision: the trainable parts (LoRA, tables, correction network) are kept in float32 when the base is in
half precision (bf16 / fp16), in the base's dtype otherwise; peft casts the activations into the LoRA
layers and the result back, and the label correction is cast to the output's dtype where it is added.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import nn

from ..guidance import CFGEps
from ..lora import add_lora, disabled_lora

__all__ = ["Steered", "SteeredModel", "PromptLabel", "trainable_dtype"]


@runtime_checkable
class Steered(Protocol):
    """What the engine needs of a fine-tuned eps model besides ``forward(x, t, cond)``."""

    @property
    def reference(self) -> nn.Module:
        """The pre-trained eps model (for the path KL)."""

    def param_groups(self, lr_lora: float, lr_embed: Optional[float] = None) -> list:
        """AdamW parameter groups of the trainable parameters."""


@dataclass(frozen=True)
class PromptLabel:
    """``cond`` carrying the base's conditioning (``prompt``: any per-sample tensor, e.g. prompt indices or
    embeddings, first dimension B) and the label(s) (``label``: (B,) or (B, m), -1 = NULL) together."""

    prompt: Any
    label: Any

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, idx) -> "PromptLabel":
        return PromptLabel(self.prompt[idx], self.label[idx])

    def to(self, device) -> "PromptLabel":
        mv = (lambda v: v.to(device) if isinstance(v, torch.Tensor) else v)
        return PromptLabel(mv(self.prompt), mv(self.label))

    def repeat(self, n: int) -> "PromptLabel":
        rep = (lambda v: v.repeat((n,) + (1,) * (v.ndim - 1)))
        return PromptLabel(rep(torch.as_tensor(self.prompt)), rep(torch.as_tensor(self.label)))

    def key(self) -> torch.Tensor:
        """(B, k) rows identifying each sample's condition (for per-condition statistics)."""
        B = len(self)
        p, lab = torch.as_tensor(self.prompt), torch.as_tensor(self.label)
        return torch.cat([p.reshape(B, -1).double(), lab.reshape(B, -1).to(p.device).double()], 1)


def trainable_dtype(base: nn.Module) -> torch.dtype:
    """float32 for a half-precision base (bf16 / fp16), else the base's floating dtype (float64 toys stay
    float64); the default dtype for a base without parameters."""
    dt = next((p.dtype for p in base.parameters() if p.is_floating_point()), torch.get_default_dtype())
    return torch.float32 if dt in (torch.float16, torch.bfloat16) else dt


class _Reference(nn.Module):
    """The pre-trained eps model inside a SteeredModel: LoRA disabled, no label correction, prompt kept."""

    def __init__(self, steered: "SteeredModel"):
        super().__init__()
        object.__setattr__(self, "_steered", steered)  # not a submodule: no parameters of its own

    def forward(self, x, t, cond=None):
        s = self._steered
        prompt, _ = s.split_cond(cond)
        with disabled_lora(s.base):
            return s.base(x, t, prompt)


class _TimeFeat(nn.Module):
    """sin/cos features of t at log-spaced frequencies in [1, 200] (the correction network's time input)."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(200.0), dim // 2)), persistent=False)

    def forward(self, t):
        u = t[:, None] * self.freqs[None].to(t.dtype)
        return torch.cat([torch.sin(u), torch.cos(u)], -1)


class _CFG(nn.Module):
    """Classifier-free mixing over the labels at a fixed prompt (``theory.guidance.CFGEps``)."""

    def __init__(self, steered: "SteeredModel", w):
        super().__init__()
        m = len(steered.n_labels_tuple)
        ws = tuple(float(v) for v in w) if isinstance(w, (tuple, list)) else float(w)
        if isinstance(ws, tuple) and len(ws) != m:
            raise ValueError(f"w: need {m} guidance weights (one per condition), got {w}")
        if steered.multi and not isinstance(ws, tuple):
            ws = (ws,) * m
        elif not steered.multi and isinstance(ws, tuple):
            ws = ws[0]
        object.__setattr__(self, "_steered", steered)  # not submodules: no parameters of their own
        object.__setattr__(self, "mixer", CFGEps(steered, ws))  # checks w >= 0
        self.ws = ws

    def forward(self, x, t, cond=None):
        s = self._steered
        prompt, label = s.split_cond(cond)
        c = s.labels(label, x.shape[0], x.device)
        c = c if s.multi else c[:, 0]
        if prompt is None:
            return self.mixer(x, t, c)
        return CFGEps(lambda x_, t_, lab: s(x_, t_, PromptLabel(prompt, lab)), self.ws)(x, t, c)


class SteeredModel(nn.Module):
    """Pre-trained eps model (frozen) + LoRA (peft) + optional CTRL label correction (module docstring).

    ``lora_rank`` / ``lora_alpha`` / ``lora_targets``: LoRA (``theory.lora.add_lora``; targets may name
    groups such as ``'attention'`` and ``'feedforward'``). ``n_labels``: an int (one condition) or a tuple
    (several). ``label_mode``: 'output', 'module' (with ``label_module`` and its per-sample output shape
    ``label_shape``) or 'network' (``label_shape`` = x's per-sample shape, default ``(base.dim,)``;
    ``label_hidden`` / ``label_depth`` size the MLP). ``label_dtype``: dtype of the label parameters
    (default ``trainable_dtype(base)``)."""

    def __init__(self, base: nn.Module, *, lora_rank: Optional[int] = None, lora_alpha: Optional[float] = None,
                 lora_targets: Optional[Sequence[str]] = None, n_labels: Union[None, int, Sequence[int]] = None,
                 label_shape: Optional[Sequence[int]] = None, label_mode: str = "output",
                 label_module: Optional[str] = None, label_hidden: int = 64, label_depth: int = 2,
                 label_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if not isinstance(base, nn.Module):
            raise ValueError(f"base: must be an nn.Module eps model, got {type(base).__name__}")
        if label_mode not in ("output", "module", "network"):
            raise ValueError(f"label_mode: 'output' (embedding added to eps), 'module' (added to the output of the "
                             f"submodule `label_module`) or 'network' (CTRL's correction MLP), got {label_mode!r}")
        hooked = None
        if label_mode != "output" and n_labels is None:
            raise ValueError(f"n_labels: label_mode={label_mode!r} needs labels")
        if label_mode == "module":
            if label_module is None or label_shape is None:
                raise ValueError("label_module, label_shape: label_mode='module' needs the submodule's name (e.g. "
                                 "'time' of an EpsMLP, 'time_embedding' of a UNet) and its per-sample output shape")
            try:
                hooked = base.get_submodule(label_module)
            except AttributeError:
                raise ValueError(f"label_module: the base model has no submodule {label_module!r}") from None
        elif label_module is not None:
            raise ValueError("label_module: only used with label_mode='module'")
        self.label_mode = label_mode
        self._pending_labels = None
        for p in base.parameters():
            p.requires_grad_(False)
        if lora_rank is not None:
            add_lora(base, rank=lora_rank, alpha=lora_alpha, target_modules=lora_targets)
        elif lora_targets is not None or lora_alpha is not None:
            raise ValueError("lora_rank: give a rank to use lora_targets / lora_alpha")
        self.base = base
        self.n_labels = n_labels
        self.multi = n_labels is not None and not isinstance(n_labels, int)
        self.n_labels_tuple: tuple = ()
        self.label_shape = None
        self.embeddings = None
        self.time = self.g = None
        if n_labels is None:
            return
        ks = tuple(int(k) for k in n_labels) if self.multi else (int(n_labels),)
        if not ks or any(k < 1 for k in ks):
            raise ValueError(f"n_labels: every condition needs >= 1 label, got {n_labels}")
        self.n_labels_tuple = ks
        if label_shape is None:
            dim = getattr(base, "dim", None)
            if not isinstance(dim, int):
                raise ValueError("label_shape: give the per-sample shape of x (the base has no int `.dim`)")
            label_shape = (dim,)
        self.label_shape = tuple(int(v) for v in label_shape)
        dtype = label_dtype or trainable_dtype(base)
        if label_mode == "network":
            self._build_network(label_hidden, label_depth, dtype)
            return
        self.embeddings = nn.ParameterList([nn.Parameter(torch.zeros((k,) + self.label_shape, dtype=dtype))
                                            for k in ks])
        self.register_buffer("null_embedding", torch.zeros((1,) + self.label_shape, dtype=dtype))
        if hooked is not None:
            hooked.register_forward_hook(self._module_hook)

    def _build_network(self, hidden: int, depth: int, dtype) -> None:
        """g_psi: Linear/SiLU layers on [x, 16 time features, one-hot codes], last layer zero (CTRL sec. 4)."""
        if len(self.label_shape) != 1:
            raise ValueError(f"label_shape: the correction network needs flat samples (D,), got {self.label_shape}")
        dim = self.label_shape[0]
        self.dim = dim
        self.time = _TimeFeat(16)
        layers: list[nn.Module] = []
        in_dim = dim + 16 + sum(self.n_labels_tuple)
        for i in range(depth):
            layers += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.SiLU()]
        last = nn.Linear(hidden, dim)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.g = nn.Sequential(*layers).to(dtype)

    def _module_hook(self, module, inputs, out):
        """Adds the pending label embedding (set by ``forward``) to the hooked submodule's output."""
        e = self._pending_labels
        if e is None:
            return out
        if out.shape[0] % e.shape[0] or out.shape[1:] != e.shape[1:]:
            raise ValueError(f"label_shape: embedding of shape {tuple(e.shape[1:])} for batch {e.shape[0]} does not "
                             f"fit the output {tuple(out.shape)} of label_module")
        return out + e.repeat((out.shape[0] // e.shape[0],) + (1,) * (e.ndim - 1)).to(out.dtype)

    # -------------------------------------------------------------------------------------------- cond
    def split_cond(self, cond):
        """(prompt for the base, labels or None) of ``cond`` (module docstring)."""
        if isinstance(cond, PromptLabel):
            if self.n_labels is None:
                raise ValueError("cond: a PromptLabel needs a model built with n_labels")
            return cond.prompt, cond.label
        return (None, cond) if self.n_labels is not None else (cond, None)

    def labels(self, cond, B: int, device) -> torch.Tensor:
        """The labels as a (B, m) long tensor (-1 = NULL; None = all NULL), checked against n_labels."""
        m = len(self.n_labels_tuple)
        if cond is None:
            return torch.full((B, m), -1, dtype=torch.long, device=device)
        c = torch.as_tensor(cond, device=device).long()
        if not self.multi:
            c = c.reshape(-1)
            if c.numel() == 1:
                c = c.expand(B)
            c = c[:, None]
        elif c.ndim == 1 and c.numel() == m:
            c = c[None].expand(B, m)
        if c.shape != (B, m):
            raise ValueError(f"cond: expected labels of shape ({B},{' ' + str(m) if self.multi else ''}) "
                             f"(-1 = NULL), got {tuple(c.shape)}")
        for j, k in enumerate(self.n_labels_tuple):
            if bool(((c[:, j] < -1) | (c[:, j] >= k)).any()):
                raise ValueError(f"cond: labels of condition {j} must lie in [-1, {k}), got {c[:, j].tolist()[:8]}")
        return c

    def label_embedding(self, cond, x: torch.Tensor) -> torch.Tensor:
        """sum_j E_j[c_j] (zero rows for NULL), shape (B, *label_shape) - x's shape in 'output' mode."""
        if self.embeddings is None:
            raise ValueError("label_mode: the model has no embedding table (label_mode 'network' or no labels)")
        c = self.labels(cond, x.shape[0], x.device)
        out = 0
        for j, (k, E) in enumerate(zip(self.n_labels_tuple, self.embeddings)):
            table = torch.cat([E, self.null_embedding.to(E.dtype)], 0)
            idx = torch.where(c[:, j] < 0, torch.full_like(c[:, j], k), c[:, j])
            out = out + table[idx]
        if self.label_mode == "module":
            return out
        if out.shape != x.shape:
            raise ValueError(f"label_shape: embedding of shape {tuple(out.shape[1:])} does not match x's "
                             f"{tuple(x.shape[1:])}")
        return out.to(x.dtype)

    def correction(self, x, t, cond) -> torch.Tensor:
        """What the labels add to the base's eps: g_psi(x, t, y) ('network') or E[y] ('output'); zero for
        NULL labels."""
        if self.label_mode == "output":
            return self.label_embedding(cond, x)
        if self.label_mode != "network":
            raise ValueError("label_mode: 'module' adds the labels inside the base; there is no separate correction")
        B = x.shape[0]
        c = self.labels(cond, B, x.device)
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(B)
        dt = self.g[0].weight.dtype
        codes = [nn.functional.one_hot(c[:, i].clamp(min=0), k).to(dt) * (c[:, i:i + 1] >= 0).to(dt)
                 for i, k in enumerate(self.n_labels_tuple)]
        h = torch.cat([x.to(dt), self.time(t.to(dt))] + codes, -1)
        on = (c >= 0).any(1, keepdim=True).to(dt)
        return (self.g(h) * on).to(x.dtype)

    def forward(self, x, t, cond=None):
        prompt, label = self.split_cond(cond)
        if self.n_labels is None:
            return self.base(x, t, prompt)
        if self.label_mode == "module":
            self._pending_labels = self.label_embedding(label, x)
            try:
                return self.base(x, t, prompt)
            finally:
                self._pending_labels = None
        return self.base(x, t, prompt) + self.correction(x, t, label)

    # ------------------------------------------------------------------------------------ helpers
    @property
    def reference(self) -> nn.Module:
        """The pre-trained eps model (LoRA disabled, no label correction; the prompt still reaches it)."""
        return _Reference(self)

    def lora_parameters(self) -> list:
        return [p for n, p in self.base.named_parameters() if "lora_" in n and p.requires_grad]

    def label_parameters(self) -> list:
        if self.embeddings is not None:
            return list(self.embeddings)
        return list(self.g.parameters()) if self.g is not None else []

    def param_groups(self, lr_lora: float, lr_embed: Optional[float] = None) -> list[dict]:
        """AdamW groups: trainable LoRA parameters at ``lr_lora``, label parameters (tables or the
        correction network) at ``lr_embed`` (default ``lr_lora``). Empty groups are left out."""
        groups = []
        lora = self.lora_parameters()
        if lora:
            groups.append({"params": lora, "lr": lr_lora, "name": "lora"})
        lab = self.label_parameters()
        if lab:
            groups.append({"params": lab, "lr": lr_lora if lr_embed is None else lr_embed, "name": "embed"})
        return groups

    def cfg(self, w) -> nn.Module:
        """eps_null + sum_i w_i (eps(y_i alone) - eps_null) (CTRL appendix B; ``theory.guidance.CFGEps``);
        ``w`` a number (every condition) or one weight per condition; the prompt is kept."""
        if self.n_labels is None:
            raise ValueError("w: classifier-free mixing needs a model built with n_labels")
        return _CFG(self, w)
