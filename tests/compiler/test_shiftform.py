"""Multiply-and-shift forms of MultiThreshold (compiler/ir/shiftform.py).

Oracle: requantizers computed brute force in exact rational arithmetic (``fractions.Fraction``)
for every input code; the thresholds handed to the search are read off that table (independent
of the search's own algebra), and the form found is checked on every code of the range.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from qdeploy.compiler import reference as ref
from qdeploy.compiler.ir import Const, GraphBuilder, parse_type
from qdeploy.compiler.ir.shiftform import ShiftForm, find_shift_form, prove
from tests.requant_oracle import channel_thresholds


def _round_half_even(q: Fraction) -> int:
    fl = math.floor(q)
    rem = q - fl
    return fl + (1 if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and fl % 2) else 0)


def _round_half_up(q: Fraction) -> int:
    return math.floor(q + Fraction(1, 2))


def requant_table(lo, hi, m: Fraction, b: Fraction, zp: int, omin: int, omax: int, rnd=_round_half_up) -> list[int]:
    """clamp(rnd(x*m + b) + zp, omin, omax) for x = lo..hi (a Quant after an affine map)."""
    return [min(max(rnd(x * m + b) + zp, omin), omax) for x in range(lo, hi + 1)]


def thresholds_from_table(tables, lo, T, omin=-(1 << 40), omax=1 << 40):
    """MultiThreshold (thresholds [C, T], base, sign) reproducing per-channel monotone tables on
    lo..lo+len-1: a step of d levels at x gives d thresholds equal to x.  Unused slots are put at
    ``lo`` (always reached; the base moves back accordingly) as far as ``[omin, omax]`` allows,
    the rest above the range (never reached), so that ``base + sign * T`` stays in range."""
    rows, base, sign = [], [], []
    hi = lo + len(tables[0]) - 1
    for vals in tables:
        s = 1 if vals[-1] >= vals[0] else -1
        steps = []
        for i in range(1, len(vals)):
            d = vals[i] - vals[i - 1]
            assert d * s >= 0, "table is not monotone"
            steps += [lo + i] * abs(d)
        assert len(steps) <= T
        room = (vals[0] - omin) if s > 0 else (omax - vals[0])
        below = min(T - len(steps), room)
        rows.append([lo] * below + steps + [hi + 6] * (T - len(steps) - below))
        base.append(vals[0] - s * below)
        sign.append(s)
    return np.array(rows, np.int64), np.array(base), np.array(sign)


def mt_reference(x, t, base, sign, out_t, in_t):
    """The IR reference interpreter's MultiThreshold on codes ``x`` ([N, C])."""
    b = GraphBuilder("mt")
    v = b.input("x", (x.shape[-1],), in_t)
    y = b.add("mt", "MultiThreshold", [v], attrs={"to": out_t},
              params={"thresholds": Const(t, parse_type(f"fixed<{in_t.width + 2},{in_t.int_bits + 2}>")),
                      "base": Const(base, parse_type("int<16>")), "sign": Const(sign, parse_type("int<2>"))})
    b.output(y)
    g = b.build()
    return ref.execute(g, {"x": x}, codes=True)[y]


CHANNELS = [  # (m, b, zp): requant multipliers, non-dyadic; sign -1; a constant channel (m = 0)
    (Fraction(1, 37), Fraction(3, 7), 5),
    (Fraction(-3, 101), Fraction(-11, 5), -3),
    (Fraction(2, 7), Fraction(1, 3), 0),
    (Fraction(0), Fraction(9, 4), 1),
    (Fraction(1, 1000), Fraction(-1, 3), -100),
    (Fraction(-1, 13), Fraction(0), 20),
]


@pytest.mark.parametrize("out", ["int<8>", "uint<4>", "int<6>"])
def test_requantizer_form_exact_on_every_code(out):
    lo, hi = -3000, 3000
    out_t = parse_type(out).with_modes("TRN", "SAT")
    tables = [requant_table(lo, hi, m, b, zp, out_t.min_code, out_t.max_code) for m, b, zp in CHANNELS]
    t, base, sign = thresholds_from_table(tables, lo, out_t.max_code - out_t.min_code, out_t.min_code,
                                         out_t.max_code)
    res = find_shift_form(t, base, sign, len(CHANNELS), lo, hi, out_t)
    assert res.form is not None, res.reason
    f = res.form
    x = np.repeat(np.arange(lo, hi + 1)[:, None], len(CHANNELS), axis=1)
    want = np.array(tables).T
    assert np.array_equal(f.apply(x), want)
    in_t = parse_type("int<13>")
    assert np.array_equal(mt_reference(x, t, base, sign, out_t, in_t), want)  # the op itself agrees
    assert f.K[3] == 0  # the constant channel
    assert f.K[1] < 0 and f.K[5] < 0 and f.K[0] > 0
    assert prove(f, t, base, sign) is None


def test_smallest_shift_is_found():
    """S is minimal: no (K, R) with shift S - 1 reproduces the table (brute force over every K and
    every R that can give the right value at ``hi``)."""
    lo, hi = 0, 200
    out_t = parse_type("uint<5>").with_modes("TRN", "SAT")
    tables = [requant_table(lo, hi, Fraction(1, 13), Fraction(1, 3), 0, 0, 31)]
    assert tables[0][-1] < 31
    t, base, sign = thresholds_from_table(tables, lo, 31, 0, 31)
    f = find_shift_form(t, base, sign, 1, lo, hi, out_t).form
    assert f is not None and f.S >= 1
    x = np.arange(lo, hi + 1)
    want = np.array(tables[0])
    assert np.array_equal(f.apply(x[:, None])[:, 0], want)
    S = f.S - 1
    P = 1 << S
    assert S <= 10
    for k in range(1, P):  # slope 1/13 < 1: K < 2**S
        r = np.arange(want[-1] * P - hi * k, (want[-1] + 1) * P - hi * k)[:, None]  # h(hi) == want[-1]
        same = np.all(np.clip((x * k + r) >> S, 0, 31) == want, axis=1)
        assert not same.any(), (k, S)


def test_duplicate_thresholds_and_broadcast_row():
    """Jumps of two and three levels at one code (equal thresholds), one row shared by every
    channel; and a function with two slopes, which no form has."""
    lo, hi = -40, 40
    out_t = parse_type("int<8>").with_modes("TRN", "SAT")
    vals = [min(max(_round_half_up(Fraction(5 * x, 2) + Fraction(1, 3)), -128), 127) for x in range(lo, hi + 1)]
    t, base, sign = thresholds_from_table([vals], lo, 255, -128, 127)
    inside = t[0][(t[0] > lo) & (t[0] <= hi)]
    assert len(set(inside.tolist())) < len(inside)  # really has equal thresholds
    f = find_shift_form(t, base, sign, 3, lo, hi, out_t).form
    assert f is not None
    x = np.repeat(np.arange(lo, hi + 1)[:, None], 3, axis=1)
    assert np.array_equal(f.apply(x), np.repeat(np.array(vals)[:, None], 3, axis=1))
    vals = [min(max(x // 4 if x < 0 else x // 2, -128), 127) for x in range(lo, hi + 1)]
    t, base, sign = thresholds_from_table([vals], lo, 255, -128, 127)
    res = find_shift_form(t, base, sign, 3, lo, hi, out_t)
    assert res.form is None and res.reason.startswith("channel 0:")


def test_round_half_even_ties_have_no_form():
    """Round-half-to-even with exact ties (m = 1/1000, b = -1/2) makes step widths alternate
    999 / 1001: no single multiplier fits (a floor form's widths differ by at most one)."""
    lo, hi = -3000, 3000
    out_t = parse_type("int<8>").with_modes("TRN", "SAT")
    tables = [requant_table(lo, hi, Fraction(1, 1000), Fraction(-1, 2), 0, -128, 127, rnd=_round_half_even)]
    t, base, sign = thresholds_from_table(tables, lo, 255)
    widths = set(np.diff(t[0][(t[0] > lo) & (t[0] <= hi)]).tolist())
    assert {999, 1001} <= widths
    res = find_shift_form(t, base, sign, 1, lo, hi, out_t)
    assert res.form is None and res.reason.startswith("channel 0:")
    # without exact ties (b = -1/3) round-half-even has a form
    tables = [requant_table(lo, hi, Fraction(1, 1000), Fraction(-1, 3), 0, -128, 127, rnd=_round_half_even)]
    t, base, sign = thresholds_from_table(tables, lo, 255)
    assert find_shift_form(t, base, sign, 1, lo, hi, out_t).form is not None


def test_irregular_thresholds_have_no_form():
    """FINN-style arbitrary thresholds: no form; the reason names the channel."""
    lo, hi = -500, 500
    out_t = parse_type("uint<3>").with_modes("TRN", "SAT")
    good = requant_table(lo, hi, Fraction(1, 90), Fraction(0), 3, 0, 7)
    t, base, sign = thresholds_from_table([good, good], lo, 7)
    t[1] = [-400, -390, -100, 0, 5, 300, 301]  # irregular gaps
    res = find_shift_form(t, base, sign, 2, lo, hi, out_t)
    assert res.form is None
    assert res.reason.startswith("channel 1:")
    # the regular channel alone does have one
    assert find_shift_form(t[:1], base[:1], sign[:1], 1, lo, hi, out_t).form is not None


def test_proof_rejects_a_wrong_form():
    lo, hi = -200, 200
    out_t = parse_type("int<4>").with_modes("TRN", "SAT")
    tables = [requant_table(lo, hi, Fraction(1, 29), Fraction(1, 5), 0, -8, 7)]
    t, base, sign = thresholds_from_table(tables, lo, 15)
    f = find_shift_form(t, base, sign, 1, lo, hi, out_t).form
    assert prove(f, t, base, sign) is None
    x = np.arange(lo, hi + 1)[:, None]
    for dk, dr in ((1, 0), (0, 1 << f.S), (-1, 0), (0, -(1 << f.S))):
        bad = ShiftForm((f.K[0] + dk,), (f.R[0] + dr,), f.S, f.out, lo, hi)
        differs = not np.array_equal(bad.apply(x)[:, 0], np.array(tables[0]))
        assert (prove(bad, t, base, sign) is None) == (not differs)
        if dr:
            assert differs  # shifting the offset by one output level is always wrong here


def test_wide_accumulator_range_proved_on_samples_against_fractions():
    """A 20-bit accumulator range (too large to enumerate): the exact proof accepts the form and
    random codes agree with the rational oracle."""
    lo, hi = -(1 << 19), (1 << 19) - 1
    out_t = parse_type("int<8>").with_modes("TRN", "SAT")
    ms = [(Fraction(1, 1531), Fraction(7, 3), -4), (Fraction(-5, 7777), Fraction(1, 3), 10)]
    rng = np.random.default_rng(3)
    tables_t, bases, signs = [], [], []
    for m, b, zp in ms:  # thresholds: smallest x reaching each level (exact, by bisection on Fractions)
        def y(x, m=m, b=b, zp=zp):
            return min(max(_round_half_even(x * m + b) + zp, -128), 127)
        row, v0, s = channel_thresholds(lo, hi, y, 255, -128, 127)
        tables_t.append(row)
        bases.append(v0)
        signs.append(s)
    t = np.array(tables_t)
    f = find_shift_form(t, np.array(bases), np.array(signs), 2, lo, hi, out_t).form
    assert f is not None
    xs = np.concatenate([rng.integers(lo, hi + 1, 4000), [lo, hi], t[:, :255].reshape(-1).clip(lo, hi),
                         (t[:, :255].reshape(-1) - 1).clip(lo, hi)])
    got = f.apply(np.repeat(xs[:, None], 2, axis=1))
    for c, (m, b, zp) in enumerate(ms):
        want = [min(max(_round_half_even(int(x) * m + b) + zp, -128), 127) for x in xs]
        assert got[:, c].tolist() == want


def test_width_cap_refuses_with_reason():
    lo, hi = -3000, 3000
    out_t = parse_type("int<8>").with_modes("TRN", "SAT")
    tables = [requant_table(lo, hi, Fraction(1, 37), Fraction(3, 7), 5, -128, 127)]
    t, base, sign = thresholds_from_table(tables, lo, 255)
    assert find_shift_form(t, base, sign, 1, lo, hi, out_t).form is not None
    res = find_shift_form(t, base, sign, 1, lo, hi, out_t, max_width=16)
    assert res.form is None and res.reason


def test_output_outside_clamp_type_is_refused():
    t = np.array([[0, 1]])
    res = find_shift_form(t, np.array([6]), np.array([1]), 1, -4, 4, parse_type("int<3>").with_modes("TRN", "SAT"))
    assert res.form is None and "outside the clamp range" in res.reason


def test_dyadic_requantizer_with_ties_gets_a_round_half_even_form():
    """m = 3/32, b = 1/4 (a power-of-two requantizer): x*m + b hits exact .5 ties, which round half
    to even alternate up and down, so the step widths alternate and no floor form exists; the
    half-to-even form does (and the proof checks it on every code).  The zero point must be added
    before rounding (QONNX Quant) or be even."""
    lo, hi = -2000, 2000
    out_t = parse_type("int<8>").with_modes("TRN", "SAT")
    chans = [(Fraction(3, 32), Fraction(1, 4), 0), (Fraction(-5, 64), Fraction(0), 4), (Fraction(0), Fraction(1, 2), 0)]
    tables = [requant_table(lo, hi, m, b, zp, -128, 127, rnd=_round_half_even) for m, b, zp in chans]
    t, base, sign = thresholds_from_table(tables, lo, 255, -128, 127)
    x0 = np.arange(lo, hi + 1)
    assert any((x * Fraction(3, 32) + Fraction(1, 4)).denominator == 2 for x in range(lo, hi + 1))  # real ties
    res = find_shift_form(t, base, sign, 3, lo, hi, out_t)
    assert res.form is not None, res.reason
    f = res.form
    assert f.rounding == "RND_CONV" and f.K[2] == 0 and f.K[1] < 0
    x = np.repeat(x0[:, None], 3, axis=1)
    assert np.array_equal(f.apply(x), np.array(tables).T)
    # an odd zero point added AFTER rounding (ONNX QuantizeLinear) sends ties to odd: no form
    odd = [requant_table(lo, hi, Fraction(-5, 64), Fraction(0), 3, -128, 127, rnd=_round_half_even)]
    to, bo, so = thresholds_from_table(odd, lo, 255, -128, 127)
    assert find_shift_form(to, bo, so, 1, lo, hi, out_t).form is None
    # the same thresholds shifted by one code at a single tie are no form of either kind
    t2 = t.copy()
    i = int(np.argmax((t2[0] > lo) & (t2[0] < hi)))
    t2[0, i] -= 1
    assert find_shift_form(t2, base, sign, 3, lo, hi, out_t).form is None


def test_floor_forms_are_preferred_and_prove_checks_the_rounding():
    """A requantizer without ties gets a floor (TRN) form; the same K, R, S read as half-to-even is
    a different function there, and prove says so."""
    lo, hi = -3000, 3000
    out_t = parse_type("int<8>").with_modes("TRN", "SAT")
    tables = [requant_table(lo, hi, Fraction(1, 37), Fraction(3, 7), 5, -128, 127)]
    t, base, sign = thresholds_from_table(tables, lo, 255, -128, 127)
    f = find_shift_form(t, base, sign, 1, lo, hi, out_t).form
    assert f.rounding == "TRN"
    g = ShiftForm(f.K, f.R, f.S, f.out, lo, hi, "RND_CONV")
    x = np.arange(lo, hi + 1)[:, None]
    assert not np.array_equal(g.apply(x), f.apply(x))
    assert prove(g, t, base, sign) is not None


def test_every_dyadic_round_half_even_requantizer_has_a_form():
    """Random exactly dyadic requantizers (m = a / 2**k, b = c / 2**j, even zero point) under round
    half to even: a form always exists (K = m 2**S, R = (b + zp) 2**S for S large enough), so the
    search must find one -- with the step bounds reduced to the convex hull of each level parity
    (one hull over all levels misses bounds that the odd-level +1 makes binding: ``known`` failed
    that way) -- and it equals the oracle on every code."""
    rng = np.random.default_rng(1)
    lo, hi = -600, 600
    out = parse_type("int<6>").with_modes("TRN", "SAT")
    x = np.repeat(np.arange(lo, hi + 1)[:, None], 3, axis=1)
    known = [(Fraction(-27, 32), Fraction(-7, 2), 2), (Fraction(-9, 128), Fraction(2), -2),
             (Fraction(1, 2), Fraction(-7, 4), -2)]
    for trial in range(21):
        chans = known if trial == 0 else [
            (Fraction(int(rng.integers(-40, 41)), 2 ** int(rng.integers(3, 9))),
             Fraction(int(rng.integers(-16, 17)), 2 ** int(rng.integers(0, 4))), 2 * int(rng.integers(-3, 4)))
            for _ in range(3)]
        tabs = [requant_table(lo, hi, m, b, zp, -32, 31, rnd=_round_half_even) for m, b, zp in chans]
        t, base, sign = thresholds_from_table(tabs, lo, 63, -32, 31)
        res = find_shift_form(t, base, sign, 3, lo, hi, out)
        assert res.form is not None, (chans, res.reason)
        assert np.array_equal(res.form.apply(x), np.array(tabs).T), chans


def test_narrow_signed_output_clamps_symmetrically():
    """A narrow signed 4-bit requantizer (QONNX ``narrow=1``: codes -7..7) whose staircase goes on
    below -7 inside the input range: with a SAT clamp (-8..7) no form exists (it would output -8);
    :func:`node_clamp_type` sees that no level reaches -8 and clamps with SAT_SYM, and the form found
    equals the Fraction table on every code."""
    from qdeploy.compiler.ir import Node
    from qdeploy.compiler.ir.shiftform import node_clamp_type, node_shift_form
    lo, hi = -400, 400
    chans = [(Fraction(1, 19), Fraction(2, 7), 0), (Fraction(-3, 41), Fraction(-1, 5), 0)]
    tables = [requant_table(lo, hi, m, b, zp, -7, 7, rnd=_round_half_even) for m, b, zp in chans]
    t, base, sign = thresholds_from_table(tables, lo, 14, -7, 7)
    to = parse_type("int<4>")
    assert find_shift_form(t, base, sign, 2, lo, hi, to.with_modes("TRN", "SAT")).form is None
    node = Node("mt", "MultiThreshold", ("x",), ("y",), {"to": to},
                {"thresholds": Const(t, parse_type("int<12>")), "base": Const(base, parse_type("int<5>")),
                 "sign": Const(sign, parse_type("int<2>"))})
    assert node_clamp_type(node).saturation == "SAT_SYM"
    f = node_shift_form(node, parse_type("int<10>").with_modes("TRN", "SAT")).form
    assert f is not None and f.out.min_code == -7
    x = np.repeat(np.arange(-512, 512)[:, None], 2, axis=1)
    full = [requant_table(-512, 511, m, b, zp, -7, 7, rnd=_round_half_even) for m, b, zp in chans]
    assert np.array_equal(f.apply(x), np.array(full).T)
    # a level at -8 (not narrow): SAT kept
    node8 = node.replace(params={**node.params, "base": Const(base - 1, parse_type("int<5>"))})
    assert node_clamp_type(node8).saturation == "SAT"
