"""Shared by the ``qdeploy`` command modules: the one-line error exit."""
from __future__ import annotations

import typer

from .compiler.errors import QDeployError

__all__ = ["fail"]


def fail(e: Exception) -> None:
    """Print ``error: <one line>`` on stderr and exit 2 (a :class:`QDeployError` prints its
    ``one_line()``, any other exception ``Type: message`` on one line; never a traceback)."""
    msg = e.one_line() if isinstance(e, QDeployError) else " ".join(f"{type(e).__name__}: {e}".split())
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)
