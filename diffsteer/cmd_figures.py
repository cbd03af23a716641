"""``diffsteer figures``: compute the registered figures (PNG + JSON of the numbers), or re-draw them from
their JSONs. The figure modules of ``sims`` and ``imaging`` are gathered here (the registry itself,
``theory.registry``, imports neither)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from .runtime import add_threads_option

#: figure modules of ``imaging`` (those of ``sims`` are listed in ``sims.registry.FIGURE_MODULES``).
IMAGING_FIGURE_MODULES = ["imaging.digits", "imaging.ctrl_figures", "imaging.guide_figures", "imaging.draft_figures"]

_DESCRIPTION = """\
Compute the paper figures into OUT: each figure is a PNG plus a JSON of the numbers drawn, its settings,
its wall time and its code version. Full settings by default (--quick: reduced ones).

Output folder: run from the diffsteer repository checkout, OUT defaults to the committed paper_figs/ of
that checkout (which this command then overwrites, figure by figure); anywhere else --out is required.
OUT is checked to be writable before anything is computed, and each figure is written as it finishes.

A figure whose PNG and JSON in OUT are current - the JSON records the same settings (--quick or not)
and the same code version (a hash of the source of the figure's module and of every theory/sims/imaging
module it imports, transitively) - is skipped; --force recomputes it. Before starting, the command
prints each figure's expected time (the wall time recorded in its JSON at the same settings) and the
expected total; long figures show their own progress (rounds, training steps). Figures that reuse the
computations of an earlier figure of the same run (ctrl_toy_table after ctrl_toy_density, gg_objective
and gg_distributions after gg_roff) record only their own extra time, and a pre-trained network that is
not yet in the cache adds its training time once: the expected total is for a whole run with a warm cache.

--replot re-draws the PNGs from the JSONs already in OUT, without computing (for layout changes).
Trained pre-trained networks are cached in $DIFFSTEER_CACHE (default: the platform's user cache
folder, e.g. ~/.cache/diffsteer), never inside the repository."""


def figure_modules() -> list[str]:
    """Every figure module, in drawing order."""
    from sims.registry import FIGURE_MODULES

    return [*FIGURE_MODULES, *IMAGING_FIGURE_MODULES]


def repo_paper_figs() -> Optional[Path]:
    """The committed paper_figs/ when this package runs from its repository checkout and the current
    folder is inside that checkout; else None."""
    root = Path(__file__).resolve().parents[1]
    if not ((root / ".git").exists() and (root / "pyproject.toml").is_file() and (root / "paper_figs").is_dir()):
        return None
    cwd = Path.cwd().resolve()
    return root / "paper_figs" if cwd == root or root in cwd.parents else None


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("figures", help="compute every registered figure (PNG + JSON of the numbers)",
                       description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced settings (fewer rounds, seeds, samples)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these figures (see --list)")
    p.add_argument("--out", default=None,
                   help="output folder (default: the repository's paper_figs/, only when run from the "
                        "repository checkout; required elsewhere)")
    p.add_argument("--list", action="store_true", help="list the registered figures with their recorded wall "
                                                       "times and exit")
    p.add_argument("--dry-run", action="store_true", help="print what would be computed and the expected time, "
                                                          "then exit")
    p.add_argument("--force", action="store_true", help="recompute figures whose output is current too")
    p.add_argument("--replot", action="store_true", help="re-draw the PNGs from the JSONs in OUT (no computation)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars inside figures")
    add_threads_option(p, default=1)
    p.set_defaults(func=run)


def _log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def run(args) -> int:
    from theory import registry

    modules = figure_modules()
    for mod, why in registry.load(modules).items():
        _log(f"figures: module {mod} not loaded ({why}); its figures are unavailable")
    names = registry.ordered_names(modules)
    committed = repo_paper_figs()
    if args.list:
        for name in names:
            t = registry.recorded_wall_time(name, args.quick, [Path(args.out)] if args.out else [committed] if committed else [])
            ts = f"{t:8.1f} s" if t is not None else "       - "
            print(f"{name:24s} {ts}  {registry.FIGURES[name].description}")
        return 0
    if args.out is None and committed is None:
        raise ValueError("out: give --out DIR (the default, the repository's paper_figs/, applies only when "
                         "diffsteer runs from its repository checkout and the current folder is inside it)")
    out = Path(args.out) if args.out is not None else committed
    if args.only:
        unknown = [n for n in args.only if n not in registry.FIGURES]
        if unknown:
            raise ValueError(f"only: unknown figure(s) {unknown}; registered: {names}")
        names = [n for n in names if n in args.only]
    if args.replot:
        failed = registry.replot_figures(names, out, log=_log)
        return 1 if failed else 0
    estimate_from = [committed] if committed is not None and committed.resolve() != out.resolve() else []
    if args.dry_run:
        known = 0.0
        for n in names:
            cur = not args.force and registry.is_current(n, out, args.quick)
            t = registry.recorded_wall_time(n, args.quick, [out, *estimate_from])
            known += 0.0 if cur or t is None else t
            print(f"{n:24s} {'current, skipped' if cur else 'compute'}  "
                  f"{'' if cur else ('expected %.1f s' % t if t is not None else 'no recorded time')}")
        print(f"expected total: {known:.0f} s (figures without a recorded time not counted)")
        return 0
    results = registry.run_figures(names, out=out, quick=args.quick, progress=not args.no_progress,
                                   skip_current=not args.force, estimate_from=estimate_from, log=_log)
    total = sum(r["wall_time_s"] for r in results.values())
    _log(f"figures: {len(results)} computed in {total:.0f} s, {len(names) - len(results)} current -> {out}/")
    return 0
