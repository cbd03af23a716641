"""Checkpoints of a fine-tuning run: safetensors and strict JSON only, never pickle.

A checkpoint is the folder ``out_dir/checkpoint`` holding

- ``params.safetensors``: the trainable parameters by name;
- ``optimizer.safetensors``: the optimiser's per-parameter tensors (``<index>.<name>``, e.g. AdamW's moments);
- ``rng.safetensors``: the generators' states as uint8 tensors, numpy's / Python's Mersenne-Twister keys as
  int64 tensors;
- ``state.json``: the step, the history, the optimiser's scalars and parameter groups, the lr scheduler,
  the RNG scalars, and the run's settings (config, strategy, number of processes).

It is written into ``checkpoint.new`` and swapped in for the old one (``checkpoint.old`` only survives a
crash in the middle of the swap, and is then what is resumed). Loading never runs code from the folder:
a checkpoint of the older pickle format (``state.pt``) is refused, as is one whose settings differ from
the resuming run's in any field but ``RESUMABLE_FIELDS``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..io import atomic_save_tensors, atomic_write_json, to_strict_json
from .config import RESUMABLE_FIELDS, History
from .strategies import strategy_name

__all__ = ["save_checkpoint", "find_checkpoint", "load_checkpoint", "run_settings", "trainable_named",
           "FILES"]

FILES = ("params.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")


def trainable_named(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def run_settings(config, strategy, world_size: int) -> dict:
    """What a checkpoint records of the run, as strict JSON: the config, the strategy and its options, the
    number of processes (which fixes the combined batch)."""
    st = {"name": strategy_name(strategy)}
    if is_dataclass(strategy):
        st.update({f.name: getattr(strategy, f.name) for f in fields(strategy)})
    return to_strict_json({"config": asdict(config), "strategy": st, "world_size": int(world_size)})


# ------------------------------------------------------------------------------------------- pieces
def _rng_state(gen: torch.Generator, noise_gen: Optional[torch.Generator]):
    np_state = np.random.get_state()
    py = random.getstate()
    tensors = {"gen": gen.get_state(), "torch": torch.get_rng_state(),
               "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
               "python_state": torch.tensor(py[1], dtype=torch.int64)}
    js = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
          "python": [py[0], py[2]]}
    if noise_gen is not None:
        tensors["noise_gen"] = noise_gen.get_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return tensors, js


def _set_rng_state(tensors: dict, js: dict, gen: torch.Generator, noise_gen: Optional[torch.Generator]) -> None:
    gen.set_state(tensors["gen"])
    torch.set_rng_state(tensors["torch"])
    name, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, gauss_next = js["python"]
    random.setstate((version, tuple(int(v) for v in tensors["python_state"].tolist()), gauss_next))
    if noise_gen is not None and "noise_gen" in tensors:
        noise_gen.set_state(tensors["noise_gen"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _optimizer_state(optimizer):
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            (tensors if isinstance(v, torch.Tensor) else scalars)[f"{idx}.{k}"] = v
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def _load_optimizer(optimizer, tensors: dict, js: dict) -> None:
    state: dict = {}
    for key, v in list(tensors.items()) + list(js["scalars"].items()):
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    groups = [dict(g, **({"betas": tuple(g["betas"])} if "betas" in g else {})) for g in js["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ------------------------------------------------------------------------------------------- save / load
def save_checkpoint(out_dir: Path, *, model, optimizer, scheduler, step: int, history: History,
                    gen: torch.Generator, noise_gen: Optional[torch.Generator], settings: dict) -> Path:
    """Write ``out_dir/checkpoint`` atomically (module docstring). Refuses non-finite parameters."""
    out_dir = Path(out_dir)
    params = trainable_named(model)
    for n, p in params.items():
        if not bool(torch.isfinite(p.detach()).all()):
            raise FloatingPointError(f"parameter {n}: non-finite at step {step}; not written to a checkpoint")
    final, new, old = out_dir / "checkpoint", out_dir / "checkpoint.new", out_dir / "checkpoint.old"
    if new.exists():
        shutil.rmtree(new)
    new.mkdir(parents=True)
    opt_t, opt_js = _optimizer_state(optimizer)
    rng_t, rng_js = _rng_state(gen, noise_gen)
    atomic_save_tensors(params, new / "params.safetensors")
    atomic_save_tensors(opt_t, new / "optimizer.safetensors")
    atomic_save_tensors(rng_t, new / "rng.safetensors")
    atomic_write_json(new / "state.json", {"step": int(step), "history": history.rows, "optimizer": opt_js,
                                           "scheduler": scheduler.state_dict(), "rng": rng_js, "run": settings})
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(new, final)
    if old.exists():
        shutil.rmtree(old)
    return final


def find_checkpoint(out_dir: Path) -> Optional[Path]:
    """The checkpoint folder to resume from, or None when ``out_dir`` has none. A checkpoint folder that
    lacks one of its files, or holds a pickle of the older format, is an error (never a silent restart)."""
    out_dir = Path(out_dir)
    for name in ("checkpoint", "checkpoint.old"):  # .old only survives a crash in the middle of a swap
        p = out_dir / name
        if not p.is_dir():
            continue
        if (p / "state.pt").exists():
            raise ValueError(f"out_dir: {p} holds state.pt, a pickle checkpoint of an older version; it is not "
                             f"loaded (unpickling a file can run code). Start a fresh out_dir, or delete {p}")
        missing = [f for f in FILES if not (p / f).is_file()]
        if missing:
            raise ValueError(f"out_dir: checkpoint {p} lacks {', '.join(missing)} (incomplete or edited); restore "
                             f"it, or delete {p} to start the run from scratch")
        return p
    return None


def _read_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"out_dir: {path} is not a readable safetensors file ({type(e).__name__}: {e}); "
                         f"delete the checkpoint folder to start from scratch") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"out_dir: {path} is not valid JSON ({e}); delete the checkpoint folder to start "
                         f"from scratch") from None


def load_checkpoint(path: Path, *, model, optimizer, scheduler, gen: torch.Generator,
                    noise_gen: Optional[torch.Generator], settings: dict):
    """Restore parameters, optimiser, scheduler and generators from the checkpoint ``path`` after checking
    that it was written by a run with the same ``settings`` (``run_settings``) but for
    ``RESUMABLE_FIELDS``. Returns (step, History)."""
    path = Path(path)
    state = _read_json(path / "state.json")
    saved = state.get("run", {})
    diffs = []
    for key in ("strategy", "world_size"):
        if saved.get(key) != settings[key]:
            diffs.append(f"{key}: {saved.get(key)!r} in the checkpoint, {settings[key]!r} now")
    sc, cc = saved.get("config", {}), settings["config"]
    for k in sorted(set(sc) | set(cc)):
        if k not in RESUMABLE_FIELDS and sc.get(k, "<absent>") != cc.get(k, "<absent>"):
            diffs.append(f"config.{k}: {sc.get(k, '<absent>')!r} in the checkpoint, {cc.get(k, '<absent>')!r} now")
    if diffs:
        raise ValueError(f"out_dir: the checkpoint {path} belongs to a run with other settings - " + "; ".join(diffs)
                         + f". Resume with the checkpoint's settings, or start a fresh run in a new out_dir (or "
                           f"delete {path}); only {', '.join(RESUMABLE_FIELDS)} may change on resume (raise steps to "
                           f"extend a run)")
    tensors = _read_tensors(path / "params.safetensors")
    named = trainable_named(model)
    if set(tensors) != set(named):
        extra, missing = sorted(set(tensors) - set(named)), sorted(set(named) - set(tensors))
        raise ValueError(f"out_dir: {path / 'params.safetensors'} does not match the model's trainable parameters "
                         f"(unexpected {extra[:3]}, missing {missing[:3]}); same model, LoRA targets and rank needed, "
                         f"or a fresh out_dir")
    for k, p in named.items():
        if tuple(tensors[k].shape) != tuple(p.shape):
            raise ValueError(f"out_dir: {path / 'params.safetensors'} holds {k} of shape {tuple(tensors[k].shape)}, the "
                             f"model's is {tuple(p.shape)} (another LoRA rank?); use the checkpoint's settings or a "
                             f"fresh out_dir")
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(tensors[k].to(device=p.device, dtype=p.dtype))
    _load_optimizer(optimizer, _read_tensors(path / "optimizer.safetensors"), state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(_read_tensors(path / "rng.safetensors"), state["rng"], gen, noise_gen)
    return int(state["step"]), History(state["history"])
