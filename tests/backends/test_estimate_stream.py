"""hls4ml estimate: the io_stream architecture (per-pixel layers, line buffers, FIFOs, BRAM packing,
dataflow latency), Resource-strategy weight BRAM, and the over-capacity warning in report.md."""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qdeploy.backends.hls4ml.estimate import estimate
from qdeploy.backends.hls4ml.stream import SRL_MAX_DEPTH, bram18_count, fifo_cost
from qdeploy.compiler.ir import Const, GraphBuilder
from qdeploy.compiler.ir.types import FixedType

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PAR, STREAM = {"io_type": "io_parallel"}, {"io_type": "io_stream"}


def relu_graph(h, w, c, bits):
    b = GraphBuilder("r")
    x = b.input("x", (h, w, c), FixedType(bits, 4))
    b.output(b.add("relu", "Relu", [x]))
    return b.build()


def conv_graph(h, w, c, f, bits, seed=0):
    rng = np.random.default_rng(seed)
    t = FixedType(bits, 2)
    b = GraphBuilder("c")
    x = b.input("x", (h, w, c), t)
    y = b.add("conv", "Conv", [x], attrs={"kernel": (3, 3)},
              params={"weight": Const(rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), (3, 3, c, f)), t)})
    y = b.add("relu", "Relu", [y])
    b.output(b.add("pool", "MaxPool", [y], attrs={"kernel": (2, 2), "strides": (2, 2)}))
    return b.build()


def row(est, name):
    return next(r for r in est["layers"] if r["name"] == name)


@SETTINGS
@given(st.integers(1, 12), st.integers(2, 12), st.integers(1, 12), st.integers(2, 12), st.integers(1, 16))
def test_stream_activation_is_one_pixel_of_logic(h, w, h2, w2, c):
    """io_parallel prices a ReLU per element (its LUTs grow with H x W); io_stream builds one pixel of
    logic reused for every position (nnet_activation_stream.h): the same LUTs for any H x W, II = H x W."""
    bits = 8
    p1, p2 = (estimate(relu_graph(a, b_, c, bits), PAR) for a, b_ in ((h, w), (h2, w2)))
    s1, s2 = (estimate(relu_graph(a, b_, c, bits), STREAM) for a, b_ in ((h, w), (h2, w2)))
    assert row(s1, "relu")["lut"] == row(s2, "relu")["lut"] > 0
    assert row(s1, "relu")["ii_cycles"] == h * w and row(s2, "relu")["ii_cycles"] == h2 * w2
    n1, n2 = h * w, h2 * w2
    assert abs(row(p1, "relu")["lut"] * n2 - row(p2, "relu")["lut"] * n1) <= max(n1, n2)  # proportional (rounding)
    assert row(s1, "relu")["lut"] < row(p1, "relu")["lut"] or h * w == 1


@SETTINGS
@given(st.integers(6, 20), st.integers(6, 40), st.integers(1, 6), st.integers(1, 8), st.integers(4, 12))
def test_stream_conv_has_line_buffer_window_and_fifos(h, w, c, f, bits):
    """A streaming 3x3 Conv holds K_h - 1 input rows and the 3x3 window (nnet_conv_stream.h); the io_stream
    design adds FIFOs between layers (BRAM once a map is deeper than an SRL), the io_parallel one has none."""
    g = conv_graph(h, w, c, f, bits)
    par, st_ = estimate(g, PAR), estimate(g, STREAM)
    line, win = 2 * w * c * bits, 9 * c * bits
    d = row(st_, "conv")["detail"]
    assert d["line_buffer_bits"] == line and d["window_bits"] == win
    if w <= SRL_MAX_DEPTH:  # a short line buffer is registers, a long one SRL storage (one LUT per bit per 32 words)
        assert row(st_, "conv")["ff"] >= line + win
    else:
        assert row(st_, "conv")["ff"] >= win and row(st_, "conv")["lut"] >= 2 * c * bits * -(-w // 32)
    out_pix = (h - 2) * (w - 2)
    fifo = (row(st_, "relu")["detail"] or {}).get("fifo")
    assert fifo is not None and fifo["depth"] == out_pix  # conv -> relu -> pool: the FIFO after relu feeds pool
    assert (st_["total"]["bram_18k"] > 0) == (out_pix > SRL_MAX_DEPTH)
    assert par["total"]["bram_18k"] == 0
    assert st_["total"]["lut"] != par["total"]["lut"] and st_["total"]["ff"] != par["total"]["ff"]


def test_stream_dataflow_latency_overlaps_layers():
    """In io_stream the layers run as a dataflow pipeline: the design latency is about the longest layer
    loop, not the sum of every layer's loop (the tutorial's SVHN report: 1044 cycles for 1027 + 902 + ...)."""
    est = estimate(conv_graph(16, 16, 3, 4, 8), STREAM)
    dev = [r for r in est["layers"] if not r["host"]]
    assert est["total"]["ii_cycles"] == max(r["ii_cycles"] for r in dev) == 16 * 16
    assert max(r["latency_cycles"] for r in dev) <= est["total"]["latency_cycles"] < sum(r["latency_cycles"] for r in dev)


def test_fifo_model_against_the_published_fifo_table():
    """FIFO implementation per the tutorial's Vivado HLS 2020.1 report (hls4ml-tutorial archived/pruned_cnn
    and quantized_pruned_cnn myproject_csynth.rpt): 900 x 16 b, 900 x 6 b, 225 x 16 b, 169 x 6 b, 36 x 16 b ->
    one BRAM_18K per channel; 16 x 16 b, 4 x 16 b, 1 x 16 b -> no BRAM; FF per FIFO 49/39/40/28/33 and 7/5/5."""
    published = [(900, 16, 1, 49), (900, 6, 1, 39), (225, 16, 1, 40), (169, 6, 1, 28), (36, 16, 1, 33),
                 (16, 16, 0, 7), (4, 16, 0, 5), (1, 16, 0, 5)]
    for depth, bits, bram, ff in published:
        f = fifo_cost(16, bits, depth)
        assert f["bram_18k"] == 16 * bram, (depth, bits, f)
        assert abs(f["ff"] / 16 - ff) <= max(3, 0.1 * ff), (depth, bits, f)


def test_bram18_aspect_ratios():
    """RAMB18 port shapes (UG573): 512x36, 1Kx18, 2Kx9, 4Kx4, 8Kx2, 16Kx1."""
    for w, d in ((36, 512), (18, 1024), (9, 2048), (4, 4096), (2, 8192), (1, 16384)):
        assert bram18_count(w, d) == 1
        assert bram18_count(w + 1, d) == 2 or bram18_count(w, d + 1) == 2
    assert bram18_count(72, 512) == 2 and bram18_count(16, 2048) == 2 and bram18_count(0, 10) == 0


def resource_dense(n_in, n_out, wb, seed):
    rng = np.random.default_rng(seed)
    b = GraphBuilder("d")
    x = b.input("x", (n_in,), FixedType(8, 2))
    codes = rng.integers(-(1 << (wb - 1)), 1 << (wb - 1), (n_in, n_out))
    b.output(b.add("fc", "Dense", [x], params={"weight": Const(codes, FixedType(wb, 1))}))
    return b.build()


@SETTINGS
@given(st.integers(64, 300), st.integers(1, 24), st.integers(2, 15), st.integers(1, 8), st.integers(1, 8),
       st.integers(0, 2**31 - 1))
def test_resource_weight_bram_grows_with_bits_and_count(n_in, n_out, wb, dbits, dout, seed):
    """Resource strategy, RF = n_in (always legal): the weights are a ROM of depth RF and width
    ceil(n_in n_out / RF) x w_bits (nnet_dense_resource.h); more bits or more weights never need fewer BRAMs."""
    cfg = {"strategy": "Resource", "reuse_factor": n_in}

    def bram(n_o, w):
        est = estimate(resource_dense(n_in, n_o, w, seed), cfg)
        assert row(est, "fc")["detail"]["reuse_factor"] == n_in
        return est["total"]["bram_18k"]
    base = bram(n_out, wb)
    assert bram(n_out, min(wb + dbits, 16)) >= base
    assert bram(n_out + dout, wb) >= base
    if n_in * n_out * wb >= 1024:
        assert base >= 1  # RF > 1 and >= 1024 bits: the ROM is block RAM (ROM_nP_BRAM)
        assert base == bram18_count(n_out * wb, n_in)


def test_over_capacity_warning_in_report_markdown():
    """A design over its part gets a WARNING line in report.md's hls4ml section (and in the estimate)."""
    from qdeploy.report import hls4ml_markdown
    g = conv_graph(30, 30, 16, 16, 16)
    est = estimate(g, {"part": "pynq-z2", "io_type": "io_parallel"})
    assert any("exceeds the part" in w for w in est["warnings"])
    info = {"backend": "Vitis", "part": "xc7z020clg400-1", "clock_period": 5, "io_type": "io_parallel",
            "strategy": "Latency", "reuse_factor": 1}
    md = "\n".join(hls4ml_markdown(info, est))
    assert "**WARNING**: the design exceeds the part PYNQ-Z2" in md
    ok = estimate(conv_graph(8, 8, 1, 1, 4), {"part": "vu9p", "io_type": "io_parallel"})
    assert "exceeds the part" not in "\n".join(hls4ml_markdown(info, ok))


@SETTINGS
@given(st.integers(4, 14), st.integers(4, 14), st.integers(1, 4), st.integers(1, 6))
def test_parallel_conv_holds_every_position_in_registers(h, w, c, f):
    """io_parallel Conv computes one position per cycle into one partitioned output array: its registers
    grow with the number of output positions (HLS_FF_FACTOR of positions x C_out x result bits, at least)."""
    from qdeploy.backends.hls4ml.resources import HLS_FF_FACTOR
    g = conv_graph(h, w, c, f, 8)
    r = row(estimate(g, PAR), "conv")
    out = g.value(g.nodes[0].output)
    pos = (h - 2) * (w - 2)
    assert r["ff"] >= HLS_FF_FACTOR * pos * f * out.dtype.width
    small = row(estimate(conv_graph(4, 4, c, f, 8), PAR), "conv")
    assert r["ff"] >= small["ff"]


def test_padded_stream_conv_reads_a_zero_padding_layer():
    """hls4ml puts a zeropad2d_cl layer (and its FIFO) in front of a padded io_stream Conv; the line
    buffer spans the padded width.  With the Resource strategy the pixel loop is not pipelined
    (nnet_conv_stream.h pipelines it for Latency only): every padded pixel waits for the RF-cycle MAC loop."""
    rng = np.random.default_rng(1)
    t = FixedType(8, 2)
    b = GraphBuilder("p")
    x = b.input("x", (20, 12, 3), t)
    b.output(b.add("conv", "Conv", [x], attrs={"kernel": (3, 3), "pads": (1, 1, 1, 1)},
                   params={"weight": Const(rng.integers(-100, 100, (3, 3, 3, 4)), t)}))
    g = b.build()
    lat = row(estimate(g, STREAM), "conv")
    d = lat["detail"]
    assert d["zero_pad"]["fifo"]["depth"] == 22 * 14
    assert d["line_buffer_bits"] == 2 * 14 * 3 * 8
    assert "zero_pad" not in (row(estimate(g, PAR), "conv")["detail"] or {})
    res = row(estimate(g, {**STREAM, "strategy": "Resource", "reuse_factor": 9}), "conv")
    assert res["detail"]["reuse_factor"] == 9
    assert res["ii_cycles"] >= 22 * 14 * 9 > lat["ii_cycles"]


def test_cast_is_a_stream_layer_unless_built_into_the_result_type():
    """qdeploy's translation emits a Quantize after a Conv as a linear layer of its own, so in io_stream it
    is one more process and FIFO (casts="layer", the default); hls4ml's converters make it the conv's
    result type (casts="result_type").  A cast after a ReLU is fused either way (ops._relu)."""
    import pytest
    from qdeploy.compiler.errors import QDeployError
    rng = np.random.default_rng(2)
    t = FixedType(8, 2)
    b = GraphBuilder("q")
    x = b.input("x", (16, 16, 2), t)
    y = b.add("conv", "Conv", [x], attrs={"kernel": (3, 3)},
              params={"weight": Const(rng.integers(-100, 100, (3, 3, 2, 4)), t)})
    y = b.add("cast", "Quantize", [y], attrs={"to": FixedType(8, 4)})
    y = b.add("relu", "Relu", [y])
    y = b.add("relu_cast", "Quantize", [y], attrs={"to": FixedType(6, 3, False)})
    b.output(b.add("pool", "MaxPool", [y], attrs={"kernel": (2, 2), "strides": (2, 2)}))
    g = b.build()
    own, fused = estimate(g, STREAM), estimate(g, {**STREAM, "casts": "result_type"})
    assert (row(own, "conv").get("detail") or {}).get("fifo") is not None
    assert (row(fused, "conv").get("detail") or {}).get("fifo") is None
    for est in (own, fused):
        assert (row(est, "relu").get("detail") or {}).get("fifo") is None  # fused into the relu layer
        assert row(est, "relu_cast")["detail"]["fifo"]["depth"] == 14 * 14
    assert own["total"]["bram_18k"] == fused["total"]["bram_18k"] + 4  # 4 channels x 196 deep, 8 bits
    with pytest.raises(QDeployError, match="casts"):
        estimate(g, {**STREAM, "casts": "fused"})


def test_over_capacity_warning_in_the_estimate_section_of_any_compile(tmp_path):
    """report.md's Estimate section (every target, here the reference interpreter) shows the share of
    the part and a WARNING line when the hls4ml estimate exceeds it."""
    import qdeploy
    rng = np.random.default_rng(3)
    b = GraphBuilder("big")
    x = b.input("x", (64,), FixedType(16, 6))
    w = Const(rng.integers(-30000, 30000, (64, 64)), FixedType(16, 6))
    b.output(b.add("fc", "Dense", [x], params={"weight": w}))
    qdeploy.compile(b.build(), "reference", tmp_path / "o", config={"hls4ml": {"part": "pynq-z2"}})
    md = (tmp_path / "o" / "report.md").read_text()
    assert "Share of the part: LUT" in md
    assert "- **WARNING**: the design exceeds the part PYNQ-Z2 (Zynq-7000 Z-7020): " in md and "DSP" in md
