"""Experiment configs from JSON files: the one loader behind ``ctrl``, ``guide`` and the DRaFT image
experiments (each config is a frozen dataclass; a file holds some of its fields)."""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

__all__ = ["load_dataclass"]


def load_dataclass(cls, path=None, overrides=None, example: str = "imaging/configs/"):
    """``cls(**fields)`` from the JSON file at ``path`` (None: no file; keys starting with '_' are
    comments), then ``overrides``. JSON lists become tuples (the configs are frozen and hashable). A
    missing file is a FileNotFoundError and an unknown key a ValueError, each naming the file or keys."""
    raw = {}
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"config: no file at '{p}' (see {example} for examples)")
        raw = {k: v for k, v in json.loads(p.read_text()).items() if not k.startswith("_")}
    raw.update(overrides or {})
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f" in '{Path(path).expanduser()}'" if path is not None else ""
        raise ValueError(f"config: unknown key(s) {unknown}{where}; valid keys: {sorted(names)}")
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items()})
