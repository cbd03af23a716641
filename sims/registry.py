"""The figure registry behind ``diffsteer figures``.

A figure is a function ``fn(quick: bool) -> (matplotlib Figure, dict)``: it runs its experiment (full
settings by default, reduced ones with ``quick``), draws, and returns the numbers it drew. The registry
writes ``<name>.png`` and ``<name>.json`` (numbers + config + wall time) into the output folder.
Modules that register figures are listed in ``FIGURE_MODULES`` and imported on demand, so a figure
module that is missing or broken is reported instead of silently skipped.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

__all__ = ["FigureSpec", "FIGURES", "FIGURE_MODULES", "figure", "load_all", "ordered_names", "run_figures",
           "to_jsonable"]

#: modules whose import registers figures, in the order figures are drawn.
FIGURE_MODULES = [
    "sims.fig_theory",
    "sims.gradguide.figures",
    "sims.ctrl_toy.figures",
    "sims.draft_toy.figures",
    "imaging.digits",
]


@dataclass(frozen=True)
class FigureSpec:
    name: str
    fn: Callable
    description: str
    module: str


FIGURES: dict[str, FigureSpec] = {}


def figure(name: str, description: str):
    """Decorator registering ``fn(quick) -> (Figure, dict)`` under ``name``."""
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"name: figure names are file stems (letters, digits, '_', '-'), got {name!r}")

    def deco(fn):
        if name in FIGURES and FIGURES[name].fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"name: figure {name!r} is registered twice ({FIGURES[name].module}, {fn.__module__})")
        FIGURES[name] = FigureSpec(name, fn, description, fn.__module__)
        return fn

    return deco


def load_all() -> None:
    """Import every figure module (a module that does not exist yet is skipped)."""
    for mod in FIGURE_MODULES:
        if importlib.util.find_spec(mod.rsplit(".", 1)[0]) is None:
            continue
        try:
            if importlib.util.find_spec(mod) is None:
                continue
        except ModuleNotFoundError:
            continue
        importlib.import_module(mod)


def ordered_names() -> list[str]:
    """Every registered figure in drawing order: by its module's place in ``FIGURE_MODULES``, then in
    registration order within the module (independent of the order in which modules were imported)."""
    load_all()
    rank = {m: i for i, m in enumerate(FIGURE_MODULES)}
    names = list(FIGURES)
    return sorted(names, key=lambda n: (rank.get(FIGURES[n].module, len(rank)), names.index(n)))


def to_jsonable(obj):
    """numpy / torch / dataclass values -> plain JSON types (NaN and inf become strings)."""
    import dataclasses

    import numpy as np

    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if torch is not None and isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().numpy())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else str(v)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run_figures(names: Optional[Sequence[str]] = None, out: str | Path = "paper_figs", quick: bool = False,
                progress: bool = True) -> dict[str, dict]:
    """Regenerate the named figures (all registered ones by default) into ``out``; returns name -> numbers."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load_all()
    names = ordered_names() if not names else list(names)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise ValueError(f"only: unknown figure(s) {unknown}; registered: {sorted(FIGURES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    it = names
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(names, desc="figures", unit="fig")
    for name in it:
        spec = FIGURES[name]
        if progress:
            it.set_postfix_str(name)
        t0 = time.perf_counter()
        fig, data = spec.fn(quick=quick)
        wall = time.perf_counter() - t0
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        _atomic_write(out / f"{name}.png", buf.getvalue())
        record = {"figure": name, "description": spec.description, "quick": quick,
                  "wall_time_s": round(wall, 2), "data": to_jsonable(data)}
        _atomic_write(out / f"{name}.json", json.dumps(record, indent=1).encode())
        results[name] = record
    return results
