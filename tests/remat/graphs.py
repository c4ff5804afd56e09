"""Small quantized IR graphs where rematerialization pays."""
from __future__ import annotations

import numpy as np

from qdeploy.compiler.ir import Const, GraphBuilder, parse_type

T = parse_type


def _w(rng, shape, t="fixed<4,1>"):
    tt = T(t)
    return Const(rng.integers(tt.min_code, tt.max_code + 1, shape), tt)


def skip_block(rng, hw=8, cin=4, ch=16, name="skipblock"):
    """x -> conv1x1 -> quant (skip) -> [conv3x3 -> quant -> relu -> conv3x3 -> quant] -> add(skip) -> gap.

    The 8-bit skip tensor is held across two convolutions; recomputing it from the small input
    lowers the peak."""
    b = GraphBuilder(name)
    x = b.input("x", (hw, hw, cin), T("fixed<8,3,RND_CONV,SAT>"))
    q8 = {"to": T("fixed<8,3,RND,SAT>")}
    s = b.add("expand", "Conv", [x], attrs={"kernel": (1, 1)}, params={"weight": _w(rng, (1, 1, cin, ch))})
    sq = b.add("expand_q", "Quantize", [s], attrs=q8)
    a = b.add("conv_a", "Conv", [sq], attrs={"kernel": (3, 3), "pads": (1, 1, 1, 1)},
              params={"weight": _w(rng, (3, 3, ch, ch))})
    aq = b.add("conv_a_q", "Quantize", [a], attrs=q8)
    r = b.add("relu_a", "Relu", [aq])
    c = b.add("conv_b", "Conv", [r], attrs={"kernel": (3, 3), "pads": (1, 1, 1, 1)},
              params={"weight": _w(rng, (3, 3, ch, ch))})
    cq = b.add("conv_b_q", "Quantize", [c], attrs=q8)
    ad = b.add("add", "Add", [sq, cq])
    out = b.add("gap", "GlobalAvgPool", [ad])
    b.output(out)
    return b.build()


def two_skips(rng, hw=6, cin=3, ch=12):
    """Two nested skips (U-Net-like): e1 held to the end, e2 across the middle; 2 outputs."""
    b = GraphBuilder("twoskips")
    x = b.input("x", (hw, hw, cin), T("fixed<6,2,RND_CONV,SAT>"))
    q = {"to": T("fixed<6,2,RND,SAT>")}
    e1 = b.add("e1_q", "Quantize", [b.add("e1", "Conv", [x], attrs={"kernel": (1, 1)},
                                          params={"weight": _w(rng, (1, 1, cin, ch))})], attrs=q)
    e2 = b.add("e2_q", "Quantize", [b.add("e2", "Conv", [e1], attrs={"kernel": (1, 1)},
                                          params={"weight": _w(rng, (1, 1, ch, ch))})], attrs=q)
    m = b.add("m_q", "Quantize", [b.add("m", "Conv", [e2], attrs={"kernel": (3, 3), "pads": (1, 1, 1, 1)},
                                        params={"weight": _w(rng, (3, 3, ch, ch))})], attrs=q)
    m = b.add("m2_q", "Quantize", [b.add("m2", "Conv", [m], attrs={"kernel": (3, 3), "pads": (1, 1, 1, 1)},
                                         params={"weight": _w(rng, (3, 3, ch, ch))})], attrs=q)
    d2 = b.add("d2", "Quantize", [b.add("d2_add", "Add", [m, e2])], attrs=q)
    d2 = b.add("d2c_q", "Quantize", [b.add("d2c", "Conv", [d2], attrs={"kernel": (3, 3), "pads": (1, 1, 1, 1)},
                                           params={"weight": _w(rng, (3, 3, ch, ch))})], attrs=q)
    d1 = b.add("d1", "Add", [d2, e1])
    o1 = b.add("gap", "GlobalAvgPool", [d1])
    o2 = b.add("pool", "MaxPool", [d2], attrs={"kernel": (2, 2), "strides": (2, 2)})
    b.output(o1, o2)
    return b.build()


def feeds(graph, rng, batch=3):
    out = {}
    for name in graph.inputs:
        v = graph.values[name]
        out[name] = rng.integers(v.dtype.min_code, v.dtype.max_code + 1, (batch, *v.shape), dtype=np.int64)
    return out
