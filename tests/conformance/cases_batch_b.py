"""Batch-B conformance cases (Resize, DepthToSpace/SpaceToDepth, broadcast Add/Mul, depthwise Conv,
kernel-1 and padded pools, Lookup tables): tiny models in the :class:`~.conftest.Case` form, merged
into :data:`.test_ops.CASES` (reference, TVM, hls4ml io_parallel) and, with :data:`STREAM_CASES`,
compiled for hls4ml io_stream by :mod:`.test_ops_batch_b`."""
from __future__ import annotations

import numpy as np

from qdeploy.compiler.ir import Const, parse_type
from qdeploy.compiler.ir.types import FLOAT32

from .conftest import Case, random_codes

T = parse_type
HLS = ("hls4ml",)


def W(rng, t, shape):
    t = T(t) if isinstance(t, str) else t
    return Const(random_codes(rng, t, shape), t)


def _conv2d_depthwise_padded(b, p, rng):
    x = b.input(p + "x", (5, 5, 4), T("fixed<6,2,RND_CONV,SAT>"))
    return [b.add(p + "c", "Conv", [x], attrs={"kernel": (3, 3), "groups": 4, "pads": (1, 1, 1, 1)},
                  params={"weight": W(rng, "fixed<5,1>", (3, 3, 1, 4)), "bias": W(rng, "fixed<7,3>", (4,))})]


def _conv1d_depthwise(b, p, rng):
    x = b.input(p + "x", (9, 3), T("fixed<7,3>"))
    return [b.add(p + "c", "Conv", [x], attrs={"kernel": (3,), "groups": 3, "strides": (2,), "pads": (1, 1)},
                  params={"weight": W(rng, "fixed<4,1>", (3, 1, 3)), "bias": W(rng, "fixed<6,2>", (3,))})]


def _se_broadcast(b, p, rng):
    # squeeze-excitation style: a feature map times a per-channel gate, plus a (1, 1, C) offset
    x = b.input(p + "x", (4, 5, 3), T("fixed<6,2>"))
    g = b.add(p + "g", "GlobalAvgPool", [x])
    gq = b.add(p + "gq", "Quantize", [g], attrs={"to": T("ufixed<4,1,RND,SAT>")})
    y = b.input(p + "y", (1, 1, 3), T("fixed<5,3>"))
    m = b.add(p + "m", "Mul", [x, gq])
    return [m, b.add(p + "a", "Add", [y, x])]


def _channel_broadcast(b, p, rng):
    # (H, W, 1) + (H, W, C): a repetition along the channel axis, which hls4ml's Resize cannot do
    x = b.input(p + "x", (3, 3, 1), T("fixed<6,2>"))
    y = b.input(p + "y", (3, 3, 4), T("fixed<6,2>"))
    return [b.add(p + "a", "Add", [x, y])]


def _pool_subsample(b, p, rng):
    # kernel 1: a subsampling (hls4ml io_stream pooling needs stride == kernel)
    x = b.input(p + "x", (6, 7, 2), T("fixed<7,2>"))
    y = b.input(p + "y", (9, 3), T("ufixed<5,2>"))
    return [b.add(p + "mp", "MaxPool", [x], attrs={"kernel": (1, 1), "strides": (2, 2)}),
            b.add(p + "ap", "AvgPool", [y], attrs={"kernel": (1,), "strides": (2,)})]


def _pool_ragged(b, p, rng):
    # non-overlapping windows that leave the last row/column unread (floor): checked in io_stream
    # too, where the unread pixels must not be left in the stream
    x = b.input(p + "x", (5, 5, 2), T("fixed<6,2>"))
    y = b.input(p + "y", (7, 3), T("ufixed<5,2>"))
    return [b.add(p + "mp", "MaxPool", [x], attrs={"kernel": (2, 2), "strides": (2, 2)}),
            b.add(p + "ap", "AvgPool", [y], attrs={"kernel": (2,), "strides": (2,)})]


def _maxpool_padded(b, p, rng):
    # non-overlapping windows with explicit padding (TF "SAME"-like), signed 2-D and unsigned 1-D
    x = b.input(p + "x", (5, 5, 3), T("fixed<6,2>"))
    y = b.input(p + "y", (7, 2), T("ufixed<5,3>"))
    return [b.add(p + "mp", "MaxPool", [x], attrs={"kernel": (2, 2), "strides": (2, 2), "pads": (0, 0, 1, 1)}),
            b.add(p + "mp1", "MaxPool", [y], attrs={"kernel": (2,), "strides": (2,), "pads": (1, 0)})]


def _resize2d(b, p, rng):
    x = b.input(p + "x", (3, 4, 2), T("fixed<6,2>"))
    r = b.add(p + "r", "Resize", [x], attrs={"scales": (2, 3)})
    return [r, b.add(p + "r1", "Resize", [x], attrs={"scales": (1, 2)})]


def _resize1d_map(b, p, rng):
    # after a Conv (the accumulator type flows through unchanged), then a rounding Quantize
    x = b.input(p + "x", (5, 2), T("ufixed<5,2>"))
    c = b.add(p + "c", "Conv", [x], attrs={"kernel": (2,)}, params={"weight": W(rng, "fixed<4,1>", (2, 2, 3))})
    r = b.add(p + "r", "Resize", [c], attrs={"scales": (4,)})
    return [b.add(p + "q", "Quantize", [r], attrs={"to": T("fixed<6,3,RND_CONV,SAT>")})]


def _depth_to_space(b, p, rng):
    x = b.input(p + "x", (2, 3, 12), T("fixed<7,3>"))
    return [b.add(p + "dcr", "DepthToSpace", [x], attrs={"block": 2, "mode": "DCR"}),
            b.add(p + "crd", "DepthToSpace", [x], attrs={"block": 2, "mode": "CRD"})]


def _space_to_depth(b, p, rng):
    x = b.input(p + "x", (4, 6, 3), T("ufixed<5,1>"))
    s2d = b.add(p + "s2d", "SpaceToDepth", [x], attrs={"block": 2})
    r = b.add(p + "r", "Relu", [b.add(p + "d", "Dense", [s2d], params={"weight": W(rng, "fixed<3,1>", (12, 4))})])
    return [s2d, r]


def _lookup(b, p, rng):
    # a 5-bit input's 32 codes -> float32 table (Sigmoid values) -> rounding Quantize; and a
    # fixed-point table (a permutation-like map) straight to codes
    x = b.input(p + "x", (4, 6), T("fixed<5,2>"))
    sig = 1.0 / (1.0 + np.exp(-np.arange(-16, 16) / 8.0))
    lt = b.add(p + "lt", "Lookup", [x], attrs={"fn": "Sigmoid"}, params={"table": Const(sig, FLOAT32)})
    q = b.add(p + "q", "Quantize", [lt], attrs={"to": T("ufixed<6,0,RND_CONV,SAT>")})
    tab = W(rng, "fixed<7,3>", (32,))
    return [q, b.add(p + "lf", "Lookup", [x], attrs={"fn": "table"}, params={"table": tab})]


def _lookup_fixed(b, p, rng):
    # folded Sigmoid/Tanh tables (the source's float32 values, rounded once): hls4ml's table
    # activations where they reproduce every code
    from qdeploy.compiler.ir.ops.lookup import source_values
    outs = []
    for fn, tin, tout in (("Sigmoid", "fixed<6,3>", "ufixed<7,0,RND_CONV,SAT>"),
                          ("Tanh", "fixed<6,2>", "fixed<7,1,RND_CONV,SAT>")):
        ti, to = T(tin), T(tout)
        x = b.input(p + "x" + fn, (2, 5), ti)
        real = ti.to_real(np.arange(ti.min_code, ti.max_code + 1)).astype(np.float32)
        tab = Const(to.quantize_real(source_values(fn, real)), to)
        outs.append(b.add(p + fn.lower(), "Lookup", [x], attrs={"fn": fn}, params={"table": tab}))
    return outs


def _conv2d_depthwise_dilated(b, p, rng):
    # dilation (batch A: a zero-inserted kernel) on the depthwise layer
    x = b.input(p + "x", (6, 6, 3), T("fixed<6,2>"))
    attrs = {"kernel": (2, 2), "groups": 3, "dilations": (2, 1), "pads": (1, 0, 1, 1)}
    return [b.add(p + "c", "Conv", [x], attrs=attrs,
                  params={"weight": W(rng, "fixed<4,1>", (2, 2, 1, 3)), "bias": W(rng, "fixed<6,2>", (3,))})]


CASES_B = [
    Case("conv2d_depthwise_padded", "Conv", _conv2d_depthwise_padded),
    Case("conv1d_depthwise", "Conv", _conv1d_depthwise),
    Case("conv2d_depthwise_dilated", "Conv", _conv2d_depthwise_dilated),
    Case("se_broadcast", "Mul", _se_broadcast),
    Case("channel_broadcast", "Add", _channel_broadcast, rejects=HLS),
    Case("pool_subsample", "MaxPool", _pool_subsample),
    Case("maxpool_padded", "MaxPool", _maxpool_padded),
    Case("pool_ragged", "MaxPool", _pool_ragged),
    Case("resize2d", "Resize", _resize2d),
    Case("resize1d_map", "Resize", _resize1d_map),
    Case("depth_to_space", "DepthToSpace", _depth_to_space),
    Case("lookup", "Lookup", _lookup, rejects=HLS),
    Case("lookup_fixed", "Lookup", _lookup_fixed),
    Case("space_to_depth", "SpaceToDepth", _space_to_depth),
]

#: Cases (of this module and of :data:`.test_ops.CASES`) also compiled for hls4ml with
#: ``io_type="io_stream"``: case id -> True when io_stream must be exact, False when it must refuse
#: with an error naming a node of the case.
STREAM_CASES = {"resize2d": True, "resize1d_map": True, "depth_to_space": True, "space_to_depth": True,
                "add_broadcast": True, "mul_broadcast": True, "se_broadcast": True, "channel_broadcast": False,
                "conv2d_depthwise": True, "conv2d_depthwise_padded": True, "conv1d_depthwise": True,
                "conv2d_depthwise_dilated": True,
                "pool_subsample": True, "maxpool_padded": True, "pool_ragged": True, "maxpool_unsigned": False,
                "maxpool_unsigned_padded": False, "maxpool2d": False, "avgpool1d": False,
                "lookup_fixed": True}
