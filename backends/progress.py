"""Progress messages from inside a backend's long steps (e.g. a TVM tuning) to whoever runs it.

:func:`qdeploy.api.compile` runs ``backend.build`` inside ``reporting(progress)``; a backend calls
:func:`report` with a short message (``"tuning (meta-schedule): 16/64 trials, 40 s"``), which
reaches that callback (the CLI shows it on its rich status line) or nothing when none is set.
A ``contextvars.ContextVar`` carries the callback, so concurrent compiles in other threads or
tasks do not see each other's.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

__all__ = ["reporting", "report"]

_CALLBACK: contextvars.ContextVar = contextvars.ContextVar("qdeploy_backend_progress", default=None)


@contextlib.contextmanager
def reporting(callback: Callable[[str], None] | None):
    """Within the block, :func:`report` calls ``callback(message)`` (None: report is silent)."""
    token = _CALLBACK.set(callback)
    try:
        yield
    finally:
        _CALLBACK.reset(token)


def report(message: str) -> None:
    """Tell the current :func:`reporting` callback ``message``; nothing when there is none."""
    cb = _CALLBACK.get()
    if cb is not None:
        cb(message)
