"""``diffsteer figures``: regenerate the registered figures (PNG + JSON) into paper_figs/."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("figures", help="regenerate every registered figure (PNG + JSON of the numbers)",
                       description="Regenerate the paper figures into OUT (default paper_figs/): each figure "
                                   "is a PNG plus a JSON of the numbers drawn. Full settings by default.")
    p.add_argument("--quick", action="store_true", help="reduced settings (fewer rounds, seeds, samples)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these figures (see --list)")
    p.add_argument("--out", default="paper_figs", help="output folder (default: paper_figs)")
    p.add_argument("--list", action="store_true", help="list the registered figures and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from sims.registry import FIGURES, ordered_names, run_figures

    if args.list:
        for name in ordered_names():
            spec = FIGURES[name]
            print(f"{name:32s} {spec.description}")
        return 0
    results = run_figures(args.only, out=args.out, quick=args.quick, progress=not args.no_progress)
    for name, rec in results.items():
        print(f"{name}: {rec['wall_time_s']:.1f} s -> {args.out}/{name}.png, .json")
    return 0
