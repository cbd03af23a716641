"""LoRA in the diffusers format: what ``sd-finetune`` writes is what a stock pipeline loads (docs/theory.md §8).

The package trains peft LoRA layers injected into the pipeline's UNet (``theory.lora.add_lora`` through
``theory.engine.SteeredModel``). Leaving the package, the adapter is written exactly as diffusers' own LoRA
training scripts write theirs - peft's ``get_peft_model_state_dict``, diffusers'
``convert_state_dict_to_diffusers`` and ``StableDiffusionPipeline.save_lora_weights`` (with the LoraConfig
as adapter metadata, so rank and alpha survive) - so ``pipe.load_lora_weights(out_dir)`` in stock
diffusers gives the package's fine-tuned UNet bit for bit. Coming in, adapters are loaded with
``pipe.load_lora_weights`` and mixed with ``pipe.set_adapters``: several adapters are summed, each delta
scaled by its weight, W + sum_a s_a (alpha_a / r_a) B_a A_a (DRaFT sec. 5.1, LoRA mixing; s = 0 is the
pre-trained model, s = 1 the fine-tune, in between the weights interpolate linearly). No key map is
written by hand here.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from torch import nn

__all__ = ["LORA_WEIGHT_NAME", "save_diffusers_lora", "parse_lora_spec", "lora_specs", "load_diffusers_loras", "unet_of"]

#: diffusers' default LoRA file name (``load_lora_weights(dir)`` looks for it).
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def unet_of(model: nn.Module) -> nn.Module:
    """The diffusers UNet inside ``model`` (a SteeredModel around a LatentEps, a LatentEps, or a UNet)."""
    from diffusers import UNet2DConditionModel

    for m in model.modules():
        if isinstance(m, UNet2DConditionModel):
            return m
    raise ValueError(f"model: no diffusers UNet2DConditionModel inside {type(model).__name__}")


def _peft_owner(model: nn.Module, adapter_name: str) -> nn.Module:
    """The module on which peft recorded the adapter's LoraConfig (where ``inject_adapter_in_model`` ran)."""
    for m in model.modules():
        cfg = getattr(m, "peft_config", None)
        if isinstance(cfg, dict) and adapter_name in cfg:
            return m
    raise ValueError(f"adapter_name: no peft LoRA adapter '{adapter_name}' in {type(model).__name__}; "
                     "train one first (SteeredModel(..., lora_rank=r))")


def save_diffusers_lora(model: nn.Module, out_dir: Union[str, Path], adapter_name: str = "default",
                        weight_name: str = LORA_WEIGHT_NAME) -> Path:
    """Write the UNet LoRA adapter ``adapter_name`` of ``model`` to ``out_dir/weight_name`` in the diffusers
    format (keys ``unet.<module>.lora.down/up.weight``, LoraConfig in the metadata), atomically (the file is
    written in a temporary folder beside it and moved in with ``os.replace``). Returns the file's path."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from theory.io import file_mode

    unet = unet_of(model)
    owner = _peft_owner(model, adapter_name)
    config = owner.peft_config[adapter_name]
    had = "peft_config" in unet.__dict__
    # peft reads the LoraConfig from ``model.peft_config``; the adapter was injected through a wrapper
    # around the UNet, so lend the UNet the wrapper's config for the call (the layer names then start at
    # the UNet, which is what diffusers expects).
    if not had:
        unet.peft_config = owner.peft_config
    try:
        sd = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    finally:
        if not had:
            del unet.peft_config
    if not sd:
        raise ValueError(f"model: the adapter '{adapter_name}' has no LoRA layer inside the UNet")
    sd = convert_state_dict_to_diffusers({k: v.detach().cpu().contiguous() for k, v in sd.items()})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".lora-"))
    try:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=sd, weight_name=weight_name,
                                                  safe_serialization=True,
                                                  unet_lora_adapter_metadata=config.to_dict())
        os.chmod(tmp / weight_name, file_mode())  # the mode of a new file, not mkdtemp's private one
        os.replace(tmp / weight_name, out_dir / weight_name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / weight_name


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """``PATH[:SCALE]`` -> (path, scale); the scale defaults to 1 and must be finite. PATH is a folder
    holding ``pytorch_lora_weights.safetensors`` or a ``.safetensors`` file."""
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            path = spec  # a ':' inside the path itself
    if not math.isfinite(scale):
        raise ValueError(f"--lora: the scale of '{spec}' must be a finite number, got {scale}")
    return Path(path).expanduser(), scale


def load_diffusers_loras(pipe, specs: Sequence[tuple], prefix: str = "lora") -> list[str]:
    """Load each (path, scale) of ``specs`` into ``pipe`` with stock ``pipe.load_lora_weights`` (adapter
    names ``lora0, lora1, ...``) and activate them together with ``pipe.set_adapters``: the deltas are
    summed, each times its scale (module docstring). Returns the adapter names."""
    from theory.lora import adapter_names

    specs = list(specs)
    if not specs:
        return []
    names = []
    for i, (path, scale) in enumerate(specs):
        path = Path(path)
        if path.is_dir():
            folder, weight = path, LORA_WEIGHT_NAME
            if not (folder / weight).is_file():
                raise FileNotFoundError(f"--lora: '{path}' has no {LORA_WEIGHT_NAME}; pass the folder sd-finetune "
                                        "wrote or a .safetensors file")
        elif path.is_file():
            folder, weight = path.parent, path.name
        else:
            raise FileNotFoundError(f"--lora: no file or folder at '{path}'")
        name = f"{prefix}{i}"
        pipe.load_lora_weights(str(folder), weight_name=weight, adapter_name=name)
        if name not in adapter_names(pipe.unet):
            raise ValueError(f"--lora: '{path}' holds no UNet LoRA keys that diffusers recognises (keys must start "
                             "with 'unet.'; files from older diffsteer versions have 'base.unet.' keys: re-export)")
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[float(s) for _, s in specs])
    return names


def lora_specs(values: Optional[Iterable[str]]) -> list[tuple[Path, float]]:
    """Parse every ``--lora PATH[:SCALE]`` value (checks only the syntax and that the path exists)."""
    out = []
    for v in values or []:
        path, scale = parse_lora_spec(v)
        if not path.exists():
            raise FileNotFoundError(f"--lora: no file or folder at '{path}'")
        out.append((path, scale))
    return out
