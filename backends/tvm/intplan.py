"""Integer widths for the TVM lowering, proved from the IR's exact types (no TVM import).

The reference interpreter computes every fixed-point value in int64.  The lowering keeps its
results bit for bit while computing in narrower integers wherever a bound proves that nothing
can overflow (issue #15, item 1):

* a value of IR type ``t`` holds codes in ``[t.min_code, t.max_code]`` (the IR's type rules
  are exact, :mod:`qdeploy.compiler.ir.ops.spec`), so casting it to any dtype holding that range
  is exact (:func:`storage_dtype`: the narrowest of int8, int16, int32, int64);
* a ``Dense``/``Conv`` accumulator is bounded per output channel by interval arithmetic over
  the actual constant weights (:func:`dot_bounds`, the same bound as the IR's type rule in
  :mod:`qdeploy.compiler.ir.ops.linear`); it accumulates in int32 when every partial sum
  provably fits (:func:`linear_plan`), else in int64 exactly as before.  Its operands (input
  codes and weight constant) are given in the accumulator's dtype: measured on the jet tagger
  (AVX-512 host, ``schedule: auto``, batch 256) int8 operands were 1.6x *slower* than int32 ones
  (113-122 vs 74-79 us per call, interleaved runs): the loop schedule vectorizes over output channels and broadcasts one
  input code per reduction step, and an int8 code costs a sign extension there;
* elementwise requantization runs in int32 when the input range, shifted, and the target type's
  constants fit (:func:`requant_dtype`).

Why every *partial* sum is covered: a partial sum over a subset of the reduction terms lies
between the sum of the subset's minima and the sum of its maxima; every term's minimum is
``<= 0 <=`` its maximum when 0 is in the input range, so the partial sums lie within the full
``[lo, hi]``.  :func:`linear_plan` therefore always widens the input range to include 0 (the
zero padding of a convolution needs it anyway).

All bounds are exact Python integers (NumPy object arrays where int64 could overflow).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...compiler.ir.types import FixedType

#: (bits, dtype) of the signed integer dtypes the lowering uses, narrowest first.
INT_DTYPES = ((8, "int8"), (16, "int16"), (32, "int32"), (64, "int64"))


def int_dtype(lo: int, hi: int) -> str:
    """The narrowest signed integer dtype holding every integer in ``[lo, hi]``.

    Raises:
        ValueError: when not even int64 holds the range (callers keep int64 wrap-around
            semantics themselves, as the reference does, and never ask then).
    """
    lo, hi = int(lo), int(hi)
    for bits, name in INT_DTYPES:
        if -(1 << (bits - 1)) <= lo and hi <= (1 << (bits - 1)) - 1:
            return name
    raise ValueError(f"range [{lo}, {hi}] does not fit int64")


def fits(lo: int, hi: int, dtype: str) -> bool:
    """True when every integer in ``[lo, hi]`` is representable in signed ``dtype``."""
    bits = dict((d, b) for b, d in INT_DTYPES)[dtype]
    return -(1 << (bits - 1)) <= int(lo) and int(hi) <= (1 << (bits - 1)) - 1


def bits_of(dtype: str) -> int:
    """Bit width of one of :data:`INT_DTYPES`' dtypes."""
    return dict((d, b) for b, d in INT_DTYPES)[dtype]


def storage_dtype(t: FixedType) -> str:
    """Dtype holding every code of fixed-point type ``t`` (IR widths are at most 62 bits)."""
    return int_dtype(t.min_code, t.max_code)


def dot_bounds(w_codes: np.ndarray, x_lo: int, x_hi: int):
    """Exact per-output-channel ``(lo, hi)`` of ``sum_k w[k, n] * x_k`` for ``x_k`` in
    ``[x_lo, x_hi]``; ``w_codes`` is ``[..., N]`` (a Dense ``[K, N]`` or a channels-last
    convolution kernel ``[*kernel, C_in/groups, C_out]``: the reduction runs over every axis but
    the last).  Returns two object arrays of Python ints, shape ``[N]``."""
    w = np.asarray(w_codes).astype(object).reshape(-1, np.shape(w_codes)[-1])
    a, b = w * int(x_lo), w * int(x_hi)
    return np.minimum(a, b).sum(axis=0), np.maximum(a, b).sum(axis=0)


@dataclass(frozen=True)
class LinearPlan:
    """Dtypes of one quantized ``Dense``/``Conv`` (see :func:`linear_plan`).

    Attributes:
        in_dtype: dtype of the input codes and of the weight constant fed to the matmul/conv
            (the accumulator's, see the module docstring).
        narrow_dtype: the narrowest dtype holding both the input's and the weights' codes
            (informative: what int8/int16 operands would be).
        acc_dtype: accumulation dtype (``out_dtype`` of the matmul/conv: products are formed
            in it too, TVM casts both operands first).
        epi_dtype: dtype of the epilogue (alignment shift and bias add), ``acc_dtype`` or int64
            (int32 only when the shifted accumulator *and* the biased result fit it).
        acc_range: proved ``(lo, hi)`` of every partial sum.
        out_range: proved ``(lo, hi)`` of the shifted, biased result.
    """

    in_dtype: str
    narrow_dtype: str
    acc_dtype: str
    epi_dtype: str
    acc_range: tuple
    out_range: tuple


def linear_plan(x_t: FixedType, w_codes: np.ndarray, shift: int, bias_aligned) -> LinearPlan:
    """Narrowest exact dtypes for a quantized ``Dense``/``Conv``.

    Args:
        x_t: the input's fixed-point type (codes in ``[x_t.min_code, x_t.max_code]``).
        w_codes: weight codes ``[..., N]`` (reduction over all axes but the last).
        shift: left shift aligning the accumulator to the output's binary point (``>= 0``).
        bias_aligned: the bias codes already shifted to the output's binary point (int64, with
            the reference's wrap-around), shape ``[N]``, or ``None``.
    Returns:
        A :class:`LinearPlan`: int32 accumulation when the proved range of every partial sum
        fits int32 (else int64, the reference's own arithmetic), operands in the accumulator's
        dtype, the epilogue in the accumulator's dtype when the shifted, biased range fits it too.
    """
    x_lo, x_hi = min(int(x_t.min_code), 0), max(int(x_t.max_code), 0)
    lo, hi = dot_bounds(w_codes, x_lo, x_hi)
    a_lo, a_hi = int(min(lo, default=0)), int(max(hi, default=0))
    acc = "int32" if fits(a_lo, a_hi, "int32") else "int64"
    w = np.asarray(w_codes)
    w_lo, w_hi = int(w.min(initial=0)), int(w.max(initial=0))
    narrow = int_dtype(min(x_lo, w_lo), max(x_hi, w_hi))
    o_lo, o_hi = lo * (1 << shift), hi * (1 << shift)
    shifted_ok = fits(min(o_lo, default=0), max(o_hi, default=0), "int32")  # before the bias, too
    if bias_aligned is not None:
        bb = np.asarray(bias_aligned).astype(object).reshape(-1)
        if bb.shape[0] == o_lo.shape[0]:
            o_lo, o_hi = o_lo + bb, o_hi + bb
        else:
            o_lo, o_hi = o_lo + min(bb), o_hi + max(bb)
    out_range = (int(min(min(o_lo, default=0), 0)), int(max(max(o_hi, default=0), 0)))
    epi = acc if acc == "int32" and shifted_ok and fits(*out_range, "int32") else "int64"
    return LinearPlan(acc, narrow, acc, epi, (a_lo, a_hi), out_range)


def requant_dtype(in_t: FixedType, shift: int, t: FixedType) -> str:
    """Dtype in which :meth:`~.lower.RelaxLowering.requantize` of codes of type ``in_t`` into
    ``t`` (``shift = frac_in - t.frac_bits``) is exact: int32 when the input codes, left-shifted
    when ``shift < 0``, the rounding constants (``2**shift``) and the overflow constants of ``t``
    (``2**t.width`` for ``WRAP``) all fit int32, else int64."""
    lo, hi = int(in_t.min_code), int(in_t.max_code)
    if shift < 0:
        lo, hi = lo << -shift, hi << -shift
    if not fits(lo, hi, "int32") or shift > 30:
        return "int64"
    if t.width > 30 or not fits(t.min_code, t.max_code, "int32"):
        return "int64"
    # the rounding bit: fl + 1 must fit (fl <= hi >> shift <= hi)
    if not fits(lo, hi + 1, "int32"):
        return "int64"
    return "int32"


def binary_dtype(op_name: str, ta: FixedType, tb: FixedType, frac_out: int) -> str:
    """Dtype in which ``Add`` (both operands left-shifted to ``frac_out`` fraction bits, then
    added) or ``Mul`` (codes multiplied) of codes of types ``ta``, ``tb`` is exact: int32 when
    every operand, shifted operand and result bound fits int32, else int64 (also for a negative
    alignment shift, which the lowering refuses itself)."""
    if op_name == "Add":
        sa, sb = frac_out - ta.frac_bits, frac_out - tb.frac_bits
        if sa < 0 or sb < 0 or sa > 31 or sb > 31:
            return "int64"
        lo_a, hi_a = ta.min_code << sa, ta.max_code << sa
        lo_b, hi_b = tb.min_code << sb, tb.max_code << sb
        ok = fits(lo_a, hi_a, "int32") and fits(lo_b, hi_b, "int32") and fits(lo_a + lo_b, hi_a + hi_b, "int32")
    elif op_name == "Mul":
        corners = [p * q for p in (ta.min_code, ta.max_code) for q in (tb.min_code, tb.max_code)]
        ok = fits(ta.min_code, ta.max_code, "int32") and fits(tb.min_code, tb.max_code, "int32") and \
            fits(min(corners), max(corners), "int32")
    else:
        raise ValueError(op_name)
    return "int32" if ok else "int64"


def affine_dtype(x_t: FixedType, scale_codes, shift: int, bias_aligned) -> str:
    """Dtype in which ``Affine`` on codes (``x * scale``, left shift by ``shift``, ``+ bias``
    already aligned) is exact: int32 when the input, the scale constants, the product bound, the
    shifted bound and the biased bound all fit int32, else int64 (also for a negative shift,
    which the lowering refuses itself).  ``scale_codes``/``bias_aligned`` may be ``None``."""
    if shift < 0 or shift > 31:
        return "int64"
    lo, hi = int(x_t.min_code), int(x_t.max_code)
    steps = [(lo, hi)]
    if scale_codes is not None:
        sc = np.asarray(scale_codes)
        s_lo, s_hi = int(sc.min()), int(sc.max())
        steps.append((s_lo, s_hi))
        corners = [p * q for p in (lo, hi) for q in (s_lo, s_hi)]
        lo, hi = min(corners), max(corners)
        steps.append((lo, hi))
    lo, hi = lo << shift, hi << shift
    steps.append((lo, hi))
    if bias_aligned is not None:
        bb = np.asarray(bias_aligned)
        steps.append((int(bb.min()), int(bb.max())))
        lo, hi = lo + int(bb.min()), hi + int(bb.max())
        steps.append((lo, hi))
    return "int32" if all(fits(a, b, "int32") for a, b in steps) else "int64"
