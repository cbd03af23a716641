"""Building cached artefacts (the trained digits pipeline) atomically under a lock. Where the cache is
lives in one place, ``theory.cache.cache_dir`` (``$DIFFSTEER_CACHE`` or the platform's user cache folder).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from theory.cache import cache_dir

__all__ = ["atomic_build", "build_lock", "cache_root", "dir_mode"]


def dir_mode() -> int:
    """0o777 & ~umask: the mode ``os.mkdir`` gives a new folder (``tempfile.mkdtemp`` leaves ``0o700``).
    Kept here beside its one user rather than beside ``theory.io.file_mode``: theory.io is imported by
    every figure, and its source is part of each figure's code version (``theory.registry.code_hash``),
    so a change there marks every committed figure stale."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def cache_root() -> Path:
    """The cache folder (not created here): ``theory.cache.cache_dir()``."""
    return cache_dir()


def build_lock(target: Path, timeout: float = -1):
    """The lock file ``<target>.lock`` (``filelock``: works across processes) that serialises building
    ``target`` and any later in-place change of it (the digits pipeline's evaluation); a context manager.
    ``timeout`` (s); -1 waits forever."""
    from filelock import (
        FileLock,  # a dependency of huggingface_hub, hence of diffusers/transformers
    )

    return FileLock(str(target) + ".lock", timeout=timeout)


def atomic_build(target: Path, build: Callable[[Path], None], is_complete: Callable[[Path], bool],
                 timeout: float = -1) -> Path:
    """Make ``target`` exist by calling ``build(tmp)`` on a fresh temporary folder next to it and renaming
    the folder into place, so a reader never sees a half-written ``target``; it gets the mode of a new folder
    (``0o777 & ~umask``). A lock file
    (``<target>.lock``, ``filelock``: works across processes) serialises concurrent callers: the first
    builds, the others wait and then reuse its result. A ``target`` that exists but is not complete
    (e.g. a copy interrupted by hand) is rebuilt. ``timeout`` (s) for the lock; -1 waits forever."""
    target = Path(target)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(target, timeout):
        if is_complete(target):  # another process finished it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            if not is_complete(tmp):
                raise RuntimeError(f"build of '{target}' finished without a complete result in '{tmp}'")
            os.chmod(tmp, dir_mode())  # the mode of a new folder, not mkdtemp's private 0o700
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target
