"""Softmax of fixed-point codes inside the TVM library, bit-identical to the reference kernel.

The reference kernel (``compiler/ir/ops/activation.py``) computes, in float32 with NumPy::

    x = codes * 2**-F;  e = np.exp(x - x.max(-1));  y = e / e.sum(-1)

TVM's own ``exp`` rounds differently from NumPy's, so until now a quantized model's trailing
Softmax ran on the host in NumPy (the "host epilogue"), which at batch 1 and at small class
counts costs more than the whole library call.  For a Softmax whose input is a fixed-point type of
at most 24 bits, every value ``x - max`` the reference can meet is ``-k * 2**-F`` for an integer
``k = max_code - code`` in ``[0, max_code - min_code]``, and that float32 subtraction is exact
(both operands and the difference are float32 numbers).  So ``exp`` only ever sees a finite set of
arguments, and this module tabulates it **with NumPy's own float32 ``np.exp``** at compile time
(the way hls4ml's softmax uses an exp table in hardware), up to the argument where ``exp``
underflows to 0 (``k * 2**-F >= 110``: ``exp(-110)`` ~ 1.7e-48 is far below float32's smallest
subnormal, 1.4e-45).  In the library:

* ``k = max_row(code) - code`` on integers, clamped to the table's last entry (0.0);
* ``e = table[k]`` (a gather: exact);
* the row sum of ``e`` in **NumPy's own summation order** for a contiguous last axis: a left fold
  for fewer than 8 terms, else its pairwise scheme (8 running partial sums, combined
  ``((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7))``, then the remainder, blocks of at most 128 split in
  halves; ``numpy/_core/src/umath/loops_utils.h.src``, ``pairwise_sum``), written as an explicit
  expression tree so no compiler may reorder it (float adds are not reassociated without
  fast-math, which TVM does not enable);
* ``y = e / sum``: IEEE float32 division, as NumPy's.

Only additions and one division touch floats, so fused multiply-adds cannot change a result.
The equality is asserted against the reference kernel by the tests
(``tests/backends/test_softmax_lut.py``, also the summation order against ``np.add.reduce``) and
by every compile's golden check.  Tables are limited to :data:`MAX_TABLE` entries (256 KiB).
"""
from __future__ import annotations

import math

import numpy as np

from ...compiler.ir.types import FixedType

__all__ = ["MAX_TABLE", "UNDERFLOW", "exp_table", "library_softmax", "numpy_sum_order", "softmax_te"]

#: largest exp table (entries, float32): 2**16 = 256 KiB
MAX_TABLE = 1 << 16
#: ``exp(-x) == 0`` in float32 for ``x >= UNDERFLOW`` (true value < 1.7e-48, subnormals end at 1.4e-45)
UNDERFLOW = 110.0


def exp_table(t) -> np.ndarray | None:
    """NumPy's float32 ``exp(-k * 2**-F)`` for ``k = 0 .. n-1``, the values the reference softmax
    takes for a ``t``-typed input (``F = t.frac_bits``), or None when the library cannot reproduce
    the reference for ``t`` (not a fixed type, wider than 24 bits, a scale outside float32's normal
    range, or a table over :data:`MAX_TABLE` entries).

    Returns:
        float32 array ``(n,)``, ``n = min(max_code - min_code, ceil(UNDERFLOW * 2**F)) + 1``; when
        the table stops at underflow its last entry is 0.0 and stands for every larger ``k``.
    """
    if not isinstance(t, FixedType):
        return None
    f, w = int(t.frac_bits), int(t.width)
    if w > 24 or f > 126 or w - f > 127:  # codes exact in float32, scaled values normal
        return None
    span = int(t.max_code) - int(t.min_code)
    under = math.ceil(UNDERFLOW * 2.0 ** f)
    n = min(span, under) + 1
    if n > MAX_TABLE:
        return None
    d = np.ldexp(-np.arange(n, dtype=np.float64), -f).astype(np.float32)  # exact: |k| < 2**24
    lut = np.exp(d)
    if n == under + 1:
        far = np.ldexp(-np.linspace(under, max(span, under), 17).round(), -f).astype(np.float32)
        if lut[-1] != 0 or np.any(np.exp(far) != 0):  # pragma: no cover - an exp that does not underflow
            return None
    return lut


def library_softmax(node, in_types: list) -> bool:
    """Whether ``node`` (with inputs of IR types ``in_types``) is a ``Softmax`` the library computes
    exactly: over the last axis, with an :func:`exp_table` for its input type."""
    return node.op == "Softmax" and int(node.attrs.get("axis", -1)) == -1 and exp_table(in_types[0]) is not None


def numpy_sum_order(terms: list, add) -> object:
    """``add``-combination of ``terms`` in the order ``np.add.reduce`` sums a contiguous float32
    axis of that length (NumPy's ``pairwise_sum``), e.g. ``add(add(t0, t1), t2)`` for three terms.
    ``add(a, b)`` builds one addition (any expression type)."""
    def pw(lo, n):
        if n < 8:
            acc = terms[lo]  # NumPy starts from -0.0; -0.0 + a == a for every a
            for i in range(lo + 1, lo + n):
                acc = add(acc, terms[i])
            return acc
        if n <= 128:
            r = [terms[lo + j] for j in range(8)]
            i = 8
            while i < n - n % 8:
                r = [add(r[j], terms[lo + i + j]) for j in range(8)]
                i += 8
            acc = add(add(add(r[0], r[1]), add(r[2], r[3])), add(add(r[4], r[5]), add(r[6], r[7])))
            for j in range(i, n):
                acc = add(acc, terms[lo + j])
            return acc
        n2 = n // 2
        n2 -= n2 % 8
        return add(pw(lo, n2), pw(lo + n2, n - n2))

    if not terms:
        raise ValueError("no terms to sum")
    return pw(0, len(terms))


def softmax_te(x, lut):
    """TE: the reference softmax of codes ``x`` (``(..., C)``, an integer dtype whose values fit
    int32) over the last axis, from the exp table ``lut`` (``(n,)`` float32, :func:`exp_table`).
    Returns float32 ``(..., C)``."""
    from tvm import te, tirx

    c = int(x.shape[-1])
    n = int(lut.shape[0])
    lead = x.shape[:-1]
    j = te.reduce_axis((0, c), name="j")
    mx = te.compute(lead, lambda *i: te.max(x[(*i, j)], axis=j), name="sm_max")

    def idx(i):
        k = (mx[i[:-1]] - x[i]).astype("int32")
        return tirx.min(k, tirx.const(n - 1, "int32"))

    e = te.compute(x.shape, lambda *i: lut[idx(i)], name="sm_exp")
    s = te.compute(lead, lambda *i: numpy_sum_order([e[(*i, q)] for q in range(c)], lambda a, b: a + b),
                   name="sm_sum")
    return te.compute(x.shape, lambda *i: e[i] / s[i[:-1]], name="softmax")
