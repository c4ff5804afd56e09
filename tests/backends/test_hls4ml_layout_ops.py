"""hls4ml translations of batch-B ops: refusals where hls4ml's C++ is not exact (``emit`` refuses
before anything compiles), and the real depthwise convolution layers (translation, estimate, and
C simulation against the reference)."""
from __future__ import annotations

import numpy as np
import pytest

from qdeploy.backends.hls4ml import Hls4mlBackend
from qdeploy.backends.hls4ml.estimate import estimate as hls4ml_estimate
from qdeploy.backends.hls4ml.translate import resize_index_ok, translate
from qdeploy.compiler import reference as ref
from qdeploy.compiler.errors import UnsupportedError
from qdeploy.compiler.ir import Const, GraphBuilder, parse_type
from tests.conformance.conftest import compile_graph, random_feeds


def _resize_graph(length, s):
    b = GraphBuilder("rs")
    x = b.input("x", (length, 1), parse_type("fixed<6,2>"))
    b.output(b.add("up", "Resize", [x], attrs={"scales": (s,)}))
    return b.build()


def test_resize_index_formula_brute_force():
    # hls4ml's index ((o * ratio) >> 16), ratio = ((L << 16) / (s L)) + 1, against o // s
    def brute(L, s):
        ratio = ((L << 16) // (s * L)) + 1
        return all(((o * ratio) >> 16) == o // s for o in range(s * L))
    for L, s in ((4, 2), (7, 3), (100, 5), (2396, 7), (3595, 5)):
        assert resize_index_ok(L, s) == brute(L, s)
    assert resize_index_ok(64, 7) and not resize_index_ok(2396, 7)


def test_resize_refused_where_hls4ml_index_is_not_a_repetition(tmp_path):
    with pytest.raises(UnsupportedError, match="node 'up'.*resize_nearest"):
        Hls4mlBackend().emit(_resize_graph(2396, 7), {}, tmp_path / "p")


# ------------------------------------------------------------------------------ depthwise Conv
def _dw_graph(nd, rng):
    b = GraphBuilder(f"dw{nd}d")
    if nd == 2:
        x = b.input("x", (6, 5, 4), parse_type("fixed<6,2>"))
        attrs, wshape = {"kernel": (3, 3), "groups": 4, "pads": (1, 1, 1, 1), "strides": (1, 2)}, (3, 3, 1, 4)
    else:
        x = b.input("x", (10, 3), parse_type("ufixed<5,2>"))
        attrs, wshape = {"kernel": (3,), "groups": 3, "pads": (2, 0)}, (3, 1, 3)
    wt, bt = parse_type("fixed<5,1>"), parse_type("fixed<7,3>")
    w = Const(rng.integers(wt.min_code, wt.max_code + 1, wshape), wt)
    bias = Const(rng.integers(bt.min_code, bt.max_code + 1, (wshape[-1],)), bt)
    b.output(b.add("dw", "Conv", [x], attrs=attrs, params={"weight": w, "bias": bias}))
    return b.build()


@pytest.mark.parametrize("io_type", ["io_parallel", "io_stream"])
@pytest.mark.parametrize("nd", [1, 2])
def test_depthwise_conv_is_a_depthwise_layer_and_exact(nd, io_type, tmp_path):
    """groups == C_in == C_out becomes hls4ml's DepthwiseConv{nd}D holding exactly the IR's k*C
    weights (not a dense kernel of k*C*C mostly-zero weights), bit-exact against the reference."""
    rng = np.random.default_rng(nd)
    g = _dw_graph(nd, rng)
    tr = translate(g, io_type)
    (lay,) = [d for d in tr.layers if d["name"] == tr.value_layer["dw"]]
    k = g.nodes[0].params["weight"]
    assert lay["class_name"] == f"DepthwiseConv{nd}D"
    assert lay["depthwise_data"].size == k.data.size  # e.g. 3*3*4 = 36, not 3*3*4*4
    np.testing.assert_array_equal(lay["depthwise_data"].reshape(-1), k.real().reshape(-1))
    assert set(tr.precisions[lay["name"]]) == {"weight", "bias", "accum", "result"}
    comp = compile_graph("hls4ml", g, tmp_path / "p", {"hls4ml": {"io_type": io_type}})
    assert any(layer["class"].startswith("DepthwiseConv") for layer in comp.info["layers"]), comp.info["layers"]
    feeds = random_feeds(g, np.random.default_rng(5), 16)
    got, want = comp(feeds), ref.execute(g, feeds, codes=True)
    np.testing.assert_array_equal(got["dw"], want["dw"])


def test_depthwise_estimate_counts_the_real_multipliers():
    """The estimate row prices the k*C products of the emitted DepthwiseConv (Latency); with the
    Resource strategy the translation falls back to a block-diagonal dense kernel (noted), and the
    row then prices the k*C*C weights that layer really stores."""
    rng = np.random.default_rng(2)
    g = _dw_graph(2, rng)
    w = g.nodes[0].params["weight"].data
    lat = hls4ml_estimate(g, {})["layers"][0]["detail"]
    assert lat["n_in"] * lat["n_out"] == w.size == 36
    assert lat["mults_zero"] == int((w == 0).sum())
    res = hls4ml_estimate(g, {"strategy": "Resource"})["layers"][0]["detail"]
    assert (res["n_in"], res["n_out"]) == (36, 4)
    assert res["mults_zero"] == 36 * 4 - 36 + int((w == 0).sum())
    tr = translate(g, "io_parallel", "Resource")
    (lay,) = [d for d in tr.layers if d["name"] == tr.value_layer["dw"]]
    assert lay["class_name"] == "Conv2D" and lay["weight_data"].shape == (3, 3, 4, 4)
    assert any("Resource strategy" in s for s in tr.notes)


def test_depthwise_1d_beside_2d_falls_back_to_dense_with_a_note():
    """hls4ml 1.3's nnet_sepconv1d_latency.h and nnet_sepconv2d_latency.h share one include guard:
    a model with both keeps the 1-D one as a dense (block-diagonal) Conv1D, and says so."""
    g1, g2 = _dw_graph(1, np.random.default_rng(1)), _dw_graph(2, np.random.default_rng(2))
    b = GraphBuilder("both")
    for gg, p in ((g1, "a_"), (g2, "b_")):
        x = b.input(p + "x", gg.value("x").shape, gg.value("x").dtype)
        n = gg.nodes[0]
        b.output(b.add(p + "dw", "Conv", [x], attrs=dict(n.attrs), params=dict(n.params)))
    tr = translate(b.build(), "io_parallel")
    cls = {d["name"]: d["class_name"] for d in tr.layers}
    assert cls[tr.value_layer["a_dw"]] == "Conv1D" and cls[tr.value_layer["b_dw"]] == "DepthwiseConv2D"
    assert any("'a_dw'" in s and "include guard" in s for s in tr.notes)


# ------------------------------------------------------------------------------ Lookup tables
def _sigmoid_graph(tin="fixed<8,3>", tout="ufixed<7,0,RND_CONV,SAT>", tamper=False):
    from qdeploy.compiler.ir.ops.lookup import source_values
    ti, to = parse_type(tin), parse_type(tout)
    real = ti.to_real(np.arange(ti.min_code, ti.max_code + 1)).astype(np.float32)
    codes = to.quantize_real(source_values("Sigmoid", real))
    if tamper:
        codes[5] += 1
    b = GraphBuilder("sig")
    x = b.input("x", (ti.max_code - ti.min_code + 1,), ti)
    b.output(b.add("sig", "Lookup", [x], attrs={"fn": "Sigmoid"}, params={"table": Const(codes, to)}))
    return b.build()


def test_sigmoid_table_uses_the_computed_table_size_and_is_exact(tmp_path):
    """fixed<8,3> has 5 fraction bits: hls4ml's sigmoid needs table_size 16 * 2**5 = 512 (not its
    default 1024) for one entry per code; the generated firmware says so and every code is exact."""
    g = _sigmoid_graph()
    comp = compile_graph("hls4ml", g, tmp_path / "p")
    params = (tmp_path / "p" / "hls4ml_prj" / "firmware" / "parameters.h").read_text()
    assert "table_size = 512" in params
    x = np.arange(-128, 128, dtype=np.int64)[None, :]  # every input code
    np.testing.assert_array_equal(comp({"x": x})["sig"], ref.execute(g, {"x": x}, codes=True)["sig"])


def test_table_hls4ml_would_compute_differently_is_refused(tmp_path):
    with pytest.raises(UnsupportedError, match="node 'sig'.*input code -123"):
        Hls4mlBackend().emit(_sigmoid_graph(tamper=True), {}, tmp_path / "p")


def test_table_entry_near_a_rounding_tie_is_refused(tmp_path):
    """sigmoid(-1/128) * 128 is within a float32 ulp of the tie 63.5: no emulation can vouch for
    hls4ml's C++ rounding there, so the layer is refused, naming the node."""
    with pytest.raises(UnsupportedError, match="node 'sig'.*too close to a rounding boundary"):
        Hls4mlBackend().emit(_sigmoid_graph("fixed<8,1>", "ufixed<7,0,RND_CONV,SAT>"), {}, tmp_path / "p")


def test_padded_maxpool_estimate_counts_the_offset_adders_where_they_are_emitted():
    """A signed padded MaxPool is hls4ml's own padded pooling in io_parallel but the explicit
    +c / ZeroPadding / -c form in io_stream: only there does the row price the two offset adders
    (one per input and one per output element)."""
    b = GraphBuilder("mp")
    x = b.input("x", (5, 5, 3), parse_type("fixed<6,2>"))
    b.output(b.add("mp", "MaxPool", [x], attrs={"kernel": (2, 2), "strides": (2, 2), "pads": (0, 0, 1, 1)}))
    g = b.build()
    par = hls4ml_estimate(g, {"io_type": "io_parallel"})["layers"][0]
    par_t = translate(g, "io_parallel")
    st_t = translate(g, "io_stream")
    assert [d["class_name"] for d in par_t.layers[1:]] == ["MaxPooling2D"]
    assert [d["class_name"] for d in st_t.layers[1:]] == ["BatchNormalization", "ZeroPadding2D", "MaxPooling2D",
                                                          "BatchNormalization"]
    # io_stream prices one pixel of each layer (estimate A15): the +c and -c layers add one adder per
    # channel of an input and of an output pixel over the same pool of an unsigned input (no offsets);
    # io_parallel has no offset adders for either
    bu = GraphBuilder("mpu")
    xu = bu.input("x", (5, 5, 3), parse_type("ufixed<6,2>"))
    bu.output(bu.add("mp", "MaxPool", [xu], attrs={"kernel": (2, 2), "strides": (2, 2), "pads": (0, 0, 1, 1)}))
    gu = bu.build()
    st = hls4ml_estimate(g, {"io_type": "io_stream"})["layers"][0]
    st_u = hls4ml_estimate(gu, {"io_type": "io_stream"})["layers"][0]
    assert st["lut"] - st_u["lut"] >= (3 + 3) * 6 * 0.5
    assert par["lut"] == hls4ml_estimate(gu, {"io_type": "io_parallel"})["layers"][0]["lut"]


def test_depth_to_space_estimate_buffers_the_tensor_only_in_io_stream():
    b = GraphBuilder("d2s")
    x = b.input("x", (2, 3, 8), parse_type("fixed<6,2>"))
    b.output(b.add("d2s", "DepthToSpace", [x], attrs={"block": 2, "mode": "CRD"}))
    g = b.build()
    par = hls4ml_estimate(g, {"io_type": "io_parallel"})["layers"][0]
    st = hls4ml_estimate(g, {"io_type": "io_stream"})["layers"][0]
    assert par["ff"] == 0 and par["lut"] == 0
    assert st["ff"] == 48 * 6  # every element of the (4, 6, 2) output, 6 bits each
