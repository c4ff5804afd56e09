"""Fidelity to the source for PyTorch/Brevitas modules (the module itself is run) and explained
ties (differences that a float64 re-evaluation of the source attributes to float32 rounding)."""
import json
import textwrap
from fractions import Fraction

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from typer.testing import CliRunner

import qdeploy
import qdeploy.api
from qdeploy.api import SourceMismatchError
from qdeploy.cli import app
from qdeploy.compiler.ir.graph import rebuild

brevitas = pytest.importorskip("brevitas")
from brevitas.core.scaling import ScalingImplType  # noqa: E402
from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU  # noqa: E402
from brevitas.quant import (Int8ActPerTensorFixedPoint, Int8WeightPerTensorFixedPoint, Int16Bias,  # noqa: E402
                            Uint8ActPerTensorFixedPoint)


class _In12(Int8ActPerTensorFixedPoint):
    """Signed 12-bit input, constant scale 32/2**11 = 2**-6."""
    bit_width = 12
    scaling_impl_type = ScalingImplType.CONST
    scaling_init = 32.0


class _Out20(Int8ActPerTensorFixedPoint):
    """Signed 20-bit output, constant scale 2048/2**19 = 2**-8."""
    bit_width = 20
    scaling_impl_type = ScalingImplType.CONST
    scaling_init = 2048.0


class SmallCnn(nn.Module):
    """QuantIdentity -> QuantConv2d -> QuantReLU -> flatten -> QuantLinear (logits)."""

    def __init__(self):
        super().__init__()
        self.q = QuantIdentity(act_quant=Int8ActPerTensorFixedPoint, bit_width=6, return_quant_tensor=True)
        self.conv = QuantConv2d(1, 3, 3, padding=1, weight_quant=Int8WeightPerTensorFixedPoint, weight_bit_width=4,
                                bias=True, bias_quant=Int16Bias)
        self.relu = QuantReLU(act_quant=Uint8ActPerTensorFixedPoint, bit_width=5, return_quant_tensor=True)
        self.fc = QuantLinear(3 * 4 * 4, 5, weight_quant=Int8WeightPerTensorFixedPoint, weight_bit_width=4, bias=True,
                              bias_quant=Int16Bias)

    def forward(self, x):
        return self.fc(self.relu(self.conv(self.q(x))).flatten(1))


class TwoHeads(nn.Module):
    """Two outputs: a QuantTensor (returned with return_quant_tensor=True) and a plain tensor."""

    def __init__(self):
        super().__init__()
        self.q = QuantIdentity(act_quant=Int8ActPerTensorFixedPoint, bit_width=6, return_quant_tensor=True)
        self.a = QuantLinear(8, 4, weight_quant=Int8WeightPerTensorFixedPoint, weight_bit_width=4, bias=False)
        self.qa = QuantIdentity(act_quant=Int8ActPerTensorFixedPoint, bit_width=8, return_quant_tensor=True)
        self.b = QuantLinear(8, 3, weight_quant=Int8WeightPerTensorFixedPoint, weight_bit_width=4, bias=False)

    def forward(self, x):
        h = self.q(x)
        return self.qa(self.a(h)), self.b(h)


class WideDot(nn.Module):
    """12-bit inputs x 12-bit weights over 1024 terms, requantized to 20 bits: sums of up to
    ~2**27 codes, which float32 (24-bit significand) rounds, so a few outputs near a rounding
    boundary of the 20-bit quantizer come out one LSB off in the float32 module."""

    def __init__(self):
        super().__init__()
        self.q = QuantIdentity(act_quant=_In12, return_quant_tensor=True)
        self.fc = QuantLinear(1024, 64, bias=False, weight_quant=Int8WeightPerTensorFixedPoint, weight_bit_width=12)
        self.o = QuantIdentity(act_quant=_Out20, return_quant_tensor=True)

    def forward(self, x):
        return self.o(self.fc(self.q(x)))


def negated_first_layer(real_load):
    """``qdeploy.api.load`` whose graph has the weights of its first weighted layer negated: what a
    frontend bug looks like (reference and target agree, the source does not)."""
    def load(model, example_input=None):
        g = real_load(model, example_input)
        nodes = list(g.nodes)
        i = next(k for k, n in enumerate(nodes) if "weight" in n.params)
        w = nodes[i].params["weight"]
        nodes[i] = nodes[i].replace(params={**nodes[i].params, "weight": type(w)(-np.array(w.data), w.dtype)})
        return rebuild(g, nodes)
    return load


def _seeded(cls, seed=0):
    torch.manual_seed(seed)
    m = cls()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.uniform_(-1, 1)
    return m.eval()


def test_brevitas_module_is_run_as_the_source(tmp_path):
    m = _seeded(SmallCnn)
    m.train()  # the check puts it in eval mode and restores the flag
    x = np.random.default_rng(0).uniform(-1, 1, (16, 1, 4, 4)).astype(np.float32)
    res = qdeploy.compile(m, "reference", tmp_path / "o", example_input=torch.tensor(x[:1]), golden=x)
    fid = res.report["fidelity"]
    assert m.training
    assert fid["checked"] and fid["ok"] and fid["samples"] == 16 and fid["exact_matches"] == 16, fid
    assert fid["source"].startswith("PyTorch module itself") and fid["differing_values"] == 0
    # the oracle: the module's own logits equal the artifact's outputs bit for bit
    with torch.no_grad():
        want = m.eval()(torch.tensor(x)).numpy()
    got = res.load().predict(x)
    assert np.array_equal(got.astype(np.float32), want)


def test_brevitas_source_mismatch_fails_and_names_the_output(tmp_path, monkeypatch):
    m = _seeded(SmallCnn)
    x = np.random.default_rng(1).uniform(-1, 1, (8, 1, 4, 4)).astype(np.float32)
    monkeypatch.setattr(qdeploy.api, "load", negated_first_layer(qdeploy.api.load))
    with pytest.raises(SourceMismatchError) as ei:
        qdeploy.compile(m, "reference", tmp_path / "o", example_input=torch.tensor(x[:1]), golden=x)
    fid = ei.value.fidelity
    assert fid["real_mismatches"] > 0 and fid["float32_rounding"] == 0 and not (tmp_path / "o").exists()
    assert "differ from the source model" in str(ei.value) and "real mismatches" in str(ei.value)
    res = qdeploy.compile(m, "reference", tmp_path / "o", example_input=torch.tensor(x[:1]), golden=x,
                          allow_inexact=True)
    assert res.report["inexact"] and res.report["fidelity"]["accepted_inexact"]


def test_multi_output_module_with_a_quant_tensor_output(tmp_path):
    m = _seeded(TwoHeads)
    x = np.random.default_rng(2).uniform(-1, 1, (12, 8)).astype(np.float32)
    res = qdeploy.compile(m, "reference", tmp_path / "o", example_input=torch.tensor(x[:1]), golden=x)
    fid = res.report["fidelity"]
    assert fid["checked"] and fid["ok"] and len(fid["per_output"]) == 2, fid
    with torch.no_grad():
        qa, b = m(torch.tensor(x))
    got = res.load().predict(x)
    assert np.array_equal(got[0].astype(np.float32), qa.value.numpy())
    assert np.array_equal(got[1].astype(np.float32), b.numpy())


def test_brevitas_float32_ties_are_explained_and_accepted(tmp_path):
    m = _seeded(WideDot)
    x = np.random.default_rng(0).uniform(-32, 32, (128, 1024)).astype(np.float32)
    res = qdeploy.compile(m, "reference", tmp_path / "o", example_input=torch.tensor(x[:1]), golden=x)
    fid = res.report["fidelity"]
    assert fid["ok"] and fid["differing_values"] > 0, fid
    assert fid["float32_rounding"] == fid["differing_values"] and fid["real_mismatches"] == 0
    assert "re-evaluated in float64" in fid["classification"] and not res.report["inexact"]
    # oracle: exact integer arithmetic on the codes (Python ints), round half to even onto the
    # 2**-8 grid; ours equals it everywhere, the float32 module differs exactly where counted
    xq = np.clip(np.round(x * 64), -2048, 2047).astype(object)
    w = m.fc.quant_weight()
    wq = np.round(w.value.detach().numpy().astype(np.float64) / float(w.scale.detach())).astype(np.int64).astype(object)
    shift = int(round(-np.log2(float(w.scale.detach())))) + 6 - 8  # product LSB 2**-(6+wf) -> output LSB 2**-8
    acc = xq.dot(wq.T)  # exact Python-int sums (torch weights are (out, in))
    exact = np.vectorize(lambda a: round(Fraction(int(a), 1 << shift)))(acc)  # half to even
    exact = np.clip(exact.astype(np.int64), -(1 << 19), (1 << 19) - 1) / 256.0
    ours = res.load().predict(x)
    with torch.no_grad():
        f32 = m(torch.tensor(x)).value.numpy()
    assert np.array_equal(ours, exact)
    assert int(np.sum(f32 != exact)) == fid["differing_values"]


def _tie_onnx(path):
    """QONNX: 12-bit input x 12-bit weights over 1024 terms -> MatMul -> 20-bit Quant (2**-8)."""
    def quant(name, x, scale, bits, out):
        inits = [numpy_helper.from_array(np.array(v, np.float32), f"{name}_{k}")
                 for k, v in (("s", scale), ("z", 0.0), ("b", bits))]
        return helper.make_node("Quant", [x, f"{name}_s", f"{name}_z", f"{name}_b"], [out], name=name,
                                domain="qonnx.custom_op.general", signed=1, narrow=0, rounding_mode="ROUND"), inits
    rng = np.random.default_rng(0)
    w = rng.integers(-2048, 2048, (1024, 64)).astype(np.float32) * 2 ** -11
    n1, i1 = quant("qin", "x", 2 ** -6, 12, "xq")
    n2, i2 = quant("qw", "w", 2 ** -11, 12, "wq")
    n3, i3 = quant("qout", "mm", 2 ** -8, 20, "y")
    g = helper.make_graph([n1, n2, helper.make_node("MatMul", ["xq", "wq"], ["mm"], name="mm"), n3], "tie",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                          [numpy_helper.from_array(w, "w"), *i1, *i2, *i3])
    import onnx
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13),
                                                  helper.make_opsetid("qonnx.custom_op.general", 1)]), str(path))
    return w


def test_onnx_float32_ties_are_explained_in_the_cli(tmp_path):
    w = _tie_onnx(tmp_path / "tie.onnx")
    x = (np.random.default_rng(1).integers(-2048, 2048, (256, 1024)) * 2.0 ** -6).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = CliRunner().invoke(app, ["compile", str(tmp_path / "tie.onnx"), "-t", "reference", "-o", str(tmp_path / "o"),
                                 "--golden", str(tmp_path / "x.npy")])
    assert r.exit_code == 0, r.output
    fid = json.loads((tmp_path / "o" / "report.json").read_text())["fidelity"]
    d = fid["differing_values"]
    assert d > 0 and fid["float32_rounding"] == d and fid["real_mismatches"] == 0 and fid["ok"]
    assert f"{d} differing value(s): {d} float32 rounding in the source" in r.output
    assert "only float32 ties, accepted" in r.output
    # oracle: exact int64 sums (< 2**53) rounded half to even; onnxruntime float32 differs from
    # it exactly on the counted values
    acc = (x * 64).astype(np.int64) @ (w * 2048).astype(np.int64)  # units of 2**-17
    exact = np.clip(np.round(acc / 512.0), -2 ** 19, 2 ** 19 - 1) / 256.0  # /512 exact (acc < 2**40); half to even
    import onnxruntime  # noqa: F401  (qonnx's executor runs on it)
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes
    import onnx
    proto = onnx.load(str(tmp_path / "tie.onnx"))  # the whole batch at once, as the check ran it (MLAS
    for t in (proto.graph.input[0], proto.graph.output[0]):  # rounds a batch and a lone sample differently)
        t.type.tensor_type.shape.dim[0].dim_value = len(x)
    mw = ModelWrapper(proto).transform(InferShapes())
    f32 = execute_onnx(mw, {"x": x})["y"]
    assert int(np.sum(f32 != exact)) == d
    ours = qdeploy.run(tmp_path / "o", x)
    assert np.array_equal(ours, exact)


def test_cli_module_spec_runs_the_module(tmp_path):
    (tmp_path / "mdl.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from brevitas.nn import QuantIdentity, QuantLinear
        from brevitas.quant import Int8ActPerTensorFixedPoint, Int8WeightPerTensorFixedPoint

        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.q = QuantIdentity(act_quant=Int8ActPerTensorFixedPoint, bit_width=6, return_quant_tensor=True)
                self.fc = QuantLinear(6, 3, weight_quant=Int8WeightPerTensorFixedPoint, weight_bit_width=4, bias=False)

            def forward(self, x):
                return self.fc(self.q(x))

        def make():
            torch.manual_seed(0)
            return M(), torch.zeros(1, 6)
    """))
    r = CliRunner().invoke(app, ["compile", f"{tmp_path / 'mdl.py'}:make", "-t", "reference", "-o",
                                 str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "fidelity vs source: 64 golden samples, 64 matching" in r.output
    assert "PyTorch module itself" in r.output and "matches the source" in r.output
    r = CliRunner().invoke(app, ["compile", f"{tmp_path / 'mdl.py'}:make", "-t", "reference", "-o",
                                 str(tmp_path / "o2"), "--no-source-check"])
    assert r.exit_code == 0 and "NOT checked: skipped (--no-source-check" in r.output, r.output


def test_graph_source_says_why_it_is_not_checked(tmp_path, rng):
    from ..conftest import small_mlp
    res = qdeploy.compile(small_mlp(rng), "reference", tmp_path / "o")
    fid = res.report["fidelity"]
    assert not fid["checked"] and "IR Graph" in fid["reason"]


@pytest.mark.parametrize("nd,group,stride,dil,pads", [(2, 1, 1, 1, [1, 1, 1, 1]), (2, 2, 2, 1, [0, 1, 2, 0]),
                                                      (1, 1, 2, 2, [2, 1]), (1, 4, 1, 1, [0, 0])])
def test_float64_conv_of_the_onnx_copy_matches_torch(nd, group, stride, dil, pads):
    # onnxruntime has no float64 Conv on the CPU; the float64 source copy uses conv_double
    from qdeploy.source_run import conv_double
    rng = np.random.default_rng(nd * 10 + group)
    x = rng.standard_normal((3, 4, *([9] * nd)))
    w = rng.standard_normal((8, 4 // group, *([3] * nd)))
    b = rng.standard_normal(8)
    got = conv_double(x, w, b, pads=pads, strides=[stride] * nd, dilations=[dil] * nd, group=group)
    xt = torch.nn.functional.pad(torch.tensor(x), [p for i in reversed(range(nd)) for p in (pads[i], pads[i + nd])])
    f = torch.nn.functional.conv2d if nd == 2 else torch.nn.functional.conv1d
    want = f(xt, torch.tensor(w), torch.tensor(b), stride=stride, dilation=dil, groups=group).numpy()
    assert got.shape == want.shape and np.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_float64_copy_of_a_qonnx_cnn_runs(tmp_path):
    # the classification of a CNN source needs its float64 copy to run (Conv, Relu, Quant, Gemm...)
    from qdeploy.compiler.frontends.brevitas import export_brevitas_qonnx
    from qdeploy.fidelity import run_onnx_source
    m = _seeded(SmallCnn)
    x = np.random.default_rng(3).uniform(-1, 1, (10, 1, 4, 4)).astype(np.float32)
    p = export_brevitas_qonnx(m, x[:1], tmp_path / "cnn.onnx")
    a, _ = run_onnx_source(p, {"global_in": x})
    b, _ = run_onnx_source(p, {"global_in": x}, double=True)
    (k,) = a
    assert b[k].dtype == np.float64 and np.array_equal(a[k].astype(np.float64), b[k])
    with torch.no_grad():
        assert np.array_equal(a[k], m(torch.tensor(x)).numpy())
