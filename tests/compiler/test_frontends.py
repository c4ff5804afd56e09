"""Frontends: QONNX/ONNX import (realcases + synthetic models), Brevitas import, QONNX export."""
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdeploy.compiler import reference as ref
from qdeploy.compiler.errors import ModelImportError, UnsupportedError
from qdeploy.compiler.frontends import export_qonnx, import_onnx, load_model
from qdeploy.compiler.ir import verify
from qdeploy.compiler.ir.types import FixedType
from tests.conftest import REALCASES, needs_realcases

warnings.filterwarnings("ignore", category=UserWarning)
QD = "qonnx.custom_op.general"


# ---------------------------------------------------------------------- helpers
def run_ir(g, x):
    """Run the IR reference on an ONNX-layout batch and return ONNX-layout outputs."""
    xi = np.transpose(x, g.meta["input_perms"][g.inputs[0]])
    y = ref.run(g, xi)
    return np.transpose(y, g.meta["output_perms"][g.outputs[0]])


def run_qonnx(model, x):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    m = ModelWrapper(model).transform(InferShapes())
    return execute_onnx(m, {model.graph.input[0].name: x})[model.graph.output[0].name]


def mk(nodes, in_shape, inits=None, opset=13, out="y"):
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()]
    g = helper.make_graph(nodes, "synthetic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(QD, 1)])
    m.ir_version = 8
    return m


def f32(a):
    return np.asarray(a, dtype=np.float32)


def quant_node(name, x, out, scale, bits, signed=1, narrow=0, mode="ROUND", zp=0.0):
    inits = {f"{name}_s": f32(scale), f"{name}_z": f32(zp), f"{name}_b": f32(bits)}
    node = helper.make_node("Quant", [x, f"{name}_s", f"{name}_z", f"{name}_b"], [out], name=name, domain=QD,
                            signed=signed, narrow=narrow, rounding_mode=mode)
    return node, inits


def check(model, x, atol=1e-5, rtol=1e-5):
    g = import_onnx(model)
    verify(g)
    y = run_ir(g, x)
    want = run_qonnx(model, x)
    assert y.shape == want.shape
    np.testing.assert_allclose(y, want, atol=atol, rtol=rtol)
    return g


def ops(g):
    return [n.op for n in g.nodes]


# ---------------------------------------------------------------------- realcases
TFC = REALCASES / "qonnx-zoo-tfc-mnist"


@needs_realcases
@pytest.mark.parametrize("variant", ["TFC_1W1A", "TFC_1W2A"])
def test_realcase_tfc(variant):
    g = import_onnx(TFC / f"{variant}.onnx")
    assert g.meta["frontend"] == "qonnx" and g.meta["source"].endswith(f"{variant}.onnx")
    assert g.meta["input_perms"] == {"0": [0, 2, 3, 1]}
    assert g.value("0").shape == (28, 28, 1)
    assert ops(g).count("Dense") == 4 and "Transpose" not in ops(g)
    x = np.load(TFC / "mnist_test_digits_7210_0to255.npy").astype(np.float32).reshape(-1, 1, 28, 28) / 255
    y = run_ir(g, x)
    assert y.argmax(1).tolist() == [7, 2, 1, 0]
    np.testing.assert_allclose(y, np.load(TFC / f"derived_{variant}_output_4x10.npy"), atol=1e-5, rtol=0)


@needs_realcases
def test_realcase_jet_tagger():
    d = REALCASES / "jsc-qkeras-3layer"
    g = import_onnx(d / "qkeras_jettagging.onnx")
    assert str(g.value("global_in").dtype) == "float32"  # no input quantizer: a pass inserts one later
    dense = [n for n in g.nodes if n.op == "Dense"]
    assert len(dense) == 4 and all(isinstance(n.params["weight"].dtype, FixedType) for n in dense)
    assert all(isinstance(n.params["bias"].dtype, FixedType) for n in dense)
    q = [n for n in g.nodes if n.op == "Quantize"]
    assert len(q) == 3 and all(str(n.attrs["to"]) == "ufixed<6,0,RND_CONV,SAT>" for n in q)
    x = np.load(d / "synthetic_input_uniform_pm1_64x16.npy")
    np.testing.assert_allclose(ref.run(g, x), np.load(d / "derived_qonnx_output_64x5.npy"), atol=1e-6, rtol=0)


@needs_realcases
def test_realcase_bnn_fc_1layer():
    d = REALCASES / "hls4ml-bnn-fc-1layer"
    g = import_onnx(d / "bnn_model_fc_1layer.onnx")
    assert ops(g) == ["Sign", "Dense", "Sign"]
    y = ref.run(g, np.load(d / "input_pm1_8x3.npy"))
    assert np.array_equal(y, np.load(d / "derived_qonnx_output_8x4.npy"))


@needs_realcases
def test_realcase_mnist_cnn():
    d = REALCASES / "onnx-mnist-cnn"
    g = import_onnx(d / "model.onnx")
    assert ops(g) == ["Conv", "Relu", "MaxPool", "Conv", "Relu", "MaxPool", "Reshape", "Dense"]
    assert g.node("Convolution28").attrs["pads"] == (2, 2, 2, 2)
    x = numpy_helper.to_array(onnx.load_tensor(str(d / "test_data_set_0" / "input_0.pb")))
    want = numpy_helper.to_array(onnx.load_tensor(str(d / "test_data_set_0" / "output_0.pb")))
    y = run_ir(g, x)
    assert y.argmax() == 2
    np.testing.assert_allclose(y, want, atol=1e-3, rtol=1e-5)


@needs_realcases
def test_realcase_residual_block():
    d = REALCASES / "qonnx-residual-block"
    g = import_onnx(d / "residual_block_clean.onnx")
    assert g.meta["output_perms"] == {"global_out": [0, 3, 1, 2]}
    assert ops(g).count("Add") == 1 and ops(g).count("Conv") == 3
    y = run_ir(g, np.load(d / "synthetic_input_1x1x200x200.npy"))
    np.testing.assert_allclose(y, np.load(d / "derived_output.npy"), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- synthetic models
def test_gemm_transB_alpha_beta(rng):
    w = f32(rng.normal(size=(5, 7)))
    c = f32(rng.normal(size=(5,)))
    m = mk([helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="gemm", transB=1, alpha=0.5, beta=2.0)],
           [3, 7], {"w": w, "c": c})
    g = check(m, f32(rng.normal(size=(3, 7))))
    assert ops(g) == ["Dense"] and g.node("gemm").params["weight"].shape == (7, 5)


def test_conv_auto_pad_same_upper(rng):
    w = f32(rng.normal(size=(4, 3, 4, 4)))
    m = mk([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", auto_pad="SAME_UPPER", strides=[2, 2])],
           [2, 3, 9, 9], {"w": w})
    g = check(m, f32(rng.normal(size=(2, 3, 9, 9))))
    assert g.node("conv").attrs["pads"] == (1, 1, 2, 2)
    assert g.value(g.inputs[0]).shape == (9, 9, 3) and g.value("y").shape == (5, 5, 4)


def test_conv_groups_bias_and_bn_fold(rng):
    w = f32(rng.normal(size=(6, 2, 3, 3)))
    b = f32(rng.normal(size=(6,)))
    bn = {"g": f32(rng.uniform(0.5, 2, 6)), "be": f32(rng.normal(size=6)), "mu": f32(rng.normal(size=6)),
          "var": f32(rng.uniform(0.5, 2, 6))}
    m = mk([helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", group=2, pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["bn"], name="bn", epsilon=1e-3),
            helper.make_node("Relu", ["bn"], ["y"], name="relu")], [2, 4, 6, 5], {"w": w, "b": b, **bn})
    g = check(m, f32(rng.normal(size=(2, 4, 6, 5))), atol=1e-4)
    assert ops(g) == ["Conv", "Relu"] and g.node("conv").attrs["groups"] == 2


def test_bn_after_quantized_dense_is_affine(rng):
    qn, qi = quant_node("wq", "wf", "w", 2.0 ** -3, 4)
    bn = {"g": f32(rng.uniform(0.5, 2, 4)), "be": f32(rng.normal(size=4)), "mu": f32(rng.normal(size=4)),
          "var": f32(rng.uniform(0.5, 2, 4))}
    m = mk([qn, helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
            helper.make_node("BatchNormalization", ["mm", "g", "be", "mu", "var"], ["y"], name="bn")],
           [3, 6], {"wf": f32(rng.normal(size=(6, 4))), **qi, **bn})
    g = check(m, f32(rng.normal(size=(3, 6))), atol=1e-5)
    assert ops(g) == ["Dense", "Affine"]
    assert g.node("mm").params["weight"].dtype == FixedType(4, 1, True)


def test_avgpool_globalavgpool_flatten_dense(rng):
    w = f32(rng.normal(size=(3, 4)))
    m = mk([helper.make_node("AveragePool", ["x"], ["p"], name="ap", kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("GlobalAveragePool", ["p"], ["gp"], name="gap"),
            helper.make_node("Flatten", ["gp"], ["f"], name="flat"),
            helper.make_node("MatMul", ["f", "w"], ["y"], name="fc")], [2, 3, 8, 6], {"w": w})
    g = check(m, f32(rng.normal(size=(2, 3, 8, 6))))
    assert ops(g) == ["AvgPool", "GlobalAvgPool", "Dense"]  # GAP + Flatten is a no-op reshape


def test_flatten_of_feature_map_folds_permutation_into_dense(rng):
    w = f32(rng.normal(size=(2 * 3 * 4, 5)))
    m = mk([helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Flatten", ["r"], ["f"], name="flat"),
            helper.make_node("MatMul", ["f", "w"], ["y"], name="fc")], [2, 2, 3, 4], {"w": w})
    g = check(m, f32(rng.normal(size=(2, 2, 3, 4))))
    assert ops(g) == ["Relu", "Reshape", "Dense"]
    # not followed by a Dense: a Transpose to (C, H, W) keeps ONNX's element order
    m2 = mk([helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["y"], name="flat")], [2, 2, 3, 4])
    g2 = check(m2, f32(rng.normal(size=(2, 2, 3, 4))))
    assert ops(g2) == ["Relu", "Transpose", "Reshape"]


def test_concat_channels_and_transpose(rng):
    w1, w2 = f32(rng.normal(size=(2, 3, 1, 1))), f32(rng.normal(size=(5, 3, 3, 3)))
    m = mk([helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"),
            helper.make_node("Conv", ["x", "w2"], ["b"], name="c2", pads=[1, 1, 1, 1]),
            helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
            helper.make_node("Transpose", ["cat"], ["t"], name="tr", perm=[0, 2, 3, 1]),
            helper.make_node("Relu", ["t"], ["y"], name="relu")], [2, 3, 4, 5], {"w1": w1, "w2": w2})
    g = check(m, f32(rng.normal(size=(2, 3, 4, 5))))
    assert g.node("cat").attrs["axis"] == 2 and g.value("cat").shape == (4, 5, 7)
    assert "Transpose" in ops(g)  # the NHWC-transposed output is put back in its canonical layout


def test_softmax_mul_div_sub_constants(rng):
    m = mk([helper.make_node("Mul", ["x", "m"], ["a"], name="mul"),
            helper.make_node("Div", ["a", "d"], ["b"], name="div"),
            helper.make_node("Sub", ["b", "s"], ["c"], name="sub"),
            helper.make_node("Softmax", ["c"], ["y"], name="sm", axis=1)], [3, 4],
           {"m": f32(rng.normal(size=4)), "d": f32([3.0]), "s": f32(0.25)})
    g = check(m, f32(rng.normal(size=(3, 4))), atol=1e-6)
    assert ops(g) == ["Affine", "Affine", "Affine", "Softmax"]


@pytest.mark.parametrize("scale,bits,signed,narrow,mode,want", [
    (2.0 ** -3, 4, 1, 0, "ROUND", "fixed<4,1,RND_CONV,SAT>"),
    (2.0 ** -3, 4, 1, 1, "ROUND", "fixed<4,1,RND_CONV,SAT_SYM>"),
    (2.0 ** -4, 6, 0, 0, "ROUND", "ufixed<6,2,RND_CONV,SAT>"),
    (4.0, 3, 1, 0, "FLOOR", "fixed<3,5,TRN,SAT>"),
    (0.5, 5, 1, 0, "ROUND_TO_ZERO", "fixed<5,4,TRN_ZERO,SAT>"),
])
def test_activation_quant_types(rng, scale, bits, signed, narrow, mode, want):
    qn, qi = quant_node("q", "x", "y", scale, bits, signed, narrow, mode)
    m = mk([qn], [64, 8], qi)
    x = f32(rng.normal(scale=4 * scale * 2 ** bits / 8, size=(64, 8)))
    x[0, :4] = np.array([0.5, 1.5, -0.5, -2.5]) * scale  # ties
    g = import_onnx(m)
    assert str(g.node("q").attrs["to"]) == want
    if mode != "ROUND_TO_ZERO":  # qonnx has no executor for that name (it calls it DOWN)
        assert np.array_equal(run_ir(g, x), run_qonnx(m, x))
    else:
        assert np.array_equal(run_ir(g, x), np.clip(np.fix(x / scale), -16, 15) * scale)


def test_quantized_weights_fold_to_exact_fixed_consts(rng):
    qn, qi = quant_node("wq", "wf", "wqo", 2.0 ** -5, 6, 1, 1)
    bq, bi = quant_node("bq", "bf", "bqo", 2.0 ** -7, 8)
    an, ai = quant_node("aq", "x", "xq", 2.0 ** -4, 8)
    m = mk([qn, bq, an, helper.make_node("Transpose", ["wqo"], ["wt"], name="wt", perm=[1, 0]),
            helper.make_node("MatMul", ["xq", "wt"], ["mm"], name="mm"),
            helper.make_node("Add", ["mm", "bqo"], ["y"], name="add")], [5, 6],
           {"wf": f32(rng.normal(size=(3, 6))), "bf": f32(rng.normal(size=3)), **qi, **bi, **ai})
    x = f32(rng.normal(size=(5, 6)))
    g = check(m, x, atol=0, rtol=0)
    assert ops(g) == ["Quantize", "Dense"]
    d = g.node("mm")
    assert d.params["weight"].dtype == FixedType(6, 1, True) and d.params["bias"].dtype.frac_bits == 7
    assert isinstance(g.value("y").dtype, FixedType)  # exact fixed-point accumulator


def test_bipolar_quant_activation_and_weights(rng):
    m = mk([helper.make_node("BipolarQuant", ["x", "one"], ["s"], name="bq", domain="onnx.brevitas"),
            helper.make_node("BipolarQuant", ["wf", "one"], ["w"], name="bw", domain="finn.custom_op.general"),
            helper.make_node("MatMul", ["s", "w"], ["y"], name="mm")], [4, 5],
           {"one": f32(1.0), "wf": f32(rng.normal(size=(5, 3)))})
    g = check(m, f32(rng.normal(size=(4, 5))), atol=0)
    assert ops(g) == ["Sign", "Dense"] and g.node("mm").params["weight"].dtype == FixedType(2, 2, True)


def test_input_name_dims_and_batch_dynamic(rng):
    m = mk([helper.make_node("Relu", ["x"], ["y"], name="relu")], ["N", 3, 5])
    g = import_onnx(m, name="dyn")
    assert g.name == "dyn" and g.value("x").shape == (5, 3) and g.meta["input_perms"]["x"] == [0, 2, 1]


# ---------------------------------------------------------------------- errors
def _err(model, exc=UnsupportedError):
    with pytest.raises(exc) as ei:
        import_onnx(model)
    return str(ei.value)


def test_error_unknown_op_and_domain():
    msg = _err(mk([helper.make_node("Foo", ["x"], ["y"], name="my_foo")], [1, 4]))
    assert "my_foo" in msg and "unsupported op type 'Foo'" in msg
    msg = _err(mk([helper.make_node("Bar", ["x"], ["y"], name="bar1", domain="acme.ops")], [1, 4]))
    assert "bar1" in msg and "'Bar'" in msg and "acme.ops" in msg
    msg = _err(mk([helper.make_node("Trunc", ["x", "s", "z", "b", "b"], ["y"], name="tr", domain=QD)], [1, 4],
                  {"s": f32(1), "z": f32(0), "b": f32(4)}))
    assert "tr" in msg and "Trunc" in msg
    msg = _err(mk([helper.make_node("Sin", ["x"], ["y"], name="sine")], [1, 4]))
    assert "sine" in msg and "'Sin'" in msg


def test_error_pool_dilation(rng):
    # Conv dilations are supported (tests/compiler/test_import_batch_a.py); pooling ones are not
    msg = _err(mk([helper.make_node("MaxPool", ["x"], ["y"], name="dpool", kernel_shape=[2, 2], dilations=[2, 2])],
                  [1, 2, 8, 8]))
    assert "dpool" in msg and "dilation" in msg


@pytest.mark.parametrize("kw,reason", [
    # non-power-of-two scales, integer zero points, narrow unsigned ranges and CEIL/UP rounding are
    # imported exactly as MultiThreshold requantizers: tests/compiler/test_scaled_import.py
    (dict(scale=0.0123, bits=8, zp=0.5), "is not an integer"),
    (dict(scale=0.0123, bits=20), "bit width 20 outside 1..16"),
    (dict(scale=0.25, bits=40), "bit width"),
    (dict(scale=0.25, bits=4, mode="STOCHASTIC"), "rounding mode 'STOCHASTIC'"),
])
def test_error_activation_quant(kw, reason):
    qn, qi = quant_node("bad_q", "x", "y", **kw)
    msg = _err(mk([qn], [1, 4], qi))
    assert "bad_q" in msg and reason in msg


def test_error_dynamic_dim():
    msg = _err(mk([helper.make_node("Relu", ["x"], ["y"], name="relu")], ["N", 3, "H", 4]))
    assert "'x'" in msg and "'H'" in msg and "dynamic" in msg


@needs_realcases
def test_error_truncated_file(tmp_path):
    data = (REALCASES / "onnx-mnist-cnn" / "model.onnx").read_bytes()
    p = tmp_path / "trunc.onnx"
    p.write_bytes(data[: len(data) // 3])
    msg = _err(p, ModelImportError)
    assert "cannot parse ONNX model" in msg and "\n" not in msg
    assert "not found" in _err(tmp_path / "missing.onnx", ModelImportError)


def test_error_bn_training_and_maxpool_indices(rng):
    bn = {k: f32(rng.uniform(0.5, 1, 3)) for k in ("g", "b", "m", "v")}
    msg = _err(mk([helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], name="bn_train",
                                    training_mode=1)], [2, 3, 4, 4], bn, opset=15))
    assert "bn_train" in msg and "training" in msg
    # (ceil_mode=1 is supported, partial windows included: tests/compiler/test_import_batch_a_pool.py)
    msg = _err(mk([helper.make_node("MaxPool", ["x"], ["y", "idx"], name="mp", kernel_shape=[2, 2])], [1, 3, 5, 5]))
    assert "mp" in msg and "Indices" in msg


# ---------------------------------------------------------------------- Brevitas, load_model, export
BREVITAS_MODEL = '''
import torch
import brevitas.nn as qnn
from brevitas.quant import (Int8ActPerTensorFixedPoint, Int8WeightPerTensorFixedPoint, Int16Bias,
                            Uint8ActPerTensorFixedPoint)


class TinyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint, return_quant_tensor=True)
        self.fc1 = qnn.QuantLinear(8, 16, bias=True, weight_quant=Int8WeightPerTensorFixedPoint,
                                   bias_quant=Int16Bias, return_quant_tensor=True)
        self.relu = qnn.QuantReLU(act_quant=Uint8ActPerTensorFixedPoint, return_quant_tensor=True)
        self.fc2 = qnn.QuantLinear(16, 4, bias=False, weight_quant=Int8WeightPerTensorFixedPoint)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(self.inp(x))))


def build():
    torch.manual_seed(0)
    m = TinyMLP().eval()
    m.example_input = torch.rand(1, 8) * 2 - 1
    return m
'''


def test_brevitas_and_load_model_spec(tmp_path):
    import torch
    pytest.importorskip("brevitas")
    f = tmp_path / "tiny_brevitas.py"
    f.write_text(BREVITAS_MODEL)
    g = load_model(f"{f}:build")
    assert g.meta["frontend"] == "brevitas" and g.name == "TinyMLP"
    assert ops(g) == ["Quantize", "Dense", "Relu", "Quantize", "Dense"]
    assert all(isinstance(n.params["weight"].dtype, FixedType) for n in g.nodes if n.op == "Dense")
    assert isinstance(g.value(g.outputs[0]).dtype, FixedType)
    import importlib.util
    spec = importlib.util.spec_from_file_location("tiny_brevitas_again", f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    module = mod.build()
    x = torch.rand(64, 8) * 4 - 2
    with torch.no_grad():
        want = module(x).detach().numpy()
    np.testing.assert_allclose(ref.run(g, x.numpy()), want, atol=1e-6, rtol=0)
    with pytest.raises(ModelImportError, match="neither an .onnx file"):
        load_model("no_colon_here")


@needs_realcases
@pytest.mark.parametrize("case,xfile,dfile", [
    ("qonnx-zoo-tfc-mnist/TFC_1W2A.onnx", "qonnx-zoo-tfc-mnist/mnist_test_digits_7210_0to255.npy",
     "qonnx-zoo-tfc-mnist/derived_TFC_1W2A_output_4x10.npy"),
    ("qonnx-residual-block/residual_block_clean.onnx", "qonnx-residual-block/synthetic_input_1x1x200x200.npy",
     "qonnx-residual-block/derived_output.npy"),
])
def test_export_roundtrip_runs_in_qonnx(tmp_path, case, xfile, dfile):
    g = import_onnx(REALCASES / case)
    model = export_qonnx(g, tmp_path / "exported.onnx")
    assert (tmp_path / "exported.onnx").is_file()
    assert any(n.domain == QD for n in model.graph.node) == g.is_quantized()
    x = np.load(REALCASES / xfile).astype(np.float32)
    if "tfc" in case:
        x = x.reshape(-1, 1, 28, 28) / 255
    want = np.load(REALCASES / dfile)
    got = np.concatenate([run_qonnx(model, x[i:i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # and the exported model re-imports to the same IR behaviour
    g2 = import_onnx(model)
    np.testing.assert_allclose(run_ir(g2, x), run_ir(g, x), atol=1e-5, rtol=1e-5)


def test_per_channel_constants_and_activation_sub_on_feature_maps(rng):
    m = mk([helper.make_node("Mul", ["x", "m"], ["a"], name="mul"),
            helper.make_node("Add", ["a", "c"], ["b"], name="add"),
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Sub", ["b", "r"], ["y"], name="sub")], [2, 3, 4, 5],
           {"m": f32(rng.normal(size=(3, 1, 1))), "c": f32(rng.normal(size=(1, 3, 1, 1)))})
    g = check(m, f32(rng.normal(size=(2, 3, 4, 5))))
    assert g.node("mul").params["scale"].shape == (3,) and g.node("add").params["bias"].shape == (3,)
    assert ops(g).count("Sub") == 1 and ops(g).count("Add") == 0  # activation - activation is one IR Sub
    # a constant varying along H is not per-channel: refused, naming the node
    bad = mk([helper.make_node("Add", ["x", "c"], ["y"], name="add_hw")], [1, 3, 4, 5], {"c": f32(np.arange(4.0).reshape(4, 1))})
    assert "add_hw" in _err(bad) and "per-channel" in _err(bad)


def test_conv1d_and_channel_softmax(rng):
    w = f32(rng.normal(size=(4, 3, 3)))
    m = mk([helper.make_node("Conv", ["x", "w"], ["c"], name="conv1d", pads=[1, 1]),
            helper.make_node("MaxPool", ["c"], ["p"], name="mp", kernel_shape=[2], strides=[2]),
            helper.make_node("Softmax", ["p"], ["y"], name="sm", axis=1)], [2, 3, 10], {"w": w})
    g = check(m, f32(rng.normal(size=(2, 3, 10))), atol=1e-6)
    assert g.value(g.inputs[0]).shape == (10, 3) and g.meta["input_perms"]["x"] == [0, 2, 1]
    assert ops(g) == ["Conv", "MaxPool", "Softmax"]


def _leaky_model(alpha):
    q1, i1 = quant_node("qin", "x", "a", 2.0 ** -4, 8)
    q2, i2 = quant_node("qout", "b", "y", 2.0 ** -5, 6)
    return mk([q1, helper.make_node("LeakyRelu", ["a"], ["b"], name="lrelu", alpha=alpha), q2], [5, 16],
              {**i1, **i2})


def test_leaky_relu_power_of_two_slope_matches_qonnx_exactly(rng, tmp_path):
    """ONNX LeakyRelu(alpha=2**-3) between Quant nodes imports through the op's own OpSpec hook
    and equals qonnx's executor bit for bit (ties included: inputs on the 2**-6 grid); the export
    runs in qonnx with the same result."""
    m = _leaky_model(0.125)
    x = f32(rng.integers(-600, 600, size=(5, 16)) / 64.0)
    g = import_onnx(m)
    verify(g)
    assert "LeakyRelu" in ops(g)
    np.testing.assert_array_equal(run_ir(g, x), run_qonnx(m, x))
    exported = export_qonnx(g, tmp_path / "lrelu.onnx")
    got = np.concatenate([run_qonnx(exported, x[i:i + 1]) for i in range(len(x))])
    np.testing.assert_array_equal(got, run_qonnx(m, x))


def test_leaky_relu_other_slope_is_refused_naming_the_node():
    msg = _err(_leaky_model(0.01))
    assert "lrelu" in msg and "alpha=0.01" in msg and "power of two" in msg


def test_leaky_relu_with_zero_slope_is_a_relu(rng):
    m = _leaky_model(0.0)
    x = f32(rng.integers(-600, 600, size=(5, 16)) / 64.0)
    g = import_onnx(m)
    assert "Relu" in ops(g) and "LeakyRelu" not in ops(g)
    np.testing.assert_array_equal(run_ir(g, x), run_qonnx(m, x))


def test_brevitas_example_without_batch_axis_is_explained():
    """An example input without the batch axis fails inside Brevitas' export with a bare
    IndexError; the error says that the module's own forward fails and that the example must be
    batch-first (a new user's mistake)."""
    import torch
    import brevitas.nn as qnn
    from qdeploy.compiler.frontends.brevitas import import_brevitas

    m = torch.nn.Sequential(qnn.QuantIdentity(bit_width=8, return_quant_tensor=True),
                            qnn.QuantLinear(16, 8, bias=True, weight_bit_width=4), torch.nn.ReLU())
    with pytest.raises(ModelImportError, match=r"own forward fails on the example input of shape \(16,\).*must be batch-first"):
        import_brevitas(m, torch.rand(16))
    g = import_brevitas(m, torch.rand(1, 16))  # the same module with a batch axis imports
    assert list(g.inputs) and len(g.nodes) > 0
