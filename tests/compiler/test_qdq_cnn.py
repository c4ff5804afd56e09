"""An int8 CNN from ``onnxruntime.quantization.quantize_static`` (QDQ format, per-channel weights),
trained briefly in PyTorch on scikit-learn's digits, compiled with ``qdeploy.compile`` and compared
with onnxruntime's own outputs on the quantized model.

``test_pow2_qdq_cnn_is_exact_on_every_target`` rounds every scale of the quantized model up to a
power of two (symmetric activations: zero points 0) and requantizes the integer initializers onto
them, so the model is fixed-point; onnxruntime's float32 arithmetic is then exact as well (each
sum has < 24 significant bits) and every target must match it bit for bit.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import qdeploy

TARGETS = ["reference", "tvm-llvm", "hls4ml"]


def _train_cnn():
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    xt, yt = torch.tensor(x[:1400]), torch.tensor(d.target[:1400])
    for _ in range(6):
        for i in range(0, 1400, 64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[i:i + 64]), yt[i:i + 64]).backward()
            opt.step()
    net.eval()
    return net, x, d.target


def _quantize(net, x, path_fp32, path_int8, symmetric: bool):
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    torch.onnx.export(net, (torch.tensor(x[:1]),), str(path_fp32), input_names=["x"], output_names=["logits"],
                      opset_version=13, dynamo=False)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": x[i:i + 1]} for i in range(0, 1400, 4)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(path_fp32), str(path_int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": symmetric})
    return onnx.load(str(path_int8))


def pow2_qdq(m: onnx.ModelProto) -> onnx.ModelProto:
    """Every QuantizeLinear/DequantizeLinear scale rounded up to a power of two and the integer
    weights requantized onto the new scales (zero points must be 0); each int32 bias gets the scale
    ``s_x * s_w`` of its layer, as onnxruntime's fused QLinearConv/QGemm kernels assume."""
    inits = {t.name: t for t in m.graph.initializer}
    arr = {k: numpy_helper.to_array(t) for k, t in inits.items()}
    producer = {n.output[0]: n for n in m.graph.node}
    new = {}

    def put(name, a):
        inits[name].CopyFrom(numpy_helper.from_array(a, name))

    def requant(n, s_new):
        w, s = arr[n.input[0]], arr[n.input[1]].astype(np.float64)
        shp = [1] * w.ndim
        if s.size > 1:
            shp[next((a.i for a in n.attribute if a.name == "axis"), 1)] = s.size
        info = np.iinfo(w.dtype)
        put(n.input[0], np.clip(np.round(w * s.reshape(shp) / s_new.reshape(shp)), info.min, info.max).astype(w.dtype))

    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            if len(n.input) > 2:
                assert not np.any(arr[n.input[2]]), "zero points must be 0"
            new.setdefault(n.input[1], 2.0 ** np.ceil(np.log2(arr[n.input[1]].astype(np.float64))))
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            sx, sw = new[producer[n.input[0]].input[1]], new[producer[n.input[1]].input[1]]
            new[producer[n.input[2]].input[1]] = sx * sw
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            requant(n, new[n.input[1]])
    for k, v in new.items():
        put(k, v.astype(np.float32).reshape(arr[k].shape))
    return m


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    d = tmp_path_factory.mktemp("qdq_cnn")
    net, x, y = _train_cnn()
    sym = _quantize(net, x, d / "fp32.onnx", d / "int8_sym.onnx", symmetric=True)
    p2 = pow2_qdq(sym)
    onnx.save(p2, str(d / "int8_pow2.onnx"))
    return {"dir": d, "x": x[1400:1464], "y": y[1400:1464], "pow2": d / "int8_pow2.onnx"}


@pytest.mark.parametrize("target", TARGETS)
def test_pow2_qdq_cnn_is_exact_on_every_target(cnn, target, tmp_path):
    x = cnn["x"]
    want = _ort(onnx.load(str(cnn["pow2"])), x)
    assert (want.argmax(1) == cnn["y"]).mean() > 0.8  # a trained, working classifier
    res = qdeploy.compile(str(cnn["pow2"]), target, tmp_path / "out", golden=x)
    assert res.report["fidelity"]["ok"], res.report["fidelity"]
    ops = [n.op for n in res.graph.nodes]
    assert ops.count("Conv") == 2 and ops.count("Dense") == 1
    got = res.load().predict(x)
    assert np.array_equal(got, want), f"{int((got != want).sum())} of {got.size} outputs differ"
