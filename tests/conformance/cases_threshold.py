"""Conformance cases of the threshold requantizer (``MultiThreshold``) and of its multiply-and-shift
form after the ``requant_shift`` pass: appended to ``test_ops.CASES`` and reused by
``test_requant.py`` (many samples, hls4ml io_stream, the rational oracle)."""
from __future__ import annotations

from fractions import Fraction

import numpy as np

from qdeploy.compiler.ir import Const, GraphBuilder, parse_type
from qdeploy.passes.requant_shift import requant_shift
from tests.requant_oracle import requant_params, round_half_even

from .conftest import Case, random_codes

T = parse_type


def W(rng, t, shape):
    t = T(t) if isinstance(t, str) else t
    return Const(random_codes(rng, t, shape), t)


def _multi_threshold(b, p, rng):
    """Random sorted thresholds (some outside the input range): no multiply-and-shift form, so
    hls4ml refuses; per-channel rows and one row shared by every channel."""
    x = b.input(p + "x", (5, 6), T("fixed<10,6>"))
    t = np.sort(rng.integers(-530, 530, (6, 20)), axis=1)
    y = b.add(p + "mt", "MultiThreshold", [x], attrs={"to": T("int<8>")},
              params={"thresholds": Const(t, T("fixed<12,8>")), "base": Const(rng.integers(-100, 100, 6), T("int<8>")),
                      "sign": Const(rng.choice([-1, 1], 6), T("int<2>"))})
    t1 = np.sort(rng.integers(-512, 512, (1, 9)), axis=1)
    y1 = b.add(p + "mt1", "MultiThreshold", [x], attrs={"to": T("fixed<6,3,RND,SAT>")},
               params={"thresholds": Const(t1, T("fixed<12,8>")), "base": Const(np.array([-4]), T("int<4>")),
                       "sign": Const(np.array([1]), T("int<2>"))})
    return [y, y1]


#: Requantizers (m, b, zp) in output codes per accumulator code: non-dyadic multipliers, a bias,
#: a zero point; sign -1 channels and a constant channel (m = 0).
REQUANT = [(Fraction(1, 37), Fraction(3, 7), 5), (Fraction(-3, 101), Fraction(-11, 5), -3),
           (Fraction(2, 7), Fraction(1, 3), 0), (Fraction(0), Fraction(9, 4), 1), (Fraction(-1, 13), Fraction(0), 20)]
REQUANT_RELU = [(Fraction(1, 300), Fraction(1, 3), 2), (Fraction(-1, 77), Fraction(0), 0),
                (Fraction(0), Fraction(0), 0),
                (Fraction(5, 1001), Fraction(-7, 2), 0), (Fraction(1, 3), Fraction(1, 5), -9)]


def _requant_nodes(b, p, rng):
    """Dense accumulator -> MultiThreshold requantizers with thresholds from the exact rational
    oracle (tests/requant_oracle.py): a signed SAT output and an unsigned (ReLU-like) one."""
    x = b.input(p + "x", (3, 6), T("int<6>"))
    d = b.add(p + "d", "Dense", [x], params={"weight": W(rng, "int<4>", (6, 5)), "bias": W(rng, "int<8>", (5,))})
    acc = b.values[d].dtype
    outs = []
    for name, to, chans in (("rq", T("fixed<8,8,RND_CONV,SAT>"), REQUANT), ("rqu", T("ufixed<4,4>"), REQUANT_RELU)):
        prm = requant_params(acc.min_code, acc.max_code, chans, to, acc.frac_bits)
        outs.append(b.add(p + name, "MultiThreshold", [d], attrs={"to": to}, params=prm))
    return outs


def _requant_shifted(b, p, rng):
    """The requantizers after the ``requant_shift`` pass: Affine + Quantize on every target."""
    sub = GraphBuilder("sub")
    sub.output(*_requant_nodes(sub, p, rng))
    g = requant_shift(sub.build())
    assert "MultiThreshold" not in {n.op for n in g.nodes}
    for name in g.inputs:
        b.input(name, g.values[name].shape, g.values[name].dtype)
    for n in g.nodes:
        b.add_node(n)
    return list(g.outputs)


def _requant_fractional(b, p, rng):
    """Fractional binary points: input fixed<12,8> (4 fraction bits), outputs fixed<6,2> (SAT_SYM)
    and ufixed<5,1>; each as the threshold op and, after the pass, as Affine + Quantize."""
    x = b.input(p + "x", (4, 3), T("fixed<12,8>"))
    xt = b.values[x].dtype
    chans = [(Fraction(3, 17), Fraction(1, 3), 2), (Fraction(-2, 51), Fraction(5, 2) + Fraction(1, 7), 0),
             (Fraction(0), Fraction(-3, 4), 0)]
    outs = []
    for name, to in (("mt", T("fixed<6,2,RND_CONV,SAT_SYM>")), ("mtu", T("ufixed<5,1>"))):
        prm = requant_params(xt.min_code, xt.max_code, chans, to, xt.frac_bits)
        outs.append(b.add(p + name, "MultiThreshold", [x], attrs={"to": to}, params=prm))
    sub = GraphBuilder("sub")
    xs = sub.input(p + "xs", (4, 3), xt)
    sub.output(*[sub.add(p + n.name[len(p):] + "_s", n.op, [xs], attrs=dict(n.attrs), params=dict(n.params))
                 for n in b.nodes[-2:]])
    g = requant_shift(sub.build())
    assert "MultiThreshold" not in {n.op for n in g.nodes}
    b.input(xs, (4, 3), xt)
    for n in g.nodes:
        b.add_node(n)
    return outs + list(g.outputs)


#: Power-of-two requantizers rounding half to even, with exact ties (no floor form; a RND_CONV one).
REQUANT_RNE = [(Fraction(3, 32), Fraction(1, 4), 0), (Fraction(-5, 64), Fraction(0), 4),
               (Fraction(0), Fraction(1, 2), 0), (Fraction(1, 8), Fraction(-3, 2), -2)]


def _requant_rne(b, p, rng):
    """QONNX ``ROUND`` (half to even) requantizers with power-of-two multipliers: the op, and the
    pass's Affine + Quantize(RND_CONV) form on a second input."""
    xt = T("int<11>")
    to = T("int<7>")
    prm = requant_params(xt.min_code, xt.max_code, REQUANT_RNE, to, 0, rnd=round_half_even)
    x = b.input(p + "x", (2, 4), xt)
    y = b.add(p + "mt", "MultiThreshold", [x], attrs={"to": to}, params=prm)
    sub = GraphBuilder("sub")
    xs = sub.input(p + "xs", (2, 4), xt)
    sub.output(sub.add(p + "mts", "MultiThreshold", [xs], attrs={"to": to}, params=prm))
    g = requant_shift(sub.build())
    assert [n.op for n in g.nodes] == ["Affine", "Quantize"] and g.nodes[1].attrs["to"].rounding == "RND_CONV"
    b.input(xs, (2, 4), xt)
    for n in g.nodes:
        b.add_node(n)
    return [y, *g.outputs]


HLS = ("hls4ml",)
CASES_THRESHOLD = [
    Case("multi_threshold", "MultiThreshold", _multi_threshold, rejects=HLS),
    Case("requant_threshold", "MultiThreshold", _requant_nodes),
    Case("requant_shifted", "Affine", _requant_shifted),
    Case("requant_fractional", "MultiThreshold", _requant_fractional),
    Case("requant_rne", "MultiThreshold", _requant_rne),
]
