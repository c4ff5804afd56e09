"""Quantizers: ``Quantize`` (cast into a fixed-point type) and ``Sign`` (bipolar quantizer).

These are the only ops that change precision: every other fixed-point op's result is exact.
"""
from __future__ import annotations

import numpy as np

from ...errors import FeedError, VerifyError
from ..types import FixedType, requantize
from .spec import OpSpec, register


def _quantize_rule(node, ins):
    to = node.attrs["to"]
    if not isinstance(to, FixedType):
        raise VerifyError("Quantize needs attribute 'to' with a fixed-point type", node.name)
    return ins[0].shape, to


def _quantize_ref(node, args, in_types, out_t):
    """Fixed input: exact ap_fixed cast of the codes.  Float input: round and overflow the reals.

    Raises:
        FeedError: naming the node when a float input holds NaN (no fixed-point code).
    """
    t0 = in_types[0]
    if isinstance(t0, FixedType):
        return requantize(args[0], t0.frac_bits, out_t)
    if np.isnan(args[0]).any():
        bad = sorted({int(i) for i in np.argwhere(np.isnan(args[0]))[:, 0]})[:5]
        raise FeedError(f"NaN in the input of this quantizer (value {node.inputs[0]!r}, sample(s) {bad}): "
                              "fixed-point types have no NaN", node.name)
    return out_t.quantize_real(args[0])


QUANTIZE = register(OpSpec(
    name="Quantize",
    summary="cast into the fixed-point type attrs['to'] with its rounding and overflow modes",
    infer=_quantize_rule, reference=_quantize_ref, attrs={"to": None}, quantizes=True))


def _sign_rule(node, ins):
    """BipolarQuant: +1 where x >= 0 else -1; codes of the integer type fixed<2,2>."""
    return ins[0].shape, FixedType(2, 2, True)


def _sign_ref(node, args, in_types, out_t):
    return np.where(args[0] >= 0, 1, -1).astype(np.int64)


SIGN = register(OpSpec(
    name="Sign", summary="bipolar quantizer: +1 where x >= 0 else -1 (type fixed<2,2>)",
    infer=_sign_rule, reference=_sign_ref, quantizes=True))
