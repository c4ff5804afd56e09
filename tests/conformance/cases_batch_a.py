"""Conformance cases of the batch-A ops (Pad, ...): appended to ``test_ops.CASES`` and also run
on their own (every backend, hls4ml in io_parallel and io_stream) by ``test_ops_batch_a.py``."""
from __future__ import annotations

import numpy as np

from qdeploy.compiler.ir import Const, parse_type

from .conftest import Case, random_codes

T = parse_type


def W(rng, t, shape):
    t = T(t) if isinstance(t, str) else t
    return Const(random_codes(rng, t, shape), t)


def _pad2d(b, p, rng):
    x = b.input(p + "x", (4, 5, 3), T("fixed<6,2>"))
    return [b.add(p + "p0", "Pad", [x], attrs={"pads": (1, 2, 0, 0, 1, 0)}),
            b.add(p + "pc", "Pad", [x], attrs={"pads": (2, 0, 0, 1, 1, 0), "code": -32})]


def _pad1d_conv(b, p, rng):
    # a zero-point-like pad code (+5) in front of an unpadded convolution
    x = b.input(p + "x", (9, 2), T("ufixed<5,2>"))
    pd = b.add(p + "pd", "Pad", [x], attrs={"pads": (2, 0, 1, 0), "code": 5})
    return [b.add(p + "c", "Conv", [pd], attrs={"kernel": (3,)}, params={"weight": W(rng, "fixed<4,1>", (3, 2, 3))})]


def _pad_float(b, p, rng):
    # float epilogue: padded on the host for hls4ml
    x = b.input(p + "x", (6,), T("fixed<6,2>"))
    d = b.add(p + "d", "Dense", [x], params={"weight": W(rng, "fixed<4,1>", (6, 8))})
    fd = b.add(p + "fd", "Dense", [d], params={"weight": Const(rng.standard_normal((8, 4)).astype(np.float32),
                                                                parse_type("float32"))})
    r = b.add(p + "r", "Reshape", [fd], attrs={"shape": (2, 2)})
    return [d, b.add(p + "pf", "Pad", [r], attrs={"pads": (1, 0, 0, 0), "value": 0.5})]


def _pad_channel(b, p, rng):
    x = b.input(p + "x", (3, 3, 2), T("fixed<6,2>"))
    return [b.add(p + "pc", "Pad", [x], attrs={"pads": (0, 0, 1, 0, 0, 0)})]


def _clip(b, p, rng):
    x = b.input(p + "x", (3, 4, 2), T("fixed<7,3>"))  # codes -64..63, lsb 1/16
    return [b.add(p + "both", "Clip", [x], attrs={"lo": -20, "hi": 37, "frac_bits": 4}),
            b.add(p + "lo", "Clip", [x], attrs={"lo": 3, "hi": None, "frac_bits": 4}),
            b.add(p + "hi", "Clip", [x], attrs={"lo": None, "hi": -5, "frac_bits": 4}),
            # bounds off the input grid (1/64 steps): the output gets 6 fraction bits
            b.add(p + "fine", "Clip", [x], attrs={"lo": -33, "hi": 101, "frac_bits": 6}),
            # a bound beyond the input range has no effect
            b.add(p + "wide", "Clip", [x], attrs={"lo": -1000, "hi": 2, "frac_bits": 0}),
            b.add(p + "relu", "Clip", [x], attrs={"lo": 0, "hi": None, "frac_bits": 0})]


def _clip_unsigned_map(b, p, rng):
    # ReLU6-like clip of a conv accumulator, then a rounding quantizer
    x = b.input(p + "x", (5, 5, 2), T("ufixed<6,3>"))
    c = b.add(p + "c", "Conv", [x], attrs={"kernel": (3, 3)}, params={"weight": W(rng, "fixed<4,1>", (3, 3, 2, 3))})
    cl = b.add(p + "cl", "Clip", [c], attrs={"lo": 0, "hi": 6, "frac_bits": 0})
    return [b.add(p + "q", "Quantize", [cl], attrs={"to": T("ufixed<5,3,RND_CONV,SAT>")})]


def _clip_float(b, p, rng):
    x = b.input(p + "x", (6,), T("fixed<6,2>"))
    d = b.add(p + "d", "Dense", [x], params={"weight": W(rng, "fixed<4,1>", (6, 4))})
    fd = b.add(p + "fd", "Dense", [d], params={"weight": Const(rng.standard_normal((4, 3)).astype(np.float32),
                                                                parse_type("float32"))})
    return [d, b.add(p + "cf", "Clip", [fd], attrs={"lo": -3, "hi": 5, "frac_bits": 2})]


def _sub(b, p, rng):
    x = b.input(p + "x", (10,), T("fixed<8,2>"))
    y = b.input(p + "y", (10,), T("ufixed<6,4>"))
    return [b.add(p + "s", "Sub", [x, y]), b.add(p + "s2", "Sub", [y, x])]


def _minmax(b, p, rng):
    x = b.input(p + "x", (3, 3, 4), T("fixed<7,3>"))
    y = b.input(p + "y", (3, 3, 4), T("ufixed<5,1>"))
    z = b.add(p + "z", "Quantize", [x], attrs={"to": T("fixed<4,2,RND_CONV,SAT>")})
    return [b.add(p + "mx", "Max", [x, y]), b.add(p + "mn", "Min", [x, y]),
            b.add(p + "mxz", "Max", [z, x]), b.add(p + "mnz", "Min", [y, z])]


def _min_map(b, p, rng):
    x = b.input(p + "x", (4, 4, 2), T("ufixed<5,2>"))
    c = b.add(p + "c", "Conv", [x], attrs={"kernel": (3, 3)}, params={"weight": W(rng, "fixed<4,1>", (3, 3, 2, 2))})
    r = b.add(p + "r", "Relu", [c])
    return [b.add(p + "mn", "Min", [c, r])]


def _minmax_broadcast(b, p, rng):
    x = b.input(p + "x", (4, 6), T("fixed<8,1>"))
    y = b.input(p + "y", (1, 6), T("fixed<6,4>"))
    return [b.add(p + "mx", "Max", [x, y]), b.add(p + "s", "Sub", [x, y])]


def _conv_dilated(b, p, rng):
    x = b.input(p + "x", (9, 8, 3), T("fixed<6,2,RND_CONV,SAT>"))
    return [b.add(p + "c", "Conv", [x], attrs={"kernel": (3, 2), "dilations": (2, 3), "strides": (1, 2),
                                               "pads": (2, 1, 1, 0)},
                  params={"weight": W(rng, "fixed<5,1>", (3, 2, 3, 4)), "bias": W(rng, "fixed<8,2>", (4,))})]


def _conv1d_dilated_grouped(b, p, rng):
    x = b.input(p + "x", (12, 4), T("ufixed<5,2>"))
    return [b.add(p + "c", "Conv", [x], attrs={"kernel": (3,), "dilations": (3,), "groups": 2, "pads": (3, 3)},
                  params={"weight": W(rng, "fixed<4,1>", (3, 2, 4))})]


def _avgpool_padded(b, p, rng):
    # padding excluded from each window's count (ONNX count_include_pad=0): 1..9 elements per window
    x = b.input(p + "x", (7, 6, 2), T("fixed<6,2>"))
    y = b.input(p + "y", (9, 3), T("ufixed<5,1>"))
    return [b.add(p + "ap3", "AvgPool", [x], attrs={"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 2)}),
            b.add(p + "ap2", "AvgPool", [x], attrs={"kernel": (2, 2), "strides": (2, 2), "pads": (1, 0, 0, 0)}),
            b.add(p + "ap1", "AvgPool", [y], attrs={"kernel": (3,), "strides": (1,), "pads": (2, 1)})]


HLS = ("hls4ml",)
CASES_A = [
    Case("pad2d", "Pad", _pad2d),
    Case("pad1d_conv", "Pad", _pad1d_conv),
    Case("pad_float", "Pad", _pad_float),
    Case("pad_channel", "Pad", _pad_channel, rejects=HLS),
    Case("clip", "Clip", _clip),
    Case("clip_unsigned_map", "Clip", _clip_unsigned_map),
    Case("clip_float", "Clip", _clip_float),
    Case("sub", "Sub", _sub),
    Case("minmax", "Max", _minmax),
    Case("min_map", "Min", _min_map),
    Case("minmax_broadcast", "Max", _minmax_broadcast, rejects=HLS),
    Case("conv_dilated", "Conv", _conv_dilated),
    Case("avgpool_padded", "AvgPool", _avgpool_padded),
    Case("conv1d_dilated_grouped", "Conv", _conv1d_dilated_grouped),
]
