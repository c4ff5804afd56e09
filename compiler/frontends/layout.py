"""Tensor layouts between PyTorch and the IR for captured dynamic programs.

PyTorch tensors are batch-first and channels-first; IR graphs are channels-last without the
batch dimension.  A device value has one of two layout kinds: :data:`NCHW` (a 4-D torch tensor
``(N, C, H, W)``, IR shape ``(H, W, C)``) or :data:`PLAIN` (a 2-D ``(N, F)``, IR shape ``(F,)``).
:mod:`.fx_to_ir` assigns the kinds; the dynamic runtime converts host tensors with
:func:`to_ir` / :func:`from_ir` at every device call.
"""
from __future__ import annotations

import numpy as np

__all__ = ["NCHW", "PLAIN", "layout_of", "to_ir", "from_ir"]

NCHW, PLAIN = "nchw", "plain"


def layout_of(ndim: int) -> str | None:
    """Device layout kind of a torch tensor of ``ndim`` dims (batch included): 4-D NCHW maps to
    IR (H, W, C), 2-D (N, F) to (F,); other ranks stay on the host (None)."""
    return {4: NCHW, 2: PLAIN}.get(ndim)


def to_ir(a: np.ndarray) -> np.ndarray:
    """Batch of torch-layout values -> IR layout: a 4-D ``(N, C, H, W)`` array becomes a contiguous
    ``(N, H, W, C)``; any other rank is returned unchanged."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)) if a.ndim == 4 else a


def from_ir(a: np.ndarray, kind: str) -> np.ndarray:
    """Batch of IR-layout values -> torch layout: ``(N, H, W, C)`` -> ``(N, C, H, W)`` when ``kind``
    is :data:`NCHW` (a view, not copied); unchanged for :data:`PLAIN`."""
    return a.transpose(0, 3, 1, 2) if kind == NCHW else a
