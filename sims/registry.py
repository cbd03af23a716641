"""The figure modules of ``sims``. The registry itself is :mod:`theory.registry` (below both ``sims`` and
``imaging``, so that each registers figures without importing the other); it is re-exported here for
modules that register with ``sims.registry.figure``."""
from __future__ import annotations

from theory.registry import FIGURES, FigureSpec, figure, load, to_jsonable

__all__ = ["FIGURE_MODULES", "FIGURES", "FigureSpec", "figure", "load_all", "to_jsonable"]

#: modules whose import registers the figures of ``sims``, in drawing order.
FIGURE_MODULES = [
    "sims.fig_theory",
    "sims.gradguide.figures",
    "sims.ctrl_toy.figures",
    "sims.draft_toy.figures",
    "sims.claims.figures",
    "sims.claims.ctrl_scalar",
    "sims.claims.ctrl_convergence",
]


def load_all() -> dict[str, str]:
    """Import the figure modules of ``sims``; returns {module: why not loaded} (see ``theory.registry.load``)."""
    return load(FIGURE_MODULES)
