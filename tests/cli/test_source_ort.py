"""The one-session onnxruntime runner of QONNX sources (qdeploy/source_ort.py) against qonnx's own
executor, which it replaces on the fidelity path: every rounding mode, bipolar, narrow, per-channel
scales, zero points, float32 ties, and a batch-fixed Reshape."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdeploy.source_onnx as so
from qdeploy.source_ort import standard_proto

MODES = ["ROUND", "HALF_EVEN", "CEIL", "FLOOR", "UP", "DOWN", "HALF_UP", "HALF_DOWN"]


def _quant_model(mode, bits, signed, narrow, per_channel, zp):
    C = 6
    scale = (np.linspace(0.07, 0.4, C) if per_channel else np.array([1 / 3])).astype(np.float32)
    scale = scale.reshape(1, C, 1) if per_channel else scale.reshape(())
    inits = [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(np.float32(zp), "z"),
             numpy_helper.from_array(np.float32(bits), "b"),
             numpy_helper.from_array(np.array([1, C * 5], np.int64), "shape")]
    nodes = [helper.make_node("Quant", ["x", "s", "z", "b"], ["q"], name="quant", domain="qonnx.custom_op.general",
                              signed=int(signed), narrow=int(narrow), rounding_mode=mode),
             helper.make_node("Reshape", ["q", "shape"], ["y"], name="flat", allowzero=1)]
    g = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C * 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14), helper.make_opsetid("qonnx.custom_op.general", 1)])
    return m


def _qonnx(m, x):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes
    w = ModelWrapper(m).transform(InferShapes())
    return np.concatenate([execute_onnx(w, {"x": x[i:i + 1]})["y"] for i in range(len(x))])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bits,signed,narrow,per_channel,zp", [(4, True, False, False, 0), (3, False, False, True, 2),
                                                               (8, True, True, True, -3), (1, True, False, False, 0)])
def test_rewritten_quant_equals_qonnx_executor(mode, bits, signed, narrow, per_channel, zp):
    m = _quant_model(mode, bits, signed, narrow, per_channel, zp)
    assert standard_proto(m) is not None
    rng = np.random.default_rng(bits)
    x = np.concatenate([rng.normal(0, 2, (20, 6, 5)), np.arange(-120, 120).reshape(8, 6, 5) / 16]).astype(np.float32)
    x[0, 0, :3] = [0.0, -0.0, 0.5]
    res, how = so.run_standard(m, {"x": x}, ["y"], len(x))  # None if it fell back
    assert how == "batched"
    want = _qonnx(m, x)
    assert np.array_equal(res["y"], want), int((res["y"] != want).sum())
    assert len(np.unique(want)) > (1 if bits == 1 else 4)


def test_other_custom_ops_fall_back_to_qonnx():
    m = _quant_model("ROUND", 4, True, False, False, 0)
    m.graph.node[0].op_type = "Trunc"  # any op the rewrite does not know
    assert standard_proto(m) is None
