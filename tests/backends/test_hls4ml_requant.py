"""Threshold requantizers on hls4ml end to end: a Brevitas MLP with DEFAULT (float, non-power-of-
two) scales, exported to QONNX, imported (MultiThreshold requantizers), through the default
pipeline (``requant_shift``), compiled to the hls4ml C simulation: bit-exact against the reference
interpreter and in agreement with the Brevitas-exported source (qonnx execute_onnx).  Also the
host/device split of an input quantizer's MultiThreshold."""
from __future__ import annotations

import re

import numpy as np

import qdeploy
from qdeploy.compiler.ir import Const, GraphBuilder, parse_type
from qdeploy.compiler.ir.types import FLOAT32
from qdeploy.passes import partition

T = parse_type


def _input_quantizer_graph():
    """float x -> grid Quantize -> MultiThreshold (irregular: no form) -> Dense."""
    b = GraphBuilder("iq")
    x = b.input("x", (4,), FLOAT32)
    q = b.add("grid", "Quantize", [x], attrs={"to": T("fixed<12,4,TRN,SAT>")})
    t = np.array([[-700, -650, -10, 0, 3, 400, 401]] * 4)
    mt = b.add("mt", "MultiThreshold", [q], attrs={"to": T("int<4>")},
               params={"thresholds": Const(t, T("fixed<12,4>")), "base": Const(np.array([-3]), T("int<3>")),
                       "sign": Const(np.array([1]), T("int<2>"))})
    b.output(b.add("d", "Dense", [mt], params={"weight": Const(np.arange(12).reshape(4, 3) - 6, T("int<5>"))}))
    return b.build()


def test_input_quantizer_thresholds_run_on_the_host_other_thresholds_on_the_device():
    part = partition(_input_quantizer_graph())
    assert [n.name for n in part.prologue.nodes] == ["grid", "mt"]
    assert part.device.inputs == ("mt",) and [n.op for n in part.device.nodes] == ["Dense"]
    b = GraphBuilder("dev")
    x = b.input("x", (4,), T("fixed<12,4>"))  # a fixed-point graph input: the thresholds stay on the device
    g = _input_quantizer_graph()
    mt = g.node("mt")
    b.output(b.add("mt", "MultiThreshold", [x], attrs=dict(mt.attrs), params=dict(mt.params)))
    assert [n.name for n in partition(b.build()).device.nodes] == ["mt"]


def _export(module, shape, path):
    """Calibrate ``module``'s activation scales on random data (training mode), export it to QONNX."""
    import torch
    from brevitas.export import export_qonnx

    module.train()
    with torch.no_grad():
        for _ in range(3):
            module(torch.randn(32, *shape))
    module.eval()
    export_qonnx(module, torch.randn(1, *shape), str(path))
    return path


def _check(rep):
    assert rep["exactness"]["bit_exact"] and rep["exactness"]["mismatches"] == 0
    assert rep["fidelity"]["checked"] and rep["fidelity"]["ok"] and rep["fidelity"]["real_mismatches"] == 0
    notes = [n for p in rep["passes"] if p["name"] == "requant_shift" for n in p["notes"]]
    m = re.match(r"requant_shift: (\d+) of (\d+) MultiThreshold nodes became multiply-and-shift", notes[0])
    assert m and int(m.group(1)) >= 1  # the hidden layers' requantizers (the input one may stay on the host)
    return int(m.group(1))


def test_brevitas_default_scales_mlp_is_exact_on_hls4ml(tmp_path):
    import brevitas.nn as qnn
    import torch

    torch.manual_seed(0)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = qnn.QuantIdentity(return_quant_tensor=True)
            self.fc1 = qnn.QuantLinear(16, 24, bias=True, return_quant_tensor=True)
            self.r1 = qnn.QuantReLU(return_quant_tensor=True)
            self.fc2 = qnn.QuantLinear(24, 5, bias=True)

        def forward(self, x):
            return self.fc2(self.r1(self.fc1(self.inp(x))))

    path = _export(M(), (16,), tmp_path / "mlp.onnx")
    _check(qdeploy.compile(str(path), "hls4ml", tmp_path / "out").report)


def test_brevitas_default_scales_cnn_with_batchnorm_is_exact_on_hls4ml_io_stream(tmp_path):
    """Conv + float bias + BatchNorm + ReLU requantizers, default float scales, io_stream."""
    import brevitas.nn as qnn
    import torch

    torch.manual_seed(0)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = qnn.QuantIdentity(return_quant_tensor=True)
            self.c1 = qnn.QuantConv2d(2, 4, 3, bias=True)
            self.bn = torch.nn.BatchNorm2d(4)
            self.r1 = qnn.QuantReLU(return_quant_tensor=True)
            self.c2 = qnn.QuantConv2d(4, 3, 3, bias=False, return_quant_tensor=True)
            self.r2 = qnn.QuantReLU(return_quant_tensor=True)
            self.fc = qnn.QuantLinear(3 * 4 * 4, 5, bias=True)

        def forward(self, x):
            return self.fc(self.r2(self.c2(self.r1(self.bn(self.c1(self.inp(x)))))).flatten(1))

    path = _export(M(), (2, 8, 8), tmp_path / "cnn.onnx")
    res = qdeploy.compile(str(path), "hls4ml", tmp_path / "out", config={"hls4ml": {"io_type": "io_stream"}})
    assert _check(res.report) >= 2
