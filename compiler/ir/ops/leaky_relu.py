"""``LeakyRelu`` with a power-of-two slope: ``y = x`` for ``x >= 0``, ``y = x * 2**-shift`` otherwise.

Source: ONNX ``LeakyRelu`` (``alpha`` = the slope), PyTorch ``nn.LeakyReLU(negative_slope)``.

With the slope ``2**-shift`` the op is exact on codes: the output has ``shift`` more fraction bits
than the input, a negative code is kept as is (its weight drops by ``2**-shift``) and a
non-negative one is shifted left by ``shift``.  The source computes ``alpha * x`` in float32, which
for a power-of-two ``alpha`` is exact too (a scaling of the exponent), so the fixed-point result
equals the source's bit for bit.  Any other slope is refused: the float32-rounded product of a
non-dyadic slope cannot be reproduced exactly in fixed point.
"""
from __future__ import annotations

import math

import numpy as np

from ...errors import UnsupportedError
from ..types import FLOAT32, FixedType, fixed_for_range
from .kernels import real_view
from .spec import OpSpec, register


def slope_shift(alpha: float, node: str) -> int:
    """``shift`` with ``alpha == 2**-shift``.

    Raises:
        UnsupportedError: naming ``node`` when ``alpha`` is not a power of two in (0, 1].
    """
    alpha = float(alpha)
    m, e = math.frexp(alpha)
    if not (0 < alpha <= 1 and m == 0.5):
        raise UnsupportedError(f"LeakyRelu slope alpha={alpha:g} is not a power of two in (0, 1]: only "
                               "2**-k slopes are exact in fixed point", node)
    return 1 - e


def _rule(node, ins):
    s = int(node.attrs["shift"])
    if s < 0:
        raise UnsupportedError(f"LeakyRelu shift {s} must be >= 0 (slope 2**-shift <= 1)", node.name)
    t = ins[0].dtype
    if isinstance(t, FixedType):
        return ins[0].shape, fixed_for_range(min(t.min_code, 0), max(t.max_code, 0) << s, t.frac_bits + s)
    return ins[0].shape, FLOAT32


def _reference(node, args, in_types, out_t):
    s = int(node.attrs["shift"])
    x = args[0]
    if isinstance(out_t, FixedType):
        return np.where(x >= 0, np.left_shift(x, s), x)
    x = real_view(x, in_types[0])
    return np.where(x >= 0, x, x * np.float32(2.0 ** -s)).astype(np.float32)


def _import_onnx(cv, node):
    """ONNX ``LeakyRelu(alpha)`` (default 0.01, refused: not a power of two); ``alpha == 0`` is a
    ``Relu``."""
    alpha = cv.attr(node, "alpha", 0.01)
    src = cv.entry(node, node.input[0])
    if float(alpha) == 0.0:
        v = cv.add(node.name, "Relu", [src.value], out=node.output[0])
    else:
        v = cv.add(node.name, "LeakyRelu", [src.value], {"shift": slope_shift(alpha, node.name)}, out=node.output[0])
    cv.bind(node.output[0], v, src.perm)


def _export_onnx(ex, n, x):
    return ex.node("LeakyRelu", x, n.output + "__ir", alpha=2.0 ** -int(n.attrs["shift"]))


LEAKY_RELU = register(OpSpec(
    name="LeakyRelu", summary="x for x >= 0, x * 2**-shift otherwise",
    infer=_rule, reference=_reference, attrs={"shift": None},
    onnx_import={"LeakyRelu": _import_onnx}, onnx_export=_export_onnx))
