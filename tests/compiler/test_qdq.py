"""ONNX QDQ import: QuantizeLinear/DequantizeLinear -> QONNX Quant (compiler/frontends/onnx_qdq.py).

Oracles: onnxruntime runs the original QDQ model; qonnx's ``execute_onnx`` runs the normalized one.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdeploy.compiler import reference as ref
from qdeploy.compiler.errors import UnsupportedError
from qdeploy.compiler.frontends import import_onnx
from qdeploy.compiler.frontends.onnx_qdq import normalize_qdq


def _model(nodes, inits, in_shape, opset=13, extra_opsets=()):
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    g = helper.make_graph(nodes, "qdq", ins, outs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    m.ir_version = 9 if opset < 21 else 10
    return m


def _ort(model, x):
    import onnxruntime as ort

    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def _qonnx(model, x):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    m = ModelWrapper(model).transform(InferShapes())
    return execute_onnx(m, {"x": x})["y"]


def _qdq(name, x, out, scale, zp, zdtype):
    inits = {f"{name}_s": np.float32(scale), f"{name}_z": np.array(zp, dtype=zdtype)}
    return [helper.make_node("QuantizeLinear", [x, f"{name}_s", f"{name}_z"], [f"{name}_q"], name=name),
            helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [out], name=f"{name}_dq")
            ], inits


@pytest.mark.parametrize("zp,zdtype", [(0, np.uint8), (3, np.uint8), (4, np.uint8), (-5, np.int8), (0, np.int8),
                                       (7, np.uint16), (-3, np.int16)])
def test_pair_rewrite_matches_onnxruntime_at_ties(zp, zdtype):
    """QuantizeLinear rounds x/s before adding z; the rewrite must too, for any z != 0 (odd z at exact
    ties; any z where the float32 sum x/s + z rounds)."""
    nodes, inits = _qdq("q", "x", "y", 0.25, zp, zdtype)
    m = _model(nodes, inits, [1, 64], opset=21 if np.dtype(zdtype).itemsize == 2 else 13)  # 16-bit: opset 21
    k = np.arange(-40, 40, dtype=np.float32)
    ties = (k + 0.5) * 0.25  # x / s = k + 1/2 exactly
    rng = np.random.default_rng(0)
    bits = 16 if np.dtype(zdtype).itemsize == 2 else 8
    big = rng.uniform(-2.0 ** (bits - 1), 2.0 ** (bits - 1), 1000).astype(np.float32)  # saturation both ends
    for x in (ties.reshape(1, 80)[:, :64], big[:64].reshape(1, 64), rng.normal(0, 20, (1, 64)).astype(np.float32)):
        want = _ort(m, x)
        norm = onnx.ModelProto()
        norm.CopyFrom(m)
        normalize_qdq(norm)
        assert not any(n.op_type.endswith("Linear") for n in norm.graph.node)
        got = _qonnx(norm, x)
        assert np.array_equal(got, want), np.flatnonzero(got != want)[:5]
    assert len([n for n in norm.graph.node if n.op_type == "Quant"]) == (2 if zp else 1)


def _mlp(zp_act=0):
    rng = np.random.default_rng(1)
    w = rng.integers(-128, 128, size=(16, 8)).astype(np.int8)
    ws = (2.0 ** -rng.integers(5, 9, size=8)).astype(np.float32)  # per output channel (axis 1 of [K, N])
    nodes, inits = _qdq("qin", "x", "xq", 2.0 ** -4, zp_act, np.int8)
    inits.update({"w": w, "w_s": ws, "w_z": np.zeros(8, np.int8)})
    nodes.append(helper.make_node("DequantizeLinear", ["w", "w_s", "w_z"], ["wf"], name="wdq", axis=1))
    nodes.append(helper.make_node("MatMul", ["xq", "wf"], ["acc"], name="mm"))
    n2, i2 = _qdq("qout", "acc", "y", 2.0 ** -2, 0, np.int8)
    nodes += n2
    inits.update(i2)
    return _model(nodes, inits, [1, 16])


def test_qdq_mlp_imports_and_matches_onnxruntime():
    m = _mlp()
    g = import_onnx(m)
    ops = [n.op for n in g.nodes]
    assert ops[:2] == ["Quantize", "Dense"] and ops[2] in ("Quantize", "MultiThreshold"), ops
    w = g.nodes[1].params["weight"]
    assert w.dtype.width <= 16  # exact int8 codes (per-channel power-of-two scales kept out of the weights)
    rng = np.random.default_rng(2)
    x = rng.normal(0, 3, (256, 16)).astype(np.float32)
    x[:8] = np.round(x[:8] * 32) / 32 + 1 / 32  # some exact ties of x / s
    want = np.concatenate([_ort(m, x[i:i + 1]) for i in range(len(x))])
    got = ref.run(g, x)
    assert np.array_equal(got, want)


def test_dynamic_batch_qdq_model_compiles_with_a_source_check(tmp_path):
    """torch/onnxruntime exports often declare a symbolic batch: the fidelity check must still run."""
    import qdeploy

    m = _mlp()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    path = tmp_path / "mlp.onnx"
    path.write_bytes(m.SerializeToString())
    x = np.random.default_rng(4).normal(0, 3, (32, 16)).astype(np.float32)
    res = qdeploy.compile(str(path), "reference", tmp_path / "out", golden=x)
    fid = res.report["fidelity"]
    assert fid["checked"] and fid["ok"] and fid["samples"] == 32, fid
    assert np.array_equal(res.load().predict(x), _ort(m, x))


def test_qoperator_ops_are_refused_naming_the_node():
    inits = {"xs": np.float32(0.1), "xz": np.uint8(0), "w": np.ones((4, 4), np.uint8), "ws": np.float32(0.1),
             "wz": np.uint8(0), "ys": np.float32(0.1), "yz": np.uint8(0)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q"),
             helper.make_node("QLinearMatMul", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["yq"], name="qmm"),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"], name="dq")]
    with pytest.raises(UnsupportedError, match="node 'qmm'.*QLinearMatMul.*export QDQ instead"):
        import_onnx(_model(nodes, inits, [1, 4]))


def test_block_quantization_is_refused():
    inits = {"w": np.ones((4, 4), np.int8), "ws": np.full((2, 4), 0.5, np.float32), "wz": np.zeros((2, 4), np.int8)}
    nodes = [helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wf"], name="wdq", axis=0, block_size=2),
             helper.make_node("MatMul", ["x", "wf"], ["y"], name="mm")]
    with pytest.raises(UnsupportedError, match="node 'wdq'.*block_size=2"):
        import_onnx(_model(nodes, inits, [1, 4], opset=21))


def test_lonely_quantizelinear_is_refused():
    inits = {"s": np.float32(0.5), "z": np.int8(0)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="qq"),
             helper.make_node("Cast", ["q"], ["y"], name="cast", to=TensorProto.FLOAT)]
    with pytest.raises(UnsupportedError, match="node 'qq'.*feeds Cast"):
        import_onnx(_model(nodes, inits, [1, 4]))


def test_int4_weights_and_uint4_activations_opset21():
    """4-bit QDQ (opset 21): uint4 activations with an odd zero point, int4 per-channel weights."""
    rng = np.random.default_rng(5)
    w = rng.integers(-8, 8, size=(12, 6))
    nodes, inits = _qdq("qin", "x", "xq", 2.0 ** -2, 7, np.uint8)
    # re-type the activation pair as uint4 and the weight as int4 (onnx stores them packed)
    inits["qin_z"] = helper.make_tensor("qin_z", TensorProto.UINT4, [], [7])
    winit = helper.make_tensor("w", TensorProto.INT4, [12, 6], w.ravel().tolist())
    wz = helper.make_tensor("w_z", TensorProto.INT4, [6], [0] * 6)
    ws = (2.0 ** -rng.integers(2, 5, size=6)).astype(np.float32)
    nodes.append(helper.make_node("DequantizeLinear", ["w", "w_s", "w_z"], ["wf"], name="wdq", axis=1))
    nodes.append(helper.make_node("MatMul", ["xq", "wf"], ["y"], name="mm"))
    g = helper.make_graph(nodes, "int4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(inits["qin_s"], "qin_s"), inits["qin_z"], winit, wz,
                           numpy_helper.from_array(ws, "w_s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    x = rng.normal(0, 2, (128, 12)).astype(np.float32)
    x[:4] = (np.round(x[:4] * 4) + 0.5) / 4  # exact ties of x / s (odd zero point: rounding before the shift)
    want = np.concatenate([_ort(m, x[i:i + 1]) for i in range(len(x))])
    norm = onnx.ModelProto()
    norm.CopyFrom(m)
    normalize_qdq(norm)
    got = np.concatenate([_qonnx(norm, x[i:i + 1]) for i in range(len(x))])
    assert np.array_equal(got, want)
    assert [n.op_type for n in norm.graph.node].count("Quant") == 3  # 2 for the odd zero point, 1 weight


def test_float64_reevaluation_of_a_qdq_source():
    """The fidelity check's float64 re-run of the source handles QDQ (via the QONNX Quant form):
    with non-power-of-two scales and an odd zero point it agrees with the exact reference."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_shapes import InferShapes

    from qdeploy.source_run import execute_double, to_double

    m = _mlp(zp_act=3)
    for t in m.graph.initializer:
        if t.name in ("qin_s", "qout_s"):
            t.CopyFrom(numpy_helper.from_array(np.float32(0.0123 if t.name == "qin_s" else 0.37), t.name))
    x = np.random.default_rng(6).normal(0, 1, (64, 16)).astype(np.float32)
    d = ModelWrapper(to_double(m)).transform(InferShapes())
    got = np.concatenate([execute_double(d, {"x": x[i:i + 1]})["y"] for i in range(len(x))])
    assert got.dtype == np.float64
    want = ref.run(import_onnx(m), x)
    assert np.array_equal(got.astype(np.float32), want)
    assert len(np.unique(want)) > 10


@pytest.mark.parametrize("scale", [0.0123, 1 / 3])
@pytest.mark.parametrize("zp,zdtype", [(3, np.uint8), (-5, np.int8), (4, np.uint8), (-128, np.int8), (0, np.int8)])
def test_non_power_of_two_scale_and_zero_points_import_exactly(zp, zdtype, scale):
    """Through the scaled-integer Quant path: the imported pair equals onnxruntime's Q -> DQ, also on
    inputs whose float32 quotient x / s is a tie the exact quotient is not (pixels k/16 with
    s = float32(1/3): 0.5 / s is 1.49999995 exactly, 1.5 in float32, and onnxruntime rounds the
    float32 value)."""
    nodes, inits = _qdq("q", "x", "y", scale, zp, zdtype)
    m = _model(nodes, inits, [1, 256])
    rng = np.random.default_rng(7)
    pixels = (np.arange(256) % 49 - 16).astype(np.float32).reshape(1, 256) / 16
    x = np.concatenate([rng.normal(0, 1, (3, 256)), rng.uniform(-3, 3, (3, 256)), pixels]).astype(np.float32)
    g = import_onnx(m)
    got = ref.run(g, x)
    want = np.concatenate([_ort(m, x[i:i + 1]) for i in range(len(x))])
    assert np.array_equal(got, want), int((got != want).sum())
    assert len(np.unique(want)) > (100 if scale < 0.1 else 8)


def test_onnxruntime_contrib_qdq_int16():
    """com.microsoft QuantizeLinear/DequantizeLinear (16-bit QDQ before opset 21): same semantics."""
    nodes, inits = _qdq("q", "x", "y", 2.0 ** -6, -3, np.int16)
    for n in nodes:
        n.domain = "com.microsoft"
    m = _model(nodes, inits, [1, 64], extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    rng = np.random.default_rng(8)
    x = np.concatenate([rng.normal(0, 300, (2, 64)), (np.arange(-64, 64).reshape(2, 64) + 0.5) / 64]
                       ).astype(np.float32)
    got = ref.run(import_onnx(m), x)
    want = np.concatenate([_ort(m, x[i:i + 1]) for i in range(len(x))])
    assert np.array_equal(got, want)
    assert want.max() == 2.0 ** -6 * (32767 + 3) and want.min() == 2.0 ** -6 * (-32768 + 3)  # saturated
