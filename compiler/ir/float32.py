"""When is exact fixed-point arithmetic the same as the source model's float32 arithmetic?

A source model (ONNX through onnxruntime, PyTorch) computes ``x * c`` and ``x + c`` in float32:
each op rounds its exact real result to the nearest float32.  The IR's fixed-point ``Affine``
computes the exact real result instead.  The two agree for every input exactly when the float32
ops never round, i.e. when every exact result is itself a float32 (at most 24 significant bits,
inside the normal exponent range).  :func:`affine_float32_exact` decides that for all codes of a
fixed-point input: by a bound (``max|code| * odd mantissa of c < 2**24``) or, when the bound does
not settle it and the input has few codes, by enumerating them with integer arithmetic.
"""
from __future__ import annotations

import math

import numpy as np

from .types import FixedType

#: float32 significand bits (with the implicit leading one)
F32_SIGNIFICAND = 24
#: smallest normal float32 exponent: 2**-126
F32_MIN_EXP = -126
#: largest float32 exponent: values below 2**128
F32_MAX_EXP = 127


def dyadic_parts(v: float) -> tuple[int, int]:
    """``v`` (a finite float) as ``m * 2**e`` with ``m`` an odd integer (or ``(0, 0)`` for 0)."""
    if v == 0:
        return 0, 0
    f, e = math.frexp(float(v))
    m, e = int(f * (1 << 53)), e - 53
    shift = (m & -m).bit_length() - 1
    return m >> shift, e + shift


def _fits_f32(v: np.ndarray, e: int) -> bool:
    """True when every integer in ``v`` (int64, exact) times ``2**e`` is a normal float32 or 0."""
    a = np.abs(v[v != 0])
    if a.size == 0:
        return True
    low = a & -a
    odd = a // low
    if np.any(odd >= (1 << F32_SIGNIFICAND)):
        return False
    top = int(a.max()).bit_length() - 1 + e  # exponent of the largest value
    bottom = int(a.min()).bit_length() - 1 + e  # exponent of the smallest nonzero value
    return top <= F32_MAX_EXP and bottom >= F32_MIN_EXP


def affine_float32_exact(xt: FixedType, scale, bias, max_codes: int = 1 << 16) -> bool:
    """True when, for every code of ``xt`` and every channel, float32 ``x * scale`` and
    float32 ``(x * scale) + bias`` (each op rounded, as onnxruntime's Mul then Add) equal the exact
    real results, so that an exact fixed-point Affine gives what the source gives.

    Args:
        xt: the input's fixed-point type (every code ``min_code..max_code`` is reachable).
        scale, bias: float32-representable constants, scalars or per-channel vectors ``[C]``, or
            ``None`` (no Mul / no Add).
        max_codes: enumerate at most this many input codes when the bound does not decide.

    Returns:
        ``True`` only when proved; ``False`` when some code rounds, or when it cannot be proved
        within ``max_codes`` codes and int64 arithmetic (the caller then keeps float32 semantics).
    """
    lo, hi = xt.min_code, xt.max_code
    big = max(abs(lo), abs(hi))
    s = np.atleast_1d(np.asarray(1.0 if scale is None else scale, dtype=np.float64)).ravel()
    b = np.atleast_1d(np.asarray(0.0 if bias is None else bias, dtype=np.float64)).ravel()
    n = max(s.size, b.size)
    s, b = np.broadcast_to(s, (n,)), np.broadcast_to(b, (n,))
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(b))):
        return False
    codes = None
    for sc, bc in zip(s.tolist(), b.tolist()):
        ms, es = dyadic_parts(sc)
        mb, eb = dyadic_parts(bc)
        ep = es - xt.frac_bits  # product = code * ms * 2**ep
        if abs(ms) <= 1 and mb == 0 and (ms == 0 or (big.bit_length() - 1 + ep <= F32_MAX_EXP
                                                      and ep >= F32_MIN_EXP)):
            continue  # a power-of-two scale: exact on any float32 x (the source's x is one)
        if big >= (1 << F32_SIGNIFICAND):  # wider than float32: the source's x is already rounded
            return False
        bound_ok = big * abs(ms) < (1 << F32_SIGNIFICAND) and _fits_f32(np.array([big * ms, ms], np.int64), ep)
        if bound_ok and mb == 0:
            continue
        if hi - lo + 1 > max_codes:
            return False
        if codes is None:
            codes = np.arange(lo, hi + 1, dtype=np.int64)
        if (big * abs(ms)).bit_length() > 62:
            return False
        prod = codes * ms
        if not _fits_f32(prod, ep):
            return False
        if mb == 0:
            continue
        e0 = min(ep, eb)
        if (big * abs(ms)).bit_length() + (ep - e0) > 62 or abs(mb).bit_length() + (eb - e0) > 62:
            return False  # too far apart for int64: not proved
        total = prod * (1 << (ep - e0)) + mb * (1 << (eb - e0))
        if np.any(np.abs(total) >= (1 << 62)) or not _fits_f32(total, e0):
            return False
    return True


def float32_affine(x, scale=None, bias=None) -> np.ndarray:
    """The float32 ``Affine`` of the reference interpreter (and of the source's Mul then Add):
    ``float32(float32(x * scale) + bias)``, each op rounded; ``None`` skips that op.

    Args:
        x: reals (any shape, last axis channels), cast to float32 first.
        scale, bias: scalars or per-channel ``[C]`` vectors, cast to float32.
    Returns:
        float32 array of ``x``'s shape (broadcast with the constants).
    """
    y = np.asarray(x, dtype=np.float32)
    if scale is not None:
        y = (y * np.asarray(scale, dtype=np.float32)).astype(np.float32)
    if bias is not None:
        y = (y + np.asarray(bias, dtype=np.float32)).astype(np.float32)
    return y
