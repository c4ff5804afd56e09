"""QONNX Quant with float scales, per-channel scales and zero points (compiler/frontends/onnx_scaled.py).

Each synthetic model (onnx.helper, Quant nodes in domain qonnx.custom_op.general) is run three ways:
the IR reference; qonnx's ``execute_onnx`` on the model as it is (float32, the source); and the
same executor on the model converted to float64 -- an independent oracle of the real-number
semantics (weights ``q * s`` are exact in float64, sums are 2**-53-accurate).  The IR must equal the
float64 oracle on every element; the float32 source may differ only where its own float32
arithmetic rounds across a quantization step, which is counted and must be rare.
"""
import warnings

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdeploy.compiler import reference as ref
from qdeploy.compiler.errors import UnsupportedError
from qdeploy.compiler.frontends import import_onnx
from qdeploy.compiler.ir import verify
from qdeploy.compiler.ir.types import FixedType

warnings.filterwarnings("ignore", category=UserWarning)
QD = "qonnx.custom_op.general"


def f32(a):
    return np.asarray(a, dtype=np.float32)


class M:
    """A tiny model builder: nodes + initializers."""

    def __init__(self):
        self.nodes, self.inits = [], {}

    def quant(self, name, x, scale, bits, signed=1, narrow=0, zp=0.0, mode="ROUND"):
        self.inits.update({f"{name}_s": f32(scale), f"{name}_z": f32(zp), f"{name}_b": f32(bits)})
        self.nodes.append(helper.make_node("Quant", [x, f"{name}_s", f"{name}_z", f"{name}_b"], [name], name=name,
                                           domain=QD, signed=signed, narrow=narrow, rounding_mode=mode))
        return name

    def wquant(self, name, w, scale, bits=8, narrow=1):
        """A Quant'ed weight: raw float weights w, per-tensor or per-channel scale."""
        self.inits[f"{name}_w"] = f32(w)
        return self.quant(name, f"{name}_w", scale, bits, 1, narrow)

    def op(self, op, ins, name, **attrs):
        self.nodes.append(helper.make_node(op, ins, [name], name=name, **attrs))
        return name

    def const(self, name, v):
        self.inits[name] = f32(v)
        return name

    def model(self, in_shape, out):
        inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in self.inits.items()]
        g = helper.make_graph(self.nodes, "scaled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QD, 1)])
        m.ir_version = 8
        return m


def eval64(model, x):
    """A float64 NumPy forward of the test models (the oracle of the real-number semantics): qonnx's
    own ``int_quant`` in float64 for every Quant, plain float64 for the other ops."""
    from qonnx.custom_op.general.intquant import int_quant
    env = {}
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        env[t.name] = a.astype(np.float64) if a.dtype == np.float32 else a
    env["x"] = x.astype(np.float64)
    for n in model.graph.node:
        a = {at.name: helper.get_attribute_value(at) for at in n.attribute}
        i = [env[t] for t in n.input]
        if n.op_type == "Quant":
            mode = a["rounding_mode"].decode() if isinstance(a["rounding_mode"], bytes) else a["rounding_mode"]
            y = int_quant(i[0], i[1], i[2], i[3], a["signed"], a["narrow"], mode)
        elif n.op_type == "MatMul":
            y = i[0] @ i[1]
        elif n.op_type == "Gemm":
            y = i[0] @ (i[1].T if a.get("transB") else i[1]) + (i[2] if len(i) > 2 else 0)
        elif n.op_type == "Add":
            y = i[0] + i[1]
        elif n.op_type == "Relu":
            y = np.maximum(i[0], 0)
        elif n.op_type == "Pad":
            p = [int(v) for v in i[1]]
            r = len(p) // 2
            y = np.pad(i[0], [(p[k], p[k + r]) for k in range(r)])
        elif n.op_type == "Flatten":
            y = i[0].reshape(len(i[0]), -1)
        elif n.op_type == "BatchNormalization":
            g, b, mu, var = (v.reshape(1, -1, 1, 1) for v in i[1:5])
            y = (i[0] - mu) / np.sqrt(var + a.get("epsilon", 1e-5)) * g + b
        elif n.op_type == "MaxPool":
            k, st = a["kernel_shape"], a.get("strides", [1, 1])
            N, C, H, W = i[0].shape
            Ho, Wo = (H - k[0]) // st[0] + 1, (W - k[1]) // st[1] + 1
            y = np.full((N, C, Ho, Wo), -np.inf)
            for dy in range(k[0]):
                for dx in range(k[1]):
                    y = np.maximum(y, i[0][:, :, dy:dy + st[0] * Ho:st[0], dx:dx + st[1] * Wo:st[1]])
        elif n.op_type == "GlobalAveragePool":
            y = i[0].mean(axis=(2, 3), keepdims=True)
        elif n.op_type == "ReduceMean":
            y = i[0].mean(axis=tuple(a["axes"]), keepdims=bool(a.get("keepdims", 1)))
        elif n.op_type == "AveragePool":  # count_include_pad=1: zeros are counted
            k, st, p = a["kernel_shape"], a.get("strides", [1, 1]), a.get("pads", [0, 0, 0, 0])
            xp = np.pad(i[0], ((0, 0), (0, 0), (p[0], p[2]), (p[1], p[3])))
            Ho, Wo = (xp.shape[2] - k[0]) // st[0] + 1, (xp.shape[3] - k[1]) // st[1] + 1
            y = np.zeros(xp.shape[:2] + (Ho, Wo))
            for dy in range(k[0]):
                for dx in range(k[1]):
                    y += xp[:, :, dy:dy + st[0] * Ho:st[0], dx:dx + st[1] * Wo:st[1]]
            y = y / (k[0] * k[1])
        elif n.op_type == "Conv":
            p = a.get("pads", [0, 0, 0, 0])
            xp = np.pad(i[0], ((0, 0), (0, 0), (p[0], p[2]), (p[1], p[3])))
            O, _, kh, kw = i[1].shape
            d = a.get("dilations", [1, 1])
            Ho, Wo = xp.shape[2] - d[0] * (kh - 1), xp.shape[3] - d[1] * (kw - 1)
            y = np.zeros((len(xp), O, Ho, Wo))
            for dy in range(kh):
                for dx in range(kw):
                    y += np.einsum("nchw,oc->nohw", xp[:, :, d[0] * dy:d[0] * dy + Ho, d[1] * dx:d[1] * dx + Wo],
                                   i[1][:, :, dy, dx])
            if len(i) > 2:
                y = y + i[2].reshape(1, -1, 1, 1)
        else:
            raise NotImplementedError(n.op_type)
        env[n.output[0]] = np.asarray(y, dtype=np.float64)
    return env[model.graph.output[0].name]


def run_qonnx(model, x):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    m = ModelWrapper(model).transform(InferShapes())
    return np.concatenate([execute_onnx(m, {"x": x[i:i + 1]})[model.graph.output[0].name] for i in range(len(x))])


def run_ir(g, x):
    y = ref.run(g, np.transpose(x, g.meta["input_perms"][g.inputs[0]]))
    return np.transpose(y, g.meta["output_perms"][g.outputs[0]])


def compare(model, x, max_source_mismatch=0.01):
    """IR == float64 oracle everywhere (as float32); returns (graph, #elements where the float32
    source differs from the oracle), after checking that count is at most ``max_source_mismatch``."""
    g = import_onnx(model)
    verify(g)
    got = run_ir(g, x)
    oracle = eval64(model, x).astype(np.float32)
    src = run_qonnx(model, x)
    assert got.shape == src.shape == oracle.shape
    np.testing.assert_array_equal(got, oracle)
    n_src = int((src != oracle).sum())
    assert n_src <= max_source_mismatch * src.size, (n_src, src.size)
    print("source float32 differs from the float64 oracle on", n_src, "of", src.size)
    return g, n_src


def ops(g):
    return [n.op for n in g.nodes]


def _mlp_model():
    """Float input scale with a zero point, per-channel weight scales (MatMul [1, N] and Gemm [N, 1]),
    a float bias Add, ReLU + unsigned Quant, an output Quant with zero point 7."""
    rng = np.random.default_rng(0)
    m = M()
    h = m.quant("qin", "x", 0.0311, 8, zp=-3.0)
    w1 = m.wquant("w1", rng.normal(0, 0.3, (16, 12)), f32(rng.uniform(0.002, 0.004, (1, 12))))
    h = m.op("MatMul", [h, w1], "mm1")
    h = m.op("Add", [h, m.const("b1", rng.normal(0, 0.2, 12))], "add1")
    h = m.op("Relu", [h], "relu1")
    h = m.quant("q1", h, 0.0237, 8, signed=0)
    w2 = m.wquant("w2", rng.normal(0, 0.3, (6, 12)), f32(rng.uniform(0.002, 0.004, (6, 1))))
    h = m.op("Gemm", [h, w2, m.const("b2", rng.normal(0, 0.2, 6))], "gemm2", transB=1)
    y = m.quant("qout", h, 0.0419, 8, signed=0, zp=7.0)
    return m.model([1, 16], y), f32(rng.uniform(-3, 3, (200, 16)))


def test_mlp_float_scales_zero_points_per_channel_weights():
    model, x = _mlp_model()
    g, n_src = compare(model, x)
    # the last Affines: q - z (exact, fixed point), then float32 * s (the output epilogue)
    assert ops(g) == ["Quantize", "MultiThreshold", "Dense", "MultiThreshold", "Dense", "MultiThreshold", "Affine",
                      "Affine"]
    dense = [n for n in g.nodes if n.op == "Dense"]
    assert all(n.params["weight"].dtype.is_integer and n.params["weight"].dtype.width <= 8 for n in dense)
    assert "bias" not in dense[0].params  # the float bias lives in the pending map, not in the datapath
    last = [n for n in g.nodes if n.op == "MultiThreshold"][-1]
    assert g.value(last.output).dtype == FixedType(8, 8, False)  # codes q in [0, 255]; z = 7 is in the map


def _cnn_model():
    """A zero point before a padded Conv, per-channel weight scales, BN with a negative gamma, ReLU,
    MaxPool, a per-channel activation scale (power-of-two ratios) with zero points, Flatten, MatMul."""
    rng = np.random.default_rng(1)
    m = M()
    h = m.quant("qin", "x", 0.0277, 8, zp=5.0)  # a zero point before a padded conv: code 0 is the real 0
    w1 = m.wquant("w1", rng.normal(0, 0.3, (4, 3, 3, 3)), f32(rng.uniform(0.002, 0.004, (4, 1, 1, 1))))
    h = m.op("Conv", [h, w1, m.const("cb1", rng.normal(0, 0.1, 4))], "conv1", pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    bn = [m.const(f"bn_{k}", v) for k, v in (("g", [1.2, -0.7, 0.9, 0.5]), ("b", rng.normal(0, 0.2, 4)),
                                              ("m", rng.normal(0, 0.1, 4)), ("v", rng.uniform(0.5, 2, 4)))]
    h = m.op("BatchNormalization", [h] + bn, "bn1")
    h = m.op("Relu", [h], "relu1")
    h = m.quant("q1", h, 0.05, 4, signed=0)
    h = m.op("MaxPool", [h], "pool1", kernel_shape=[2, 2], strides=[2, 2])
    w2 = m.wquant("w2", rng.normal(0, 0.3, (5, 4, 2, 2)), 0.0031)
    h = m.op("Conv", [h, w2], "conv2", kernel_shape=[2, 2])
    s2 = 0.0213 * f32([1, 2, 0.5, 1, 4]).reshape(1, 5, 1, 1)  # per-channel, power-of-two ratios: one Dense
    h = m.quant("q2", h, s2, 6, zp=f32([[[[2]], [[0]], [[-1]], [[3]], [[0]]]]))
    h = m.op("Flatten", [h], "flat")
    w3 = m.wquant("w3", rng.normal(0, 0.3, (20, 3)), f32(rng.uniform(0.002, 0.004, (1, 3))))
    h = m.op("MatMul", [h, w3], "fc")
    y = m.quant("qout", h, 0.013, 8)
    x = f32(rng.uniform(-2, 2, (100, 3, 6, 6)))
    return m.model([1, 3, 6, 6], y), x


def test_cnn_bn_negative_gamma_zero_point_padding_per_channel_act():
    model, x = _cnn_model()
    g, _ = compare(model, x)
    mts = [n for n in g.nodes if n.op == "MultiThreshold"]
    assert len(mts) == 4
    assert set(mts[1].params["sign"].data.tolist()) == {-1, 1}  # the negative batch-norm gamma
    assert "BatchNormalization" not in ops(g) and "Affine" in ops(g)  # BN folded; Affine = the output epilogue
    (pad,) = [n for n in g.nodes if n.op == "Pad"]  # conv1's zero padding: the code z = 5 is the real 0
    assert pad.attrs["code"] == 5 and g.node("conv1").attrs["pads"] == (0, 0, 0, 0)


def test_dead_channel_constant_output_and_note():
    rng = np.random.default_rng(2)
    m = M()
    h = m.quant("qin", "x", 0.021, 8)
    w = m.wquant("w", rng.normal(0, 0.3, (3, 2, 1, 1)), f32([[[[0.003]]], [[[0.0025]]], [[[0.002]]]]))
    h = m.op("Conv", [h, w], "conv", kernel_shape=[1, 1])
    bn = [m.const(f"bn_{k}", v) for k, v in (("g", [1.0, 0.0, 2.0]), ("b", [0.1, 0.37, -0.2]),
                                              ("m", [0.0, 0.1, 0.0]), ("v", [1.0, 1.0, 1.0]))]
    h = m.op("BatchNormalization", [h] + bn, "bn")
    y = m.quant("qout", h, 0.017, 8)
    x = f32(rng.uniform(-2, 2, (50, 2, 4, 4)))
    g, _ = compare(m.model([1, 2, 4, 4], y), x)
    assert any("qout" in n and "constant outputs" in n for n in g.meta["notes"])
    out = run_ir(g, x)
    assert np.all(out[:, 1] == out[0, 1, 0, 0])  # gamma 0: beta alone


def test_residual_add_power_of_two_ratio_and_refusal():
    rng = np.random.default_rng(3)

    def build(s_b):
        m = M()
        a = m.quant("qa", "x", 0.0123, 8)
        w = m.wquant("w", rng.normal(0, 0.3, (8, 8)), 0.0031)
        h = m.op("MatMul", [a, w], "mm")
        b = m.quant("qb", h, s_b, 8)
        h = m.op("Add", [a, b], "add")
        return m.model([1, 8], m.quant("qout", h, 0.029, 8))

    x = f32(rng.uniform(-1.5, 1.5, (100, 8)))
    g, _ = compare(build(0.0123 * 4), x)
    assert "Add" in ops(g)
    with pytest.raises(UnsupportedError) as ei:
        import_onnx(build(0.0123 * 3))
    msg = str(ei.value)
    assert "add" in msg and "0.0123" in msg and "0.0369" in msg and "power of two" in msg


def test_per_channel_power_of_two_weights_stay_narrow():
    """6-bit weights with per-channel scales 2**-3, 2**-5: integer codes + a per-channel shift, not
    a widened weight type."""
    rng = np.random.default_rng(4)
    m = M()
    h = m.quant("qin", "x", 2.0 ** -4, 8)
    w = m.wquant("w", rng.normal(0, 0.5, (8, 4)), f32([[2 ** -3, 2 ** -5, 2 ** -3, 2 ** -4]]), bits=6)
    h = m.op("MatMul", [h, w], "mm")
    y = m.quant("qout", h, 2.0 ** -3, 8)
    x = f32(rng.uniform(-4, 4, (100, 8)))
    g, _ = compare(m.model([1, 8], y), x)
    (d,) = [n for n in g.nodes if n.op == "Dense"]
    assert d.params["weight"].dtype == FixedType(6, 6, True)
    assert isinstance(g.value("qout").dtype, FixedType) and g.value("qout").dtype.frac_bits == 3  # plain fixed


def test_float_logits_output():
    """A final float-bias Linear: a float32 output (noted), within float32 rounding of the source."""
    rng = np.random.default_rng(5)
    m = M()
    h = m.quant("qin", "x", 0.0311, 8)
    w = m.wquant("w", rng.normal(0, 0.3, (6, 10)), f32(rng.uniform(0.002, 0.004, (6, 1))))
    y = m.op("Gemm", [h, w, m.const("b", rng.normal(0, 0.2, 6))], "gemm", transB=1)
    model = m.model([1, 10], y)
    g = import_onnx(model)
    x = f32(rng.uniform(-3, 3, (50, 10)))
    got, src = run_ir(g, x), run_qonnx(model, x)
    np.testing.assert_allclose(got, src, rtol=1e-6, atol=1e-6)
    assert any("float32" in n and "'gemm'" in n for n in g.meta["notes"])


def _refused(model, *words):
    with pytest.raises(UnsupportedError) as ei:
        import_onnx(model)
    msg = str(ei.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_refusals():
    rng = np.random.default_rng(6)
    # a padded conv reading an accumulator with an offset (no Quant in between): padding != real 0
    m = M()
    h = m.quant("qin", "x", 0.02, 8)
    w1 = m.wquant("w1", rng.normal(0, 0.3, (2, 2, 1, 1)), 0.003)
    h = m.op("Conv", [h, w1, m.const("b1", [0.1, -0.2])], "c1", kernel_shape=[1, 1])
    w2 = m.wquant("w2", rng.normal(0, 0.3, (2, 2, 3, 3)), 0.003)
    h = m.op("Conv", [h, w2], "c2", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    _refused(m.model([1, 2, 4, 4], m.quant("qo", h, 0.1, 8)), "c2", "pads", "real 0")
    # a ReLU of an accumulator with a bias that no Quant follows
    m = M()
    h = m.quant("qin", "x", 0.02, 8)
    w1 = m.wquant("w1", rng.normal(0, 0.3, (4, 4)), 0.003)
    h = m.op("Gemm", [h, w1, m.const("b1", [0.1, -0.2, 0.3, 0.0])], "g1", transB=1)
    h = m.op("Relu", [h], "r1")
    h = m.op("AveragePool", [m.op("Reshape", [h, m.const("shp", np.array([1, 4, 1, 1], np.int64))], "rs")],
             "ap", kernel_shape=[1, 1])
    model = m.model([1, 4], h)
    model.graph.initializer[-1].CopyFrom(numpy_helper.from_array(np.array([1, 4, 1, 1], np.int64), "shp"))
    _refused(model, "r1", "Relu")
    # float weights on a scaled-integer input
    m = M()
    h = m.quant("qin", "x", 0.02, 8)
    h = m.op("MatMul", [h, m.const("wf", rng.normal(0, 0.3, (4, 4)))], "mmf")
    _refused(m.model([1, 4], h), "mmf", "not produced by a Quant")
    # a zero point that is not an integer
    m = M()
    _refused(m.model([1, 4], m.quant("qz", "x", 0.02, 8, zp=0.5)), "qz", "not an integer")


@pytest.mark.parametrize("kw", [dict(scale=0.25, bits=4, signed=0, narrow=1), dict(scale=0.125, bits=5, mode="CEIL"),
                                dict(scale=0.0713, bits=3, mode="UP", zp=1.0), dict(scale=0.5, bits=1),
                                dict(scale=0.0713, bits=6, signed=0, mode="HALF_DOWN", zp=9.0),
                                dict(scale=0.0713, bits=6, mode="DOWN", narrow=1)],
                         ids=["narrow_unsigned", "ceil", "up", "bipolar", "half_down", "down_narrow"])
def test_quantizer_variants_after_a_layer(kw):
    """Quantizers with no ap_fixed form (narrow unsigned, CEIL/UP/HALF_DOWN rounding, bipolar with
    scale 0.5) on an integer accumulator: MultiThreshold, equal to the oracle."""
    rng = np.random.default_rng(7)
    m = M()
    h = m.quant("qin", "x", 0.0311, 8)
    w = m.wquant("w", rng.normal(0, 0.3, (8, 6)), 0.0029)
    h = m.op("MatMul", [h, w], "mm")
    y = m.quant("qout", h, kw.pop("scale"), kw.pop("bits"), **kw)
    x = f32(rng.uniform(-3, 3, (300, 8)))
    g, _ = compare(m.model([1, 8], y), x)
    assert "MultiThreshold" in ops(g)


def test_pad_of_zero_point_codes_then_conv():
    """An explicit ONNX Pad (0) of a Quant output with zero point 5: the codes pad with 5 (the real 0)."""
    rng = np.random.default_rng(8)
    m = M()
    h = m.quant("qin", "x", 0.0277, 8, signed=0, zp=5.0)
    m.inits["pads"] = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)
    h = m.op("Pad", [h, "pads"], "pad")
    w = m.wquant("w", rng.normal(0, 0.3, (3, 2, 3, 3)), 0.0031)
    h = m.op("Conv", [h, w], "conv", kernel_shape=[3, 3])
    y = m.quant("qout", h, 0.021, 8)
    x = f32(rng.uniform(-1, 6, (60, 2, 5, 5)))
    g, _ = compare(m.model([1, 2, 5, 5], y), x)
    (p,) = [n for n in g.nodes if n.op == "Pad"]
    assert p.attrs["code"] == 5  # the zero point: the real 0
    m.inits["cval"] = f32(0.5)
    m.nodes[1] = helper.make_node("Pad", ["qin", "pads", "cval"], ["pad"], name="pad")
    _refused(m.model([1, 2, 5, 5], y), "pad", "real 0.5 is not one code")


def test_quant_output_epilogue_is_qonnx_float32_dequantization():
    """A Quant output (per-channel scale, zero points) as a graph output: float32((y - z) * s) bit for
    bit as qonnx's execute_onnx computes it, on every element."""
    rng = np.random.default_rng(9)
    m = M()
    s = f32([0.0173, 0.0311, 0.0497]).reshape(1, 3, 1, 1)
    y = m.quant("q", "x", s, 8, signed=0, zp=f32([3, 128, 0]).reshape(1, 3, 1, 1))
    model = m.model([1, 3, 4, 4], y)
    x = f32(rng.uniform(-3, 9, (100, 3, 4, 4)))
    g, n_src = compare(model, x)
    assert n_src == 0
    np.testing.assert_array_equal(run_ir(g, x), run_qonnx(model, x))
    assert ops(g) == ["Quantize", "MultiThreshold", "Affine", "Affine"]


@pytest.mark.parametrize("reduce_mean", [False, True], ids=["global_average_pool", "reduce_mean"])
def test_average_pools_as_exact_sums(reduce_mean):
    """AveragePool over 3x3 windows (9 elements, padded, count_include_pad=1) and GlobalAveragePool
    over 3x3 (9) of zero-point codes: exact integer sums with 1/9 in the map (a fixed-point average
    would truncate)."""
    rng = np.random.default_rng(10)
    m = M()
    h = m.quant("qin", "x", 0.0311, 8, signed=0, zp=11.0)
    w = m.wquant("w", rng.normal(0, 0.3, (4, 2, 1, 1)), 0.0029)
    h = m.op("Conv", [h, w], "conv", kernel_shape=[1, 1])
    h = m.quant("q1", h, 0.0173, 6, signed=0, zp=20.0)
    h = m.op("AveragePool", [h], "ap", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2], count_include_pad=1)
    if reduce_mean:  # AdaptiveAvgPool2d(1) + flatten as torch exports it
        h = m.op("ReduceMean", [h], "gap", axes=[2, 3], keepdims=0)
    else:
        h = m.op("Flatten", [m.op("GlobalAveragePool", [h], "gap")], "flat")
    w2 = m.wquant("w2", rng.normal(0, 0.3, (4, 3)), 0.0041)
    h = m.op("MatMul", [h, w2], "fc")
    y = m.quant("qout", h, 0.0057, 8)
    x = f32(rng.uniform(-1, 8, (80, 2, 6, 6)))
    g, _ = compare(m.model([1, 2, 6, 6], y), x)
    assert "AvgPool" not in ops(g) and "GlobalAvgPool" not in ops(g) and ops(g).count("Pad") == 1


@pytest.mark.parametrize("target", ["tvm-llvm", "hls4ml"])
@pytest.mark.parametrize("build", [_mlp_model, _cnn_model], ids=["mlp", "cnn"])
def test_scaled_models_on_targets(tmp_path, build, target):
    """The MLP and CNN above compiled for TVM and the hls4ml C simulation: the built outputs equal
    the reference on every golden input (the compile's own check), and the source check passes."""
    from qdeploy import api
    model, x = build()
    res = api.compile(model, target=target, out_dir=tmp_path / "out", golden=x[:64])
    ex = res.report["exactness"]
    assert ex["bit_exact"] and ex["mismatches"] == 0 and ex["samples"] == 64
    assert res.report["fidelity"]["checked"] and res.report["fidelity"]["ok"]
    np.testing.assert_array_equal(np.asarray(res.load().predict(x[:64])), eval64(model, x[:64]).astype(np.float32))


@pytest.mark.parametrize("zp", [0.0, 3.0])
def test_dilated_conv_on_a_scaled_value_keeps_its_dilation(zp):
    """A dilated Conv whose input has a float scale (and a zero point: padded with code z) is a
    dilated integer Conv: the dilation was dropped once (found by a new-user trial: wrong values,
    or a wrong output shape, reported bit-exact with the source check off)."""
    rng = np.random.default_rng(7)
    m = M()
    h = m.quant("qin", "x", 0.0311, 8, zp=zp)
    w = m.wquant("w", rng.normal(0, 0.3, (4, 2, 3, 3)), f32(rng.uniform(0.002, 0.004, (4, 1, 1, 1))))
    h = m.op("Conv", [h, w], "dconv", pads=[2, 2, 2, 2], kernel_shape=[3, 3], dilations=[2, 2], strides=[1, 1])
    y = m.quant("qout", h, 0.017, 8)
    x = f32(rng.uniform(-2, 2, (40, 2, 8, 8)))
    g, _ = compare(m.model([1, 2, 8, 8], y), x)
    assert tuple(g.node("dconv").attrs["dilations"]) == (2, 2)
