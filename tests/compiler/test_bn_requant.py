"""A BatchNormalization between a fixed-point (power-of-two) integer layer and a QONNX ``Quant`` folds
into the Quant's exact requantizer (a ``MultiThreshold``, real-number semantics of the Quant), as on
the float-scale path (issue 14, silent case 3 and the ``pot_bn_conv_relu_b6`` corpus row).

Before: the BN stayed a float32 ``Affine`` in the datapath.  ``affine_to_fixed`` made it fixed-point
only right before a ``Quantize`` (not through a ``Relu``), reproducing our *own* float32 Affine, whose
rounding differs from onnxruntime's float32 BN near quantization steps (real mismatches, not ties),
and hls4ml refused the float op ("float op feeds the fixed-point datapath").

Oracles: the float64 forward of ``test_scaled_import.eval64`` (qonnx's ``int_quant`` in float64) and
the source itself through qonnx's ``execute_onnx`` (onnxruntime), independently of qdeploy's report.
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
from onnx import numpy_helper

from qdeploy import api
from qdeploy.compiler.frontends import import_onnx
from qdeploy.compiler.ir import GraphBuilder
from qdeploy.compiler.ir.shiftform import node_shift_form
from qdeploy.compiler.reference import execute
from qdeploy.compiler.reference import run as ref_run

from .test_scaled_import import M, eval64, f32, ops, run_ir

warnings.filterwarnings("ignore", category=UserWarning)

#: BN parameters with no dyadic form (gamma / sqrt(var + eps) and the shift are not k * 2**-n)
_BN = {"g": [0.7, -1.3, 1.1, 0.45], "b": [0.05, 0.31, -0.2, 0.013], "m": [0.11, -0.4, 0.27, 0.0],
       "v": [1.3, 0.6, 2.2, 0.3]}


def _dense_bn_model():
    """x [1, 2] -> Quant (8 bit, 2**-3) -> MatMul (8-bit weights, 2**-7) -> BN (non-dyadic) -> Quant
    (16 bit, 2**-10): every scale a power of two, so the integer layer is plain fixed point.  The
    inputs are all 256 x 256 pairs of input codes (65,536 samples); with weight codes like (127, 1)
    they reach 23,953..32,641 distinct accumulator values per channel (every integer of the range
    for (127, 1)), and the 16-bit output makes float32 ties of the source frequent enough to be seen
    (90 of the 262,144 values)."""
    m = M()
    h = m.quant("qin", "x", 2.0 ** -3, 8)
    w = m.wquant("w", f32([[127, -101, 89, 1], [1, 3, -7, 113]]) * 2.0 ** -7, 2.0 ** -7, bits=8)
    h = m.op("MatMul", [h, w], "mm")
    bn = [m.const(f"bn_{k}", v) for k, v in _BN.items()]
    h = m.op("BatchNormalization", [h] + bn, "bn")
    y = m.quant("qout", h, 2.0 ** -10, 16)
    c = np.arange(-128, 128, dtype=np.float32) / 8
    x = np.stack(np.meshgrid(c, c, indexing="ij"), -1).reshape(-1, 2)
    return m.model([1, 2], y), x


def oracle64(model, x):
    """:func:`test_scaled_import.eval64` (qonnx's ``int_quant`` in float64, float64 layers), with the
    BatchNormalization of a rank-2 ``[N, C]`` tensor (channel axis 1) that it does not know."""
    if all(n.op_type != "BatchNormalization" for n in model.graph.node) or x.ndim != 2:
        return eval64(model, x)
    head, tail = copy.deepcopy(model), copy.deepcopy(model)
    k = next(i for i, n in enumerate(model.graph.node) if n.op_type == "BatchNormalization")
    bn = model.graph.node[k]
    del head.graph.node[k:]
    head.graph.output[0].name = bn.input[0]
    h = eval64(head, x)
    p = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    g, b, mu, var = (p[t] for t in bn.input[1:5])
    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    y = (h - mu) / np.sqrt(var + eps) * g + b
    del tail.graph.node[:k + 1]
    tail.graph.input[0].name = bn.output[0]
    for n in tail.graph.node:  # the rest reads the BN output under the name "x"
        for i, t in enumerate(n.input):
            if t == bn.output[0]:
                n.input[i] = "x"
    return eval64(tail, y)


def run_qonnx_batch(model, x):
    """qonnx ``execute_onnx`` (onnxruntime underneath) of ``model`` on the whole batch ``x`` at once
    (a copy whose input has batch size ``len(x)``; every op here keeps samples apart)."""
    from onnx import TensorProto, helper
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes
    m = copy.deepcopy(model)
    m.graph.ClearField("value_info")
    m.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape)))
    w = ModelWrapper(m).transform(InferShapes())
    return execute_onnx(w, {"x": x})[model.graph.output[0].name]


def compare(model, x, max_source_mismatch):
    """IR == float64 oracle on every element; returns (graph, #elements where the float32 source
    differs), after checking that count is at most ``max_source_mismatch`` of them."""
    g = import_onnx(model)
    got, oracle, src = run_ir(g, x), oracle64(model, x).astype(np.float32), run_qonnx_batch(model, x)
    assert got.shape == src.shape == oracle.shape
    np.testing.assert_array_equal(got, oracle)
    n_src = int((src != oracle).sum())
    assert n_src <= max_source_mismatch * src.size, (n_src, src.size)
    return g, n_src


def test_dense_bn_quant_is_exact_and_differs_from_onnxruntime_only_on_ties():
    """Import: no float op is left; the IR equals the float64 oracle on all 65,536 inputs x 4
    channels; the float32 source (onnxruntime) differs only where its float32 BN rounds across a
    quantization step (counted: > 0 here, at most 5 per mille)."""
    model, x = _dense_bn_model()
    g, n_src = compare(model, x, max_source_mismatch=0.005)
    assert ops(g) == ["Quantize", "Dense", "MultiThreshold"]
    assert n_src > 0  # the model does exercise float32 ties of the source
    assert not any(str(g.value(n.output).dtype) == "float32" for n in g.nodes)


@pytest.mark.parametrize("target", ["reference", "tvm-llvm"])
def test_dense_bn_quant_compiles_exact_up_to_counted_ties(tmp_path, target):
    """The compiled artifact on all 65,536 inputs: equal to the float64 oracle everywhere; where it
    differs from the float32 source (qonnx execute_onnx, computed here independently), the report's
    fidelity section counts exactly those values as float32 rounding of the source (its float64
    re-run), none as real mismatches, and the compile succeeds without --allow-inexact."""
    model, x = _dense_bn_model()
    res = api.compile(model, target=target, out_dir=tmp_path / "out", golden=x)
    got = np.asarray(res.load().predict(x))
    oracle = oracle64(model, x).astype(np.float32)
    src = run_qonnx_batch(model, x)
    np.testing.assert_array_equal(got, oracle)
    differ = int((got != src).sum())
    fid = res.report["fidelity"]
    assert fid["checked"] and fid["ok"], fid
    assert differ > 0 and fid["differing_values"] == differ and fid["float32_rounding"] == differ
    assert fid["real_mismatches"] == 0 and fid["unclassified"] == 0
    assert res.report["exactness"]["bit_exact"]


def test_dense_bn_quant_on_hls4ml_is_not_refused(tmp_path):
    """hls4ml: the BN is no float op any more (it was refused with 'float op feeds the fixed-point
    datapath ...', telling the user to quantize); the C simulation equals the reference on 4,096 of
    the inputs (every 16th), and the float64 oracle."""
    model, x = _dense_bn_model()
    xs = x[::16]
    res = api.compile(model, target="hls4ml", out_dir=tmp_path / "out", golden=xs)
    ex = res.report["exactness"]
    assert ex["bit_exact"] and ex["samples"] == len(xs)
    np.testing.assert_array_equal(np.asarray(res.load().predict(xs)), oracle64(model, xs).astype(np.float32))


def _conv_bn_relu_model(narrow: int):
    """Quant (6 bit, 2**-4) -> Conv 3x3 pad 1 (6-bit weights, 2**-5, no bias) -> BN -> Relu -> Quant
    (unsigned 6 bit, 2**-3), then a second Quant-ed Conv -> BN -> Quant (signed 4 bit, 2**-2, narrow
    or not): Brevitas' Conv -> BatchNorm2d -> QuantReLU block with power-of-two quantizers."""
    rng = np.random.default_rng(14)
    m = M()
    h = m.quant("qin", "x", 2.0 ** -4, 6)
    w1 = m.wquant("w1", rng.normal(0, 0.3, (4, 2, 3, 3)), 2.0 ** -5, bits=6)
    h = m.op("Conv", [h, w1], "conv1", pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    bn = [m.const(f"bn1_{k}", v) for k, v in _BN.items()]
    h = m.op("Relu", [m.op("BatchNormalization", [h] + bn, "bn1")], "relu1")
    h = m.quant("q1", h, 2.0 ** -3, 6, signed=0)
    w2 = m.wquant("w2", rng.normal(0, 0.3, (3, 4, 1, 1)), 2.0 ** -5, bits=6)
    h = m.op("Conv", [h, w2], "conv2", kernel_shape=[1, 1])
    bn = [m.const(f"bn2_{k}", v[:3]) for k, v in _BN.items()]
    h = m.op("BatchNormalization", [h] + bn, "bn2")
    y = m.quant("qout", h, 2.0 ** -2, 4, narrow=narrow)
    return m.model([1, 2, 6, 6], y), f32(rng.uniform(-2, 2, (300, 2, 6, 6)))


@pytest.mark.parametrize("narrow", [0, 1])
def test_pot_conv_bn_relu_quant_folds_into_multithreshold(narrow):
    """Both BNs (one through a Relu) become MultiThresholds on the integer accumulators, equal to
    the float64 oracle; each has a multiply-and-shift form (what hls4ml and TVM emit), a narrow
    signed output with a symmetric clamp, equal to the MultiThreshold on every accumulator code."""
    model, x = _conv_bn_relu_model(narrow)
    g, _ = compare(model, x, 0.01)
    assert ops(g) == ["Quantize", "Conv", "MultiThreshold", "Conv", "MultiThreshold"]
    for n in [n for n in g.nodes if n.op == "MultiThreshold"]:
        xt = g.value(n.inputs[0]).dtype
        f = node_shift_form(n, xt).form
        assert f is not None
        assert f.out.saturation == ("SAT_SYM" if narrow and n.name == "qout" else "SAT")
        # independent check on every input code: clamp(rnd((x*K + R) / 2**S)) == the reference kernel
        codes = np.arange(xt.min_code, xt.max_code + 1, dtype=np.int64)
        C = g.value(n.output).shape[-1]
        feed = np.repeat(codes[:, None], C, axis=1)
        b = GraphBuilder("mt")
        b.add(n.name, "MultiThreshold", [b.input("x", (C,), xt)], dict(n.attrs), dict(n.params), out="y")
        b.output("y")
        want = execute(b.build(), {"x": feed}, codes=True)["y"]
        acc = feed * np.asarray(f.K, dtype=object) + np.asarray(f.R, dtype=object)
        if f.rounding == "TRN":
            q = acc // (1 << f.S)
        else:
            q = np.vectorize(lambda a: _rne(a, f.S))(acc)
        got = np.clip(q.astype(np.int64), f.out.min_code, f.out.max_code)
        np.testing.assert_array_equal(got, want)


def _rne(a: int, s: int) -> int:
    """Round ``a / 2**s`` half to even, in Python integers."""
    q, r = divmod(int(a), 1 << s)
    half = 1 << (s - 1) if s else 0
    if s and (r > half or (r == half and q % 2)):
        q += 1
    return q


@pytest.mark.parametrize("reader", ["output", "quant20"])
def test_bn_without_a_narrow_following_quant_stays_float(reader):
    """A BN on an integer layer read by something else than a Quant (the graph output), or by a Quant
    wider than a MultiThreshold takes (20 bits > requant.MAX_BITS), is not routed to a requantizer:
    it stays the float32 Affine of before (the source's float32 BN), within float32 rounding."""
    m = M()
    h = m.quant("qin", "x", 2.0 ** -3, 8)
    w = m.wquant("w", f32([[7, -5, 3, 6], [3, 7, -8, 1]]) * 0.25, 0.25, bits=4)
    h = m.op("MatMul", [h, w], "mm")
    y = m.op("BatchNormalization", [h] + [m.const(f"bn_{k}", v) for k, v in _BN.items()], "bn")
    if reader == "quant20":
        y = m.quant("q20", y, 2.0 ** -8, 20)
    model = m.model([1, 2], y)
    g = import_onnx(model)
    assert "MultiThreshold" not in ops(g) and str(g.value("bn").dtype) == "float32"
    x = f32(np.random.default_rng(3).uniform(-8, 8, (64, 2)))
    np.testing.assert_allclose(ref_run(g, x), run_qonnx_batch(model, x), rtol=1e-6, atol=2.0 ** -8)
