"""Threshold requantizers end to end: the ``requant_shift`` pass, its rational oracle, and the
targets (TVM, hls4ml io_parallel and io_stream) on many samples.

Independent oracle: ``clamp(round_half_up(acc * m + b) + zp)`` in ``fractions.Fraction`` on the
Dense accumulator codes (tests/requant_oracle.py), besides the reference interpreter.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from qdeploy.backends.tvm.lower import lower
from qdeploy.compiler import reference as ref
from qdeploy.compiler.errors import UnsupportedError
from qdeploy.compiler.ir import Const, GraphBuilder, parse_type
from qdeploy.passes import PassContext, PassManager, default_pipeline
from qdeploy.passes.requant_shift import requant_shift
from tests.requant_oracle import requant, requant_params

from .conftest import assert_exact, backend_params, compile_graph, emit_only, random_codes
from .cases_threshold import REQUANT, REQUANT_RELU, _multi_threshold, _requant_nodes

T = parse_type


def _graph():
    b = GraphBuilder("rq")
    b.output(*_requant_nodes(b, "", np.random.default_rng(11)))
    return b.build()


def _feeds(g, n, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": random_codes(rng, g.values["x"].dtype, (n, *g.values["x"].shape))}


def test_pass_rewrites_every_requantizer_and_matches_the_rational_oracle():
    g = _graph()
    with PassContext() as ctx:
        g2 = requant_shift(g)
    assert [n.op for n in g2.nodes] == ["Dense", "Affine", "Quantize", "Affine", "Quantize"]
    assert g2.outputs == g.outputs
    assert ctx.notes[0].startswith("requant_shift: 2 of 2 MultiThreshold nodes became multiply-and-shift (")
    feeds = _feeds(g, 3000)
    out = ref.execute(g2, feeds, codes=True, keep=True)
    acc = out["d"]  # the Dense accumulator codes (integer: frac bits 0)
    assert g.values["d"].dtype.frac_bits == 0
    for name, chans, lo, hi in (("rq", REQUANT, -128, 127), ("rqu", REQUANT_RELU, 0, 15)):
        want = np.array([[requant(int(a), m, bb, zp, lo, hi) for a, (m, bb, zp) in zip(row, chans)]
                         for row in acc.reshape(-1, acc.shape[-1])]).reshape(acc.shape)
        assert np.array_equal(out[name], want), name
        assert np.array_equal(ref.execute(g, feeds, codes=True)[name], want), name  # the op itself
        t = g2.values[name].dtype
        assert (t.rounding, t.saturation, t.width) == ("TRN", "SAT", g.values[name].dtype.width)


def test_pass_is_exact_on_every_accumulator_code():
    """The rewritten chain equals the MultiThreshold on every code of the accumulator type."""
    g = _graph()
    acc_t = g.values["d"].dtype
    codes = np.arange(acc_t.min_code, acc_t.max_code + 1)
    assert codes.size <= 1 << 16
    b = GraphBuilder("acc")
    a = b.input("a", (5,), acc_t)
    outs = [b.add(n.name, "MultiThreshold", [a], attrs=dict(n.attrs), params=dict(n.params))
            for n in g.nodes if n.op == "MultiThreshold"]
    b.output(*outs)
    h = b.build()
    h2 = requant_shift(h)
    feeds = {"a": np.repeat(codes[:, None], 5, axis=1)}
    want, got = ref.execute(h, feeds, codes=True), ref.execute(h2, feeds, codes=True)
    for o in outs:
        assert np.array_equal(got[o], want[o]), o


def test_pass_keeps_a_node_without_form_and_says_why():
    b = GraphBuilder("mt")
    outs = _multi_threshold(b, "", np.random.default_rng(5))
    b.output(*outs)
    g = b.build()
    with PassContext() as ctx:
        g2 = requant_shift(g)
    assert [n.op for n in g2.nodes] == ["MultiThreshold", "MultiThreshold"]
    assert ctx.notes[0] == "requant_shift: 0 of 2 MultiThreshold nodes became multiply-and-shift"
    assert ctx.notes[1].startswith("mt: kept as MultiThreshold (channel ")


def test_default_pipeline_runs_it():
    pm = PassManager(default_pipeline())
    g2 = pm.run(_graph())
    assert "MultiThreshold" not in {n.op for n in g2.nodes}
    rec = next(r for r in pm.records if r.name == "requant_shift")
    assert rec.notes and rec.notes[0].startswith("requant_shift: 2 of 2")


@pytest.mark.parametrize("backend", backend_params(("tvm-llvm", "hls4ml")))
def test_no_form_is_refused_on_hls4ml_only(backend):
    b = GraphBuilder("mt")
    b.output(*_multi_threshold(b, "", np.random.default_rng(5)))
    err = emit_only(backend, b.build())
    if backend == "tvm-llvm":
        assert err is None
    else:
        assert isinstance(err, UnsupportedError) and err.node == "mt"
        assert "without a multiply-and-shift form (channel " in str(err) and "\n" not in str(err)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("config", [
    pytest.param(("tvm-llvm", None), id="tvm"),
    pytest.param(("hls4ml", {"hls4ml": {"io_type": "io_parallel"}}), id="hls4ml-io_parallel"),
    pytest.param(("hls4ml", {"hls4ml": {"io_type": "io_stream"}}), id="hls4ml-io_stream"),
])
@pytest.mark.parametrize("shifted", [True, False], ids=["after_pass", "threshold_op"])
def test_requantizers_exact_on_targets(config, shifted, tmp_path):
    backend, cfg = config
    g = requant_shift(_graph()) if shifted else _graph()
    comp = compile_graph(backend, g, tmp_path / "b", cfg)
    feeds = _feeds(g, 300, seed=1)
    assert_exact("requant", f"requant_{'shift' if shifted else 'mt'}", backend, g, comp(feeds), feeds=feeds)


def test_tvm_threshold_count_has_no_batch_by_thresholds_intermediate(tmp_path):
    """T = 255 at batch 256: one TE reduction, no tensor of shape [..., C, T] in the module, and
    exact against the reference."""
    xt = T("fixed<16,16>")
    b = GraphBuilder("big")
    x = b.input("x", (4, 4, 8), xt)
    chans = [(Fraction(k + 1, 2900 + 37 * k), Fraction(1, 3), 0) for k in range(8)]
    y = b.add("mt", "MultiThreshold", [x], attrs={"to": T("int<8>")},
              params=requant_params(xt.min_code, xt.max_code, chans, T("int<8>"), 0))
    b.output(y)
    g = b.build()
    assert g.nodes[0].params["thresholds"].shape == (8, 255)
    import re

    text = re.sub(r"T\.int64\((\d+)\)", r"\1", lower(g).script())
    shapes = re.findall(r"(?:Buffer|alloc_buffer|Tensor)\(\(([^()]*)\)", text)
    assert "n, 4, 4, 8" in shapes and "8, 255" in shapes  # the thresholds constant [8, 255] ...
    big = [sh for sh in shapes if "255" in sh and sh != "8, 255"]
    assert not big, big  # ... and no other buffer or tensor has the T axis
    comp = compile_graph("tvm-llvm", g, tmp_path / "b")
    feeds = {"x": random_codes(np.random.default_rng(2), xt, (256, 4, 4, 8))}
    assert_exact("requant", "mt_T255", "tvm-llvm", g, comp(feeds), feeds=feeds)


def test_constant_and_negative_channels_in_the_form():
    g = requant_shift(_graph())
    aff = next(n for n in g.nodes if n.op == "Affine")
    k = aff.params["scale"].data
    assert k[3] == 0 and k[1] < 0 and k[4] < 0 and k[0] > 0  # REQUANT: m = 0 and m < 0 channels
    assert isinstance(aff.params["bias"], Const)


def test_fpga_estimate_prices_threshold_units_by_count():
    """The hls4ml estimate row of a MultiThreshold: T comparators of the input width plus a
    T-input count per output element -- so it grows linearly with T and dwarfs its
    multiply-and-shift replacement's adder."""
    from qdeploy.backends.hls4ml.estimate import estimate
    from qdeploy.backends.hls4ml.resources import HLS_LUT_FACTOR

    def mt_graph(n_t):
        b = GraphBuilder(f"mt{n_t}")
        x = b.input("x", (4,), T("int<10>"))
        t = np.tile(np.arange(n_t) * 3 - 100, (4, 1))
        b.output(b.add("mt", "MultiThreshold", [x], attrs={"to": T("int<9>")},
                       params={"thresholds": Const(t, T("int<10>")), "base": Const(np.zeros(4), T("int<2>")),
                               "sign": Const(np.ones(4), T("int<2>"))}))
        return b.build()

    rows = {n_t: next(r for r in estimate(mt_graph(n_t))["layers"] if r["name"] == "mt") for n_t in (15, 60)}
    assert rows[15]["lut"] == round(HLS_LUT_FACTOR * 4 * 15 * 11)
    assert rows[60]["lut"] == round(HLS_LUT_FACTOR * 4 * 60 * 11)
    assert rows[60]["dsp"] == 0 and not rows[60]["host"]
    # the ASIC estimator's own entry (not the generic elementwise one): grows with T as well
    from qdeploy.backends import asic
    from qdeploy.backends.asic.cells import GE_FA

    ge = {n_t: next(r for r in asic.estimate(mt_graph(n_t))["layers"] if r["name"] == "mt")["ge"]
          for n_t in (15, 60)}
    assert ge[60] > 3.5 * ge[15] and ge[15] >= 4 * 15 * 11 * GE_FA * 0.5


def test_fractional_binary_points_pass_equals_op_on_every_code():
    """Input with 4 fraction bits, outputs with fraction bits (SAT_SYM and unsigned): the pass's
    Affine + Quantize equal the thresholds on all 4096 input codes."""
    from .cases_threshold import _requant_fractional

    b = GraphBuilder("frac")
    outs = _requant_fractional(b, "", np.random.default_rng(0))
    b.output(*outs)
    g = b.build()
    xt = g.values["x"].dtype
    codes = np.repeat(np.arange(xt.min_code, xt.max_code + 1)[:, None, None], 4, axis=1).repeat(3, axis=2)
    got = ref.execute(g, {"x": codes, "xs": codes}, codes=True)
    assert [g.producer(o).op for o in outs] == ["MultiThreshold", "MultiThreshold", "Quantize", "Quantize"]
    assert np.array_equal(got[outs[0]], got[outs[2]]) and np.array_equal(got[outs[1]], got[outs[3]])
    assert len(np.unique(got[outs[0]])) > 10  # really many levels


def test_shared_row_thresholds_through_the_pass():
    """One threshold row, base and sign for all channels ([1, T], [1]): the form is shared and the
    Affine constants are broadcast to every channel; equal to the op on every input code."""
    xt = T("int<11>")
    b = GraphBuilder("shared")
    x = b.input("x", (3,), xt)
    prm = requant_params(xt.min_code, xt.max_code, [(Fraction(-2, 45), Fraction(1, 7), 3)], T("int<5>"), 0)
    b.output(b.add("mt", "MultiThreshold", [x], attrs={"to": T("int<5>")}, params=prm))
    g = b.build()
    g2 = requant_shift(g)
    aff = g2.nodes[0]
    assert aff.op == "Affine" and aff.params["scale"].shape == (3,) and len(set(aff.params["scale"].data)) == 1
    codes = np.repeat(np.arange(xt.min_code, xt.max_code + 1)[:, None], 3, axis=1)
    want = np.array([requant(int(v), Fraction(-2, 45), Fraction(1, 7), 3, -16, 15) for v in codes[:, 0]])
    got = ref.execute(g2, {"x": codes}, codes=True)["mt"]
    assert np.array_equal(got, np.repeat(want[:, None], 3, axis=1))


def test_round_half_even_form_equals_the_op_and_the_rational_oracle_on_every_code():
    from tests.requant_oracle import round_half_even

    from .cases_threshold import REQUANT_RNE, _requant_rne

    b = GraphBuilder("rne")
    outs = _requant_rne(b, "", np.random.default_rng(0))
    b.output(*outs)
    g = b.build()
    xt = g.values["x"].dtype
    codes = np.repeat(np.arange(xt.min_code, xt.max_code + 1)[:, None, None], 2, axis=1).repeat(4, axis=2)
    got = ref.execute(g, {"x": codes, "xs": codes}, codes=True)
    assert g.producer(outs[1]).op == "Quantize"
    assert np.array_equal(got[outs[0]], got[outs[1]])
    want = np.array([[requant(int(v), m, bb, zp, -64, 63, round_half_even) for (m, bb, zp) in REQUANT_RNE]
                     for v in codes[:, 0, 0]])
    assert np.array_equal(got[outs[1]][:, 0, :], want)
