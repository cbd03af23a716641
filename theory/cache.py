"""The one place that says where diffsteer caches things it can rebuild (trained pre-trained networks,
generated pipelines): ``$DIFFSTEER_CACHE`` when set, else the platform's user cache folder
(``platformdirs``: ``$XDG_CACHE_HOME/diffsteer`` or ``~/.cache/diffsteer`` on Linux,
``~/Library/Caches/diffsteer`` on macOS, ``%LOCALAPPDATA%\\diffsteer\\Cache`` on Windows).

Nothing is cached inside the repository, and nothing outside it except under this folder. The test suite
points ``DIFFSTEER_CACHE`` at a temporary folder per session (tests/conftest.py).
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "ENV_VAR"]

#: the environment variable that overrides the cache folder.
ENV_VAR = "DIFFSTEER_CACHE"


def cache_dir() -> Path:
    """The cache folder (not created here: writers create it when they first write). ``~`` in
    ``$DIFFSTEER_CACHE`` is expanded; an empty value counts as unset."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_path

    return user_cache_path("diffsteer", appauthor=False)
