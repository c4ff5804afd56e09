"""Op catalogue and exact type rules.

Every op has a rule ``(node, input values) -> (output shape, output dtype)``.  For fixed-point
inputs the rule returns the narrowest type that holds every possible result *exactly*: the
result of a fixed-point op is never rounded or overflowed; only ``Quantize`` (and ``Sign``)
change precision.  Precision inference (:mod:`qdeploy.passes.precision`) is running these rules.

Accumulators.  For ``Dense``/``Conv`` the rule bounds each output channel by interval
arithmetic over the actual constant weights: ``max_n = sum_k max(w_kn*x_lo, w_kn*x_hi)``, which
is never wider than the textbook bound of ``W + X + ceil(log2 K)`` bits (W-bit weights, X-bit
inputs, K terms) and is often narrower.  The bias is aligned to the accumulator's binary point
first (``F = max(F_x + F_w, F_b)``).

Shapes omit the batch dimension and are channels-last (see :mod:`.graph`).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..errors import UnsupportedError, VerifyError
from .types import FLOAT32, FixedType, FloatType, TypeError_, fixed_for_range

OPS = ("Quantize", "Sign", "Dense", "Conv", "Relu", "Add", "Mul", "Affine", "Concat", "Reshape",
       "Transpose", "MaxPool", "AvgPool", "GlobalAvgPool", "Softmax")

_RULES: dict[str, Callable] = {}


def rule(op):
    def deco(fn):
        _RULES[op] = fn
        return fn
    return deco


def infer(node, inputs) -> tuple[tuple[int, ...], object]:
    """Output (shape, dtype) of ``node`` given its input :class:`Value` s.

    Raises:
        VerifyError / UnsupportedError: naming ``node.name`` when shapes, types or
            attributes are invalid.
    """
    if node.op not in _RULES:
        raise UnsupportedError(f"unknown op type {node.op!r}", node.name)
    try:
        return _RULES[node.op](node, inputs)
    except (VerifyError, UnsupportedError):
        raise
    except TypeError_ as e:
        raise VerifyError(str(e), node.name) from None
    except (KeyError, IndexError, ValueError) as e:
        raise VerifyError(f"{node.op}: invalid attributes or inputs ({type(e).__name__}: {e})", node.name) from None


def code_range(t: FixedType) -> tuple[int, int]:
    return t.min_code, t.max_code


def _fixed(*ts) -> bool:
    return all(isinstance(t, FixedType) for t in ts)


def _n_in(node, inputs, n):
    if len(inputs) != n:
        raise VerifyError(f"{node.op} takes {n} input(s), got {len(inputs)}", node.name)


def _shift_range(lo, hi, s):
    return lo << s, hi << s


@rule("Quantize")
def _quantize(node, ins):
    _n_in(node, ins, 1)
    to = node.attrs["to"]
    if not isinstance(to, FixedType):
        raise VerifyError("Quantize needs attribute 'to' with a fixed-point type", node.name)
    return ins[0].shape, to


@rule("Sign")
def _sign(node, ins):
    """BipolarQuant: +1 where x >= 0 else -1; codes of the integer type fixed<2,2>."""
    _n_in(node, ins, 1)
    return ins[0].shape, FixedType(2, 2, True)


def _dot_bounds(w_codes: np.ndarray, x_lo: int, x_hi: int, axis_out: int = -1):
    """Per-output-channel exact (lo, hi) of sum_k w*x for x in [x_lo, x_hi] (codes)."""
    w = w_codes.astype(object) if np.abs(w_codes).max(initial=0) > 2 ** 30 else w_codes.astype(np.int64)
    w2 = np.moveaxis(w, axis_out, -1).reshape(-1, w.shape[axis_out])
    a, b = w2 * x_lo, w2 * x_hi
    hi = np.maximum(a, b).sum(axis=0)
    lo = np.minimum(a, b).sum(axis=0)
    return lo, hi


def _acc_type(node, x_t: FixedType, w, bias, groups_cin=None):
    x_lo, x_hi = code_range(x_t)
    x_lo, x_hi = min(x_lo, 0), max(x_hi, 0)
    lo, hi = _dot_bounds(w.data, x_lo, x_hi)
    f = x_t.frac_bits + w.dtype.frac_bits
    if bias is not None:
        if not isinstance(bias.dtype, FixedType):
            return FLOAT32
        fb = bias.dtype.frac_bits
        F = max(f, fb)
        lo = lo * (1 << (F - f)) + bias.data.astype(np.int64) * (1 << (F - fb))
        hi = hi * (1 << (F - f)) + bias.data.astype(np.int64) * (1 << (F - fb))
        f = F
    return fixed_for_range(int(np.min(lo)), int(np.max(hi)), f)


@rule("Dense")
def _dense(node, ins):
    """y[..., n] = sum_k x[..., k] * weight[k, n] + bias[n]."""
    _n_in(node, ins, 1)
    x = ins[0]
    w = node.params["weight"]
    bias = node.params.get("bias")
    if w.data.ndim != 2:
        raise VerifyError(f"Dense weight must be 2-D [K, N], got {w.shape}", node.name)
    if not x.shape or x.shape[-1] != w.shape[0]:
        raise VerifyError(f"Dense input shape {x.shape} does not match weight [K={w.shape[0]}, N]", node.name)
    if bias is not None and bias.shape not in ((w.shape[1],), ()):
        raise VerifyError(f"Dense bias shape {bias.shape} does not match N={w.shape[1]}", node.name)
    shape = (*x.shape[:-1], w.shape[1])
    if _fixed(x.dtype, w.dtype):
        return shape, _acc_type(node, x.dtype, w, bias)
    return shape, FLOAT32


def conv_out_shape(node, in_shape):
    """Spatial output sizes of Conv/MaxPool/AvgPool: floor((L + p0 + p1 - k) / s) + 1."""
    k = tuple(node.attrs["kernel"])
    nd = len(k)
    s = tuple(node.attrs.get("strides", (1,) * nd))
    p = tuple(node.attrs.get("pads", (0,) * (2 * nd)))
    if len(in_shape) != nd + 1:
        raise VerifyError(f"{node.op} expects a {nd}-D channels-last input, got shape {in_shape}", node.name)
    if len(s) != nd or len(p) != 2 * nd:
        raise VerifyError(f"{node.op}: strides {s} / pads {p} do not match kernel {k}", node.name)
    out = []
    for i in range(nd):
        L = in_shape[i] + p[i] + p[i + nd] - k[i]
        if L < 0 or s[i] < 1:
            raise VerifyError(f"{node.op}: kernel {k} larger than padded input {in_shape[:-1]}", node.name)
        out.append(L // s[i] + 1)
    return tuple(out)


@rule("Conv")
def _conv(node, ins):
    """Channels-last convolution; weight [*kernel, C_in/groups, C_out]; pads (begins..., ends...)."""
    _n_in(node, ins, 1)
    x = ins[0]
    w = node.params["weight"]
    bias = node.params.get("bias")
    if any(d != 1 for d in node.attrs.get("dilations", ())):
        raise UnsupportedError(f"Conv dilation {tuple(node.attrs['dilations'])} is not supported (only 1)", node.name)
    k = tuple(w.shape[:-2])
    if tuple(node.attrs["kernel"]) != k:
        raise VerifyError(f"Conv kernel attribute {node.attrs['kernel']} does not match weight {w.shape}", node.name)
    g = int(node.attrs.get("groups", 1))
    cin = x.shape[-1]
    if cin % g or w.shape[-2] * g != cin or w.shape[-1] % g:
        raise VerifyError(f"Conv groups={g}: input channels {cin} / weight {w.shape} inconsistent", node.name)
    spatial = conv_out_shape(node, x.shape)
    shape = (*spatial, w.shape[-1])
    if bias is not None and bias.shape not in ((w.shape[-1],), ()):
        raise VerifyError(f"Conv bias shape {bias.shape} does not match C_out={w.shape[-1]}", node.name)
    if _fixed(x.dtype, w.dtype):
        return shape, _acc_type(node, x.dtype, w, bias)
    return shape, FLOAT32


@rule("Relu")
def _relu(node, ins):
    _n_in(node, ins, 1)
    t = ins[0].dtype
    if isinstance(t, FixedType):
        return ins[0].shape, fixed_for_range(0, max(t.max_code, 0), t.frac_bits)
    return ins[0].shape, FLOAT32


def _broadcast(node, a, b):
    try:
        return tuple(np.broadcast_shapes(a, b))
    except ValueError:
        raise VerifyError(f"{node.op}: shapes {a} and {b} do not broadcast", node.name) from None


@rule("Add")
def _add(node, ins):
    """Elementwise sum of two activations (residual add); exact type covers both ranges."""
    _n_in(node, ins, 2)
    a, b = ins
    shape = _broadcast(node, a.shape, b.shape)
    if _fixed(a.dtype, b.dtype):
        F = max(a.dtype.frac_bits, b.dtype.frac_bits)
        alo, ahi = _shift_range(*code_range(a.dtype), F - a.dtype.frac_bits)
        blo, bhi = _shift_range(*code_range(b.dtype), F - b.dtype.frac_bits)
        return shape, fixed_for_range(alo + blo, ahi + bhi, F)
    return shape, FLOAT32


@rule("Mul")
def _mul(node, ins):
    """Elementwise product of two activations."""
    _n_in(node, ins, 2)
    a, b = ins
    shape = _broadcast(node, a.shape, b.shape)
    if _fixed(a.dtype, b.dtype):
        ca, cb = code_range(a.dtype), code_range(b.dtype)
        prods = [x * y for x in ca for y in cb]
        return shape, fixed_for_range(min(prods), max(prods), a.dtype.frac_bits + b.dtype.frac_bits)
    return shape, FLOAT32


@rule("Affine")
def _affine(node, ins):
    """y = x * scale + bias, scale/bias per channel (last axis) or scalar (folded batch norm,
    Mul/Add by a constant)."""
    _n_in(node, ins, 1)
    x = ins[0]
    scale = node.params.get("scale")
    bias = node.params.get("bias")
    c = x.shape[-1] if x.shape else 1
    for role, p in (("scale", scale), ("bias", bias)):
        if p is not None and p.shape not in ((), (1,), (c,)):
            raise VerifyError(f"Affine {role} shape {p.shape} is neither scalar nor [C={c}]", node.name)
    parts = [x.dtype] + [p.dtype for p in (scale, bias) if p is not None]
    if not _fixed(*parts):
        return x.shape, FLOAT32
    lo, hi = code_range(x.dtype)
    f = x.dtype.frac_bits
    if scale is not None:
        s = scale.data.astype(np.int64).reshape(-1)
        lo, hi = np.minimum(s * lo, s * hi), np.maximum(s * lo, s * hi)
        f += scale.dtype.frac_bits
    else:
        lo, hi = np.array([lo]), np.array([hi])
    if bias is not None:
        fb = bias.dtype.frac_bits
        F = max(f, fb)
        bb = bias.data.astype(np.int64).reshape(-1) << (F - fb)
        lo, hi = (lo << (F - f)) + bb, (hi << (F - f)) + bb
        f = F
    return x.shape, fixed_for_range(int(np.min(lo)), int(np.max(hi)), f)


@rule("Concat")
def _concat(node, ins):
    if len(ins) < 2:
        raise VerifyError("Concat needs at least two inputs", node.name)
    axis = int(node.attrs.get("axis", -1))
    rank = len(ins[0].shape)
    ax = axis % rank
    for v in ins[1:]:
        if len(v.shape) != rank or any(v.shape[i] != ins[0].shape[i] for i in range(rank) if i != ax):
            raise VerifyError(f"Concat inputs {[v.shape for v in ins]} differ off axis {axis}", node.name)
    shape = list(ins[0].shape)
    shape[ax] = sum(v.shape[ax] for v in ins)
    if _fixed(*(v.dtype for v in ins)):
        F = max(v.dtype.frac_bits for v in ins)
        lo = min(v.dtype.min_code << (F - v.dtype.frac_bits) for v in ins)
        hi = max(v.dtype.max_code << (F - v.dtype.frac_bits) for v in ins)
        return tuple(shape), fixed_for_range(lo, hi, F)
    return tuple(shape), FLOAT32


@rule("Reshape")
def _reshape(node, ins):
    """Row-major reshape of the per-sample tensor (Flatten is Reshape to (size,))."""
    _n_in(node, ins, 1)
    shape = tuple(int(s) for s in node.attrs["shape"])
    if int(np.prod(shape, dtype=np.int64)) != ins[0].size:
        raise VerifyError(f"Reshape from {ins[0].shape} to {shape} changes the element count", node.name)
    return shape, ins[0].dtype


@rule("Transpose")
def _transpose(node, ins):
    _n_in(node, ins, 1)
    perm = tuple(int(p) for p in node.attrs["perm"])
    if sorted(perm) != list(range(len(ins[0].shape))):
        raise VerifyError(f"Transpose perm {perm} is not a permutation of the {len(ins[0].shape)} per-sample axes", node.name)
    return tuple(ins[0].shape[p] for p in perm), ins[0].dtype


@rule("MaxPool")
def _maxpool(node, ins):
    _n_in(node, ins, 1)
    sp = conv_out_shape(node, ins[0].shape)
    return (*sp, ins[0].shape[-1]), ins[0].dtype


def avg_shift(n: int) -> int:
    """Extra fraction bits k = ceil(log2 n) of an average over n elements."""
    return max(0, math.ceil(math.log2(n))) if n > 1 else 0


def _avg_type(t, n):
    if not isinstance(t, FixedType):
        return FLOAT32
    k = avg_shift(n)
    return fixed_for_range(t.min_code << k, t.max_code << k, t.frac_bits + k)


@rule("AvgPool")
def _avgpool(node, ins):
    """Average over each window of n = prod(kernel) elements.  Fixed point: the result has
    k = ceil(log2 n) more fraction bits and is floor(sum * 2**k / n) -- exact when n is a power
    of two, truncated (rounded towards -inf) otherwise.  Padding is not supported."""
    _n_in(node, ins, 1)
    if any(int(p) for p in node.attrs.get("pads", ())):
        raise UnsupportedError("AvgPool with padding is not supported", node.name)
    sp = conv_out_shape(node, ins[0].shape)
    n = int(np.prod(node.attrs["kernel"]))
    return (*sp, ins[0].shape[-1]), _avg_type(ins[0].dtype, n)


@rule("GlobalAvgPool")
def _gap(node, ins):
    """Average over all spatial positions: (*spatial, C) -> (C,); rounding as AvgPool."""
    _n_in(node, ins, 1)
    if len(ins[0].shape) < 2:
        raise VerifyError(f"GlobalAvgPool needs a feature map, got shape {ins[0].shape}", node.name)
    n = int(np.prod(ins[0].shape[:-1]))
    return (ins[0].shape[-1],), _avg_type(ins[0].dtype, n)


@rule("Softmax")
def _softmax(node, ins):
    """Softmax over the last axis, always float32."""
    _n_in(node, ins, 1)
    if int(node.attrs.get("axis", -1)) not in (-1, len(ins[0].shape) - 1):
        raise UnsupportedError("Softmax only over the last (channel) axis", node.name)
    return ins[0].shape, FLOAT32


def is_float(t) -> bool:
    return isinstance(t, FloatType)
