"""Process settings every ``diffsteer`` command applies before it works: torch's thread count, and the
one-line message for a missing optional extra.

Threads are chosen, not inherited: torch's default (one intra-op thread per core) oversubscribes a
machine whose cores are shared with other processes, and the small networks of the toy experiments
gain nothing from more than one thread (measured: ``theory_tilting --quick`` took 49 s with torch's
default threads on a busy 2-core machine, 5.8 s with one). Commands that run the small networks
default to one thread per process; commands that run the image pipelines (Stable Diffusion, and the 1M-
parameter digits pipeline, whose batched U-Net calls do use a second core: ``sd-sample --n 256 --steps
50`` took 15.6 s with one thread and 11.3 s with two on an idle 2-core machine) default to every core this
process may use. ``--threads N`` overrides either.
"""
from __future__ import annotations

import os
from typing import Optional

__all__ = ["usable_cores", "configure_threads", "add_threads_option", "missing_extra_message", "IMAGING_MODULES"]

#: top-level modules that only the ``imaging`` extra installs.
IMAGING_MODULES = ("diffusers", "transformers", "accelerate")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform tells, else the core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def configure_threads(threads: Optional[int], default: Optional[int] = 1) -> int:
    """Set torch's intra-op threads to ``threads``, else ``default`` (None: every usable core). Returns
    the count set. The one place every command sets its threads."""
    n = threads if threads is not None else (default if default is not None else usable_cores())
    if int(n) < 1:
        raise ValueError(f"threads: must be >= 1, got {n}")
    import torch

    torch.set_num_threads(int(n))
    return int(n)


def add_threads_option(parser, default: Optional[int] = 1) -> None:
    """``--threads N`` on a subcommand's parser; ``default`` is the command's own (None: all usable cores)."""
    what = "1 (small networks)" if default == 1 else "every usable core" if default is None else str(default)
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help=f"torch threads for this process (default: {what}; see diffsteer.runtime)")
    parser.set_defaults(default_threads=default)


def missing_extra_message(e: ModuleNotFoundError) -> Optional[str]:
    """The one-line message for a module of an optional extra that is not installed, else None."""
    root = (e.name or "").split(".")[0]
    if root in IMAGING_MODULES:
        return f"this command needs {root}, from the imaging extra: pip install 'diffsteer[imaging]'"
    return None
