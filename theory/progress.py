"""Progress inside long computations, reported to whoever is listening (the ``diffsteer figures``
progress display), without the computation knowing about displays.

A long loop calls ``report(done, total, unit)`` (rounds of Algorithm 1, training steps of a pre-trained
network, ...). Nothing happens unless a caller installed a listener with ``listening(callback)``; the
listener is held in a ``contextvars.ContextVar``, so nested or concurrent runs do not see each other's.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Optional

__all__ = ["report", "listening", "Listener"]

#: ``callback(done, total, unit, what)``; ``total`` may be None when unknown.
Listener = Callable[[int, Optional[int], str, str], None]

_listener: contextvars.ContextVar[Optional[Listener]] = contextvars.ContextVar("diffsteer_progress", default=None)


def report(done: int, total: Optional[int] = None, unit: str = "step", what: str = "") -> None:
    """Tell the current listener (if any) that ``done`` of ``total`` ``unit``s of ``what`` are finished."""
    cb = _listener.get()
    if cb is not None:
        cb(int(done), None if total is None else int(total), unit, what)


@contextlib.contextmanager
def listening(callback: Optional[Listener]) -> Iterator[None]:
    """Install ``callback`` as the listener for the duration of the ``with`` block."""
    token = _listener.set(callback)
    try:
        yield
    finally:
        _listener.reset(token)
