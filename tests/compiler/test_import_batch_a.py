"""ONNX import of the batch-A ops (Pad, ...): tiny QONNX models (Quant nodes with power-of-two
scales) whose IR reference output must equal qonnx's ``execute_onnx`` (the source semantics)
exactly, and the refusals that name the ONNX node."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdeploy.compiler import reference as ref
from qdeploy.compiler.errors import UnsupportedError
from qdeploy.compiler.frontends import export_qonnx, import_onnx
from qdeploy.compiler.ir import verify

warnings.filterwarnings("ignore", category=UserWarning)
QD = "qonnx.custom_op.general"


def f32(a):
    return np.asarray(a, dtype=np.float32)


def mk(nodes, in_shapes, inits=None, opset=13, out="y"):
    """A model with float inputs ``in_shapes`` (name -> shape, or one shape for ``x``)."""
    if not isinstance(in_shapes, dict):
        in_shapes = {"x": in_shapes}
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()]
    ins = [helper.make_tensor_value_info(k, TensorProto.FLOAT, s) for k, s in in_shapes.items()]
    g = helper.make_graph(nodes, "batch_a", ins, [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(QD, 1)])
    m.ir_version = 8
    return m


def quant(name, x, out, scale, bits, signed=1, narrow=0, mode="ROUND"):
    """A QONNX Quant node and its initializers."""
    inits = {f"{name}_s": f32(scale), f"{name}_z": f32(0.0), f"{name}_b": f32(bits)}
    node = helper.make_node("Quant", [x, f"{name}_s", f"{name}_z", f"{name}_b"], [out], name=name, domain=QD,
                            signed=signed, narrow=narrow, rounding_mode=mode)
    return node, inits


def run_qonnx(model, feeds):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    m = ModelWrapper(model).transform(InferShapes())
    return execute_onnx(m, feeds)[model.graph.output[0].name]


def run_ir(g, feeds):
    """IR reference on ONNX-layout feeds; ONNX-layout output."""
    y = ref.run(g, {i: np.transpose(feeds[i], g.meta["input_perms"][i]) for i in g.inputs})
    return np.transpose(y, g.meta["output_perms"][g.outputs[0]])


def grid(rng, shape, lo=-700, hi=700, f=6):
    """float32 inputs on the 2**-f grid (every rounding tie of the quantizers happens)."""
    return f32(rng.integers(lo, hi, size=shape) / 2.0 ** f)


def exact(model, feeds):
    """Import, verify, and require the IR reference to equal qonnx's executor bit for bit."""
    g = import_onnx(model)
    verify(g)
    got, want = run_ir(g, feeds), run_qonnx(model, feeds)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    return g


def refused(model) -> str:
    with pytest.raises(UnsupportedError) as ei:
        import_onnx(model)
    return str(ei.value)


def ops(g):
    return [n.op for n in g.nodes]


@pytest.fixture
def rng():
    return np.random.default_rng(2026)


# ---------------------------------------------------------------------- Pad
def _pad_model(value, pads=(0, 0, 1, 2, 0, 0, 2, 1), scale=2.0 ** -3, bits=6, signed=1):
    q1, i1 = quant("qin", "x", "a", scale, bits, signed=signed)
    q2, i2 = quant("qout", "c", "y", 2.0 ** -2, 8)
    pad = helper.make_node("Pad", ["a", "pads", "val"], ["b"], name="pad", mode="constant")
    conv = helper.make_node("Conv", ["b", "w"], ["c"], name="conv", kernel_shape=[3, 3])
    w = f32(np.arange(-9, 9).reshape(2, 1, 3, 3) / 8.0)
    return mk([q1, pad, conv, q2], [3, 1, 5, 6],
              {**i1, **i2, "pads": np.array(pads, np.int64), "val": f32(value), "w": w})


@pytest.mark.parametrize("value", [0.0, -0.375, 1.5])
def test_pad_constant_matches_qonnx(rng, value, tmp_path):
    """Pad with 0 and with non-zero values of the input grid (the pad code differs from code 0)
    before a Conv: IR == qonnx exactly; the QONNX export runs in qonnx with the same result."""
    m = _pad_model(value)
    x = grid(rng, (3, 1, 5, 6))
    g = exact(m, {"x": x})
    pad = next(n for n in g.nodes if n.op == "Pad")
    assert pad.attrs["code"] == int(value * 8)
    exported = export_qonnx(g, tmp_path / "pad.onnx")
    got = np.concatenate([run_qonnx(exported, {"x": x[i:i + 1]}) for i in range(len(x))])
    np.testing.assert_array_equal(got, run_qonnx(m, {"x": x}))


def test_pad_opset18_axes(rng):
    """opset 18 ``axes`` input: pads only on the listed axes (here the last, W)."""
    q1, i1 = quant("qin", "x", "a", 2.0 ** -4, 8)
    pad = helper.make_node("Pad", ["a", "pads", "val", "axes"], ["y"], name="pad", mode="constant")
    m = mk([q1, pad], [2, 3, 4, 5], {**i1, "pads": np.array([3, 1], np.int64), "val": f32(0.25),
                                     "axes": np.array([-1], np.int64)}, opset=18)
    exact(m, {"x": grid(rng, (2, 3, 4, 5))})


@pytest.mark.parametrize("value,why", [(0.3, "not a value of the input type"), (9.0, "not a value of the input type")])
def test_pad_value_off_the_input_grid_is_refused(value, why):
    msg = refused(_pad_model(value))
    assert "'pad'" in msg and why in msg


def test_pad_batch_axis_negative_and_other_modes_are_refused():
    assert "batch axis" in refused(_pad_model(0.0, pads=(1, 0, 0, 0, 0, 0, 0, 0)))
    assert "negative" in refused(_pad_model(0.0, pads=(0, 0, -1, 0, 0, 0, 0, 0)))
    m = _pad_model(0.0)
    m.graph.node[1].attribute[0].s = b"reflect"
    assert "mode 'reflect'" in refused(m)


# ---------------------------------------------------------------------- Clip / HardTanh
def _clip_model(lo, hi, opset=13, q_out=True):
    q1, i1 = quant("qin", "x", "a", 2.0 ** -4, 8)
    inits = dict(i1)
    if opset >= 11:
        ins = ["a", "" if lo is None else "lo", "" if hi is None else "hi"]
        while ins[-1] == "":
            ins.pop()
        clip = helper.make_node("Clip", ins, ["b" if q_out else "y"], name="clip")
        inits.update({k: f32(v) for k, v in (("lo", lo), ("hi", hi)) if v is not None})
    else:
        kw = {k: v for k, v in (("min", lo), ("max", hi)) if v is not None}
        clip = helper.make_node("Clip", ["a"], ["b" if q_out else "y"], name="clip", **kw)
    nodes = [q1, clip]
    if q_out:
        q2, i2 = quant("qout", "b", "y", 2.0 ** -3, 6, mode="ROUND")
        nodes.append(q2)
        inits.update(i2)
    return mk(nodes, [4, 3, 5], inits, opset=opset)


@pytest.mark.parametrize("lo,hi,opset", [(-1.0, 1.0, 13), (0.0, 6.0, 13), (-2.5, None, 13), (None, 0.75, 13),
                                         (-1.0, 1.0, 6), (-0.3, 0.7, 13), (-100.0, 100.0, 13)])
def test_clip_matches_qonnx(rng, lo, hi, opset, tmp_path):
    """Clip/HardTanh (ONNX Clip, min/max as inputs or, before opset 11, attributes) on a fixed-point
    input, with bounds on and off the input grid and beyond its range: IR == qonnx exactly, both as a
    graph output (the bound itself is output) and through a rounding Quant."""
    x = grid(rng, (4, 3, 5), -3000, 3000, 8)
    for q_out in (False, True):
        m = _clip_model(lo, hi, opset, q_out)
        g = exact(m, {"x": x})
        if lo == -100.0:
            assert "Clip" not in ops(g)  # neither bound can change a value
    exported = export_qonnx(g, tmp_path / "clip.onnx")
    got = np.concatenate([run_qonnx(exported, {"x": x[i:i + 1]}) for i in range(len(x))])
    np.testing.assert_array_equal(got, run_qonnx(m, {"x": x}))


def test_clip_off_grid_bound_keeps_the_bound_exactly(rng):
    """A bound off the input grid is not rounded: the output type carries it (float32(0.7) needs 24
    fraction bits), so inputs above it give exactly the source's float32(0.7)."""
    g = import_onnx(_clip_model(-0.3, 0.7, q_out=False))
    out = g.values[g.outputs[0]].dtype
    assert out.frac_bits >= 24
    y = run_ir(g, {"x": f32(np.full((1, 3, 5), 3.0))})
    assert np.all(y == np.float32(0.7))


def test_clip_min_above_max_is_refused():
    from qdeploy.compiler.errors import VerifyError
    with pytest.raises((UnsupportedError, VerifyError), match="'clip'.*above"):
        import_onnx(_clip_model(1.0, -1.0))


# ---------------------------------------------------------------------- Sub / Max / Min
def _two_input_model(op, const=None, n_act=2, opset=13):
    """Two quantized activations (different grids and signedness) combined by ``op``, optionally
    with a scalar constant as a further input, then a rounding Quant."""
    q1, i1 = quant("qa", "x", "a", 2.0 ** -4, 8)
    q2, i2 = quant("qb", "z", "b", 2.0 ** -2, 5, signed=0)
    ins = ["a", "b"][:n_act] + (["c"] if const is not None else [])
    body = helper.make_node(op, ins, ["r"], name="op")
    q3, i3 = quant("qo", "r", "y", 2.0 ** -3, 8, mode="ROUND")
    inits = {**i1, **i2, **i3}
    if const is not None:
        inits["c"] = f32(const)
    shapes = {"x": [4, 3, 5, 5]} if n_act == 1 else {"x": [4, 3, 5, 5], "z": [4, 3, 5, 5]}
    nodes = [q1, q2, body, q3] if n_act == 2 else [q1, body, q3]
    return mk(nodes, shapes, inits, opset=opset)


def _feeds2(rng, n_act=2):
    f = {"x": grid(rng, (4, 3, 5, 5), -3000, 3000, 8)}
    if n_act == 2:
        f["z"] = grid(rng, (4, 3, 5, 5), -500, 5000, 6)
    return f


@pytest.mark.parametrize("op", ["Sub", "Max", "Min"])
def test_binary_of_two_activations_matches_qonnx(rng, op, tmp_path):
    """Sub/Max/Min of two quantized activations on different grids: IR == qonnx exactly, as one IR
    node of that op; the QONNX export runs in qonnx with the same result."""
    m = _two_input_model(op)
    feeds = _feeds2(rng)
    g = exact(m, feeds)
    assert op in ops(g) and "Affine" not in ops(g)
    exported = export_qonnx(g, tmp_path / "bin.onnx")
    got = np.concatenate([run_qonnx(exported, {k: v[i:i + 1] for k, v in feeds.items()}) for i in range(4)])
    np.testing.assert_array_equal(got, run_qonnx(m, feeds))


@pytest.mark.parametrize("op,const,n_act", [("Sub", 0.75, 1), ("Max", 0.3, 1), ("Min", -1.25, 1),
                                            ("Max", 1.5, 2), ("Min", 2.0, 2)])
def test_binary_with_a_constant_matches_qonnx(rng, op, const, n_act):
    """Activation minus a constant (an exact Affine), Max/Min with a scalar constant (a Clip, also
    with a bound off the input grid), and three-input Max/Min (two activations and a constant)."""
    m = _two_input_model(op, const, n_act)
    g = exact(m, _feeds2(rng, n_act))
    if op != "Sub":
        assert "Clip" in ops(g)


def test_max_with_a_per_channel_constant_is_refused():
    m = _two_input_model("Max", np.array([0.0, 1.0, 2.0]).reshape(1, 3, 1, 1), 1)
    msg = refused(m)
    assert "'op'" in msg and "non-scalar constant" in msg


# ---------------------------------------------------------------------- dilated Conv
@pytest.mark.parametrize("dil,auto_pad,group", [((2, 2), None, 1), ((1, 3), None, 2), ((2, 3), "VALID", 1)])
def test_dilated_conv_matches_qonnx(rng, dil, auto_pad, group, tmp_path):
    """Conv with ONNX ``dilations`` (explicit pads, groups, auto_pad VALID) with
    quantized weights and a rounding output Quant: IR == qonnx (onnxruntime's convolution) exactly; the
    export keeps the dilations."""
    q1, i1 = quant("qin", "x", "a", 2.0 ** -3, 6)
    qw, iw = quant("qw", "wf", "w", 2.0 ** -2, 4)
    q2, i2 = quant("qout", "c", "y", 2.0 ** -2, 8, mode="ROUND")
    kw = dict(kernel_shape=[3, 2], dilations=list(dil), group=group)
    if auto_pad:
        kw["auto_pad"] = auto_pad
    else:
        kw["pads"] = [2, 1, 1, 2]
    conv = helper.make_node("Conv", ["a", "w"], ["c"], name="dconv", **kw)
    m = mk([q1, qw, conv, q2], [2, 4, 9, 10],
           {**i1, **iw, **i2, "wf": f32(rng.uniform(-2, 2, size=(4, 4 // group, 3, 2)))})
    x = grid(rng, (2, 4, 9, 10), -300, 300, 5)
    g = exact(m, {"x": x})
    assert tuple(g.node("dconv").attrs["dilations"]) == dil
    exported = export_qonnx(g, tmp_path / "dconv.onnx")
    got = np.concatenate([run_qonnx(exported, {"x": x[i:i + 1]}) for i in range(len(x))])
    np.testing.assert_array_equal(got, run_qonnx(m, {"x": x}))


def test_dilated_conv_with_auto_pad_same_is_refused(rng):
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="dsame", kernel_shape=[3, 3], dilations=[2, 2],
                            auto_pad="SAME_UPPER")
    msg = refused(mk([conv], [1, 2, 8, 8], {"w": f32(rng.normal(size=(2, 2, 3, 3)))}))
    assert "'dsame'" in msg and "auto_pad SAME" in msg


# ---------------------------------------------------------------------- Quant rounding modes
MODES = ["ROUND", "HALF_EVEN", "FLOOR", "CEIL", "UP", "DOWN", "HALF_UP", "HALF_DOWN"]


def rounding_model(mode, bits=4, signed=1, narrow=0, after_conv=False):
    """An input Quant (float input) with ``mode``, or (``after_conv``) a Quant with ``mode`` that
    drops fraction bits of a convolution's fixed-point output."""
    if not after_conv:
        q, i = quant("q", "x", "y", 2.0 ** -2, bits, signed=signed, narrow=narrow, mode=mode)
        return mk([q], [6, 3, 4, 4], i)
    q1, i1 = quant("qin", "x", "a", 2.0 ** -4, 8)
    qw, iw = quant("qw", "wf", "w", 2.0 ** -2, 4)
    conv = helper.make_node("Conv", ["a", "w"], ["c"], name="conv", kernel_shape=[1, 1])
    q2, i2 = quant("q", "c", "y", 2.0 ** -1, bits, signed=signed, narrow=narrow, mode=mode)
    w = f32(np.array([0.75, -0.5, 0.25]).reshape(1, 3, 1, 1))
    return mk([q1, qw, conv, q2], [6, 3, 4, 4], {**i1, **iw, **i2, "wf": w})


def rounding_feeds(rng):
    # on the 2**-5 grid: every tie (x.5), every fraction, negative and positive, beyond the range
    return {"x": grid(rng, (6, 3, 4, 4), -400, 400, 5)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bits,signed,narrow", [(4, 1, 0), (5, 1, 1), (3, 0, 0)])
def test_every_qonnx_rounding_mode_matches_qonnx(rng, mode, bits, signed, narrow):
    """Every rounding mode qonnx's ``resolve_rounding_mode`` accepts, signed / narrow / unsigned, on a
    float input and on a fixed-point convolution output: IR == qonnx exactly (CEIL and UP through
    their exact compositions, see ``compiler/frontends/onnx_rounding.py``)."""
    for after_conv in (False, True):
        m = rounding_model(mode, bits, signed, narrow, after_conv)
        g = exact(m, rounding_feeds(rng))
        if after_conv:  # the Quant reads fixed-point codes
            assert all(str(g.values[n.inputs[0]].dtype) != "float32" for n in g.nodes
                       if n.name == "q" or n.name.startswith("q__"))
        if mode in ("CEIL", "UP"):
            assert "Affine" in ops(g)


def test_brevitas_model_with_hardtanh_and_relu6_exports_clip_and_matches(rng, tmp_path):
    """nn.Hardtanh(-0.5, 0.75) and nn.ReLU6 between Brevitas power-of-two quantizers export as ONNX
    Clip; the IR equals qonnx's executor and the Brevitas module itself."""
    import onnx
    import torch
    import brevitas.nn as qnn
    from brevitas.export import export_qonnx as brevitas_export
    from brevitas.quant import Int8ActPerTensorFixedPoint

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q1 = qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint)
            self.ht = torch.nn.Hardtanh(-0.5, 0.75)
            self.q2 = qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint)
            self.r6 = torch.nn.ReLU6()
            self.q3 = qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint)

        def forward(self, x):
            return self.q3(self.r6(self.q2(self.ht(self.q1(x)) * 8.0)))

    torch.manual_seed(0)
    mod = M().eval()
    x = torch.randn(4, 3, 5)
    with torch.no_grad():
        mod(x)
    brevitas_export(mod, x, str(tmp_path / "ht.onnx"))
    m = onnx.load(str(tmp_path / "ht.onnx"))
    assert [n.op_type for n in m.graph.node].count("Clip") == 2
    xs = grid(rng, (4, 3, 5), -400, 400, 6)
    name = m.graph.input[0].name
    g = exact(m, {name: xs})
    assert ops(g).count("Clip") == 2
    with torch.no_grad():
        want = mod(torch.from_numpy(xs)).numpy()
    np.testing.assert_array_equal(run_ir(g, {name: xs}), want)


def test_clip_of_a_float_value_keeps_any_float32_bound(rng):
    """Clip on an unquantized (float32) tensor with a tiny bound (2**-140 grid): exact float32 clip."""
    m = mk([helper.make_node("Relu", ["x"], ["a"], name="relu"),
            helper.make_node("Clip", ["a", "lo", "hi"], ["y"], name="clip")], [3, 7],
           {"lo": f32(np.float32(1e-42)), "hi": f32(0.3)})
    x = f32(rng.normal(size=(3, 7)))
    x[0, :3] = [0.0, 1e-43, 0.3]
    exact(m, {"x": x})


def test_pad_after_a_transpose_maps_onnx_axes_through_the_layout(rng):
    """A Pad of a tensor whose IR layout differs from its ONNX axis order (after an ONNX Transpose):
    the ONNX axes are mapped to IR axes through the layout, so the result equals qonnx's."""
    q1, i1 = quant("qin", "x", "a", 2.0 ** -3, 6)
    tr = helper.make_node("Transpose", ["a"], ["t"], name="tr", perm=[0, 2, 3, 1])  # NCHW -> NHWC in ONNX
    pad = helper.make_node("Pad", ["t", "pads", "val"], ["y"], name="pad", mode="constant")
    m = mk([q1, tr, pad], [2, 3, 4, 5], {**i1, "pads": np.array([0, 1, 0, 2, 0, 0, 3, 0], np.int64),
                                         "val": f32(-0.5)})
    exact(m, {"x": grid(rng, (2, 3, 4, 5), -300, 300, 5)})


def test_pad_opset10_attributes(rng):
    """Before opset 11 ``pads`` and ``value`` are attributes."""
    q1, i1 = quant("qin", "x", "a", 2.0 ** -4, 8)
    pad = helper.make_node("Pad", ["a"], ["y"], name="pad", mode="constant", pads=[0, 0, 2, 1, 0, 0, 0, 3],
                           value=-1.25)
    m = mk([q1, pad], [2, 3, 4, 5], i1, opset=10)
    g = exact(m, {"x": grid(rng, (2, 3, 4, 5), -300, 300, 5)})
    assert g.nodes[-1].attrs["code"] == -20
