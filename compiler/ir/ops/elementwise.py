"""Elementwise binary ops on two activations: ``Add`` (residual add) and ``Mul``.

Per-sample shapes broadcast like NumPy; the exact fixed-point type covers every result.
"""
from __future__ import annotations

from ..types import FLOAT32, FixedType, fixed_for_range
from .kernels import align, per_sample_broadcast, real_view
from .spec import OpSpec, all_fixed, broadcast_shape, code_range, register, shift_range


def _add_rule(node, ins):
    """Elementwise sum of two activations (residual add); exact type covers both ranges."""
    a, b = ins
    shape = broadcast_shape(node, a.shape, b.shape)
    if all_fixed(a.dtype, b.dtype):
        F = max(a.dtype.frac_bits, b.dtype.frac_bits)
        alo, ahi = shift_range(*code_range(a.dtype), F - a.dtype.frac_bits)
        blo, bhi = shift_range(*code_range(b.dtype), F - b.dtype.frac_bits)
        return shape, fixed_for_range(alo + blo, ahi + bhi, F)
    return shape, FLOAT32


def _add_ref(node, args, in_types, out_t):
    a, b = per_sample_broadcast(*args)
    ta, tb = in_types
    if isinstance(out_t, FixedType):
        F = out_t.frac_bits
        return align(a, ta.frac_bits, F) + align(b, tb.frac_bits, F)
    return real_view(a, ta) + real_view(b, tb)


ADD = register(OpSpec(name="Add", summary="elementwise sum of two activations",
                      infer=_add_rule, reference=_add_ref, arity=2))


def _mul_rule(node, ins):
    """Elementwise product of two activations."""
    a, b = ins
    shape = broadcast_shape(node, a.shape, b.shape)
    if all_fixed(a.dtype, b.dtype):
        ca, cb = code_range(a.dtype), code_range(b.dtype)
        prods = [x * y for x in ca for y in cb]
        return shape, fixed_for_range(min(prods), max(prods), a.dtype.frac_bits + b.dtype.frac_bits)
    return shape, FLOAT32


def _mul_ref(node, args, in_types, out_t):
    a, b = per_sample_broadcast(*args)
    if isinstance(out_t, FixedType):
        return a * b
    return real_view(a, in_types[0]) * real_view(b, in_types[1])


MUL = register(OpSpec(name="Mul", summary="elementwise product of two activations",
                      infer=_mul_rule, reference=_mul_ref, arity=2))
