"""Artifacts declare their input/output layouts; predict, run and golden files take exactly that
layout (or channels-last when asked), never a layout guessed from the shape; `run` writes every
output.  Models where the channel count equals the spatial size are the ones a shape test misreads."""
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdeploy
from qdeploy.compiler.errors import QDeployError

warnings.filterwarnings("ignore", category=UserWarning)
QD = "qonnx.custom_op.general"


def _quant(name, x, out, scale, bits, signed=1):
    inits = {f"{name}_s": np.float32(scale), f"{name}_z": np.float32(0), f"{name}_b": np.float32(bits)}
    node = helper.make_node("Quant", [x, f"{name}_s", f"{name}_z", f"{name}_b"], [out], name=name, domain=QD,
                            signed=signed, narrow=0, rounding_mode="ROUND")
    return node, inits


def conv_model(in_shape, two_outputs=False, seed=0):
    """Quant -> Conv (quantized weights, 'same' padding) -> Quant, C == spatial size; optionally a
    second output (Relu -> Quant of the conv)."""
    rng = np.random.default_rng(seed)
    c = in_shape[1]
    k = [3] * (len(in_shape) - 2)
    w = (rng.integers(-8, 8, (c, c, *k)) / 8).astype(np.float32)
    nodes, inits = [], {"w_f": w}
    for n, i in [_quant("qin", "x", "xq", 2.0 ** -4, 8), _quant("qw", "w_f", "wq", 2.0 ** -3, 4),
                 _quant("qout", "c", "y", 2.0 ** -3, 8)]:
        nodes.append(n)
        inits.update(i)
    nodes.insert(2, helper.make_node("Conv", ["xq", "wq"], ["c"], name="conv", pads=[1] * (2 * len(k))))
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if two_outputs:
        nodes.append(helper.make_node("Relu", ["c"], ["r"], name="relu"))
        n, i = _quant("qr", "r", "z", 2.0 ** -2, 6, signed=0)
        nodes.append(n)
        inits.update(i)
        outs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    g = helper.make_graph(nodes, "sq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))], outs,
                          [numpy_helper.from_array(np.asarray(v), kk) for kk, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QD, 1)])
    m.ir_version = 8
    return m


def run_qonnx(model, x):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    m = ModelWrapper(model).transform(InferShapes())
    res = [execute_onnx(m, {"x": x[i:i + 1]}) for i in range(len(x))]  # the model's batch is 1
    return [np.concatenate([r[o.name] for r in res]) for o in model.graph.output]


SQUARE = {"conv2d_c4_h4_w4": (1, 4, 4, 4), "conv1d_c8_l8": (1, 8, 8)}


@pytest.fixture(params=list(SQUARE), scope="module")
def square(request, tmp_path_factory):
    """(onnx path, artifact dir, inputs in the source layout, source outputs) of a square model."""
    shape = SQUARE[request.param]
    d = tmp_path_factory.mktemp(request.param)
    m = conv_model(shape)
    path = d / "m.onnx"
    path.write_bytes(m.SerializeToString())
    x = (np.random.default_rng(1).integers(-128, 128, (6, *shape[1:])) / 16).astype(np.float32)
    want = run_qonnx(m, x)[0]
    qdeploy.compile(str(path), "reference", d / "art", golden=x)
    return path, d / "art", x, want


def test_manifest_declares_source_layouts(square):
    _, art, x, _ = square
    man = json.loads((art / "manifest.json").read_text())
    src = "NCHW" if x.ndim == 4 else "NCL"
    assert man["inputs"][0]["layout"] == src and man["outputs"][0]["layout"] == src
    assert man["inputs"][0]["ir_layout"] == ("NHWC" if x.ndim == 4 else "NLC")


def test_predict_takes_the_source_layout_when_c_equals_spatial(square):
    _, art, x, want = square
    m = qdeploy.CompiledModel.load(art)
    np.testing.assert_array_equal(m.predict(x), want)
    # channels-last only when asked for, inputs and outputs alike
    perm = (0, 2, 3, 1) if x.ndim == 4 else (0, 2, 1)
    inv = np.argsort(perm)
    cl = m.predict(np.transpose(x, perm), layout="channels-last")
    np.testing.assert_array_equal(np.transpose(cl, inv), want)
    ir = "NHWC" if x.ndim == 4 else "NLC"
    np.testing.assert_array_equal(m.predict(np.transpose(x, perm), layout=ir), cl)


def test_shape_errors_speak_the_users_layout(square):
    _, art, x, _ = square
    m = qdeploy.CompiledModel.load(art)
    src = "NCHW" if x.ndim == 4 else "NCL"
    with pytest.raises(QDeployError, match=rf"expected \(N, {', '.join(map(str, x.shape[1:]))}\) in {src}"):
        m.predict(x[..., :-1])
    with pytest.raises(QDeployError, match="layout"):
        m.predict(x, layout="NDHWC")


def test_cli_run_and_golden_take_the_source_layout(square, tmp_path):
    path, art, x, want = square
    np.save(tmp_path / "x.npy", x)
    cli = [sys.executable, "-m", "qdeploy.cli"]
    r = subprocess.run(cli + ["run", str(art), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), want)
    perm = (0, 2, 3, 1) if x.ndim == 4 else (0, 2, 1)
    np.save(tmp_path / "xcl.npy", np.transpose(x, perm))
    r = subprocess.run(cli + ["run", str(art), "-i", str(tmp_path / "xcl.npy"), "-o", str(tmp_path / "ycl.npy"),
                              "--layout", "channels-last"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.transpose(np.load(tmp_path / "ycl.npy"), np.argsort(perm)), want)
    # golden files recorded from the source-layout inputs hold the source model's outputs
    from qdeploy.golden import load_golden
    for src in (art, path):
        qdeploy.golden.record(src, tmp_path / "g.npz", inputs=x)
        _, arrays = load_golden(tmp_path / "g.npz")
        (key,) = [k for k in arrays if k.startswith("output_real:")]
        np.testing.assert_array_equal(np.transpose(arrays[key], np.argsort(perm)), want)
        assert qdeploy.golden.check(art, tmp_path / "g.npz").ok


def test_compile_golden_is_read_in_the_source_layout(square):
    _, art, x, want = square
    with np.load(art / "golden.npz") as z:
        ref = [z[k] for k in z.files if k.startswith("ref:")][0]
    m = qdeploy.CompiledModel.load(art)
    (o,) = m.graph.outputs
    t = m.graph.value(o).dtype
    perm = (0, 2, 3, 1) if x.ndim == 4 else (0, 2, 1)
    np.testing.assert_array_equal(np.transpose(t.to_real(ref), np.argsort(perm)), want)


def test_old_artifact_without_layout_field(square, tmp_path):
    import shutil
    _, art, x, want = square
    old = tmp_path / "old"
    shutil.copytree(art, old)
    man = json.loads((old / "manifest.json").read_text())
    for e in man["inputs"] + man["outputs"]:
        e.pop("layout", None)
        e.pop("ir_layout", None)
    (old / "manifest.json").write_text(json.dumps(man))
    np.testing.assert_array_equal(qdeploy.CompiledModel.load(old).predict(x), want)  # from the IR's meta
    doc = json.loads((old / "ir" / "model.json").read_text())
    doc["meta"].pop("input_perms")
    (old / "ir" / "model.json").write_text(json.dumps(doc))
    with pytest.raises(QDeployError, match="layout.*'x'|'x'.*layout"):
        qdeploy.CompiledModel.load(old)


def test_brevitas_square_conv_predict_matches_module(tmp_path):
    torch = pytest.importorskip("torch")
    qnn = pytest.importorskip("brevitas.nn")
    from brevitas.quant import Int8ActPerTensorFixedPoint, Int8WeightPerTensorFixedPoint

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint, return_quant_tensor=True),
        qnn.QuantConv2d(4, 4, 3, padding=1, bias=False, weight_quant=Int8WeightPerTensorFixedPoint,
                        return_quant_tensor=True),
        qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint))
    net.eval()
    x = torch.rand(8, 4, 4, 4) * 2 - 1
    with torch.no_grad():
        net(x)
        want = net(x).numpy()
    res = qdeploy.compile(net, "reference", tmp_path / "art", golden=x.numpy(), example_input=x[:1])
    got = qdeploy.CompiledModel.load(res.out_dir).predict(x.numpy())
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.fixture(scope="module")
def two_out(tmp_path_factory):
    d = tmp_path_factory.mktemp("two")
    m = conv_model((1, 4, 4, 4), two_outputs=True)
    (d / "m.onnx").write_bytes(m.SerializeToString())
    x = (np.random.default_rng(2).integers(-128, 128, (5, 4, 4, 4)) / 16).astype(np.float32)
    qdeploy.compile(str(d / "m.onnx"), "reference", d / "art", golden=x)
    return d / "art", x, run_qonnx(m, x)


def test_run_writes_every_output(two_out, tmp_path):
    art, x, want = two_out
    np.save(tmp_path / "x.npy", x)
    cli = [sys.executable, "-m", "qdeploy.cli"]
    r = subprocess.run(cli + ["run", str(art), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npz")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "y.npz") as z:
        assert sorted(z.files) == ["y", "z"]
        np.testing.assert_array_equal(z["y"], want[0])
        np.testing.assert_array_equal(z["z"], want[1])
    r = subprocess.run(cli + ["run", str(art), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y2.npy")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and ".npz" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "y2.npy").exists()


def test_channels_last_golden_only_when_asked(square, tmp_path):
    path, art, x, want = square
    perm = (0, 2, 3, 1) if x.ndim == 4 else (0, 2, 1)
    xcl = np.transpose(x, perm)
    qdeploy.compile(str(path), "reference", tmp_path / "cl", golden=xcl, golden_layout="channels-last")
    with np.load(art / "golden.npz") as a, np.load(tmp_path / "cl" / "golden.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k])
    np.save(tmp_path / "xcl.npy", xcl)
    r = subprocess.run([sys.executable, "-m", "qdeploy.cli", "golden", "record", str(art), "-o", str(tmp_path / "g.npz"),
                        "-i", str(tmp_path / "xcl.npy"), "--layout", "channels-last"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert qdeploy.golden.check(art, tmp_path / "g.npz").ok
