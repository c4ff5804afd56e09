"""NumPy building blocks of the reference kernels (batch-first runtime arrays).

Runtime arrays: int64 codes for fixed-point values, float32 for float values; a value of IR
shape ``S`` is an array of shape ``(N, *S)``.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..types import FixedType


def real_view(arr, t):
    """float32 real view of a runtime array of type ``t`` (codes scaled by ``2**-F``)."""
    if isinstance(t, FixedType):
        return t.to_real(arr).astype(np.float32)
    return arr.astype(np.float32, copy=False)


def align(codes, f_from: int, f_to: int):
    """Codes with ``f_from`` fraction bits re-expressed with ``f_to >= f_from`` (left shift)."""
    return np.left_shift(codes, f_to - f_from)


def windows(x, kernel, strides, pads, pad_value):
    """x: (N, *spatial, C) -> view (N, *out_spatial, C, *kernel) of the pooling/conv windows.

    ``pads`` is (begins..., ends...); padded cells hold ``pad_value``.
    """
    nd = len(kernel)
    pw = [(0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)] + [(0, 0)]
    if any(p != (0, 0) for p in pw):
        x = np.pad(x, pw, constant_values=pad_value)
    v = sliding_window_view(x, tuple(kernel), axis=tuple(range(1, nd + 1)))
    sl = (slice(None),) + tuple(slice(None, None, s) for s in strides)
    return v[sl]


def conv_nhwc(x, w, strides, pads, groups, pad_value=0):
    """Channels-last convolution for int64 or float32 arrays.

    Args:
        x: (N, *spatial, C_in).  w: (*kernel, C_in/groups, C_out).
        strides: one per spatial axis.  pads: (begins..., ends...).  groups: channel groups.
    Returns:
        (N, *out_spatial, C_out), same dtype family as the inputs.
    """
    nd = w.ndim - 2
    kernel = w.shape[:nd]
    win = windows(x, kernel, strides, pads, pad_value)  # (N, *out, C, *k)
    cin_g = w.shape[-2]
    cout_g = w.shape[-1] // groups
    outs = []
    for g in range(groups):
        wg = w[..., g * cout_g:(g + 1) * cout_g]  # (*k, cin_g, cout_g)
        xg = win[(Ellipsis, slice(g * cin_g, (g + 1) * cin_g)) + (slice(None),) * nd]
        if nd == 1:
            outs.append(np.einsum("nlck,kco->nlo", xg, wg, optimize=True))
        else:
            outs.append(np.einsum("nhwcij,ijco->nhwo", xg, wg, optimize=True))
    return np.concatenate(outs, axis=-1) if groups > 1 else outs[0]


def dilate_kernel(w, dilations):
    """Zero-inserted kernel equivalent to a dilated convolution.

    Args:
        w: weights ``(*kernel, C_in/groups, C_out)``.  dilations: one factor >= 1 per spatial axis.
    Returns:
        ``(*[d * (k - 1) + 1], C_in/groups, C_out)``: ``w`` at every ``d``-th tap, exact zeros between
        (ONNX ``Conv`` ``dilations``: tap ``i`` reads input ``o * s + i * d - pad``).
    """
    nd = w.ndim - 2
    d = tuple(int(v) for v in dilations)
    if all(v == 1 for v in d):
        return w
    out = np.zeros(tuple(dd * (k - 1) + 1 for dd, k in zip(d, w.shape[:nd])) + w.shape[nd:], dtype=w.dtype)
    out[tuple(slice(None, None, dd) for dd in d)] = w
    return out


def per_sample_broadcast(a, b):
    """Align two batch-first arrays whose per-sample ranks differ (numpy broadcasting of
    the per-sample shapes, the batch axis kept first)."""
    ra, rb = a.ndim, b.ndim
    if ra < rb:
        a = a.reshape((a.shape[0],) + (1,) * (rb - ra) + a.shape[1:])
    elif rb < ra:
        b = b.reshape((b.shape[0],) + (1,) * (ra - rb) + b.shape[1:])
    return a, b
