"""QONNX ``Trunc`` with a scale that is not a power of two, after an average pool: Brevitas
``TruncAvgPool2d`` / ``TruncAdaptiveAvgPool2d`` over a window area ``n`` that is not a power of two.

Brevitas exports ``AveragePool -> Trunc(x, scale = s / n, 0, ., out_scale = s * 2**t / n, out_bw)``
(``TruncQuantProxyHandler`` in ``brevitas/export/onnx/qonnx/handler.py``): the window *sum* of codes
``S`` divided by ``2**t`` instead of ``n``, and rounded; the output ``q * out_scale`` is not a
fixed-point value (``out_scale`` has the factor ``1/n``).  qonnx's executor computes, in float32,
``x = float32(S * s) / n`` (onnxruntime's average), then ``trunc_v2``:
``q = R(clamp(round(x / scale) / 2**t))``.

Here ``round(x / scale)`` is checked, in that float32 arithmetic, to give back ``S`` for *every*
reachable window sum (else the import is refused), so ``q = R(clamp(S / 2**t))``: the IR computes the
window sums exactly (a depthwise convolution with a ones kernel over the average pool's input; the
pool itself is left to dead-code elimination) and one ``Quantize`` drops ``t`` fraction bits with
``R`` and saturates -- every step a power of two, so every target does it exactly.  The result is a
scaled-integer value (codes ``q``, pending map ``real = q * out_scale``,
:class:`~.onnx_scaled.Scaled`) that the next ``Quant`` requantizes exactly (a ``MultiThreshold``) or a
graph output dequantizes in float32, as qonnx does.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

from ..errors import UnsupportedError
from ..ir.graph import Const
from ..ir.types import FixedType
from .onnx_convert import is_pow2
from .onnx_rounding import DIRECTED, ROUNDING_MAP, domain_version, quantize_directed
from .onnx_rounding import import_trunc as import_trunc_pow2

#: Largest number of window sums enumerated.
MAX_SUMS = 1 << 20


def _is_pow2_scalar(cv, node, t: str) -> bool:
    v = np.asarray(cv.const(node, t), dtype=np.float64)
    return v.size == 1 and is_pow2(float(v.ravel()[0]))


def _trunc_after_average(cv, node, e, mode: str) -> bool:
    """A Trunc v2 whose scales are not powers of two, after an average pool (:mod:`.onnx_trunc_avg`);
    False when it does not apply (the caller then refuses the scales)."""
    zp = np.asarray(cv.const(node, node.input[2]), dtype=np.float64)
    sc, osc, obw = (np.asarray(cv.const(node, t), dtype=np.float64).ravel() for t in node.input[1:2] + node.input[4:6])
    if np.any(zp != 0) or sc.size != 1 or osc.size != 1 or obw.size != 1 or obw[0] != int(obw[0]) \
            or not 1 <= obw[0] <= 16 or sc[0] <= 0 or osc[0] <= 0:
        return False
    signed, narrow = bool(int(cv.attr(node, "signed", 1))), bool(int(cv.attr(node, "narrow", 0)))
    return trunc_after_average(cv, node, e, float(sc[0]), float(osc[0]), int(obw[0]), signed, narrow, mode)


def import_trunc(cv, node):
    """QONNX ``Trunc``: after an average pool with scales that are not powers of two as described in
    the module docstring, else :func:`.onnx_rounding.import_trunc` (power-of-two scales, or a clear
    refusal naming the node)."""
    if domain_version(cv, node.domain) >= 2 and len(node.input) == 6 \
            and not all(_is_pow2_scalar(cv, node, t) for t in (node.input[1], node.input[4])):
        e = cv.entry(node, node.input[0])
        mode = str(cv.attr(node, "rounding_mode", "FLOOR")).upper()
        if (mode in ROUNDING_MAP or mode in DIRECTED) and _trunc_after_average(cv, node, e, mode):
            return cv.env[node.output[0]].value
    return import_trunc_pow2(cv, node)


def trunc_after_average(cv, node, e, scale: float, out_scale: float, out_bw: int, signed: bool, narrow: bool,
                        mode: str) -> bool:
    """Import ``node`` (a qonnx Trunc v2 with zero point 0) reading entry ``e`` as described in the
    module docstring; returns False (nothing added) when ``e`` is not the output of an unpadded IR
    ``AvgPool`` / ``GlobalAvgPool`` of a fixed-point value (or a ``Reshape`` of one).

    Raises:
        UnsupportedError: naming the node when the source's float32 ``round(x / scale)`` does not give
            back every window sum, or too many sums to check.
    """
    from qonnx.custom_op.general.trunc import trunc_v2

    from .onnx_scaled import Scaled

    prod = next((n for n in cv.b.nodes if n.output == e.value), None)
    if prod is not None and prod.op == "Reshape":  # ReduceMean's keepdims Reshape of a GlobalAvgPool
        prod = next((n for n in cv.b.nodes if n.output == prod.inputs[0]), None)
    if prod is None or prod.op not in ("AvgPool", "GlobalAvgPool") or any(int(p) for p in prod.attrs.get("pads", ())):
        return False
    tin = cv.b.values[prod.inputs[0]].dtype
    if not isinstance(tin, FixedType):
        return False
    n = int(np.prod(prod.attrs["kernel"])) if prod.op == "AvgPool" else int(np.prod(cv.b.values[prod.inputs[0]].shape[:-1]))
    lo_s, hi_s = tin.min_code * n, tin.max_code * n
    if hi_s - lo_s + 1 > MAX_SUMS:
        raise UnsupportedError(f"Trunc after an average of {n} elements: {hi_s - lo_s + 1} window sums to check "
                               f"(more than {MAX_SUMS})", node.name)
    S = np.arange(lo_s, hi_s + 1, dtype=np.int64)
    real = np.ldexp(S.astype(np.float64), -tin.frac_bits).astype(np.float32)  # the exact float32 window sum
    x = (real / np.float32(n)).astype(np.float32)  # onnxruntime's float32 average
    back = np.round((x / np.float32(scale)).astype(np.float32))
    if not np.array_equal(back.astype(np.int64), S):
        bad = int(S[np.argmax(back.astype(np.int64) != S)])
        raise UnsupportedError(f"Trunc scale {scale:.6g}: the source's float32 round(avg / scale) does not give back "
                               f"the window sum {bad} (of {n} codes): not exact in fixed point", node.name)
    # trunc_v2: trunc_scale = 2**round(log2(out_scale / scale)) in float32; then q = R(clamp(S / trunc_scale))
    t = int(np.round(np.log2(np.float32(out_scale) / np.float32(scale))))
    q = trunc_v2(x, np.float32(scale), np.float32(0.0), None, int(narrow), int(signed), np.float32(out_scale),
                 np.float32(out_bw), mode)
    F = tin.frac_bits
    to = FixedType(out_bw, out_bw - (F - t), signed, ROUNDING_MAP.get(mode, "TRN"), "SAT_SYM" if narrow else "SAT")
    want = np.round(q.astype(np.float64) / np.float64(np.float32(out_scale))).astype(np.int64)
    got = to.quantize_real(np.ldexp(S.astype(np.float64), -F)) if mode not in DIRECTED else None
    if got is not None and not np.array_equal(got, want):  # the Quantize below is qonnx's trunc, code for code
        raise UnsupportedError("Trunc after an average: internal check failed (quantizer differs from qonnx's trunc)",
                               node.name)
    # the window sums S themselves: a depthwise convolution with a ones kernel (exact integer sums)
    xin = cv.b.values[prod.inputs[0]]
    C = xin.shape[-1]
    kern = tuple(int(v) for v in prod.attrs["kernel"]) if prod.op == "AvgPool" else tuple(xin.shape[:-1])
    attrs = {"kernel": kern, "strides": tuple(prod.attrs.get("strides", (1,) * len(kern))) if prod.op == "AvgPool"
             else (1,) * len(kern), "pads": (0,) * (2 * len(kern)), "groups": C}
    ones = Const(np.ones((*kern, 1, C), dtype=np.int64), FixedType(1, 1, False))
    out = node.output[0]
    s_val = cv.add(f"{node.name}__window_sum", "Conv", [prod.inputs[0]], attrs, {"weight": ones},
                   out=f"{out}__window_sum")
    if cv.b.values[s_val].shape != cv.b.values[e.value].shape:
        s_val = cv.add(f"{node.name}__window_sum_shape", "Reshape", [s_val], {"shape": cv.b.values[e.value].shape},
                       out=f"{out}__window_sum_shape")
    q_val = quantize_directed(cv, node, s_val, mode, to, out) if mode in DIRECTED else \
        cv.add(node.name, "Quantize", [s_val], {"to": to}, out=out)
    P = Fraction(float(np.float32(out_scale))) * Fraction(2) ** (F - t)  # real = q * out_scale, q's IR real q * 2**(t - F)
    cv.env[out] = type(e)(q_val, e.perm, scaled=Scaled(np.array(P), np.array(Fraction(0))))
    cv.b.meta.setdefault("notes", []).append(
        f"{node.name}: Trunc with scale {scale:.6g} after an average of {n} codes imported as the exact window sum "
        f"(a depthwise ones convolution) shifted by 2**{t} (the Trunc's integers), real = q * "
        f"{float(np.float32(out_scale)):.6g}")
    return True
