"""Linear layers: ``Dense``, ``Conv`` and ``Affine`` (per-channel scale and bias).

Accumulators.  For ``Dense``/``Conv`` the rule bounds each output channel by interval
arithmetic over the actual constant weights: ``max_n = sum_k max(w_kn*x_lo, w_kn*x_hi)``, which
is never wider than the textbook bound of ``W + X + ceil(log2 K)`` bits (W-bit weights, X-bit
inputs, K terms) and is often narrower.  The bias is aligned to the accumulator's binary point
first (``F = max(F_x + F_w, F_b)``).
"""
from __future__ import annotations

import numpy as np

from ...errors import UnsupportedError, VerifyError
from ..types import FLOAT32, FixedType, fixed_for_range
from .kernels import align, conv_nhwc, dilate_kernel, real_view
from .spec import OpSpec, all_fixed, code_range, conv_out_shape, register


def _dot_bounds(w_codes: np.ndarray, x_lo: int, x_hi: int, axis_out: int = -1):
    """Per-output-channel exact (lo, hi) of sum_k w*x for x in [x_lo, x_hi] (codes)."""
    w = w_codes.astype(object) if np.abs(w_codes).max(initial=0) > 2 ** 30 else w_codes.astype(np.int64)
    w2 = np.moveaxis(w, axis_out, -1).reshape(-1, w.shape[axis_out])
    a, b = w2 * x_lo, w2 * x_hi
    hi = np.maximum(a, b).sum(axis=0)
    lo = np.minimum(a, b).sum(axis=0)
    return lo, hi


def _acc_type(node, x_t: FixedType, w, bias):
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


def _linear_ref(node, args, in_types, out_t):
    """Dense (matmul) or Conv (channels-last convolution), exact on codes, float32 otherwise."""
    w = node.params["weight"]
    b = node.params.get("bias")
    dense = node.op == "Dense"
    if not dense and w.data.ndim not in (3, 4):
        raise UnsupportedError(f"Conv with {w.data.ndim - 2} spatial dimensions: only 1-D and 2-D convolutions "
                               f"are supported", node.name)
    nd = w.data.ndim - 2
    strides = node.attrs.get("strides", (1,) * nd)
    pads = node.attrs.get("pads", (0,) * 2 * nd)
    groups = int(node.attrs.get("groups", 1))
    wd = w.data if dense else dilate_kernel(w.data, conv_dilations(node, nd))
    if isinstance(out_t, FixedType):
        x = args[0]
        acc = np.matmul(x, wd) if dense else conv_nhwc(x, wd, strides, pads, groups)
        f = in_types[0].frac_bits + w.dtype.frac_bits
        acc = align(acc, f, out_t.frac_bits)
        if b is not None:
            acc = acc + align(b.data, b.dtype.frac_bits, out_t.frac_bits)
        return acc
    x = real_view(args[0], in_types[0])
    wr = w.real().astype(np.float32)
    if not dense:
        wr = dilate_kernel(wr, conv_dilations(node, nd))
    y = np.matmul(x, wr) if dense else conv_nhwc(x, wr, strides, pads, groups).astype(np.float32)
    if b is not None:
        y = y + b.real().astype(np.float32)
    return y.astype(np.float32)


def _dense_rule(node, ins):
    """y[..., n] = sum_k x[..., k] * weight[k, n] + bias[n]."""
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
    if all_fixed(x.dtype, w.dtype):
        return shape, _acc_type(node, x.dtype, w, bias)
    return shape, FLOAT32


def _dense_macs(node, graph) -> int:
    """K multiply-accumulates per output element."""
    w = node.params["weight"].data
    return max(1, graph.values[node.output].size * int(w.shape[0]))


DENSE = register(OpSpec(
    name="Dense", kind="mac", summary="y[..., n] = sum_k x[..., k] * weight[k, n] + bias[n]",
    infer=_dense_rule, reference=_linear_ref, params=("weight", "bias"), macs=_dense_macs))


def conv_dilations(node, nd: int) -> tuple[int, ...]:
    """The ``dilations`` of a Conv node (one per spatial axis, default all 1).

    Raises:
        VerifyError: naming the node for a wrong count or a factor < 1.
    """
    d = node.attrs.get("dilations", 1)
    d = (int(d),) * nd if isinstance(d, (int, np.integer)) else tuple(int(v) for v in d)
    if len(d) != nd or any(v < 1 for v in d):
        raise VerifyError(f"Conv dilations {d} must be {nd} factor(s) >= 1", node.name)
    return d


def _conv_rule(node, ins):
    """Channels-last convolution; weight [*kernel, C_in/groups, C_out]; pads (begins..., ends...);
    ``dilations`` (ONNX semantics: tap i of the kernel reads input ``o * stride + i * d - pad``)."""
    x = ins[0]
    w = node.params["weight"]
    bias = node.params.get("bias")
    k = tuple(w.shape[:-2])
    dil = conv_dilations(node, len(k))
    if tuple(node.attrs["kernel"]) != k:
        raise VerifyError(f"Conv kernel attribute {node.attrs['kernel']} does not match weight {w.shape}", node.name)
    g = int(node.attrs.get("groups", 1))
    cin = x.shape[-1]
    if cin % g or w.shape[-2] * g != cin or w.shape[-1] % g:
        raise VerifyError(f"Conv groups={g}: input channels {cin} / weight {w.shape} inconsistent", node.name)
    spatial = conv_out_shape(node, x.shape, tuple(d * (kk - 1) + 1 for d, kk in zip(dil, k)))
    shape = (*spatial, w.shape[-1])
    if bias is not None and bias.shape not in ((w.shape[-1],), ()):
        raise VerifyError(f"Conv bias shape {bias.shape} does not match C_out={w.shape[-1]}", node.name)
    if all_fixed(x.dtype, w.dtype):
        return shape, _acc_type(node, x.dtype, w, bias)
    return shape, FLOAT32


def _conv_macs(node, graph) -> int:
    """prod(kernel) * C_in/groups multiply-accumulates per output element."""
    w = node.params["weight"].data
    return max(1, graph.values[node.output].size * int(np.prod(w.shape[:-1])))


CONV = register(OpSpec(
    name="Conv", kind="mac", summary="channels-last 1-D/2-D convolution, weight [*kernel, C_in/groups, C_out], "
                                     "optionally dilated",
    infer=_conv_rule, reference=_linear_ref, params=("weight", "bias"), macs=_conv_macs,
    attrs={"kernel": None, "strides": 1, "pads": 0, "groups": 1, "dilations": 1}))


def _affine_rule(node, ins):
    """y = x * scale + bias, scale/bias per channel (last axis) or scalar (folded batch norm,
    Mul/Add by a constant)."""
    x = ins[0]
    scale = node.params.get("scale")
    bias = node.params.get("bias")
    c = x.shape[-1] if x.shape else 1
    for role, p in (("scale", scale), ("bias", bias)):
        if p is not None and p.shape not in ((), (1,), (c,)):
            raise VerifyError(f"Affine {role} shape {p.shape} is neither scalar nor [C={c}]", node.name)
    parts = [x.dtype] + [p.dtype for p in (scale, bias) if p is not None]
    if not all_fixed(*parts):
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


def _affine_ref(node, args, in_types, out_t):
    s = node.params.get("scale")
    b = node.params.get("bias")
    if isinstance(out_t, FixedType):
        y = args[0]
        f = in_types[0].frac_bits
        if s is not None:
            y = y * s.data
            f += s.dtype.frac_bits
        y = align(y, f, out_t.frac_bits)
        if b is not None:
            y = y + align(b.data, b.dtype.frac_bits, out_t.frac_bits)
        return y
    y = real_view(args[0], in_types[0])
    if s is not None:
        y = y * s.real().astype(np.float32)
    if b is not None:
        y = y + b.real().astype(np.float32)
    return y.astype(np.float32)


AFFINE = register(OpSpec(
    name="Affine", summary="y = x * scale + bias, per channel (last axis) or scalar",
    infer=_affine_rule, reference=_affine_ref, params=("scale", "bias")))
