import numpy as np
import pytest

from qdeploy.compiler.ir.types import FixedType, FixedTypeError, exact_type_for_values, parse_type, requantize

MODES = ["TRN", "TRN_ZERO", "RND", "RND_ZERO", "RND_INF", "RND_MIN_INF", "RND_CONV"]


def _round_ref(v, mode):
    """Reference rounding of exact rationals (Python floats on a coarse grid are exact)."""
    import math
    fl = math.floor(v)
    r = v - fl
    if mode == "TRN":
        return fl
    if mode == "TRN_ZERO":
        return math.trunc(v)
    if r != 0.5:
        return fl + (1 if r > 0.5 else 0)
    return {"RND": fl + 1, "RND_MIN_INF": fl, "RND_ZERO": fl + (1 if v < 0 else 0),
            "RND_INF": fl + (0 if v < 0 else 1), "RND_CONV": fl + (fl % 2)}[mode]


@pytest.mark.parametrize("mode", MODES)
def test_requantize_rounding_matches_definition(mode):
    codes = np.arange(-64, 65, dtype=np.int64)  # 3 fraction bits -> drop to 0
    t = FixedType(12, 12, True, mode, "SAT")
    got = requantize(codes, 3, t)
    want = np.array([_round_ref(c / 8, mode) for c in codes])
    assert np.array_equal(got, want)
    # the float path gives the same codes
    assert np.array_equal(t.quantize_real(codes / 8), want)


def test_saturation_modes():
    codes = np.array([-300, -129, -128, -5, 0, 127, 128, 300])
    assert np.array_equal(requantize(codes, 0, FixedType(8, 8, True, "TRN", "SAT")),
                          [-128, -128, -128, -5, 0, 127, 127, 127])
    assert np.array_equal(requantize(codes, 0, FixedType(8, 8, True, "TRN", "SAT_SYM")),
                          [-127, -127, -127, -5, 0, 127, 127, 127])
    assert np.array_equal(requantize(codes, 0, FixedType(8, 8, True, "TRN", "WRAP")),
                          [-44, 127, -128, -5, 0, 127, -128, 44])
    assert np.array_equal(requantize(codes, 0, FixedType(8, 8, True, "TRN", "SAT_ZERO")),
                          [0, 0, -128, -5, 0, 127, 0, 0])
    assert np.array_equal(requantize(codes, 0, FixedType(4, 4, False, "TRN", "SAT")),
                          [0, 0, 0, 0, 0, 15, 15, 15])


def test_parse_and_print_roundtrip():
    for s in ["fixed<8,3>", "ufixed<6,0,RND_CONV,SAT>", "fixed<16,6,RND,SAT_SYM>"]:
        t = parse_type(s)
        assert str(t) == s
    t = parse_type("ap_fixed<16,6,AP_RND_CONV,AP_SAT>")
    assert t.hls() == "ap_fixed<16,6,AP_RND_CONV,AP_SAT>"
    assert parse_type("int<8>") == FixedType(8, 8, True)
    assert parse_type("uint<4>").max_code == 15
    with pytest.raises(FixedTypeError):
        parse_type("fixed<0,0>")
    with pytest.raises(FixedTypeError):
        parse_type("fixed<8>")
    with pytest.raises(FixedTypeError):
        FixedType(8, 0, False, "TRN", "SAT_SYM")


def test_exact_type_for_values():
    t = exact_type_for_values(np.array([-1.0, 0.5, 0.96875]))
    assert t == FixedType(6, 1, True)
    assert t.represents([-1.0, 0.5, 0.96875])
    assert exact_type_for_values(np.array([0.1])) is None
    assert exact_type_for_values(np.array([0.0, 3.0])) == FixedType(2, 2, False)


def test_quantize_real_wide_fraction_is_exact(rng):
    x = np.round(rng.uniform(-1, 1, 1000) * 2 ** 16) / 2 ** 16
    t = FixedType(18, 2, True, "RND_CONV", "SAT")
    assert np.array_equal(t.to_real(t.quantize_real(x)), x)
