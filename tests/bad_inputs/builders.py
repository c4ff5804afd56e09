"""Builders for the bad-input corpus: each case writes its bad model (or config) into a tmp
directory at test time with ``onnx.helper`` and says what the CLI must answer.

A :class:`Case` builds the CLI arguments (``build(tmp) -> (model_arg, extra_args)``), names the
target, the string that identifies the culprit (node, input, file, spec, target...) and a keyword
of the reason the one-line error must contain.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

QD = "qonnx.custom_op.general"


# ---------------------------------------------------------------------- model helpers
def f32(a):
    return np.asarray(a, dtype=np.float32)


def quant(name, x, out, scale=2.0 ** -4, bits=8, signed=1, narrow=0, zp=0.0, mode="ROUND"):
    """A QONNX Quant node and its initializers (scale, zero point, bit width)."""
    inits = {f"{name}_s": f32(scale), f"{name}_z": f32(zp), f"{name}_b": f32(bits)}
    node = helper.make_node("Quant", [x, f"{name}_s", f"{name}_z", f"{name}_b"], [out], name=name, domain=QD,
                            signed=signed, narrow=narrow, rounding_mode=mode)
    return node, inits


def model(nodes, in_shape, inits=None, opset=13, outputs=("y",), name="bad_model", in_name="x"):
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()]
    ins = [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, in_shape)]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    g = helper.make_graph(nodes, name, ins, outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(QD, 1)])
    m.ir_version = 8
    return m


def qmlp(w=None, w_name="fc_w", act_scale=2.0 ** -4, act_bits=8, k=4, n=3, extra=None):
    """A valid small quantized MLP: Quant(x) -> MatMul(Quant(w)) -> Relu -> Quant.

    Nodes: ``in_q``, ``w_q`` (weight quantizer), ``fc``, ``relu``, ``out_q``.
    """
    rng = np.random.default_rng(0)
    w = f32(rng.uniform(-1, 1, (k, n)) if w is None else w)
    qi, ii = quant("in_q", "x", "xq", scale=act_scale, bits=act_bits)
    qw, iw = quant("w_q", w_name, "wq", scale=2.0 ** -3, bits=6)
    nodes = [qi, qw, helper.make_node("MatMul", ["xq", "wq"], ["h"], name="fc"),
             helper.make_node("Relu", ["h"], ["r"], name="relu")]
    qo, io = quant("out_q", "r", "y", scale=2.0 ** -4, bits=8, signed=0)
    nodes.append(qo)
    inits = {**ii, **iw, **io, w_name: w}
    return nodes, inits


def save(m: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(m.SerializeToString())
    return path


def valid_bytes() -> bytes:
    nodes, inits = qmlp(k=64, n=32)
    return model(nodes, [1, 64], inits).SerializeToString()


# ---------------------------------------------------------------------- cases
@dataclass
class Case:
    id: str
    build: Callable[[Path], tuple]  # tmp -> (model argument, [extra CLI args])
    culprit: "str | tuple"  # must appear in the error line (node / input / file / spec / target name)
    reason: str  # a keyword of the reason, must appear in the error line
    target: str = "reference"
    extra: list = field(default_factory=list)


def _onnx_case(cid, make, culprit, reason, target="reference"):
    def build(tmp: Path):
        return str(save(make(), tmp / f"{cid}.onnx")), []
    return Case(cid, build, culprit, reason, target)


def _bytes_case(cid, make_bytes, reason, target="reference"):
    fname = f"{cid}.onnx"

    def build(tmp: Path):
        p = tmp / fname
        p.write_bytes(make_bytes())
        return str(p), []
    return Case(cid, build, fname, reason, target)


def _truncated():
    b = valid_bytes()
    return b[: len(b) // 3]


def _corrupted():
    b = bytearray(valid_bytes())
    b[10:40] = b"\xff" * 30
    return bytes(b)


def _missing_initializer():
    nodes, inits = qmlp()
    nodes[2] = helper.make_node("MatMul", ["xq", "fc_w_missing"], ["h"], name="fc_dangling")
    return model(nodes, [1, 4], inits)


def _cycle():
    qi, ii = quant("in_q", "x", "xq")
    nodes = [qi, helper.make_node("Add", ["xq", "loop_b"], ["loop_a"], name="add_cyc"),
             helper.make_node("Relu", ["loop_a"], ["loop_b"], name="relu_cyc"),
             helper.make_node("Identity", ["loop_b"], ["y"], name="out_id")]
    return model(nodes, [1, 4], ii)


def _single(op, name, in_shape, inits=None, domain=None, opset=13, inputs=("x",), **attrs):
    kw = {"domain": domain} if domain else {}
    return lambda: model([helper.make_node(op, list(inputs), ["y"], name=name, **kw, **attrs)], in_shape,
                         inits, opset=opset)


def _matmul_k_mismatch():
    nodes, inits = qmlp()
    inits["fc_w"] = f32(np.ones((5, 3)))
    nodes[2] = helper.make_node("MatMul", ["xq", "wq"], ["h"], name="fc_kmismatch")
    return model(nodes, [1, 4], inits)


def _weights_with(bad):
    def make():
        w = np.random.default_rng(0).uniform(-1, 1, (4, 3)).astype(np.float32)
        w[1, 2] = bad
        nodes, inits = qmlp(w=w, w_name="fc_weight_bad")
        return model(nodes, [1, 4], inits)
    return make


def _float_weights_with(bad):
    def make():
        w = np.ones((4, 3), np.float32)
        w[0, 0] = bad
        return model([helper.make_node("MatMul", ["x", "float_w"], ["y"], name="float_fc")], [1, 4],
                     {"float_w": w})
    return make


def _act_quant(**kw):
    def make():
        qn, qi = quant("act_q", "x", "y", **kw)
        return model([qn], [1, 4], qi)
    return make


def _weight_quant(**kw):
    def make():
        nodes, inits = qmlp()
        qw, iw = quant("w_q", "fc_w", "wq", **kw)
        nodes[1] = qw
        inits.update(iw)
        return model(nodes, [1, 4], inits)
    return make


def _bn_training():
    bn = {k: f32(np.full(3, 0.5 + i / 10)) for i, k in enumerate(("g", "b", "m", "v"))}
    return model([helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], name="bn_train",
                                   training_mode=1)], [1, 3, 4, 4], bn, opset=15)


def _conv_dilation():
    w = f32(np.random.default_rng(0).normal(size=(2, 3, 3, 3)))
    return model([helper.make_node("Conv", ["x", "w"], ["y"], name="dil_conv", dilations=[2, 2], auto_pad="SAME_UPPER")],
                 [1, 3, 8, 8], {"w": w})


def _empty_graph():
    return model([], [1, 4], outputs=("x",), name="empty_graph")


def _no_outputs():
    nodes, inits = qmlp()
    m = model(nodes, [1, 4], inits, name="outputless")
    del m.graph.output[:]
    return m


def _avgpool_pad():
    return model([helper.make_node("AveragePool", ["x"], ["y"], name="avg_padded", kernel_shape=[2, 2],
                                   pads=[2, 2, 2, 2])], [1, 3, 6, 6])  # windows of padding only


def _gemm_transA():
    return model([helper.make_node("Gemm", ["x", "gw"], ["y"], name="gemm_ta", transA=1)], [1, 4],
                 {"gw": f32(np.ones((1, 3)))})


def _float_mlp():
    rng = np.random.default_rng(0)
    return model([helper.make_node("MatMul", ["x", "fw"], ["h"], name="float_fc"),
                  helper.make_node("Relu", ["h"], ["y"], name="float_relu")], [1, 4],
                 {"fw": f32(rng.uniform(-1, 1, (4, 3)))}, name="float_mlp")


def _softmax_in_datapath():
    nodes, inits = qmlp()
    # in_q -> fc -> relu -> out_q -> sm -> sm_q -> fc2 -> fc2_q : the Softmax sits between quantized layers
    rng = np.random.default_rng(1)
    qs, is_ = quant("sm_q", "p", "pq", scale=2.0 ** -7, bits=8, signed=0)
    qw2, iw2 = quant("w2_q", "fc2_w", "w2q", scale=2.0 ** -3, bits=6)
    qo2, io2 = quant("fc2_q", "h2", "z", scale=2.0 ** -4, bits=12)
    nodes += [helper.make_node("Softmax", ["y"], ["p"], name="mid_softmax", axis=-1), qs, qw2,
              helper.make_node("MatMul", ["pq", "w2q"], ["h2"], name="fc2"), qo2]
    inits.update({**is_, **iw2, **io2, "fc2_w": f32(rng.uniform(-1, 1, (3, 2)))})
    return model(nodes, [1, 4], inits, outputs=("z",))


def _spec(spec, culprit, reason):
    return Case(f"spec_{culprit}", lambda tmp: (spec, []), culprit, reason)


def _missing_path():
    return Case("missing_onnx_path", lambda tmp: (str(tmp / "no_such_model.onnx"), []), "no_such_model.onnx",
                "not found")


def _config_case(cid, text, reason, culprit=None):
    def build(tmp: Path):
        nodes, inits = qmlp()
        p = save(model(nodes, [1, 4], inits), tmp / "good.onnx")
        c = tmp / f"{cid}.yaml"
        c.write_text(text)
        return str(p), ["--config", str(c)]
    return Case(cid, build, (f"{cid}.yaml", culprit) if culprit else f"{cid}.yaml", reason)


def _valid_model_case(cid, target, culprit, reason):
    def build(tmp: Path):
        nodes, inits = qmlp()
        return str(save(model(nodes, [1, 4], inits), tmp / "good.onnx")), []
    return Case(cid, build, culprit, reason, target)


def cases() -> list[Case]:
    I = [1, 4]
    return [
        # --- malformed files
        _bytes_case("truncated", _truncated, "cannot parse"),
        _bytes_case("corrupted", _corrupted, "cannot parse"),
        _bytes_case("empty_file", lambda: b"", "no graph nodes"),
        _missing_path(),
        _onnx_case("empty_graph", _empty_graph, "empty_graph", "no graph nodes"),
        _onnx_case("no_outputs", _no_outputs, "outputless", "no outputs"),
        # --- graph structure
        _onnx_case("missing_initializer", _missing_initializer, "fc_dangling", "fc_w_missing"),
        _onnx_case("cycle", _cycle, "add_cyc", "cycle"),
        _onnx_case("unknown_op", _single("FooBar", "my_foo", I), "my_foo", "FooBar"),
        _onnx_case("unknown_domain", _single("Quux", "quux1", I, domain="acme.ops"), "quux1", "acme.ops"),
        _onnx_case("matmul_k_mismatch", _matmul_k_mismatch, "fc_kmismatch", "shape"),
        _onnx_case("dynamic_dim", _single("Relu", "relu_dyn", ["N", 3, "H", 4]), "'x'", "dynamic"),
        # --- bad numbers
        _onnx_case("nan_weights", _weights_with(np.nan), ("w_q", "fc_weight_bad"), "1 NaN"),
        _onnx_case("inf_weights", _weights_with(np.inf), ("w_q", "fc_weight_bad"), "1 Inf"),
        _onnx_case("nan_float_weights", _float_weights_with(np.nan), ("float_fc", "float_w"), "1 NaN"),
        _onnx_case("neg_inf_float_weights", _float_weights_with(-np.inf), ("float_fc", "float_w"), "1 Inf"),
        # --- quantizers
        _onnx_case("quant_bits_0", _act_quant(bits=0), "act_q", "bit width"),
        _onnx_case("quant_bits_33", _act_quant(bits=33), "act_q", "bit width"),
        _onnx_case("quant_neg_scale", _act_quant(scale=-0.25), "act_q", "scale"),
        _onnx_case("quant_zero_scale", _act_quant(scale=0.0), "act_q", "scale"),
        # (non-power-of-two / per-channel scales, zero points and narrow unsigned ranges compile now:
        # integer codes + MultiThreshold requantizers, tests/compiler/test_requant*.py)
        _onnx_case("quant_stochastic", _act_quant(mode="STOCHASTIC"), "act_q", "rounding mode 'STOCHASTIC'"),
        _onnx_case("weight_quant_zero_scale", _weight_quant(scale=0.0), "w_q", "scale"),
        _onnx_case("weight_quant_neg_scale", _weight_quant(scale=-0.125), "w_q", "scale"),
        _onnx_case("weight_quant_bits_0", _weight_quant(bits=0), "w_q", "bit width"),
        # --- unsupported ops / attributes
        _onnx_case("bn_training_mode", _bn_training, "bn_train", "training"),
        _onnx_case("conv_dilation", _conv_dilation, "dil_conv", "dilation", target="hls4ml"),
        _onnx_case("maxpool_indices", lambda: model([helper.make_node("MaxPool", ["x"], ["y", "idx"], name="mp_idx",
                                                                      kernel_shape=[2, 2])], [1, 3, 5, 5]),
                   "mp_idx", "Indices"),
        _onnx_case("avgpool_padding", _avgpool_pad, "avg_padded", "padding"),
        _onnx_case("gemm_transA", _gemm_transA, "gemm_ta", "transA", target="tvm-llvm"),
        # --- target limits
        _onnx_case("float_model_hls4ml", _float_mlp, "float_mlp", "no fixed-point layers", target="hls4ml"),
        _onnx_case("softmax_datapath_hls4ml", _softmax_in_datapath, "mid_softmax", "fixed-point datapath",
                   target="hls4ml"),
        _onnx_case("unknown_op_tvm", _single("FooBar", "foo_tvm", I), "foo_tvm", "FooBar", target="tvm-llvm"),
        _valid_model_case("unknown_target", "fpga9000", "fpga9000", "unknown target"),
        # --- specs and configs
        _spec("no_such_module_xyz:build", "no_such_module_xyz", "cannot import"),
        _spec("json:no_such_function", "no_such_function", "no callable"),
        _config_case("config_not_mapping", "- just\n- a list\n", "mapping"),
        _config_case("config_bad_yaml", "input_type: [unclosed\n", "cannot read config"),
        _config_case("config_bad_input_type", "input_type: fixed<banana>\n", "input_type", "fixed<banana>"),
    ]
