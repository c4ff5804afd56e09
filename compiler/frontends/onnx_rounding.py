"""QONNX ``Quant`` rounding modes without an ap_fixed quantization mode: ``CEIL`` and ``UP``.

qonnx's ``resolve_rounding_mode`` (``qonnx/custom_op/general/intquant.py``) accepts ROUND/HALF_EVEN,
CEIL, FLOOR, UP (``sign(x) * ceil(|x|)``: away from zero), DOWN (``np.fix``: towards zero), HALF_UP
and HALF_DOWN.  All but CEIL and UP are ap_fixed modes (``onnx_ops.ROUNDING_MAP``).  ``int_quant``
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

import numpy as np

from ..ir.graph import Const
from ..ir.types import FLOAT32, FixedType

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
