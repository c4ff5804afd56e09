"""compiler/ir/requant.py against brute force: MultiThreshold(acc) == clamp(round(relu?(acc*P+B)/s + z)),
computed with fractions.Fraction for every accumulator code of a small range, ties included."""
from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest

from qdeploy.compiler.errors import UnsupportedError
from qdeploy.compiler.ir.graph import Const, GraphBuilder
from qdeploy.compiler.ir.requant import (ROUNDING_MODES, QuantSpec, f32_at_least, float_input_thresholds,
                                         multithreshold_params, round_rational)
from qdeploy.compiler.ir.types import FLOAT32, FixedType
from qdeploy.compiler import reference


def _mt(params, x):
    """The MultiThreshold reference kernel (the op itself, via a one-node graph) on codes x [N, C]."""
    C = x.shape[1]
    b = GraphBuilder("mt")
    b.input("x", (C,), params.threshold_type.__class__(62, 62 - params.threshold_type.frac_bits, True))
    v = b.add("mt", "MultiThreshold", ["x"], {"to": params.out_type},
              {"thresholds": Const(params.thresholds, params.threshold_type),
               "base": Const(params.base, FixedType(62, 62, True)), "sign": Const(params.sign, FixedType(62, 62, True))})
    b.output(v)
    g = b.build()
    return reference.execute(g, {"x": x}, codes=True)[v]


def _numpy_round(mode):
    """qonnx's resolve_rounding_mode, on float64 (exact for the halves used below)."""
    return {"ROUND": np.round, "HALF_EVEN": np.round, "CEIL": np.ceil, "FLOOR": np.floor, "DOWN": np.fix,
            "ROUND_TO_ZERO": np.fix, "UP": lambda x: np.sign(x) * np.ceil(np.abs(x)),
            "HALF_UP": lambda x: np.sign(x) * np.floor(np.abs(x) + 0.5),
            "HALF_DOWN": lambda x: np.sign(x) * np.ceil(np.abs(x) - 0.5)}[mode]


@pytest.mark.parametrize("mode", ROUNDING_MODES)
def test_round_rational_matches_qonnx_numpy(mode):
    xs = [Fraction(k, 4) for k in range(-20, 21)]
    want = _numpy_round(mode)(np.array([float(x) for x in xs]))
    assert [round_rational(x, mode) for x in xs] == [int(w) for w in want]


def _brute(quant, P, B, relu, acc, C):
    out = np.zeros((len(acc), C), dtype=np.int64)
    for c in range(C):
        p, b = P[c % len(P)], B[c % len(B)]
        for i, a in enumerate(acc):
            u = a * p + b
            v = max(Fraction(0), u) if relu else u
            out[i, c] = quant.quantize(v, c)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_random_maps_match_brute_force(seed):
    rng = random.Random(seed)
    C = rng.choice([1, 3])
    bw = rng.randint(2, 8)
    signed = rng.random() < 0.5
    narrow = rng.random() < 0.5
    mode = rng.choice(ROUNDING_MODES)
    scale = tuple(Fraction(float(np.float32(rng.uniform(0.01, 0.5)))) for _ in range(rng.choice([1, C])))
    zp = tuple(rng.randint(-3, 3) if signed else rng.randint(0, 5) for _ in range(rng.choice([1, C])))
    quant = QuantSpec(scale, zp, bw, signed, narrow, mode)
    P = [Fraction(float(np.float32(rng.uniform(0.001, 0.02)))) * rng.choice([1, -1, 1]) for _ in range(C)]
    if C > 1:
        P[1] = Fraction(0)  # a dead channel
    B = [Fraction(float(np.float32(rng.uniform(-0.5, 0.5)))) for _ in range(C)]
    relu = rng.random() < 0.5
    lo, hi = -300, 300
    p = multithreshold_params(lo, hi, P, B, quant, relu)
    acc = np.arange(lo, hi + 1)
    got = _mt(p, np.repeat(acc[:, None], C, axis=1))
    want = _brute(quant, P, B, relu, acc, C)
    np.testing.assert_array_equal(got, want)
    assert (1 in p.dead) == (C > 1)
    assert ((p.sign == -1).any()) == any(x < 0 for x in P)


@pytest.mark.parametrize("mode", ROUNDING_MODES)
@pytest.mark.parametrize("relu", [False, True])
def test_exact_ties(mode, relu):
    """acc * P + B lands exactly on every half-integer (and integer) multiple of s: each tie is
    decided as the rounding mode says."""
    s = Fraction(3, 7)  # not a power of two
    quant = QuantSpec((s,), (2,), 4, True, False, mode)
    P = [s / 2]  # acc * s/2: every other code is a tie (a/2 + z)
    B = [Fraction(-5, 2) * s]
    lo, hi = -40, 40
    p = multithreshold_params(lo, hi, P, B, quant, relu)
    acc = np.arange(lo, hi + 1)
    got = _mt(p, acc[:, None])
    want = _brute(quant, P, B, relu, acc, 1)
    np.testing.assert_array_equal(got, want)
    assert len(set(want.ravel())) >= (6 if relu else 12)  # the range covers many steps, ties included


def test_bipolar_and_negative_scale_channel():
    quant = QuantSpec((Fraction(1, 3),), (0,), 1, True, False, "ROUND")
    P, B = [Fraction(1, 5), Fraction(-1, 5)], [Fraction(1, 10), Fraction(0)]
    p = multithreshold_params(-10, 10, P, B, quant)
    acc = np.arange(-10, 11)
    got = _mt(p, np.stack([acc, acc], 1))
    np.testing.assert_array_equal(got, _brute(quant, P, B, False, acc, 2))
    assert set(got.ravel()) == {-1, 1}


def test_unsupported_quantizers_are_refused():
    with pytest.raises(UnsupportedError, match="rounding mode"):
        multithreshold_params(0, 3, [1], [0], QuantSpec((Fraction(1),), (0,), 4, True, False, "STOCHASTIC"))
    with pytest.raises(UnsupportedError, match="bit width"):
        multithreshold_params(0, 3, [1], [0], QuantSpec((Fraction(1),), (0,), 20, True, False))


def test_f32_at_least():
    r = Fraction(1, 3)
    t = f32_at_least(r, False)
    assert t >= r and Fraction(float(np.nextafter(np.float32(float(t)), np.float32(0)))) < r
    one = Fraction(1)
    assert f32_at_least(one, False) == one
    assert f32_at_least(one, True) == Fraction(float(np.nextafter(np.float32(1), np.float32(2))))


@pytest.mark.parametrize("mode", ["ROUND", "FLOOR", "HALF_UP", "DOWN", "HALF_DOWN", "UP", "CEIL"])
def test_float_input_thresholds_match_qonnx_float32(mode):
    """float32 inputs, including every float32 neighbour of each real threshold, decided exactly like
    qonnx's own ``int_quant`` executor (float32 ``x / s + z`` then its rounding function): the source's
    arithmetic, not the real-number quotient."""
    from qonnx.custom_op.general.intquant import int_quant
    seed = ["ROUND", "FLOOR", "HALF_UP", "DOWN", "HALF_DOWN", "UP", "CEIL"].index(mode)
    rng = np.random.default_rng(seed)
    s32 = rng.uniform(0.003, 0.2, size=2).astype(np.float32)
    s32[0] = np.float32(1 / 3)  # float32 ties: x = 0.5 -> 1.5 in float32, 1.49999995 exactly
    scale = tuple(Fraction(float(v)) for v in s32)
    zp = (3, 0) if mode not in ("CEIL", "UP") else (3, 1)
    quant = QuantSpec(scale, zp, 8, False, False, mode)
    grid, p = float_input_thresholds(quant, 2)
    xs = [np.float32(v) for v in rng.uniform(-1, 60, size=400)] + [np.float32(k / 16) for k in range(-16, 64)]
    for c in range(2):
        for V, _ in quant.conditions(c)[::7]:
            x0 = np.float32(float(V))
            xs += [x0, np.nextafter(x0, np.float32(-1)), np.nextafter(x0, np.float32(100)),
                   np.nextafter(np.nextafter(x0, np.float32(100)), np.float32(100))]
    x = np.array(xs, dtype=np.float32)
    codes = grid.quantize_real(x)
    got = _mt(p, np.stack([codes, codes], 1))
    for c in range(2):
        deq = int_quant(x, s32[c], np.float32(zp[c]), np.float32(8), 0, 0, mode)  # float32 (q - z) * s
        want = np.round(deq.astype(np.float64) / np.float64(s32[c])).astype(np.int64) + zp[c]
        np.testing.assert_array_equal(got[:, c], want)
    if mode == "ROUND":  # inputs where float32 and the real quotient round apart (corpus zeropoint_mlp_b2) are covered
        assert any(quant.quantize(Fraction(float(v)), 0) != quant.quantize_f32(v, 0) for v in x)


def test_float_input_open_threshold_at_zero_is_refused():
    """CEIL with z = 0: 'x > 0' has no finite grid (the smallest float32 above 0 is 2**-149)."""
    quant = QuantSpec((Fraction(1, 10),), (0,), 4, False, False, "CEIL")
    with pytest.raises(UnsupportedError, match="grid"):
        float_input_thresholds(quant, 1)
