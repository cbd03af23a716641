"""The ``diffsteer`` command line: it parses and dispatches; the work lives in sims/ and imaging/.

Subcommands are contributed by modules that expose ``add_parser(subparsers)``; each sets
``func(args) -> int`` as its handler. Heavy imports happen inside the handlers.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .runtime import add_threads_option, configure_threads

#: modules contributing subcommands (imaging's need only argparse at import time).
COMMAND_MODULES = ["diffsteer.cmd_figures", "imaging.cli", "imaging.cli_ctrl", "imaging.cli_guide"]


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
    for p in sub.choices.values():  # --threads on every command; a command that did not add its own gets
        try:  # the default "every usable core" (large networks)
            add_threads_option(p, default=None)
        except argparse.ArgumentError:
            pass
    return parser


class DiffsteerError(Exception):
    """An expected failure that is not a bad value or a missing file (a corrupt checkpoint, a device that
    cannot do what was asked): the CLI prints its message in one line and exits 2. Lower layers (theory,
    imaging) cannot import this package; an exception class of theirs is treated the same when its name, or
    a base class's name, is ``DiffsteerError`` or ``CheckpointError``."""


#: exceptions that are the user's to fix (a bad argument, file, device or checkpoint): one line, exit 2.
#: ``json.JSONDecodeError`` (a malformed model_index.json or checkpoint JSON) is a ValueError;
#: ``FloatingPointError`` is a run that diverged (the engine names the step and the parameter).
EXPECTED_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                   FloatingPointError, DiffsteerError)
_EXPECTED_NAMES = {"DiffsteerError", "CheckpointError"}


def is_expected(e: BaseException) -> bool:
    """True for the failures ``main`` reports in one line (``EXPECTED_ERRORS`` and the named classes)."""
    return isinstance(e, EXPECTED_ERRORS) or any(c.__name__ in _EXPECTED_NAMES for c in type(e).__mro__)


def _missing_extra(e: ModuleNotFoundError):
    from .runtime import missing_extra_message

    return missing_extra_message(e)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in msg:
        msg = f"{msg}: {e.filename}"
    return " ".join(msg.split())


def main(argv=None) -> int:
    """Parse ``argv`` and run the subcommand. Expected failures (``is_expected``; a missing optional extra)
    print ``diffsteer COMMAND: error: <one line>`` to stderr and return 2; anything else propagates with
    its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        configure_threads(args.threads, args.default_threads)  # the one place every command sets its threads
        return int(args.func(args) or 0)
    except ModuleNotFoundError as e:
        msg = _missing_extra(e)
        if msg is None:
            raise
        print(f"diffsteer {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - re-raised below unless expected
        if not is_expected(e):
            raise
        print(f"diffsteer {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
