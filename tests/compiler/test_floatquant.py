"""QONNX FloatQuant (minifloat): the IR op against qonnx's executor, import, TVM and export.

Oracles: qonnx's ``float_quant`` (the op's NumPy executor) element by element on edge values, and
``execute_onnx`` on a minifloat linear layer.
"""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdeploy
from qdeploy.compiler import reference as ref
from qdeploy.compiler.errors import UnsupportedError
from qdeploy.compiler.frontends import export_qonnx, import_onnx
from qdeploy.compiler.ir import GraphBuilder
from qdeploy.compiler.ir.types import FLOAT32

QD = "qonnx.custom_op.general"
FORMATS = [(4, 3, 7), (5, 2, 15), (3, 2, 3), (2, 1, 1)]  # e4m3, e5m2 (FP8), two narrow ones


def _edge_values(rng, E, M, bias, scale):
    """Random values at many magnitudes, powers of two and their float32 neighbours, every tie of
    every binade of the format, subnormals, overflow, +-0, +-inf, NaN (all times ``scale``)."""
    vals = [rng.normal(0, s, 2000) for s in (1e-3, 0.1, 1, 10, 1e3)]
    p2 = 2.0 ** np.arange(-30, 30)
    vals += [p2, -p2, p2 * (1 - 2.0 ** -24), p2 * (1 + 2.0 ** -23)]
    for e in range(-bias, (1 << E) - bias + 1):
        g = 2.0 ** (max(e, 1 - bias) - M)
        mids = 2.0 ** e + g * (np.arange(2 ** M + 1) + 0.5)
        vals += [mids, -mids, mids * (1 - 2.0 ** -12)]
    vals.append(np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1e-45]))
    return (np.concatenate(vals) * scale).astype(np.float32)


def _op_graph(E, M, bias, scale, sat, has_inf, has_nan, max_val, n):
    b = GraphBuilder("fq")
    x = b.input("x", (n,), FLOAT32)
    b.output(b.add("fq", "FloatQuant", [x], attrs={
        "exponent_bits": E, "mantissa_bits": M, "exponent_bias": bias, "scale": scale, "max_val": max_val,
        "saturation": sat, "has_inf": has_inf, "has_nan": has_nan}))
    return b.build()


def _same(got, want):
    return ((got == want) & (np.signbit(got) == np.signbit(want))) | (np.isnan(got) & np.isnan(want))


@pytest.mark.parametrize("E,M,bias", FORMATS)
@pytest.mark.parametrize("scale", [1.0, 0.25, 0.0137])
@pytest.mark.parametrize("sat,has_inf,has_nan,max_val", [(True, False, False, np.inf), (False, True, False, np.inf),
                                                         (False, False, True, np.inf), (True, False, False, 5.0)])
def test_reference_equals_qonnx_float_quant(E, M, bias, scale, sat, has_inf, has_nan, max_val):
    from qonnx.custom_op.general.floatquant import float_quant

    x = _edge_values(np.random.default_rng(E * 10 + M), E, M, bias, scale)
    g = _op_graph(E, M, bias, scale, sat, has_inf, has_nan, max_val, x.size)
    got = ref.run(g, x[None])[0]
    with np.errstate(all="ignore"):
        want = float_quant(x.copy(), np.float32(scale), np.float32(E), np.float32(M), np.float32(bias), True,
                           np.float32(max_val), has_inf, has_nan, True, "ROUND", int(sat)).astype(np.float32)
    bad = ~_same(got, want)
    assert not bad.any(), (x[bad][:4], got[bad][:4], want[bad][:4])


def _fq(name, x, out, E, M, bias, scale, **attrs):
    inits = {f"{name}_{r}": np.float32(v) for r, v in (("s", scale), ("e", E), ("m", M), ("b", bias),
                                                         ("max", 3e38))}  # max_val: no cap beyond the format
    attrs = {"has_inf": 0, "has_nan": 0, "has_subnormal": 1, "saturation": 1, **attrs}
    node = helper.make_node("FloatQuant", [x] + list(inits), [out], name=name, domain=QD, **attrs)
    return node, inits


def minifloat_linear(rng, act=(3, 2, 3, 1.0), wt=(3, 2, 3, 0.25), out=(4, 3, 7, 0.37), k=8, n=5):
    """x -> FloatQuant(act) -> MatMul(FloatQuant(wt)(W)) -> FloatQuant(out).  With the default
    e3m2 formats every product has at most 6 significant bits between 2**-10 and 2**8, so each
    float32 partial sum of the source is exact (|sum| <= 8 * 28 * 7 < 2**11 on a 2**-10 grid)."""
    n1, i1 = _fq("fq_x", "x", "xq", *act)
    n2, i2 = _fq("fq_w", "w", "wq", *wt)
    n3, i3 = _fq("fq_y", "acc", "y", *out)
    nodes = [n1, n2, helper.make_node("MatMul", ["xq", "wq"], ["acc"], name="mm"), n3]
    inits = {**i1, **i2, **i3, "w": rng.normal(0, 2, (k, n)).astype(np.float32)}
    g = helper.make_graph(nodes, "minifloat_linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                          [numpy_helper.from_array(np.asarray(v), nm) for nm, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QD, 1)])
    m.ir_version = 8
    return m


def _qonnx(model, x):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    m = ModelWrapper(model).transform(InferShapes())
    return np.concatenate([execute_onnx(m, {"x": x[i:i + 1]})["y"] for i in range(len(x))])


@pytest.mark.parametrize("target", ["tvm-llvm", "hls4ml"])
def test_minifloat_linear_layer_reference_and_targets_match_qonnx(target, tmp_path):
    """hls4ml: both FloatQuants run on the host (prologue / epilogue), the Dense on the device."""
    rng = np.random.default_rng(3)
    m = minifloat_linear(rng)
    g = import_onnx(m)
    assert [n.op for n in g.nodes] == ["FloatQuant", "Quantize", "Dense", "FloatQuant"]
    assert g.nodes[2].params["weight"].dtype.width <= 16  # e3m2 weights: exact fixed-point codes
    x = np.concatenate([rng.normal(0, s, (40, 8)) for s in (0.3, 3, 30)]).astype(np.float32)
    want = _qonnx(m, x)
    assert len(np.unique(want)) > 20
    assert np.array_equal(ref.run(g, x), want)
    path = tmp_path / "mf.onnx"
    path.write_bytes(m.SerializeToString())
    res = qdeploy.compile(str(path), target, tmp_path / "out", golden=x)
    assert res.report["fidelity"]["ok"], res.report["fidelity"]
    assert np.array_equal(res.load().predict(x), want)
    back = _qonnx(export_qonnx(g), x)
    assert np.array_equal(back, want)


def test_floating_rounding_modes_other_than_round_are_refused():
    m = minifloat_linear(np.random.default_rng(0))
    for n in m.graph.node:
        if n.name == "fq_x":
            n.attribute.extend([helper.make_attribute("rounding_mode", "FLOOR")])
    with pytest.raises(UnsupportedError, match="node 'fq_x'.*only ROUND"):
        import_onnx(m)


def test_missing_saturation_attribute_is_refused():
    m = minifloat_linear(np.random.default_rng(0))
    n = next(n for n in m.graph.node if n.name == "fq_y")
    keep = [a for a in n.attribute if a.name != "saturation"]
    del n.attribute[:]
    n.attribute.extend(keep)
    with pytest.raises(UnsupportedError, match="node 'fq_y'.*saturation missing"):
        import_onnx(m)


def test_per_channel_minifloat_scale_is_refused():
    m = minifloat_linear(np.random.default_rng(0))
    for t in m.graph.initializer:
        if t.name == "fq_x_s":
            t.CopyFrom(numpy_helper.from_array(np.resize(np.float32([0.5, 0.25]), 8), "fq_x_s"))
    with pytest.raises(UnsupportedError, match="node 'fq_x'.*per-tensor"):
        import_onnx(m)


@pytest.mark.parametrize("per_channel", [False, True])
def test_brevitas_fp8_e4m3_linear_imports_and_matches_the_module(per_channel, tmp_path):
    """Brevitas' OCP FP8 e4m3 quantizers (learned float scales) exported with export_qonnx: the
    imported minifloat quantizer equals Brevitas' own quantized activations bit for bit."""
    import warnings

    import torch
    import brevitas.nn as qnn
    from brevitas.export import export_qonnx as brevitas_export
    from brevitas.quant.float_quant_ocp import (Fp8e4m3OCPActPerTensorFloat, Fp8e4m3OCPWeightPerChannelFloat,
                                                Fp8e4m3OCPWeightPerTensorFloat)

    wq = Fp8e4m3OCPWeightPerChannelFloat if per_channel else Fp8e4m3OCPWeightPerTensorFloat

    class Fp8Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = qnn.QuantIdentity(act_quant=Fp8e4m3OCPActPerTensorFloat, return_quant_tensor=True)
            self.fc = qnn.QuantLinear(8, 4, bias=False, weight_quant=wq)

        def forward(self, x):
            return self.fc(self.inp(x))

    torch.manual_seed(0)
    m = Fp8Linear()
    m.train()
    for _ in range(3):  # calibrate the activation scale
        m(torch.randn(16, 8) * 3)
    m.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        brevitas_export(m, torch.randn(1, 8), str(tmp_path / "fp8.onnx"))
    g = import_onnx(str(tmp_path / "fp8.onnx"))
    fq = [n for n in g.nodes if n.op == "FloatQuant"]
    assert len(fq) == 1 and fq[0].attrs["exponent_bits"] == 4 and fq[0].attrs["mantissa_bits"] == 3
    x = np.random.default_rng(0).normal(0, 3, (256, 8)).astype(np.float32)
    with torch.no_grad():
        q_want = m.inp(torch.tensor(x)).value.numpy()
        y_want = m(torch.tensor(x)).numpy()
    q_got = ref.execute(g, x, keep=True)[fq[0].output]
    assert np.array_equal(q_got, q_want)
    assert len(np.unique(q_want)) > 50
    np.testing.assert_allclose(ref.run(g, x), y_want, rtol=1e-5, atol=1e-6)  # float32 sums: order may differ
    w_ir = [n for n in g.nodes if n.op == "Dense"][0].params["weight"].real()
    assert np.array_equal(w_ir.T.astype(np.float32), m.fc.quant_weight().value.detach().numpy())  # FP8 weights
