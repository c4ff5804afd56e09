"""QONNX ``Quant`` rounding modes without an ap_fixed quantization mode: ``CEIL`` and ``UP``.

qonnx's ``resolve_rounding_mode`` (``qonnx/custom_op/general/intquant.py``) accepts ROUND/HALF_EVEN,
CEIL, FLOOR, UP (``sign(x) * ceil(|x|)``: away from zero), DOWN (``np.fix``: towards zero), HALF_UP
and HALF_DOWN.  All but CEIL and UP are ap_fixed modes (:data:`ROUNDING_MAP`).  ``int_quant``
clamps ``x / scale`` to the integer range and then rounds; with integer bounds and a monotone
rounding that equals rounding then saturating, which is what the IR graphs below do, exactly:

* ``CEIL(x) = -FLOOR(-x)``: ``Affine(x, scale=-1)`` (exact: a sign flip, in float32 too),
  ``Quantize`` with TRN (floor) into a type two bits wider than the target (so its own saturation
  cannot bind before the target's), ``Affine(scale=-1)``, then a ``Quantize`` into the target type
  (same binary point: it only saturates);
* ``UP(x) = CEIL(x) + FLOOR(x) - TRUNC(x)`` (for x > 0 TRUNC = FLOOR, for x < 0 TRUNC = CEIL, on
  integers all three agree): the CEIL chain above, a FLOOR (TRN) and a TRUNC (TRN_ZERO)
  ``Quantize`` into the wide type, ``Add``, ``Sub``, then the saturating ``Quantize``.  Inputs
  beyond the wide range saturate every term to its bound, and the sum stays beyond the target's
  range, so the final saturation is right there too.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import UnsupportedError
from ..ir.graph import Const
from ..ir.types import FLOAT32, FixedType, fixed_for_range
from .onnx_convert import is_pow2

#: QONNX rounding_mode -> ap_fixed quantization mode (``ROUND_TO_ZERO`` is accepted as a synonym of
#: ``DOWN``, although qonnx's own executor does not know it).
ROUNDING_MAP = {"ROUND": "RND_CONV", "HALF_EVEN": "RND_CONV", "FLOOR": "TRN", "ROUND_TO_ZERO": "TRN_ZERO",
                "DOWN": "TRN_ZERO", "HALF_UP": "RND_INF", "HALF_DOWN": "RND_ZERO"}
#: QONNX rounding modes this module expresses with several IR nodes.
DIRECTED = ("CEIL", "UP")


def _neg(cv, name: str, x: str) -> str:
    fixed = isinstance(cv.b.values[x].dtype, FixedType)
    c = Const.from_real(-1.0) if fixed else Const(np.float32(-1.0), FLOAT32)
    return cv.add(name, "Affine", [x], {}, {"scale": c}, out=name)


def quantize_directed(cv, node, x: str, mode: str, to: FixedType, out: str) -> str:
    """IR nodes computing QONNX ``Quant`` of IR value ``x`` with rounding ``mode`` (``CEIL`` or
    ``UP``) into ``to`` (its rounding mode is irrelevant: the last cast keeps the binary point),
    named after ONNX ``node``; the final value is named ``out``.  Returns it."""
    wide = FixedType(to.width + 2, to.int_bits + 2, True, "TRN", "SAT")
    base = node.name
    neg = _neg(cv, f"{base}__neg", x)
    fl_neg = cv.add(f"{base}__floor_neg", "Quantize", [neg], {"to": wide}, out=f"{base}__floor_neg")
    ceil = _neg(cv, f"{base}__ceil", fl_neg)
    if mode == "UP":
        floor = cv.add(f"{base}__floor", "Quantize", [x], {"to": wide}, out=f"{base}__floor")
        trunc = cv.add(f"{base}__trunc", "Quantize", [x], {"to": wide.with_modes("TRN_ZERO")}, out=f"{base}__trunc")
        both = cv.add(f"{base}__ceil_floor", "Add", [ceil, floor], out=f"{base}__ceil_floor")
        ceil = cv.add(f"{base}__up", "Sub", [both, trunc], out=f"{base}__up")
    return cv.add(node.name, "Quantize", [ceil], {"to": to.with_modes("TRN")}, out=out)


def domain_version(cv, domain: str) -> int:
    """The model's opset version of ``domain`` (1 when it declares none)."""
    for o in cv.m.model.opset_import:
        if o.domain == domain:
            return int(o.version)
    return 1


def _pow2_scalar(cv, node, t: str, what: str) -> int:
    """``F`` with the constant ``t`` == ``2**-F`` (a positive power-of-two scalar)."""
    v = np.asarray(cv.const(node, t), dtype=np.float64)
    if v.size != 1 or not is_pow2(float(v.ravel()[0])):
        raise UnsupportedError(f"Trunc {what} {v.ravel().tolist()[:4]} is not one power of two: no exact "
                               "fixed-point type (Brevitas TruncAvgPool with a kernel area that is not a power of two "
                               "has such a scale)", node.name)
    return -int(round(math.log2(float(v.ravel()[0]))))


def import_trunc(cv, node):
    """QONNX ``Trunc`` (``qonnx/custom_op/general/trunc.py``; Brevitas ``TruncAvgPool2d`` exports
    ``AveragePool -> Trunc``), version chosen like qonnx's executor, by the model's opset of the
    node's domain: v1 ``(x, scale, zeropt, in_bw, out_bw)``: ``R(round(x / s) / 2**(in_bw - out_bw)) * s``
    (no clamp); v2 ``(x, scale, zeropt, in_bw, out_scale, out_bw)``: ``R(clamp(round(x / s) / 2**t))
    * out_scale`` with ``2**t = out_scale / s``, clamped to the ``out_bw``-bit (signed, narrow) range.
    ``round`` is half-to-even (``np.round``), ``R`` the ``rounding_mode``.  With power-of-two scales
    and a zero zero-point this is exactly: a half-even ``Quantize`` onto the ``s`` grid (only when the
    input has finer fraction bits), then a ``Quantize`` into the output type with ``R`` (CEIL/UP via
    :func:`quantize_directed`), for v1 followed by the exact rescale ``* 2**-t`` (an ``Affine``).

    Raises:
        UnsupportedError: naming the node for a float input, a scale or output scale that is not a
            power of two, a non-zero zero point, an input count that does not fit the version, or an
            unsupported rounding mode.
    """
    version = domain_version(cv, node.domain)
    want = 5 if version < 2 else 6
    if len(node.input) != want:
        raise UnsupportedError(f"Trunc (qonnx v{min(version, 2)}) needs {want} inputs, got {len(node.input)}",
                               node.name)
    e = cv.entry(node, node.input[0])
    t = cv.dtype(e)
    if not isinstance(t, FixedType):
        raise UnsupportedError("Trunc of a float value (it must read a fixed-point value, e.g. an AveragePool of "
                               "quantized activations)", node.name)
    mode = str(cv.attr(node, "rounding_mode", "FLOOR")).upper()
    if mode not in ROUNDING_MAP and mode not in DIRECTED:
        raise UnsupportedError(f"Trunc rounding mode {mode!r} is not supported", node.name)
    fs = _pow2_scalar(cv, node, node.input[1], "scale")
    zp = np.asarray(cv.const(node, node.input[2]), dtype=np.float64)
    if np.any(zp != 0):
        raise UnsupportedError(f"Trunc zero point {zp.ravel()[0]:g} is not 0", node.name)
    bits = [np.asarray(cv.const(node, b), dtype=np.float64).ravel() for b in node.input[3:4] + node.input[want - 1:]]
    if any(b.size != 1 or b[0] != int(b[0]) or not 1 <= b[0] <= 32 for b in bits):
        raise UnsupportedError(f"Trunc bit widths {[b.tolist() for b in bits]} are not integers in 1..32", node.name)
    in_bw, out_bw = int(bits[0][0]), int(bits[1][0])
    x, base, out = e.value, node.name, node.output[0]
    if t.frac_bits > fs:  # round(x / s): half to even onto the s grid
        w = max(2, t.width - (t.frac_bits - fs) + 1)
        x = cv.add(f"{base}__round", "Quantize", [x], {"to": FixedType(w, w - fs, True, "RND_CONV", "SAT")},
                   out=f"{base}__round")
    if version >= 2:
        fo = _pow2_scalar(cv, node, node.input[4], "output scale")
        signed, narrow = bool(int(cv.attr(node, "signed", 1))), bool(int(cv.attr(node, "narrow", 0)))
        if narrow and not signed:
            raise UnsupportedError("narrow unsigned Trunc has no fixed-point type", node.name)
        to = FixedType(out_bw, out_bw - fo, signed, ROUNDING_MAP.get(mode, "TRN"),
                       "SAT_SYM" if narrow else "SAT")
        v = quantize_directed(cv, node, x, mode, to, out) if mode in DIRECTED else \
            cv.add(base, "Quantize", [x], {"to": to}, out=out)
    else:
        k = in_bw - out_bw
        xt = cv.b.values[x].dtype
        fq = fs - k  # grid of round(x / s) / 2**k
        lo = math.floor(xt.min_code * 2.0 ** (fq - xt.frac_bits)) - 1
        hi = math.ceil(xt.max_code * 2.0 ** (fq - xt.frac_bits)) + 1
        wide = fixed_for_range(lo, hi, fq).with_modes(ROUNDING_MAP.get(mode, "TRN"), "SAT")
        q = quantize_directed(cv, node, x, mode, wide, f"{out}__q") if mode in DIRECTED else \
            cv.add(f"{base}__q" if k else base, "Quantize", [x], {"to": wide}, out=f"{out}__q" if k else out)
        v = q if not k else cv.add(base if mode not in DIRECTED else f"{base}__rescale", "Affine", [q], {},
                                   {"scale": Const.from_real(2.0 ** -k)}, out=out)
    cv.bind(out, v, e.perm)
    return v
