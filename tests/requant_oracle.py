"""Test oracle for threshold requantizers: ``y(x) = clamp(rnd(x * m + b) + zp, omin, omax)`` in
exact rational arithmetic (``fractions.Fraction``), and the MultiThreshold parameters that
reproduce it, read off the function itself by bisection (independent of the code under test)."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from qdeploy.compiler.ir import Const, parse_type


def round_half_up(q: Fraction) -> int:
    return math.floor(q + Fraction(1, 2))


def round_half_even(q: Fraction) -> int:
    """QONNX ``ROUND`` / NumPy ``round``: ties to the even neighbour."""
    fl = math.floor(q)
    rem = q - fl
    return fl + (1 if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and fl % 2) else 0)


def requant(x: int, m: Fraction, b: Fraction, zp: int, omin: int, omax: int, rnd=round_half_up) -> int:
    """clamp(rnd(x * m + b) + zp, omin, omax) for one integer code ``x``."""
    return min(max(rnd(x * m + b) + zp, omin), omax)


def channel_thresholds(lo: int, hi: int, fn, T: int, omin: int, omax: int):
    """(thresholds row of length T, base, sign) of a monotone integer function ``fn`` on
    ``[lo, hi]``: the smallest code reaching each level (bisection), padded with ``lo`` (always
    reached; base moved back) and ``hi + 1`` (never reached) so that ``base + sign * T`` stays in
    ``[omin, omax]``."""
    v0, v1 = fn(lo), fn(hi)
    s = 1 if v1 >= v0 else -1
    th = []
    for j in range(1, abs(v1 - v0) + 1):
        target = v0 + s * j
        a, c = lo, hi
        while a < c:
            mid = (a + c) // 2
            if (fn(mid) >= target) if s > 0 else (fn(mid) <= target):
                c = mid
            else:
                a = mid + 1
        th.append(a)
    assert len(th) <= T
    room = (v0 - omin) if s > 0 else (omax - v0)
    below = min(T - len(th), room)
    return [lo] * below + th + [hi + 1] * (T - len(th) - below), v0 - s * below, s


def requant_params(lo: int, hi: int, channels, out_t, in_frac: int, T: int | None = None, rnd=round_half_up):
    """MultiThreshold params (``thresholds``, ``base``, ``sign`` Consts) for per-channel
    requantizers ``channels = [(m, b, zp), ...]`` (``m``, ``b`` Fractions in output codes per input
    code) on input codes ``[lo, hi]`` with ``in_frac`` fraction bits, into ``out_t``, rounding with
    ``rnd`` (half up by default)."""
    T = T if T is not None else out_t.max_code - out_t.min_code
    rows, base, sign = [], [], []
    for m, b, zp in channels:
        row, b0, s = channel_thresholds(lo, hi, lambda x, m=m, b=b, zp=zp: requant(x, m, b, zp, out_t.min_code,
                                                                                  out_t.max_code, rnd),
                                        T, out_t.min_code, out_t.max_code)
        rows.append(row)
        base.append(b0)
        sign.append(s)
    t = np.array(rows, np.int64)
    w = max(int(np.abs(t).max()).bit_length() + 1, 2)
    return {"thresholds": Const(t, parse_type(f"fixed<{w},{w - in_frac}>")),
            "base": Const(np.array(base), parse_type("int<24>")),
            "sign": Const(np.array(sign), parse_type("int<2>"))}
