"""Multiply-and-shift forms of ``MultiThreshold`` nodes, found by search and proved exact.

A :class:`ShiftForm` is, per channel ``c`` (last axis), the map of input codes ``x``

    ``g_c(x) = clamp(floor((x * K[c] + R[c]) / 2**S), out.min_code, out.max_code)``

or the same with round-half-to-even instead of the floor (tried when no floor form exists: an
exactly dyadic requantizer whose ties round to even has steps of alternating widths, which no
floor form has; ``tau(j)`` below is then the smallest accumulator that rounds to ``j`` or more).

with integers ``K[c]`` (multiplier), ``R[c]`` (offset) and one shift ``S`` shared by every channel.
:func:`find_shift_form` looks for one that equals a MultiThreshold ``f_c(x) = base[c] + sign[c] *
#{k : x >= t[c, k]}`` for EVERY code ``x`` in the input range ``[lo, hi]``; :func:`prove` is the
proof, in exact Python-integer arithmetic:

* both maps are monotone integer step functions (``K >= 0`` non-decreasing, ``K <= 0``
  non-increasing), so each is determined on ``[lo, hi]`` by its value at ``lo`` and the sorted
  list of its unit-step positions in ``(lo, hi]`` (a jump of ``d`` levels at ``x`` is ``d`` equal
  positions).  For ``g`` with ``K > 0`` the step to level ``j`` (``out.min_code < j <=
  out.max_code``) is at ``x = ceil((j * 2**S - R) / K)`` (``g(x) >= j  <=>  x*K + R >= j * 2**S``),
  with ``K < 0`` the step down to level ``j`` is at ``floor((R - (j+1) * 2**S) / -K) + 1``;
* equal start values and equal step lists mean equal functions on the whole range.

The search (:func:`find_shift_form`).  For a non-decreasing channel with value ``v0 = f(lo)``,
steps ``u_1 <= ... <= u_m`` in ``(lo, hi]`` (level ``v0 + i`` starts at ``u_i``) and clamp range
``[omin, omax]``, the form is equal iff (with ``P = 2**S``)

* every step is where it should be: ``(v0+i) P - u_i K <= R <= (v0+i) P - (u_i - 1) K - 1``;
* the start value is right: ``R <= (v0+1) P - lo K - 1``, and ``R >= v0 P - lo K`` unless
  ``v0 == omin`` (the clamp lifts anything below);
* no step beyond the last: ``R <= (v1+1) P - hi K - 1`` unless ``v1 = v0 + m == omax``.

(for round half to even, ``j P`` becomes ``tau(j)`` throughout).

So for a given ``(S, K)`` the feasible offsets are one integer interval ``[max L_i(K), min
U_i(K)]`` whose bounds are affine in ``K``; ``psi(K) = max L_i(K) - min U_i(K)`` is convex, its
feasible set ``psi <= 0`` is an interval of ``K``, found by ternary search (vectorized over
channels) and then walked down to its smallest ``K``.  A form at ``S`` gives one at ``S + 1``
(``2K, 2R``), so the smallest feasible ``S`` is found by bisection.  Non-increasing channels
(``sign = -1``) are solved mirrored (``-f``; ``K -> -K``, ``R -> 2**S - 1 - R``), constant
channels get ``K = 0``.  Channels with irregular steps (FINN-imported thresholds can be
arbitrary) have no form within the width caps: the result is ``None``.

Sources: the integer-only requantization of Jacob et al., "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018, section 2.2 (a real
multiplier as a fixed-point integer multiplier and a right shift); thresholds as the exact form
of a monotone quantizer: Umuroglu & Jahre, "Streamlined Deployment for Quantized Neural
Networks", arXiv 1709.04060, section 3.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graph import Const
from .types import MAX_WIDTH, FixedType, bits_for_range

#: Magnitude bound of every intermediate of the vectorized search (int64 headroom).
_LIM = 1 << 60
_BIG = 1 << 62


@dataclass(frozen=True)
class ShiftForm:
    """``clamp(rnd((x * K[c] + R[c]) / 2**S), out)`` per channel ``c`` (last axis), ``rnd`` the
    floor (``rounding="TRN"``) or round-half-to-even (``"RND_CONV"``).

    Attributes:
        K: per-channel integer multipliers (length C; negative for non-increasing channels,
            0 for channels constant on the range).
        R: per-channel integer offsets (length C).
        S: the shared right shift (bits).
        out: the clamp range, as the fixed-point type whose ``min_code``/``max_code`` bound the
            result (its codes are the MultiThreshold's output codes).
        lo, hi: the input code range the form was proved equal on.
        rounding: ``"TRN"`` (floor) or ``"RND_CONV"`` (half to even): the ``Quantize`` mode.
    """

    K: tuple
    R: tuple
    S: int
    out: FixedType
    lo: int
    hi: int
    rounding: str = "TRN"

    @property
    def k_bits(self) -> int:
        """Bits of the widest multiplier (two's complement when any ``K < 0``)."""
        return bits_for_range(min(self.K), max(self.K))[0]

    def acc_range(self) -> tuple[int, int]:
        """Exact ``(min, max)`` of ``x * K[c] + R[c]`` over ``x`` in ``[lo, hi]`` and every channel."""
        vals = [x * k + r for k, r in zip(self.K, self.R) for x in (self.lo, self.hi)]
        return min(vals), max(vals)

    def acc_bits(self) -> int:
        """Bits of the ``x * K + R`` accumulator over the proved range."""
        return bits_for_range(*self.acc_range())[0]

    def apply(self, x) -> np.ndarray:
        """The form on int64 codes ``x`` (``[..., C]``, values in ``[lo, hi]``): int64 codes.

        Raises:
            ValueError: the accumulator needs more than 62 bits (cannot be done in int64).
        """
        if self.acc_bits() > MAX_WIDTH:
            raise ValueError(f"accumulator of {self.acc_bits()} bits does not fit int64 arithmetic")
        x = np.asarray(x, dtype=np.int64)
        a = x * np.asarray(self.K, np.int64) + np.asarray(self.R, np.int64)
        y = np.right_shift(a, self.S)
        if self.rounding == "RND_CONV" and self.S > 0:
            rem = a - np.left_shift(y, self.S)
            half = np.int64(1) << np.int64(self.S - 1)
            y = y + ((rem > half) | ((rem == half) & ((y & 1) == 1)))
        return np.clip(y, self.out.min_code, self.out.max_code)


#: Rounding modes a form may use (the ``Quantize`` after the ``Affine``).
ROUNDINGS = ("TRN", "RND_CONV")


def tau(level, S: int, rounding: str):
    """The smallest accumulator ``a`` with ``rnd(a / 2**S) >= level`` (ints or int64 arrays):
    ``level * 2**S`` for the floor; for half-to-even ``level * 2**S - 2**(S-1)`` plus one when
    ``level`` is odd (the tie ``level - 1/2`` rounds up to ``level`` only when it is even)."""
    if rounding == "TRN" or S == 0:
        return level << S
    return (level << S) - (1 << (S - 1)) + (level & 1)


def _rnd(a: int, S: int, rounding: str) -> int:
    """``rnd(a / 2**S)`` of a Python int."""
    q = a >> S
    if rounding == "RND_CONV" and S > 0:
        rem, half = a - (q << S), 1 << (S - 1)
        q += 1 if rem > half or (rem == half and q & 1) else 0
    return q


# ----------------------------------------------------------------------------- channel data
@dataclass(frozen=True)
class _Channel:
    """One channel of a MultiThreshold restricted to ``[lo, hi]``: its value at ``lo``, its
    direction (+1 / -1) and the positions of its unit steps in ``(lo, hi]``, ascending."""

    v0: int
    sign: int
    steps: tuple


def channel_steps(thresholds: np.ndarray, base: np.ndarray, sign: np.ndarray, channels: int,
                  lo: int, hi: int) -> list:
    """Per channel, the MultiThreshold restricted to input codes ``[lo, hi]``.

    Args:
        thresholds: int codes ``[C or 1, T]``, rows ascending.
        base, sign: ``[C or 1]`` ints (sign +1 or -1).
        channels: C.
        lo, hi: the input code range.
    Returns:
        ``[(v0, sign, steps)]`` per channel: ``f(lo)``, the direction and the step positions
        (thresholds in ``(lo, hi]``; each one moves the output one level in ``sign``'s direction).
    """
    t = np.asarray(thresholds)
    out = []
    for c in range(channels):
        row = [int(v) for v in t[c if t.shape[0] > 1 else 0]]
        b = int(base[c if len(base) > 1 else 0])
        s = int(sign[c if len(sign) > 1 else 0])
        n0 = sum(1 for v in row if v <= lo)
        out.append(_Channel(b + s * n0, s, tuple(v for v in row if lo < v <= hi)))
    return out


def _form_steps(k: int, r: int, S: int, out: FixedType, lo: int, hi: int, limit: int, rounding: str = "TRN"):
    """(value at lo, direction, step list) of ``clamp(rnd((x*k + r) / 2**S))`` on ``[lo, hi]``,
    exact in Python ints; ``None`` when it has more than ``limit`` steps there."""
    def g(x):
        return min(max(_rnd(x * k + r, S, rounding), out.min_code), out.max_code)

    v0, v1 = g(lo), g(hi)
    if abs(v1 - v0) > limit:
        return None
    if v1 > v0:  # k > 0: step up to level j at ceil((tau(j) - r) / k)
        return v0, 1, tuple(max(lo, -((r - tau(j, S, rounding)) // k)) for j in range(v0 + 1, v1 + 1))
    if v1 < v0:  # k < 0: step down to level j (g <= j, i.e. not g >= j+1) at floor((r - tau(j+1)) / -k) + 1
        return v0, -1, tuple(max(lo, (r - tau(j + 1, S, rounding)) // (-k) + 1) for j in range(v0 - 1, v1 - 1, -1))
    return v0, 0, ()


def prove(form: ShiftForm, thresholds, base, sign) -> str | None:
    """Check ``form`` against a MultiThreshold on EVERY input code of ``[form.lo, form.hi]``.

    Exact integer arithmetic (Python ints): compares, per channel, the value at ``lo`` and the
    sorted step positions in ``(lo, hi]`` of both monotone step functions (see the module
    docstring); equal data means equal functions on the whole range.

    Returns:
        None when equal; otherwise a one-line description of the first difference.
    """
    chans = channel_steps(thresholds, base, sign, len(form.K), form.lo, form.hi)
    for c, (ch, k, r) in enumerate(zip(chans, form.K, form.R)):
        got = _form_steps(int(k), int(r), form.S, form.out, form.lo, form.hi, len(ch.steps), form.rounding)
        if got is None:
            return f"channel {c}: the form has more steps than the thresholds"
        v0, d, steps = got
        if v0 != ch.v0:
            return f"channel {c}: value {v0} at input code {form.lo}, thresholds give {ch.v0}"
        if steps != ch.steps or (steps and d != ch.sign):
            return f"channel {c}: step positions differ"
    return None


# ----------------------------------------------------------------------------- search
def _hull(pts: list, upper: bool) -> list:
    """The upper (``upper``) or lower convex hull of points ``(x, y)`` sorted by ``x`` then ``y``
    (Andrew's monotone chain, exact in Python ints).  ``max_i (y_i P - x_i K)`` over the points,
    for any ``P, K > 0``, is attained on the upper hull (``min``: the lower hull), so the step
    bounds of the other points never bind and are dropped (T thresholds -> a few vertices)."""
    out: list = []
    for p in pts:
        while len(out) >= 2:
            (ox, oy), (ax, ay) = out[-2], out[-1]
            cross = (ax - ox) * (p[1] - oy) - (ay - oy) * (p[0] - ox)
            if (cross >= 0) if upper else (cross <= 0):
                out.pop()
            else:
                break
        out.append(p)
    return out


def _parity_hulls(pts: list, upper: bool) -> list:
    """:func:`_hull` of the even-level and of the odd-level points separately: the half-to-even
    bound ``tau(level)`` adds ``level & 1`` to ``level * 2**S - 2**(S-1)``, a term constant within
    each parity class only, so the hull argument holds per class (for the floor the union is
    merely a few points more than one hull)."""
    return _hull([p for p in pts if p[1] % 2 == 0], upper) + _hull([p for p in pts if p[1] % 2], upper)


def _constraints(chans, lo: int, hi: int, omin: int, omax: int):
    """Padded arrays of the bounds ``L_i(K) = lvl_i * 2**S + a_i - b_i K`` (lower) and
    ``U_i(K) = lvl_i * 2**S + a_i - b_i K`` (upper) of the non-constant channels, each
    normalized to a non-decreasing step (mirrored when sign = -1)."""
    rows_l, rows_u = [], []
    for ch in chans:
        if ch.sign > 0:
            v0, cmin, cmax = ch.v0, omin, omax
        else:
            v0, cmin, cmax = -ch.v0, -omax, -omin
        m = len(ch.steps)
        v1 = v0 + m
        L = [(lvl, 0, u) for u, lvl in _parity_hulls([(u, v0 + i + 1) for i, u in enumerate(ch.steps)], True)]
        U = [(lvl, -1, u) for u, lvl in _parity_hulls([(u - 1, v0 + i + 1) for i, u in enumerate(ch.steps)], False)]
        if v0 > cmin:
            L.append((v0, 0, lo))
        U.append((v0 + 1, -1, lo))
        if v1 < cmax:
            U.append((v1 + 1, -1, hi))
        rows_l.append(L)
        rows_u.append(U)

    def pad(rows, fill):
        n = max(len(r) for r in rows)
        lvl = np.zeros((len(rows), n), np.int64)
        a = np.full((len(rows), n), fill, np.int64)
        b = np.zeros((len(rows), n), np.int64)
        for i, r in enumerate(rows):
            arr = np.asarray(r, np.int64).reshape(-1, 3)
            lvl[i, :len(r)], a[i, :len(r)], b[i, :len(r)] = arr[:, 0], arr[:, 1], arr[:, 2]
        return lvl, a, b

    return pad(rows_l, -_BIG), pad(rows_u, _BIG)


def _psi(S: int, K: np.ndarray, cl, cu, rounding: str = "TRN"):
    """``max_i L_i(K) - min_i U_i(K)`` and the two bounds, per channel (``K``: ``[C', 1]``)."""
    lvl, a, b = cl
    L = np.where(a == -_BIG, -_BIG, tau(lvl, S, rounding) + a - b * K).max(axis=1)
    lvl, a, b = cu
    U = np.where(a == _BIG, _BIG, tau(lvl, S, rounding) + a - b * K).min(axis=1)
    return L - U, L, U


def _brackets(S: int, chans, kmax: int, rounding: str = "TRN"):
    """Per channel a necessary range ``[a, b]`` of ``K`` at shift ``S``: the first and last steps
    ``u_1``, ``u_m`` (``m >= 2``, ``d = u_m - u_1``, ``n = tau(v0+m) - tau(v0+1)``, about
    ``(m-1) 2**S``) force ``n + 1 <= (d+1) K`` and, for ``d >= 2``, ``(d-1) K <= n - 1`` (their
    two step intervals must meet).  Clipped to ``[1, kmax]``; ``a > b``: no ``K`` at this shift."""
    a = np.ones(len(chans), np.int64)
    b = np.full(len(chans), kmax, np.int64)
    for i, ch in enumerate(chans):
        m = len(ch.steps)
        if m < 2:
            continue
        d = ch.steps[-1] - ch.steps[0]
        v0 = ch.v0 if ch.sign > 0 else -ch.v0
        n = tau(v0 + m, S, rounding) - tau(v0 + 1, S, rounding)
        a[i] = min(max(1, -(-(n + 1) // (d + 1))), kmax + 1)
        if d >= 2:
            b[i] = min(kmax, (n - 1) // (d - 1))
    return a, b


def _solve(S: int, cl, cu, a: np.ndarray, b: np.ndarray, rounding: str = "TRN"):
    """Smallest feasible ``K`` in ``[a, b]`` per channel at shift ``S`` (0 where none) and its
    offset interval ``[L, U]``."""
    n = cl[0].shape[0]
    ok0 = a <= b
    a, b = np.where(ok0, a, 1), np.where(ok0, b, 1)
    lo_k = a.copy()
    while True:  # ternary search of the convex psi on [a, b]
        wide = b - a > 2
        if not wide.any():
            break
        third = (b - a) // 3
        m1, m2 = a + third, b - third
        p1 = _psi(S, m1[:, None], cl, cu, rounding)[0]
        p2 = _psi(S, m2[:, None], cl, cu, rounding)[0]
        na = np.where(p1 > p2, m1 + 1, np.where(p1 == p2, m1, a))
        nb = np.where(p1 < p2, m2 - 1, np.where(p1 == p2, m2, b))
        a, b = np.where(wide, na, a), np.where(wide, nb, b)
    best = a.copy()
    bestp = _psi(S, a[:, None], cl, cu, rounding)[0]
    for off in (1, 2):
        k = np.minimum(a + off, b)
        p = _psi(S, k[:, None], cl, cu, rounding)[0]
        better = p < bestp
        best, bestp = np.where(better, k, best), np.where(better, p, bestp)
    ok = ok0 & (bestp <= 0)
    # the feasible K form an interval containing best: bisect down to its smallest element
    hi_k = best.copy()
    while True:
        open_ = ok & (lo_k < hi_k)
        if not open_.any():
            break
        mid = (lo_k + hi_k) // 2
        feas = _psi(S, mid[:, None], cl, cu, rounding)[0] <= 0
        hi_k = np.where(open_ & feas, mid, hi_k)
        lo_k = np.where(open_ & ~feas, mid + 1, lo_k)
    K = np.where(ok, hi_k, 0)
    _, L, U = _psi(S, np.maximum(K, 1)[:, None], cl, cu, rounding)
    return ok, K, L, U


@dataclass(frozen=True)
class SearchResult:
    """What :func:`find_shift_form` found: the proved ``form`` or ``None`` and, then, ``reason``
    (one line: which channel has no form, or which width cap was hit)."""

    form: ShiftForm | None
    reason: str = ""


def find_shift_form(thresholds, base, sign, channels: int, lo: int, hi: int, out: FixedType,
                    max_width: int = MAX_WIDTH, max_const_bits: int = MAX_WIDTH) -> SearchResult:
    """Search and prove a multiply-and-shift form of a MultiThreshold on input codes ``[lo, hi]``.

    Args:
        thresholds: int codes ``[C or 1, T]`` (rows ascending), the input's binary point.
        base, sign: ints ``[C or 1]`` (sign +1 / -1).
        channels: C, the length of the last axis.
        lo, hi: the input code range (e.g. the accumulator type's ``min_code``/``max_code``).
        out: the clamp type: its code range must contain every output code of the op (e.g. the
            op's ``to`` with TRN rounding and SAT saturation).
        max_width: cap on the bits of the ``x * K + R`` accumulator (default the IR's 62).
        max_const_bits: cap on the bits of ``K`` and of ``R`` (e.g. 53 where constants travel as
            float64).
    Returns:
        :class:`SearchResult` with the smallest shift ``S`` (and, for it, the smallest ``|K|``
        per channel) that :func:`prove` accepts, or ``form=None`` with the reason.
    """
    lo, hi = int(lo), int(hi)
    if lo > hi:
        raise ValueError(f"empty input range [{lo}, {hi}]")
    base, sign = np.asarray(base).reshape(-1), np.asarray(sign).reshape(-1)
    chans = channel_steps(thresholds, base, sign, channels, lo, hi)
    for c, ch in enumerate(chans):
        vs = (ch.v0, ch.v0 + ch.sign * len(ch.steps))
        if min(vs) < out.min_code or max(vs) > out.max_code:
            return SearchResult(None, f"channel {c}: output codes {min(vs)}..{max(vs)} outside the clamp range "
                                      f"of {out}")
    amax = max(abs(lo), abs(hi), 1)
    levels = max(abs(out.min_code), abs(out.max_code)) + 2
    s_max = max(0, min(max_width, (_LIM // levels).bit_length() - 1))
    kmax = max(1, min(_LIM // amax, (1 << max_const_bits) - 1))
    reasons = []
    for rounding in ROUNDINGS:  # the floor first (no rounding adder), then half to even
        res = _search(chans, thresholds, base, sign, lo, hi, out, s_max, kmax, max_width, max_const_bits, rounding)
        if res.form is not None:
            return res
        reasons.append(res.reason)
    return SearchResult(None, f"{reasons[0]}; with round-half-to-even: {reasons[1]}" if reasons[1] != reasons[0]
                        else reasons[0])


def _search(chans, thresholds, base, sign, lo, hi, out, s_max, kmax, max_width, max_const_bits,
            rounding) -> SearchResult:
    """:func:`find_shift_form` for one rounding mode."""
    channels = len(chans)
    moving = [c for c, ch in enumerate(chans) if ch.steps]
    K, R, S = [0] * channels, [0] * channels, 0
    if moving:
        sub = [chans[c] for c in moving]
        cl, cu = _constraints(sub, lo, hi, out.min_code, out.max_code)
        found, bad = None, moving[0]
        ever = np.zeros(len(moving), bool)  # channels feasible at some shift tried
        for S in range(s_max + 1):  # smallest shift first (a form at S gives one at S+1 while 2K fits)
            a, b = _brackets(S, sub, kmax, rounding)
            if (a > kmax).any():  # the lower bound only grows with S
                if ever.all():
                    bad = moving[int(np.argmax(a > kmax))]
                break
            ok, kk, L, U = _solve(S, cl, cu, a, b, rounding)
            if ok.all():
                found = S
                break
            ever |= ok
            bad = moving[int(np.argmin(ever))] if not ever.all() else moving[int(np.argmin(ok))]
        if found is None:
            return SearchResult(None, f"channel {bad}: its {len(chans[bad].steps)} thresholds in [{lo}, {hi}] are "
                                      f"not the steps of any multiply-and-shift form with a shift up to {s_max} "
                                      f"bits and a multiplier below 2**{kmax.bit_length()}")
        for i, c in enumerate(moving):
            k, r = int(kk[i]), min(max(0, int(L[i])), int(U[i]))
            if chans[c].sign < 0:  # mirrored: -floor(a / P) = floor((-a + P - 1) / P); -rne(a / P) = rne(-a / P)
                k, r = -k, ((1 << S) - 1 - r if rounding == "TRN" else -r)
            K[c], R[c] = k, r
    for c, ch in enumerate(chans):
        if not ch.steps:  # constant on [lo, hi]: K = 0, rnd(R / 2**S) == v0 (or clamps to it)
            v = ch.v0
            lo_r = tau(v, S, rounding) if v > out.min_code else -_BIG
            hi_r = tau(v + 1, S, rounding) - 1 if v < out.max_code else _BIG
            R[c] = min(max(0, lo_r), hi_r)
    form = ShiftForm(tuple(K), tuple(R), S, out, lo, hi, rounding)
    if form.acc_bits() > max_width:
        return SearchResult(None, f"the form needs a {form.acc_bits()}-bit accumulator (shift {S}), more than "
                                  f"{max_width}")
    r_bits = bits_for_range(min(R), max(R))[0]
    if form.k_bits > max_const_bits or r_bits > max_const_bits:
        return SearchResult(None, f"the form needs {form.k_bits}-bit multipliers and {r_bits}-bit offsets "
                                  f"(shift {S}), more than {max_const_bits}")
    why = prove(form, thresholds, base, sign)
    if why is not None:  # the search and the proof disagree: never use an unproved form
        return SearchResult(None, f"candidate form failed the exact check ({why})")
    return SearchResult(form)


# ----------------------------------------------------------------------------- IR helpers
def clamp_type(to: FixedType, rounding: str = "TRN") -> FixedType:
    """The ``Quantize`` type of a form into MultiThreshold output type ``to``: ``to`` with the
    form's ``rounding`` (TRN: the floor; RND_CONV: half to even) and SAT saturation (its clamp;
    ``SAT_SYM`` kept, which clamps to the symmetric range).  Same width, binary point and
    signedness as ``to``, so every output code of the op is one of its codes."""
    return to.with_modes(rounding, "SAT_SYM" if to.saturation == "SAT_SYM" else "SAT")


def node_clamp_type(node) -> FixedType:
    """:func:`clamp_type` of MultiThreshold ``node``'s ``to``, SAT_SYM when ``to`` is signed and no
    output level (``base``, ``base + sign * T`` per channel) is its most negative code: a narrow
    signed Quant (QONNX ``narrow=1``), whose staircase a SAT clamp would continue one level too far."""
    to, p = node.attrs["to"], node.params
    base, sign = (np.asarray(p[k].data, dtype=np.int64).reshape(-1) for k in ("base", "sign"))
    low = min(int(base.min()), int((base + sign * int(p["thresholds"].shape[1])).min()))
    return clamp_type(to).with_modes(None, "SAT_SYM") if to.signed and to.width > 1 and low > to.min_code \
        else clamp_type(to)


def node_shift_form(node, in_type: FixedType, max_width: int = MAX_WIDTH,
                    max_const_bits: int = MAX_WIDTH) -> SearchResult:
    """:func:`find_shift_form` for MultiThreshold ``node`` whose input has type ``in_type``: the
    range is every code of ``in_type``, the clamp :func:`node_clamp_type` (the node's ``to`` with
    TRN rounding and SAT, or SAT_SYM for a narrow signed output).  A caller's ``Quantize`` type is
    ``clamp_type(form.out, form.rounding)``."""
    p = node.params
    t = p["thresholds"].data
    c = max(int(t.shape[0]), int(p["base"].shape[0]), int(p["sign"].shape[0]))
    return find_shift_form(t, p["base"].data, p["sign"].data, c, in_type.min_code, in_type.max_code,
                           node_clamp_type(node), max_width, max_const_bits)


def affine_constants(form: ShiftForm, in_type: FixedType, channels: int):
    """The fixed-point ``Affine`` constants of ``form`` for input type ``in_type`` and output
    (``to``) fraction bits ``form.out.frac_bits``: ``scale = K * 2**(F_in - S - F_out)`` and
    ``bias = R * 2**-(S + F_out)``, so that the Affine's codes (``S + F_out`` fraction bits) are
    exactly ``x * K + R`` and a TRN/SAT ``Quantize`` into ``form.out`` is the form.

    Returns:
        ``(scale, bias)`` :class:`~qdeploy.compiler.ir.graph.Const` of shape ``[channels]``.
    """
    f_acc = form.S + form.out.frac_bits
    k = np.broadcast_to(np.asarray(form.K, np.int64), (channels,))
    r = np.broadcast_to(np.asarray(form.R, np.int64), (channels,))
    wk, sk = bits_for_range(int(k.min()), int(k.max()))
    wr, sr = bits_for_range(int(r.min()), int(r.max()))
    f_k = f_acc - in_type.frac_bits
    return Const(k, FixedType(wk, wk - f_k, sk)), Const(r, FixedType(wr, wr - f_acc, sr))
