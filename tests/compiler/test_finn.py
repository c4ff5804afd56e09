"""FINN-ONNX import: finn_datatype annotations and MultiThreshold (compiler/frontends/onnx_finn.py).

Oracle: qonnx's ``execute_onnx`` on the FINN model itself; the QONNX export of the imported graph
must run in it to the same outputs (round trip).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdeploy.compiler import reference as ref
from qdeploy.compiler.errors import UnsupportedError
from qdeploy.compiler.frontends import export_qonnx, import_onnx

FINN = "finn.custom_op.general"
QD = "qonnx.custom_op.general"


def _wrap(nodes, inits, in_shape, dts, domain_opsets=(FINN, QD)):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.datatype import DataType

    g = helper.make_graph(nodes, "finn_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)] +
                          [helper.make_opsetid(d, 1) for d in domain_opsets])
    m.ir_version = 8
    w = ModelWrapper(m)
    for t, dt in dts.items():
        w.set_tensor_datatype(t, DataType[dt])
    return w.model


def _qonnx(model, x):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    m = ModelWrapper(model).transform(InferShapes())
    name = model.graph.input[0].name
    return np.concatenate([execute_onnx(m, {name: x[i:i + 1]})[model.graph.output[0].name] for i in range(len(x))])


def _mt(name, x, out, thr, domain=FINN, **attrs):
    return helper.make_node("MultiThreshold", [x, f"{name}_t"], [out], name=name, domain=domain, **attrs), \
        {f"{name}_t": thr}


def _thresholds(rng, c, t, lo, hi):
    """Sorted thresholds, half of them non-integers (rounded up exactly by the importer)."""
    v = rng.uniform(lo, hi, (c, t))
    v[:, ::2] = np.round(v[:, ::2])
    return np.sort(v.astype(np.float32), axis=1)


def finn_mlp(rng, out_scale=1.0, out_bias=0.0, domain=FINN):
    """INT8 input -> MatMul(bipolar) -> MultiThreshold (UINT2) -> MatMul(INT2) -> MultiThreshold
    (global thresholds, out_bias -8: INT4) -> MatMul(INT3) -> MultiThreshold(out_scale, out_bias)."""
    w1 = rng.choice([-1.0, 1.0], (16, 24))
    w2 = rng.integers(-2, 2, (24, 12)).astype(np.float64)
    w3 = rng.integers(-4, 4, (12, 5)).astype(np.float64)
    n1, t1 = _mt("mt1", "a1", "h1", _thresholds(rng, 24, 3, -150, 150), domain, out_dtype="UINT2")
    n2, t2 = _mt("mt2", "a2", "h2", _thresholds(rng, 1, 15, -6, 6), domain, out_dtype="INT4", out_bias=-8.0,
                 data_layout="NC")
    n3, t3 = _mt("mt3", "a3", "y", _thresholds(rng, 5, 7, -40, 40), domain, out_dtype="UINT3",
                 out_scale=out_scale, out_bias=out_bias)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a1"], name="mm1"), n1,
             helper.make_node("MatMul", ["h1", "w2"], ["a2"], name="mm2"), n2,
             helper.make_node("MatMul", ["h2", "w3"], ["a3"], name="mm3"), n3]
    inits = {"w1": w1, "w2": w2, "w3": w3, **t1, **t2, **t3}
    dts = {"x": "INT8", "w1": "BIPOLAR", "w2": "INT2", "w3": "INT3", "h1": "UINT2", "h2": "INT4"}
    return _wrap(nodes, inits, [1, 16], dts)


@pytest.mark.parametrize("out_scale,out_bias,exact", [(1.0, 0.0, True), (-0.25, 1.5, True), (0.3, -0.7, False)])
def test_finn_mlp_matches_qonnx_and_round_trips(out_scale, out_bias, exact):
    rng = np.random.default_rng(0)
    m = finn_mlp(rng, out_scale, out_bias)
    g = import_onnx(m)
    ops = [n.op for n in g.nodes]
    assert ops[:6] == ["Quantize", "Dense", "MultiThreshold", "Dense", "MultiThreshold", "Dense"]
    assert ops[6:] == (["MultiThreshold"] if exact else ["MultiThreshold", "Affine"])
    assert all(g.values[n.output].dtype.__class__.__name__ == "FixedType" for n in g.nodes[:7])
    x = rng.integers(-128, 128, (64, 16)).astype(np.float32)
    want = _qonnx(m, x)
    assert len(np.unique(want)) > 3  # the thresholds are reached by some inputs and not by others
    got = ref.run(g, x)
    assert np.array_equal(got, want)
    back = _qonnx(export_qonnx(g), x)
    assert np.array_equal(back, want)


def test_finn_mlp_with_arbitrary_thresholds_is_refused_by_hls4ml_naming_the_node(tmp_path):
    """hls4ml has no thresholding layer: a MultiThreshold goes through a proved multiply-and-shift
    form, which random FINN thresholds do not have -> a one-line refusal naming the node."""
    import qdeploy

    m = finn_mlp(np.random.default_rng(0))
    path = tmp_path / "finn_mlp.onnx"
    path.write_bytes(m.SerializeToString())
    with pytest.raises(UnsupportedError, match="node 'mt1'.*multiply-and-shift"):
        qdeploy.compile(str(path), "hls4ml", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["reference", "tvm-llvm"])
def test_finn_mlp_compiles_exactly(target, tmp_path):
    import qdeploy

    rng = np.random.default_rng(0)
    m = finn_mlp(rng, -0.25, 1.5)
    path = tmp_path / "finn_mlp.onnx"
    path.write_bytes(m.SerializeToString())
    x = rng.integers(-128, 128, (64, 16)).astype(np.float32)
    want = _qonnx(m, x)
    res = qdeploy.compile(str(path), target, tmp_path / "out", golden=x)
    assert res.report["fidelity"]["ok"], res.report["fidelity"]
    assert np.array_equal(res.load().predict(x), want)


def _single(thr, shape, attrs, dt="INT4"):
    n, t = _mt("mt", "x", "y", thr, QD, out_dtype="UINT4", **attrs)
    return _wrap([n], t, shape, {"x": dt})


@pytest.mark.parametrize("layout", ["", "NCHW", "NHWC"])
def test_multithreshold_on_images_follows_the_channel_axis(layout):
    rng = np.random.default_rng(1)
    shape = [1, 3, 4, 5] if layout != "NHWC" else [1, 4, 5, 3]
    thr = _thresholds(rng, 3, 6, -8, 8)
    m = _single(thr, shape, {"data_layout": layout} if layout else {})
    g = import_onnx(m)
    x = rng.integers(-8, 8, (8, *shape[1:])).astype(np.float32)
    want = _qonnx(m, x)
    xi = np.transpose(x, g.meta["input_perms"]["x"])
    got = np.transpose(ref.run(g, xi), g.meta["output_perms"]["y"])
    assert np.array_equal(got, want)
    assert np.array_equal(_qonnx(export_qonnx(g), x), want)


def test_float_input_without_annotation_is_refused():
    n, t = _mt("mt", "x", "y", np.zeros((1, 2), np.float32), QD, out_dtype="UINT2")
    m = _wrap([n], t, [1, 4], {})
    with pytest.raises(UnsupportedError, match="node 'mt'.*float32: it must be integer-valued"):
        import_onnx(m)


def test_rank3_without_layout_is_refused():
    m = _single(np.zeros((1, 2), np.float32), [1, 3, 4], {})
    with pytest.raises(UnsupportedError, match="node 'mt'.*rank-3.*data_layout"):
        import_onnx(m)


def test_annotated_weight_with_other_values_is_refused():
    n, t = _mt("mt", "a", "y", np.zeros((1, 2), np.float32), QD, out_dtype="UINT2")
    m = _wrap([helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"), n], {"w": np.full((4, 3), 0.5), **t},
              [1, 4], {"x": "INT4", "w": "INT2"})
    from qdeploy.compiler.errors import ModelImportError
    with pytest.raises(ModelImportError, match="node 'mm'.*annotated INT2"):
        import_onnx(m)


def _with_topk(m, k, use_values=False):
    m.graph.initializer.append(numpy_helper.from_array(np.array([k], np.int64), "k"))
    m.graph.node.append(helper.make_node("TopK", ["y", "k"], ["vals", "idx"], name="label_select"))
    m.graph.output[0].name = "vals" if use_values else "idx"
    if not use_values:
        m.graph.output[0].type.tensor_type.elem_type = TensorProto.INT64
    return m


@pytest.mark.parametrize("k", [1, 3])
def test_topk_label_select_matches_qonnx_ties_to_the_lower_index(k, tmp_path):
    rng = np.random.default_rng(0)
    m = _with_topk(finn_mlp(rng), k)
    g = import_onnx(m)
    assert g.nodes[-1].op == "TopK"
    x = rng.integers(-128, 128, (64, 16)).astype(np.float32)
    want = _qonnx(m, x)
    scores = _qonnx(finn_mlp(np.random.default_rng(0)), x)
    assert any(len(set(r)) < len(r) for r in scores)  # ties among the UINT3 scores
    assert np.array_equal(ref.run(g, x), want)
    import qdeploy
    path = tmp_path / "finn_topk.onnx"
    path.write_bytes(m.SerializeToString())
    res = qdeploy.compile(str(path), "tvm-llvm", tmp_path / "out", golden=x)
    assert res.report["fidelity"]["ok"], res.report["fidelity"]
    assert np.array_equal(res.load().predict(x), want)


def test_topk_values_output_is_refused():
    m = _with_topk(finn_mlp(np.random.default_rng(0)), 1, use_values=True)
    with pytest.raises(UnsupportedError, match="node 'label_select'.*values output"):
        import_onnx(m)
