"""Faster host kernels for the float epilogue of a TVM artifact, bit-identical to the reference.

A quantized model's trailing float ops (output scale, softmax) run on the host in NumPy so the
artifact stays bit-exact (:mod:`qdeploy.passes.partition`).  Their reference kernels
(``OpSpec.reference``) are written for clarity: they convert constants on every call and view
codes through float64.  At batch 1 those conversions are most of a call's time, so for the ops
that commonly end a model this module precomputes what depends only on the node and returns a
kernel with the same float32 results, bit for bit:

* codes -> float32: ``codes.astype(float32) * 2**-F`` instead of
  ``ldexp(float64(codes), -F).astype(float32)``.  Both round the same real number once to float32
  (int64 -> float32 rounds the integer; a power-of-two scale of a normal float32 is exact), so they
  agree whenever every scaled value is a normal float32 or zero: guaranteed here by requiring
  ``F <= 126`` and ``width - F <= 127`` (else no fast kernel).
* ``Affine`` with a float output: the float32 scale and bias computed once.
* ``Softmax``: the same operations in the same order (max, subtract, exp, sum, divide), in place;
  the row maximum of a batch taken column by column (exact in any order).

Anything else returns None and the reference kernel runs.  Equality with the reference kernels is
tested on random and extreme codes (``tests/backends/test_host_kernels.py``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ...compiler.ir.types import FixedType

__all__ = ["fast_kernel"]


def _to_f32(t) -> Callable | None:
    """``f(arr) -> float32 array`` equal to ``kernels.real_view(arr, t)`` (a fresh array), or None
    when the fast conversion is not provably identical for type ``t``."""
    if not isinstance(t, FixedType):
        return lambda a: a.astype(np.float32)  # real_view: astype(copy=False); fresh here (in place use)
    f = int(t.frac_bits)
    if f > 126 or int(t.width) - f > 127 or f < -127:
        return None
    sc = np.float32(2.0 ** -f)
    if f == 0:
        return lambda a: a.astype(np.float32)

    def conv(a):
        y = a.astype(np.float32)
        y *= sc
        return y
    return conv


def _softmax(node, in_types, out_t):
    conv = _to_f32(in_types[0])
    if conv is None or int(node.attrs.get("axis", -1)) != -1:
        return None
    mx, add, sub, exp, div, maximum = np.maximum.reduce, np.add.reduce, np.subtract, np.exp, np.divide, np.maximum

    def k(args):
        x = conv(args[0])
        c = x.shape[-1]
        if x.ndim == 2 and x.shape[0] == 1:  # one row: whole-array reductions over the same elements
            sub(x, mx(x, axis=None), out=x)
            exp(x, out=x)
            div(x, add(x, axis=None), out=x)
            return x
        if x.ndim == 2 and x.shape[0] >= 8 and 1 < c <= 16:
            # the row maximum column by column (NumPy's reduce over a short last axis costs a loop
            # per row); a maximum is exact in any order, and the only order-dependent case, the
            # sign of a zero maximum, cannot change exp(x - m)
            m = maximum(x[:, 0], x[:, 1])
            for j in range(2, c):
                maximum(m, x[:, j], out=m)
            m = m[:, None]
        else:
            m = mx(x, axis=-1, keepdims=True)
        sub(x, m, out=x)
        exp(x, out=x)
        div(x, add(x, axis=-1, keepdims=True), out=x)  # the reference's own sum (its order matters)
        return x
    return k


def _affine(node, in_types, out_t):
    if isinstance(out_t, FixedType):
        return None
    conv = _to_f32(in_types[0])
    if conv is None:
        return None
    s, b = node.params.get("scale"), node.params.get("bias")
    s = None if s is None else s.real().astype(np.float32)
    b = None if b is None else b.real().astype(np.float32)
    if (s is not None and s.ndim > 1) or (b is not None and b.ndim > 1):
        return None

    def k(args):
        y = conv(args[0])
        if s is not None:
            y = y * s  # broadcasting as the reference does (a per-channel scale may widen the shape)
        if b is not None:
            y = y + b
        return y.astype(np.float32, copy=False)
    return k


_FAST = {"Softmax": _softmax, "Affine": _affine}


def fast_kernel(node, in_types: list, out_t) -> Callable[[list], np.ndarray] | None:
    """A kernel ``k(args) -> array`` for ``node`` equal bit for bit to
    ``OpSpec.reference(node, args, in_types, out_t)`` on runtime arrays (int64 codes for fixed
    inputs), or None when this module has none for it (the caller runs the reference kernel)."""
    make = _FAST.get(node.op)
    return None if make is None else make(node, in_types, out_t)
