"""Divergence localization (the first layer whose target outputs differ from the reference) and the
hls4ml io_stream flatten bug it located.

The bug: a Brevitas 1-D CNN (Conv1d, AvgPool1d, flatten, QuantIdentity, QuantLinear) compiled for
hls4ml io_stream gave wrong outputs on every sample with "Hls::stream 'layer5_out' contains
leftover data".  hls4ml keeps a flatten in io_stream as an alias of its input stream, which only
a Dense reads right; the quantizer after the flatten read words of the wrong width.  The
localization names that quantizer (the transpose before the flatten is right).
"""
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import qdeploy
import qdeploy.backends.hls4ml as hls_pkg
import qdeploy.backends.tvm.lower as tvm_lower
from qdeploy.compiler.ir.graph import rebuild

pytest.importorskip("hls4ml")
if shutil.which("g++") is None:
    pytest.skip("g++ is needed for the hls4ml C simulation", allow_module_level=True)

from brevitas.nn import QuantConv1d, QuantIdentity, QuantLinear, QuantReLU  # noqa: E402
from brevitas.quant import (Int8ActPerTensorFixedPoint, Int8WeightPerTensorFixedPoint, Int16Bias,  # noqa: E402
                            Uint8ActPerTensorFixedPoint)


class Cnn1d(nn.Module):
    """Conv1d -> ReLU -> AvgPool1d -> flatten -> QuantIdentity -> QuantLinear."""

    def __init__(self):
        super().__init__()
        self.q = QuantIdentity(act_quant=Int8ActPerTensorFixedPoint, bit_width=6, return_quant_tensor=True)
        self.conv = QuantConv1d(2, 4, 3, padding=1, weight_quant=Int8WeightPerTensorFixedPoint, weight_bit_width=4,
                                bias=True, bias_quant=Int16Bias)
        self.relu = QuantReLU(act_quant=Uint8ActPerTensorFixedPoint, bit_width=6, return_quant_tensor=True)
        self.pool = nn.AvgPool1d(2)
        self.qp = QuantIdentity(act_quant=Uint8ActPerTensorFixedPoint, bit_width=8, return_quant_tensor=True)
        self.fc = QuantLinear(4 * 8, 5, weight_quant=Int8WeightPerTensorFixedPoint, weight_bit_width=4, bias=True,
                              bias_quant=Int16Bias)

    def forward(self, x):
        x = self.pool(self.relu(self.conv(self.q(x))))
        return self.fc(self.qp(x.flatten(1)))


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    m = Cnn1d().eval()
    x = torch.randn(64, 2, 16)
    return m, x


def _compile(m, x, out, target="hls4ml", io="io_stream"):
    return qdeploy.compile(m, target, out, example_input=x[:1], golden=x.numpy(),
                           config={"hls4ml": {"io_type": io}})


def test_io_stream_flatten_into_a_quantizer_is_exact(cnn, tmp_path, capfd):
    m, x = cnn
    res = _compile(m, x, tmp_path / "o")
    ex, fid = res.report["exactness"], res.report["fidelity"]
    assert ex["bit_exact"] and ex["mismatches"] == 0 and ex["samples"] == 64, ex
    assert fid["checked"] and fid["ok"] and fid["exact_matches"] == 64  # and the module itself agrees
    assert "leftover data" not in capfd.readouterr().out
    # the oracle: the Brevitas module's logits equal the C simulation's outputs
    with torch.no_grad():
        want = m(x).numpy()
    assert np.array_equal(res.load().predict(x.numpy()).astype(np.float32), want)


def _without_repack(real):
    """``translate`` as on main before the fix: the flatten stays a plain Reshape in io_stream."""
    def tr(device, *args, **kw):
        t = real(device, *args, **kw)
        for d in t.layers:
            if d["class_name"] == "Repack":
                d["class_name"] = "Reshape"
        return t
    return tr


def test_localization_names_the_layer_that_reads_the_flattened_stream(cnn, tmp_path, capfd, monkeypatch):
    m, x = cnn
    monkeypatch.setattr(hls_pkg, "translate", _without_repack(hls_pkg.translate))
    res = _compile(m, x, tmp_path / "o")
    ex = res.report["exactness"]
    assert ex["fixed_mismatches"] == 64 and "leftover data" in capfd.readouterr().out
    div = ex["divergence"]
    first = div["first"]
    g = res.graph
    # the first differing value is the quantizer right after the flatten; everything before it
    # (the transpose included) was traced and equal
    flat = next(n for n in g.nodes if n.op == "Reshape")
    assert g.producer(flat.inputs[0]).op == "Transpose"
    assert first["node"] == g.consumers(flat.output)[0].name and first["op"] == "Quantize", div
    assert first["samples"] == 64 and first["values"] > 0
    order = [n.name for n in g.nodes]
    assert div["compared"] >= 4 and g.producer(flat.inputs[0]).output not in div["not_observed"]
    assert order.index(first["node"]) > order.index(flat.name)
    assert "first differing layer: node" in div["sentence"] and first["node"] in div["sentence"]
    assert first["node"] in qdeploy.report.exactness_sentence(ex)


def _corrupt_first(op, graph):
    """``graph`` with the first weight of the first ``op`` node changed (a wrong kernel)."""
    nodes = list(graph.nodes)
    i = next(k for k, n in enumerate(nodes) if n.op == op)
    w = nodes[i].params["weight"]
    d = np.array(w.data, copy=True)
    d.flat[0] = d.flat[0] + 1 if d.flat[0] < w.dtype.max_code else d.flat[0] - 1
    nodes[i] = nodes[i].replace(params={**nodes[i].params, "weight": type(w)(d, w.dtype)})
    return rebuild(graph, nodes), nodes[i].name


def test_hls4ml_localization_names_a_corrupted_conv(cnn, tmp_path, monkeypatch):
    m, x = cnn
    real = hls_pkg.translate
    seen = {}

    def tr(device, *args, **kw):
        g, seen["node"] = _corrupt_first("Conv", device)
        return real(g, *args, **kw)
    monkeypatch.setattr(hls_pkg, "translate", tr)
    res = _compile(m, x, tmp_path / "o", io="io_parallel")
    first = res.report["exactness"]["divergence"]["first"]
    assert first["node"] == seen["node"] and first["op"] == "Conv" and first["samples"] > 0, first
    assert first["layers"]  # the hls4ml layer(s) of that node are named


def test_tvm_localization_names_a_corrupted_dense(cnn, tmp_path, monkeypatch):
    m, x = cnn
    real = tvm_lower.lower
    seen = {}

    def lower(graph, **kw):
        g, seen["node"] = _corrupt_first("Dense", graph)
        return real(g, **kw)
    monkeypatch.setattr(tvm_lower, "lower", lower)
    res = _compile(m, x, tmp_path / "o", target="tvm-llvm")
    ex = res.report["exactness"]
    first = ex["divergence"]["first"]
    assert ex["fixed_mismatches"] > 0
    # the golden run's mismatching samples (the batch-1 entry's row-by-row check adds its own)
    static = ex.get("static_batches", {})
    assert static["1"]["fixed_mismatches"] > 0  # main_b1 comes from the same (corrupted) lowering
    golden = ex["fixed_mismatches"] - sum(s["fixed_mismatches"] for s in static.values())
    assert first["node"] == seen["node"] and first["op"] == "Dense" and first["samples"] == golden
    assert ex["divergence"]["compared"] == len(res.graph.nodes)  # every earlier value was observed and equal


def test_no_localization_on_an_exact_compile(cnn, tmp_path):
    m, x = cnn
    res = _compile(m, x, tmp_path / "o", target="tvm-llvm")
    assert res.report["exactness"]["bit_exact"] and "divergence" not in res.report["exactness"]
