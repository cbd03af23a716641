"""The ``diffsteer`` command line: it parses and dispatches; the work lives in sims/ and imaging/.

Subcommands are contributed by modules that expose ``add_parser(subparsers)``; each sets
``func(args) -> int`` as its handler. Heavy imports happen inside the handlers.
"""
from __future__ import annotations

import argparse
import importlib
import sys

#: modules contributing subcommands (imaging's need only argparse at import time).
COMMAND_MODULES = ["diffsteer.cmd_figures", "imaging.cli", "imaging.cli_ctrl"]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="diffsteer",
        description="Steer pre-trained diffusion models: CTRL, DRaFT and gradient guidance on one SDE core.",
    )
    parser.add_argument("--version", action="version", version=f"diffsteer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMAND_MODULES:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and mod.startswith(e.name):
                continue
            raise
        m.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"diffsteer {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
