"""``diffsteer figures``: compute the registered figures (PNG + JSON of the numbers), or re-draw them from
their JSONs. The figure modules of ``sims`` and ``imaging`` are gathered here (the registry itself,
``theory.registry``, imports neither)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

from .runtime import add_threads_option

#: figure modules of ``imaging`` (those of ``sims`` are listed in ``sims.registry.FIGURE_MODULES``).
IMAGING_FIGURE_MODULES = ["imaging.digits", "imaging.ctrl_figures", "imaging.guide_figures", "imaging.draft_figures"]

_DESCRIPTION = """\
Compute the paper figures into OUT: each figure is a PNG plus a JSON of the numbers drawn, its settings,
its verdicts on the papers' claims, its wall time and its code version.

Settings: by default the reduced ("default") settings, chosen to run in minutes; --full runs the papers'
settings (45, 47, 58, 59 and 69 min measured on 2 cores, the machine's speed differing). Each
figure's JSON says which it holds ("settings": "default" / "full") and its verdicts; README's verdict
table compares the default run's verdicts with the full run's.

Output folder: run from the diffsteer repository checkout, OUT defaults to paper_figs/default/ of that
checkout for the default settings, and to the committed paper_figs/ itself with --full (which it then
overwrites, figure by figure); anywhere else --out is required. OUT is checked to be writable before
anything is computed, and each figure is written as it finishes.

Processes: --jobs N worker processes (default 2, at most the usable cores), each with --threads torch
threads (default 1); the figures of one module run in one process, in order (they share computations:
ctrl_toy_table reuses ctrl_toy_density, gg_objective and gg_distributions reuse gg_roff,
draft_image_lora reuses draft_image_compare), largest first.

A figure whose PNG and JSON in OUT are current - the JSON records the same settings and the same code
version (a hash of the source of the figure's module and of every theory/sims/imaging module it
imports, transitively, leaving out the runner itself) - is skipped; --force recomputes it. Before
starting, the command prints each figure's expected time (the wall time recorded in its JSON at the same
settings) and the expected total for the schedule; each figure logs its time as it finishes, and long
figures show their own progress (rounds, training steps): bars with one process, a line a minute per
worker with several. A pre-trained network that is not yet in the cache adds its training time once (the
digits pipeline: about 7.5 min on one thread).

--replot re-draws the PNGs from the JSONs already in OUT and refreshes their verdicts, without
computing (for layout or wording changes). Trained pre-trained networks are cached in $DIFFSTEER_CACHE
(default: the platform's user cache folder, e.g. ~/.cache/diffsteer), never inside the repository."""


def figure_modules() -> list[str]:
    """Every figure module, in drawing order."""
    from sims.registry import FIGURE_MODULES

    return [*FIGURE_MODULES, *IMAGING_FIGURE_MODULES]


def repo_paper_figs(full: bool = True) -> Optional[Path]:
    """The committed paper_figs/ (``full``) or paper_figs/default/ when this package runs from its
    repository checkout and the current folder is inside that checkout; else None."""
    root = Path(__file__).resolve().parents[1]
    if not ((root / ".git").exists() and (root / "pyproject.toml").is_file() and (root / "paper_figs").is_dir()):
        return None
    cwd = Path.cwd().resolve()
    if not (cwd == root or root in cwd.parents):
        return None
    return root / "paper_figs" if full else root / "paper_figs" / "default"


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("figures", help="compute every registered figure (PNG + JSON of the numbers)",
                       description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true",
                   help="the papers' full settings (45-69 min measured on 2 cores, the machine's speed differing; "
                        "default: the reduced default settings, about 9 min)")
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # the old name of the default
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these figures (see --list)")
    p.add_argument("--out", default=None,
                   help="output folder (default, only when run from the repository checkout: paper_figs/default/, "
                        "with --full paper_figs/; required elsewhere)")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="worker processes (default: 2, at most the usable cores); 1 runs in this process with "
                        "progress bars inside long figures (several: progress lines, one a minute)")
    p.add_argument("--list", action="store_true", help="list the registered figures with their recorded wall "
                                                       "times and exit")
    p.add_argument("--dry-run", action="store_true", help="print what would be computed and the expected time, "
                                                          "then exit")
    p.add_argument("--force", action="store_true", help="recompute figures whose output is current too")
    p.add_argument("--replot", action="store_true", help="re-draw the PNGs from the JSONs in OUT (no computation)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars inside figures (one process)")
    add_threads_option(p, default=1)
    p.set_defaults(func=run)


def _log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def run(args) -> int:
    from theory import registry

    from .runtime import usable_cores

    if args.full and args.quick:
        raise ValueError("full: --full and --quick (the old name of the default settings) exclude each other")
    quick = not args.full
    jobs = args.jobs if args.jobs is not None else max(1, min(2, usable_cores()))
    if jobs < 1:
        raise ValueError(f"jobs: must be >= 1, got {jobs}")
    modules = figure_modules()
    for mod, why in registry.load(modules).items():
        _log(f"figures: module {mod} not loaded ({why}); its figures are unavailable")
    names = registry.ordered_names(modules)
    committed = repo_paper_figs(full=not quick)
    full_figs = repo_paper_figs(full=True)
    if args.list:
        for name in names:
            t = registry.recorded_wall_time(name, quick, [Path(args.out)] if args.out else [committed] if committed else [])
            ts = f"{t:8.1f} s" if t is not None else "       - "
            print(f"{name:24s} {ts}  {registry.FIGURES[name].description}")
        return 0
    if args.out is None and committed is None:
        raise ValueError("out: give --out DIR (the defaults, the repository's paper_figs/default/ and with --full "
                         "paper_figs/, apply only when diffsteer runs from its repository checkout and the current "
                         "folder is inside it)")
    out = Path(args.out) if args.out is not None else committed
    if args.only:
        unknown = [n for n in args.only if n not in registry.FIGURES]
        if unknown:
            raise ValueError(f"only: unknown figure(s) {unknown}; registered: {names}")
        names = [n for n in names if n in args.only]
    if args.replot:
        failed = registry.replot_figures(names, out, log=_log)
        return 1 if failed else 0
    estimate_from = [p for p in (committed, full_figs) if p is not None and p.resolve() != out.resolve()]
    if args.dry_run:
        known = 0.0
        for n in names:
            cur = not args.force and registry.is_current(n, out, quick)
            t = registry.recorded_wall_time(n, quick, [out, *estimate_from])
            known += 0.0 if cur or t is None else t
            print(f"{n:24s} {'current, skipped' if cur else 'compute'}  "
                  f"{'' if cur else ('expected %.1f s' % t if t is not None else 'no recorded time')}")
        print(f"expected total: {known:.0f} s (figures without a recorded time not counted)")
        return 0
    threads = args.threads if args.threads is not None else 1
    t0 = time.perf_counter()
    results = registry.run_figures(names, out=out, quick=quick, progress=not args.no_progress,
                                   skip_current=not args.force, estimate_from=estimate_from, log=_log,
                                   jobs=jobs, modules=modules, threads=threads)
    wall = time.perf_counter() - t0
    total = sum(r["wall_time_s"] for r in results.values())
    _log(f"figures: {len(results)} computed in {wall:.0f} s wall ({total:.0f} s of figure time, {jobs} process(es)), "
         f"{len(names) - len(results)} current -> {out}/")
    return 0
