"""Exact requantization: a QONNX ``Quant`` after an exact affine map of integer codes, as the
parameters of a :mod:`MultiThreshold <qdeploy.compiler.ir.ops.threshold>` op.

Setting.  An integer accumulator code ``a`` (any integer in ``[lo, hi]``) stands for the real
``u = a * P + B`` (``P``, ``B`` exact rationals per channel: products of float32 scales, a float32
bias, a folded batch norm).  An optional ReLU gives ``v = max(0, u)`` (else ``v = u``), and the
QONNX ``Quant`` (qonnx ``IntQuant``: *QONNX operator spec, Quant*; ``qonnx.custom_op.general.intquant``)
gives the integer ``q = clamp(round(v / s + z), qmin, qmax)`` with ``round`` its ``rounding_mode``
and ``(q - z) * s`` as the dequantized real.  ``q`` is a non-decreasing (``P > 0``) or
non-increasing (``P < 0``) step function of ``a``, so
``q = qmin + #{k : q >= qmin + k}``, and each ``q >= k`` is one comparison ``a >= t_k`` whose
threshold ``t_k`` is computed here in :class:`fractions.Fraction` arithmetic, without floats
(FINN's thresholding: Umuroglu & Jahre, "Streamlined Deployment for Quantized Neural Networks",
arXiv 1709.04060, section 3; the FINN/qonnx ``MultiThreshold`` op).

The returned codes are the quantizer's integers ``q`` in ``[qmin, qmax]`` (e.g. ``uint8``: the
output type is exactly that range, so a multiply-and-shift form can clamp to it), and the
dequantized real is ``(q - z) * s``: the zero point stays in the consumer's offset (Jacob et al.,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference",
CVPR 2018, section 2.3).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ..errors import UnsupportedError
from .types import FixedType, bits_for_range, fixed_for_range

#: QONNX ``rounding_mode`` values (qonnx ``resolve_rounding_mode``) and the aliases the
#: importer already accepts; ``ROUND`` and ``HALF_EVEN`` are round half to even (NumPy's ``round``).
ROUNDING_MODES = ("ROUND", "HALF_EVEN", "CEIL", "FLOOR", "UP", "DOWN", "ROUND_TO_ZERO", "HALF_UP", "HALF_DOWN")

#: Widest quantizer this module turns into thresholds (2**16 - 1 thresholds per channel).
MAX_BITS = 16


def frac(x) -> Fraction:
    """An exact :class:`Fraction` of a float (float32 values are exact as Python floats), int or
    Fraction."""
    if isinstance(x, Fraction):
        return x
    if isinstance(x, (int, np.integer)):
        return Fraction(int(x))
    return Fraction(float(x))


def round_rational(f: Fraction, mode: str) -> int:
    """``f`` rounded to an integer with QONNX rounding mode ``mode`` (qonnx ``resolve_rounding_mode``:
    ROUND/HALF_EVEN = ``np.round``, CEIL, FLOOR, UP = away from 0, DOWN/ROUND_TO_ZERO = ``np.fix``,
    HALF_UP = half away from 0, HALF_DOWN = half towards 0).  Exact; the brute-force oracle of the tests."""
    fl = math.floor(f)
    r = f - fl
    if mode in ("ROUND", "HALF_EVEN"):
        return fl + (1 if r > Fraction(1, 2) or (r == Fraction(1, 2) and fl % 2 == 1) else 0)
    if mode == "FLOOR":
        return fl
    if mode == "CEIL":
        return math.ceil(f)
    if mode in ("DOWN", "ROUND_TO_ZERO"):
        return fl if f >= 0 else math.ceil(f)
    if mode == "UP":
        return math.ceil(f) if f >= 0 else fl
    if mode == "HALF_UP":
        return math.floor(abs(f) + Fraction(1, 2)) * (1 if f >= 0 else -1)
    if mode == "HALF_DOWN":
        return math.ceil(abs(f) - Fraction(1, 2)) * (1 if f >= 0 else -1)
    raise ValueError(f"unknown rounding mode {mode!r}")


def step_condition(mode: str, k: int) -> tuple[Fraction, bool]:
    """``round(f) >= k`` as ``f >= c`` (closed, ``True``) or ``f > c`` (open, ``False``): ``(c, closed)``.

    Derivation per mode (``k`` an integer): FLOOR ``f >= k``; CEIL ``f > k - 1``; DOWN ``f >= k``
    for ``k >= 1`` else ``f > k - 1``; UP ``f > k - 1`` for ``k >= 1`` else ``f >= k``; the half modes
    compare with ``k - 1/2``, closed when the tie ``k - 1/2`` rounds up to ``k`` (HALF_EVEN: ``k``
    even; HALF_UP: ``k >= 1``; HALF_DOWN: ``k <= 0``)."""
    h = Fraction(2 * k - 1, 2)
    if mode in ("ROUND", "HALF_EVEN"):
        return h, k % 2 == 0
    if mode == "HALF_UP":
        return h, k >= 1
    if mode == "HALF_DOWN":
        return h, k <= 0
    if mode == "FLOOR":
        return Fraction(k), True
    if mode == "CEIL":
        return Fraction(k - 1), False
    if mode in ("DOWN", "ROUND_TO_ZERO"):
        return (Fraction(k), True) if k >= 1 else (Fraction(k - 1), False)
    if mode == "UP":
        return (Fraction(k - 1), False) if k >= 1 else (Fraction(k), True)
    raise ValueError(f"unknown rounding mode {mode!r}")


@dataclass(frozen=True)
class QuantSpec:
    """One QONNX ``Quant`` (per tensor or per channel).

    Attributes:
        scale: positive scales, one per channel (or one for all), exact ``Fraction`` s of the float32
            constants.
        zero_point: integer zero points, one per channel (or one); QONNX allows any real, this
            importer only integers (the code ``0`` then means the real 0).
        bit_width: 1..:data:`MAX_BITS`; ``signed``/``narrow``: QONNX attributes (a 1-bit signed Quant
            is bipolar, ``+-1``); ``rounding``: one of :data:`ROUNDING_MODES`.
    """

    scale: tuple
    zero_point: tuple
    bit_width: int
    signed: bool
    narrow: bool
    rounding: str = "ROUND"

    @property
    def bipolar(self) -> bool:
        return self.bit_width == 1 and self.signed

    @property
    def qmin(self) -> int:
        """Smallest integer ``q`` (qonnx ``min_int``; -1 for bipolar)."""
        if self.bipolar:
            return -1
        if not self.signed:
            return 0
        return -(1 << (self.bit_width - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        """Largest integer ``q`` (qonnx ``max_int``: ``2**b - 2`` for narrow unsigned)."""
        if self.bipolar:
            return 1
        if not self.signed:
            return (1 << self.bit_width) - (2 if self.narrow else 1)
        return (1 << (self.bit_width - 1)) - 1

    def channel(self, c: int) -> tuple[Fraction, int]:
        """(scale, zero point) of channel ``c``."""
        s = self.scale[c if len(self.scale) > 1 else 0]
        z = self.zero_point[c if len(self.zero_point) > 1 else 0]
        return frac(s), int(z)

    def quantize(self, v: Fraction, c: int = 0) -> int:
        """The integer ``q`` of real ``v`` in channel ``c`` (brute force: ``clamp(round(v/s + z))``;
        bipolar: ``+1`` where ``v/s + z >= 0`` else ``-1``, as qonnx's ``int_quant``)."""
        s, z = self.channel(c)
        f = v / s + z
        if self.bipolar:
            return 1 if f >= 0 else -1
        return min(max(round_rational(f, self.rounding), self.qmin), self.qmax)

    def quantize_f32(self, x, c: int = 0) -> int:
        """The integer ``q`` the float32 source computes for the float32 input ``x`` in channel ``c``:
        ``y = float32(float32(x / s) + z)`` (Brevitas ``IntQuant.forward``: ``x / scale`` then
        ``+ zero_point`` on float32 tensors; qonnx's ``int_quant`` computes the same), then ``y``
        rounded with the rounding mode as qonnx's ``resolve_rounding_mode`` does it (exactly, except
        HALF_UP / HALF_DOWN, whose ``|y| +- 0.5`` is a float32 sum there too) and clamped (bipolar:
        ``+1`` where ``y >= 0``)."""
        s, z = self.channel(c)
        with np.errstate(over="ignore", under="ignore"):
            y = np.float32(np.float32(x) / np.float32(float(s)))
            if z:
                y = np.float32(y + np.float32(z))
        if not np.isfinite(y):
            return self.qmax if y > 0 else self.qmin
        if self.bipolar:
            return 1 if y >= 0 else -1
        if self.rounding in ("HALF_UP", "HALF_DOWN"):  # qonnx: sign(y) * floor(|y| + 0.5) in float32
            a = np.float32(abs(y) + np.float32(0.5 if self.rounding == "HALF_UP" else -0.5))
            r = math.floor(a) if self.rounding == "HALF_UP" else math.ceil(a)
            q = r if y >= 0 else -r
        else:
            q = round_rational(Fraction(float(y)), self.rounding)
        return min(max(q, self.qmin), self.qmax)

    def conditions(self, c: int) -> list[tuple[Fraction, bool]]:
        """``q >= qmin + 1 + j`` for ``j = 0 .. qmax - qmin - 1`` as conditions ``v >= V`` /
        ``v > V`` on the real input ``v``: a list of ``(V, closed)``."""
        s, z = self.channel(c)
        if self.bipolar:  # -1 -> +1 is one step of 2: two equal conditions f >= 0
            return [((0 - z) * s, True)] * 2
        out = []
        for k in range(self.qmin + 1, self.qmax + 1):
            cc, closed = step_condition(self.rounding, k)
            out.append(((cc - z) * s, closed))
        return out


def check_quant(q: QuantSpec, where: str = "") -> None:
    """Refuse a quantizer this module cannot express, naming ``where``.

    Raises:
        UnsupportedError: unknown rounding mode, bit width outside 1..:data:`MAX_BITS`, a scale that
            is not positive, or a zero point that is not an integer.
    """
    if q.rounding not in ROUNDING_MODES:
        raise UnsupportedError(f"Quant rounding mode {q.rounding!r} is not one of {', '.join(ROUNDING_MODES)}", where)
    if not 1 <= q.bit_width <= MAX_BITS:
        raise UnsupportedError(f"Quant bit width {q.bit_width} outside 1..{MAX_BITS} (too many thresholds)", where)
    if any(frac(s) <= 0 for s in q.scale):
        raise UnsupportedError("Quant scale must be positive", where)


@dataclass(frozen=True)
class ThresholdParams:
    """The parameters of one ``MultiThreshold`` node.

    Attributes:
        thresholds: int64 ``[C, T]`` (or ``[1, T]``) accumulator codes, sorted per row.
        base, sign: int64 ``[C]`` (or ``[1]``): output code where no threshold is reached; +1 / -1.
        out_type: integer :class:`FixedType` (frac bits ``out_frac``) holding every output code.
        threshold_type: :class:`FixedType` of the threshold codes (the input's fraction bits).
        dead: channels whose ``P == 0``: constant outputs (listed for a converter note).
    """

    thresholds: np.ndarray
    base: np.ndarray
    sign: np.ndarray
    out_type: FixedType
    threshold_type: FixedType
    dead: tuple


def _real_condition(V: Fraction, closed: bool, relu: bool):
    """``max(0, u) >= V`` (or ``>``) as a condition on ``u``: ``None`` when always true."""
    if relu and (V < 0 or (V == 0 and closed)):
        return None
    return V, closed


@functools.lru_cache(maxsize=64)
def _steps(mode: str, qmin: int, qmax: int, bipolar: bool) -> tuple:
    """``(h, closed)`` per condition ``q >= k``: ``round(f) >= k`` is ``f >= h/2`` (or ``>``)."""
    if bipolar:
        return ((0, True), (0, True))
    return tuple((int(cc * 2), closed) for cc, closed in (step_condition(mode, k) for k in range(qmin + 1, qmax + 1)))


def _channel_thresholds(quant: QuantSpec, c: int, p: Fraction, b: Fraction, relu: bool, lo: int, hi: int):
    """The thresholds of channel ``c`` (``p != 0``), clipped to ``[lo, hi + 1]``.  For ``u = a*p + b``
    and a condition ``u >= V`` (``u > V`` when open) with ``r = (V - b) / p``: when ``p > 0`` it is
    ``a >= ceil(r)`` (open: ``a >= floor(r) + 1``); when ``p < 0`` its *negation* is ``a >= floor(r) + 1``
    (open: ``a >= ceil(r)``), counted with sign -1.

    In integer arithmetic: a condition's real is ``V = (h/2 - z) * s`` (``h`` its half-integer step,
    :func:`step_condition`), so ``r = N / D`` with ``N = ((h - 2z) * sn * bd - 2 * bn * sd) * pd`` and
    ``D = 2 * sd * bd * pn`` (numerators/denominators of the Fractions ``s``, ``b``, ``p``), and
    ``ceil``/``floor`` of ``N / D`` are exact integer divisions (checked against brute force)."""
    s, z = quant.channel(c)
    sn, sd, pn, pd, bn, bd = s.numerator, s.denominator, p.numerator, p.denominator, b.numerator, b.denominator
    D = 2 * sd * bd * pn
    neg = D < 0
    D = abs(D)
    out = []
    for h, closed in _steps(quant.rounding, quant.qmin, quant.qmax, quant.bipolar):
        vnum = (h - 2 * z) * sn  # V = vnum / (2 sd)
        if relu and (vnum < 0 or (vnum == 0 and closed)):  # max(0, u) always meets it
            out.append(lo if p > 0 else hi + 1)
            continue
        N = (vnum * bd - 2 * bn * sd) * pd
        if neg:
            N = -N
        if p > 0:
            t = -((-N) // D) if closed else N // D + 1
        else:
            t = N // D + 1 if closed else -((-N) // D)
        out.append(min(max(t, lo), hi + 1))
    return out


def multithreshold_params(lo: int, hi: int, P, B, quant: QuantSpec, relu: bool = False,
                          frac_bits: int = 0, out_frac: int = 0) -> ThresholdParams:
    """MultiThreshold parameters for ``q = Quant(relu?(a * P + B))`` on integer codes ``a`` in ``[lo, hi]``.

    Args:
        lo, hi: the accumulator's code range (from its :class:`FixedType`).
        P, B: per-channel sequences of exact rationals (``Fraction``, int or float32 values), or
            length-1 sequences for all channels; ``P`` may be negative (sign -1) or 0 (dead channel).
        quant: the output quantizer (per-tensor or per-channel scale/zero point of the same ``C``).
        relu: a ReLU between the affine map and the quantizer.
        frac_bits: fraction bits of the accumulator type (the thresholds' type shares them).
        out_frac: fraction bits of the output type (0: integer codes ``q - z``; ``F`` for a
            power-of-two scale ``2**-F`` with ``z == 0`` whose codes are plain fixed point).
    Returns:
        :class:`ThresholdParams`; output code ``y = q`` (the zero point is not subtracted).
    Raises:
        UnsupportedError: see :func:`check_quant`, or inconsistent channel counts.
    """
    check_quant(quant)
    P = [frac(p) for p in np.ravel(np.asarray(P, dtype=object))]
    B = [frac(b) for b in np.ravel(np.asarray(B, dtype=object))]
    C = max(len(P), len(B), len(quant.scale), len(quant.zero_point))
    for name, seq in (("P", P), ("B", B), ("scale", quant.scale), ("zero point", quant.zero_point)):
        if len(seq) not in (1, C):
            raise UnsupportedError(f"requantizer: {name} has {len(seq)} channels, expected 1 or {C}")
    rows, bases, signs, dead = [], [], [], []
    T = quant.qmax - quant.qmin if not quant.bipolar else 2
    for c in range(C):
        p, b = P[c if len(P) > 1 else 0], B[c if len(B) > 1 else 0]
        if p == 0:  # constant channel: count the conditions the constant u = B meets
            conds = [_real_condition(V, closed, relu) for V, closed in quant.conditions(c)]
            dead.append(c)
            n = sum(1 for cd in conds if cd is None or (b > cd[0] if not cd[1] else b >= cd[0]))
            rows.append([lo] * n + [hi + 1] * (T - n))
            bases.append(quant.qmin)
            signs.append(1)
            continue
        rows.append(sorted(_channel_thresholds(quant, c, p, b, relu, lo, hi)))
        if p > 0:
            bases.append(quant.qmin)
            signs.append(1)
        else:
            bases.append(quant.qmin + T)
            signs.append(-1)
    th = np.array(rows, dtype=np.int64).reshape(C, T)
    base, sign = np.array(bases, dtype=np.int64), np.array(signs, dtype=np.int64)
    if C > 1 and np.all(th == th[0]) and np.all(base == base[0]) and np.all(sign == sign[0]):
        th, base, sign = th[:1], base[:1], sign[:1]
    out_type = fixed_for_range(quant.qmin, quant.qmax, out_frac)
    th_type = fixed_for_range(min(lo, int(th.min())), max(hi + 1, int(th.max())), frac_bits)
    return ThresholdParams(th, base, sign, out_type, th_type, tuple(dead))


# ---------------------------------------------------------------------- float inputs
def f32_at_least(r: Fraction, strict: bool) -> Fraction:
    """The smallest float32 value ``>= r`` (``> r`` when ``strict``), as a Fraction.

    For a float32 input ``x`` (a graph input), ``x >= r`` holds exactly when ``x >= f32_at_least(r)``
    (``x > r`` when ``x >= f32_at_least(r, True)``).  Saturates to the largest finite float32.
    """
    x = np.float32(float(r))  # nearest float32 (ties even); move up/down until it is the first above
    while Fraction(float(x)) < r or (strict and Fraction(float(x)) == r):
        x = np.nextafter(x, np.float32(np.inf), dtype=np.float32)
    while True:
        below = np.nextafter(x, np.float32(-np.inf), dtype=np.float32)
        fb = Fraction(float(below))
        if fb > r or (not strict and fb == r):
            x = below
        else:
            break
    if not np.isfinite(x):
        x = np.float32(np.finfo(np.float32).max)
    return Fraction(float(x))


def _f32_order(x) -> int:
    """float32 ``x`` -> an integer that orders like the value (``-0.0`` and ``0.0`` -> 0)."""
    u = int(np.float32(x).view(np.uint32))
    return -(u & 0x7FFFFFFF) if u & 0x80000000 else u


def _f32_of_order(o: int):
    """Inverse of :func:`_f32_order` (``0`` -> ``0.0``)."""
    u = o if o >= 0 else (-o) | 0x80000000
    return np.uint32(u).view(np.float32)


_F32_MAX_ORDER = _f32_order(np.finfo(np.float32).max)


def f32_first_passing(passes, start) -> Fraction | None:
    """The smallest finite float32 ``x`` with ``passes(x)`` for a predicate that is monotone
    (false, then true) over the float32 values, searched from ``start`` (a float32 near the
    answer: exponential search for a bracket, then bisection on the float32 order); ``None`` when
    even the largest finite float32 fails.  The lowest finite float32 when all pass."""
    o = _f32_order(start)
    if passes(_f32_of_order(o)):
        hi, step = o, 1
        while True:
            lo = max(hi - step, -_F32_MAX_ORDER)
            if not passes(_f32_of_order(lo)):
                break
            if lo == -_F32_MAX_ORDER:
                return Fraction(float(_f32_of_order(lo)))
            hi, step = lo, step * 2
    else:
        lo, step = o, 1
        while True:
            hi = min(lo + step, _F32_MAX_ORDER)
            if passes(_f32_of_order(hi)):
                break
            if hi == _F32_MAX_ORDER:
                return None
            lo, step = hi, step * 2
    while hi - lo > 1:  # passes(hi), not passes(lo)
        mid = (lo + hi) // 2
        if passes(_f32_of_order(mid)):
            hi = mid
        else:
            lo = mid
    return Fraction(float(_f32_of_order(hi)))


def float_input_thresholds(quant: QuantSpec, C: int, max_width: int = 62):
    """Thresholds for a ``Quant`` on a float32 tensor ``x`` (per channel ``C``) that decide exactly
    like the float32 source.

    The source (Brevitas, qonnx's executor, onnxruntime) computes ``x / s`` and ``+ z`` in float32
    before rounding (:meth:`QuantSpec.quantize_f32`); for an ``x`` whose exact quotient lies within
    a float32 rounding of a tie, that differs from the real-number ``Quant`` (``x = 0.5`` with
    ``s = float32(1/3)``: exact ``1.49999995`` rounds to 1, float32 ``1.5`` rounds to 2), and on
    data with few distinct values (pixels ``k/16``) it differs on every such input.  So each
    threshold is the first float32 ``t_k`` whose float32 code is ``>= k`` (found by search on the
    float32 order, :func:`f32_first_passing`; the code is non-decreasing in ``x`` because every
    float32 operation is correctly rounded and so monotone).  With ``F`` fraction bits such that
    every ``t_k`` lies on the grid ``2**-F``, ``floor(x * 2**F) >= t_k * 2**F`` holds exactly when
    ``x >= t_k`` for every float32 ``x``: casting ``x`` into that grid and comparing integer codes
    reproduces the source for every float32 input.

    Returns:
        ``(grid, params)``: ``grid`` the fixed type (``TRN``, ``SAT``) to cast ``x`` into first (its
        range reaches one code past every threshold, so saturation changes no decision), and the
        :class:`ThresholdParams` on its codes (output codes ``q``, fraction bits 0).
    Raises:
        UnsupportedError: when the grid needs more than ``max_width`` bits, or a threshold lies at
            the end of the float32 range.
    """
    check_quant(quant)
    T = quant.qmax - quant.qmin if not quant.bipolar else 2
    rows = []
    for c in range(C):
        conds = quant.conditions(c)
        row = []
        for j in range(T):
            k = quant.qmin + 1 + j
            t = f32_first_passing(lambda x, k=k: quant.quantize_f32(x, c) >= k, np.float32(float(conds[j][0])))
            if t is None or t == Fraction(float(-np.finfo(np.float32).max)):
                raise UnsupportedError(f"a Quant on a float input has a threshold at the end of the float32 range "
                                       f"(channel {c}, code {k})")
            row.append(t)
        rows.append(row)
    F = max([t.denominator.bit_length() - 1 for row in rows for t in row if t != 0] + [0])
    codes = [[int(t * (1 << F)) for t in row] for row in rows]
    lo, hi = min(min(r) for r in codes) - 1, max(max(r) for r in codes) + 1
    width, signed = bits_for_range(min(lo, 0), max(hi, 0))
    if width > max_width:
        raise UnsupportedError(f"a Quant on a float input needs a {width}-bit grid ({F} fraction bits) to compare "
                               f"the float32 input exactly with its thresholds (more than {max_width}; e.g. a "
                               f"threshold 'x > 0' of CEIL/UP rounding)")
    grid = FixedType(width, width - F, signed, "TRN", "SAT")
    th = np.array(codes, dtype=np.int64).reshape(C, T)
    base = np.full(C, quant.qmin, dtype=np.int64)
    sign = np.ones(C, dtype=np.int64)
    if C > 1 and np.all(th == th[0]):
        th, base, sign = th[:1], base[:1], sign[:1]
    th_type = fixed_for_range(min(grid.min_code, int(th.min())), max(grid.max_code + 1, int(th.max())), F)
    return grid, ThresholdParams(th, base, sign, fixed_for_range(quant.qmin, quant.qmax, 0), th_type, ())
