"""Pooling: ``MaxPool``, ``AvgPool`` (windows of ``kernel``) and ``GlobalAvgPool``.

Fixed-point averages over n elements get k = ceil(log2 n) more fraction bits and are
floor(sum * 2**k / n): exact when n is a power of two, truncated (towards -inf) otherwise.
``AvgPool`` padding is excluded from the count (ONNX ``count_include_pad=0``).
"""
from __future__ import annotations

import math

import numpy as np

from ...errors import UnsupportedError, VerifyError
from ..types import FLOAT32, FixedType, fixed_for_range
from .kernels import real_view, windows
from .spec import OpSpec, conv_out_shape, register


def avg_shift(n: int) -> int:
    """Extra fraction bits k = ceil(log2 n) of an average over n elements (0 for n <= 1)."""
    return max(0, math.ceil(math.log2(n))) if n > 1 else 0


def _avg_type(t, n):
    if not isinstance(t, FixedType):
        return FLOAT32
    k = avg_shift(n)
    return fixed_for_range(t.min_code << k, t.max_code << k, t.frac_bits + k)


def _window_macs(node, graph) -> int:
    """prod(kernel) operations per output element."""
    return max(1, graph.values[node.output].size * int(np.prod(node.attrs["kernel"])))


def _window_args(node):
    k = tuple(node.attrs["kernel"])
    nd = len(k)
    return k, nd, tuple(node.attrs.get("strides", (1,) * nd)), tuple(node.attrs.get("pads", (0,) * 2 * nd))


def _maxpool_rule(node, ins):
    sp = conv_out_shape(node, ins[0].shape)
    return (*sp, ins[0].shape[-1]), ins[0].dtype


def _maxpool_ref(node, args, in_types, out_t):
    k, nd, s, p = _window_args(node)
    t0 = in_types[0]
    pad = t0.min_code if isinstance(t0, FixedType) else -np.inf
    return windows(args[0], k, s, p, pad).max(axis=tuple(range(-nd, 0)))


POOL_ATTRS = {"kernel": None, "strides": 1, "pads": 0}

MAXPOOL = register(OpSpec(name="MaxPool", kind="pool", summary="maximum over each window (padding holds the type's minimum)",
                          infer=_maxpool_rule, reference=_maxpool_ref, attrs=POOL_ATTRS, macs=_window_macs))


def _avgpool_rule(node, ins):
    """Average over each window of n = prod(kernel) elements.  Fixed point: the result has
    k = ceil(log2 n) more fraction bits and is floor(sum * 2**k / n_w) -- exact when n_w is a power
    of two, truncated (rounded towards -inf) otherwise.  Padding (``pads``) is *excluded* from the
    average, as ONNX ``AveragePool`` with ``count_include_pad=0``: n_w is the number of input
    elements in window w (ONNX's ``count_include_pad=1`` is imported as a zero ``Pad`` and an
    unpadded pool)."""
    k, nd, s, p = _window_args(node)
    if any(pv >= kv for pv, kv in zip(p, k + k)):
        raise UnsupportedError(f"AvgPool pads {p} as large as the kernel {k} (windows of padding only)", node.name)
    sp = conv_out_shape(node, ins[0].shape)
    n = int(np.prod(node.attrs["kernel"]))
    return (*sp, ins[0].shape[-1]), _avg_type(ins[0].dtype, n)


def window_counts(node, in_shape) -> np.ndarray:
    """Number of input (non-padding) elements in each window of a pool ``node`` over the
    channels-last per-sample ``in_shape``: an int64 array of the output's spatial shape."""
    k, nd, s, p = _window_args(node)
    ones = np.ones((1, *in_shape[:-1], 1), dtype=np.int64)
    return windows(ones, k, s, p, 0).sum(axis=tuple(range(-nd, 0)))[0, ..., 0]


def _avgpool_ref(node, args, in_types, out_t):
    k, nd, s, p = _window_args(node)
    win = windows(args[0], k, s, p, 0)
    cnt = int(np.prod(k))
    per = window_counts(node, args[0].shape[1:])[None, ..., None] if any(p) else cnt
    if isinstance(out_t, FixedType):
        tot = win.sum(axis=tuple(range(-nd, 0)))
        return np.floor_divide(np.left_shift(tot, avg_shift(cnt)), per)
    return (win.astype(np.float32).sum(axis=tuple(range(-nd, 0))) / np.asarray(per, np.float32)).astype(np.float32)


AVGPOOL = register(OpSpec(name="AvgPool", kind="pool", summary="average over each window (padding not counted), "
                                                                "floor(sum * 2**k / n) on codes",
                          infer=_avgpool_rule, reference=_avgpool_ref, attrs=POOL_ATTRS, macs=_window_macs))


def _gap_rule(node, ins):
    """Average over all spatial positions: (*spatial, C) -> (C,); rounding as AvgPool."""
    if len(ins[0].shape) < 2:
        raise VerifyError(f"GlobalAvgPool needs a feature map, got shape {ins[0].shape}", node.name)
    n = int(np.prod(ins[0].shape[:-1]))
    return (ins[0].shape[-1],), _avg_type(ins[0].dtype, n)


def _gap_ref(node, args, in_types, out_t):
    x = args[0]
    axes = tuple(range(1, x.ndim - 1))
    cnt = int(np.prod(x.shape[1:-1]))
    if isinstance(out_t, FixedType):
        return np.floor_divide(np.left_shift(x.sum(axis=axes), avg_shift(cnt)), cnt)
    return (real_view(x, in_types[0]).mean(axis=axes)).astype(np.float32)


def _gap_macs(node, graph) -> int:
    """One addition per input element."""
    return max(1, graph.values[node.inputs[0]].size)


GLOBALAVGPOOL = register(OpSpec(name="GlobalAvgPool", kind="pool", summary="average over all spatial positions: (*spatial, C) -> (C,)",
                                infer=_gap_rule, reference=_gap_ref, macs=_gap_macs))
