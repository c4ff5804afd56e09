"""Tensor layouts between a PyTorch model and the IR.

The IR is channels-last: a torch NCHW activation (N, C, H, W) is the IR value (H, W, C) per
sample, a (N, F) activation is (F,).  Other ranks have no device layout (they stay on the host
in dynamic programs).  Arrays here are batch first.
"""
from __future__ import annotations

import numpy as np

__all__ = ["NCHW", "PLAIN", "layout_of", "to_ir", "from_ir"]

#: Layout kinds: a 4-D NCHW tensor, or a 2-D (N, F) tensor kept as is.
NCHW, PLAIN = "nchw", "plain"


def layout_of(ndim: int) -> str | None:
    """Device layout kind of a torch tensor of ``ndim`` dims (batch included): 4-D NCHW maps to
    IR (H, W, C), 2-D (N, F) to (F,); other ranks stay on the host (None)."""
    return {4: NCHW, 2: PLAIN}.get(ndim)


def to_ir(a: np.ndarray) -> np.ndarray:
    """A batch in torch layout -> IR layout: (N, C, H, W) -> contiguous (N, H, W, C); other ranks
    unchanged."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)) if a.ndim == 4 else a


def from_ir(a: np.ndarray, kind: str) -> np.ndarray:
    """A batch in IR layout -> torch layout for layout ``kind``: (N, H, W, C) -> (N, C, H, W) view
    for :data:`NCHW`, unchanged otherwise."""
    return a.transpose(0, 3, 1, 2) if kind == NCHW else a
