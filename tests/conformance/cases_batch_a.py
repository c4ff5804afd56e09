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


HLS = ("hls4ml",)
CASES_A = [
    Case("pad2d", "Pad", _pad2d),
    Case("pad1d_conv", "Pad", _pad1d_conv),
    Case("pad_float", "Pad", _pad_float),
    Case("pad_channel", "Pad", _pad_channel, rejects=HLS),
]
