"""ONNX import of QONNX ``Trunc``, padded / ceil-mode ``AveragePool`` and ``ReduceMean``: IR reference
output equal to qonnx's ``execute_onnx`` bit for bit (Brevitas TruncAvgPool2d exports included), and
the refusals that name the node."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from tests.compiler.test_import_batch_a import QD, exact, f32, grid, mk, ops, quant, refused


@pytest.fixture
def rng():
    return np.random.default_rng(2027)


# ---------------------------------------------------------------------- Trunc, padded AveragePool, ReduceMean
def brevitas_trunc_pool_model(kernel=2, path=None):
    """A Brevitas QuantIdentity (8-bit power-of-two scale) -> TruncAvgPool2d(kernel, stride=kernel) ->
    TruncAdaptiveAvgPool2d(1), exported with ``export_qonnx`` (``AveragePool -> Trunc`` and
    ``ReduceMean -> Trunc``).  Returns (onnx model, brevitas module, example input)."""
    import onnx
    import torch
    import brevitas.nn as qnn
    from brevitas.export import export_qonnx as brevitas_export
    from brevitas.quant import Int8ActPerTensorFixedPoint

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint, return_quant_tensor=True)
            self.p = qnn.TruncAvgPool2d(kernel_size=kernel, stride=kernel)
            self.g = qnn.TruncAdaptiveAvgPool2d(output_size=1)

        def forward(self, x):
            return self.g(self.p(self.q(x)))

    torch.manual_seed(0)
    m = M().eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        m(x)
    brevitas_export(m, x, str(path))
    return onnx.load(str(path)), m, x


def test_brevitas_trunc_avg_pool_matches_qonnx(rng, tmp_path):
    """Brevitas TruncAvgPool2d(2) + TruncAdaptiveAvgPool2d(1) (power-of-two window areas): the QONNX
    export (AveragePool -> Trunc, ReduceMean -> Trunc, qonnx Trunc v2) imports as AvgPool /
    GlobalAvgPool + exact Quantize and equals qonnx's executor bit for bit, ties included."""
    m, _, _ = brevitas_trunc_pool_model(2, tmp_path / "trunc.onnx")
    assert {"Trunc", "AveragePool", "ReduceMean"} <= {n.op_type for n in m.graph.node}
    name = m.graph.input[0].name
    for i in range(6):
        g = exact(m, {name: grid(rng, (1, 3, 8, 8), -1200, 1200, 7 if i % 2 else 4)})
    assert {"AvgPool", "GlobalAvgPool"} <= set(ops(g))


def brevitas_trunc_pool_requant_model(kernel, size, path, adaptive=False, out_quant=True):
    """QuantIdentity -> TruncAvgPool2d(kernel) (or TruncAdaptiveAvgPool2d(1)) -> QuantIdentity (or none)."""
    import onnx
    import torch
    import brevitas.nn as qnn
    from brevitas.export import export_qonnx as brevitas_export
    from brevitas.quant import Int8ActPerTensorFixedPoint

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint, return_quant_tensor=True)
            self.p = qnn.TruncAdaptiveAvgPool2d(output_size=1) if adaptive else \
                qnn.TruncAvgPool2d(kernel_size=kernel, stride=kernel)
            self.o = qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint) if out_quant else None

        def forward(self, x):
            y = self.p(self.q(x))
            return self.o(y) if self.o is not None else y

    torch.manual_seed(0)
    m = M().eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        m(x)
    brevitas_export(m, x, str(path))
    return onnx.load(str(path)), m


@pytest.mark.parametrize("kernel,size,adaptive,out_quant", [(3, 6, False, True), (3, 9, False, False),
                                                            (None, 5, True, True), (None, 7, True, False)])
def test_brevitas_trunc_avg_pool_of_other_areas_matches_qonnx(rng, tmp_path, kernel, size, adaptive, out_quant):
    """A TruncAvgPool2d(3) / TruncAdaptiveAvgPool2d over 5x5 or 7x7 (window areas 9, 25, 49): the Trunc
    scale s/n is not a power of two: after checking that the source's float32 round(avg / scale) gives
    back every window sum, its integers q are the exact window sums shifted by 2**t (a ones depthwise
    Conv and a Quantize) with the pending scale out_scale; a following QuantIdentity requantizes them
    exactly (a MultiThreshold), a graph output is dequantized in float32 as qonnx does.  IR == qonnx
    exactly."""
    m, _ = brevitas_trunc_pool_requant_model(kernel, size, tmp_path / "t.onnx", adaptive, out_quant)
    name = m.graph.input[0].name
    for i in range(4):
        g = exact(m, {name: grid(rng, (1, 3, size, size), -1200, 1200, 7 if i % 2 else 4)})
    assert "Conv" in ops(g)  # the exact window sums
    assert ("MultiThreshold" in ops(g)) == out_quant  # the requantizing QuantIdentity


@pytest.mark.parametrize("mode", ["FLOOR", "ROUND", "CEIL"])
def test_trunc_v1_matches_qonnx(rng, mode):
    """qonnx Trunc v1 (5 inputs, domain opset 1): R(round(x/s) / 2**(in_bw - out_bw)) * s."""
    q, i = quant("qin", "x", "a", 2.0 ** -3, 8)
    tr = helper.make_node("Trunc", ["a", "ts", "tz", "tin", "tout"], ["y"], name="trunc", domain=QD,
                          rounding_mode=mode)
    m = mk([q, tr], [4, 2, 3, 3], {**i, "ts": f32(2.0 ** -3), "tz": f32(0.0), "tin": f32(8.0), "tout": f32(5.0)})
    exact(m, {"x": grid(rng, (4, 2, 3, 3), -2000, 2000, 6)})


@pytest.mark.parametrize("count_include_pad,ceil_mode,pads,strides", [
    (1, 0, [1, 1, 1, 1], [2, 2]), (1, 0, [0, 1, 1, 0], [1, 1]), (0, 1, [0, 0, 0, 0], [2, 2]),
    (1, 1, [1, 1, 1, 1], [2, 2]), (0, 0, [1, 1, 1, 1], [2, 2]), (0, 0, [1, 0, 0, 1], [1, 1]),
    (0, 1, [0, 0, 0, 0], [3, 3]), (1, 1, [1, 0, 0, 1], [3, 2]), (0, 1, [1, 1, 0, 0], [3, 3])])
def test_padded_and_ceil_mode_avgpool_matches_qonnx(rng, count_include_pad, ceil_mode, pads, strides):
    """AveragePool 2x2 with count_include_pad=1 pads (a zero Pad, then an unpadded pool), with
    count_include_pad=0 pads (the IR AvgPool's own padding: each window divided by its count of
    input elements, 1, 2 or 4 here) and ceil_mode (also with partial last windows: their overhang is
    neither counted nor padded), then a rounding Quant: IR == qonnx exactly."""
    q1, i1 = quant("qin", "x", "a", 2.0 ** -3, 6)
    ap = helper.make_node("AveragePool", ["a"], ["b"], name="ap", kernel_shape=[2, 2], strides=strides, pads=pads,
                          count_include_pad=count_include_pad, ceil_mode=ceil_mode)
    q2, i2 = quant("qout", "b", "y", 2.0 ** -4, 8, mode="ROUND")
    m = mk([q1, ap, q2], [2, 3, 6, 6], {**i1, **i2})
    g = exact(m, {"x": grid(rng, (2, 3, 6, 6), -500, 500, 6)})
    assert ("Pad" in ops(g)) == (any(pads) and count_include_pad == 1)


@pytest.mark.parametrize("strides,pads", [([2, 2], [0, 0, 0, 0]), ([3, 2], [1, 0, 1, 1])])
def test_ceil_mode_maxpool_with_partial_windows_matches_qonnx(rng, strides, pads):
    q1, i1 = quant("qin", "x", "a", 2.0 ** -3, 6)
    mp = helper.make_node("MaxPool", ["a"], ["y"], name="mp", kernel_shape=[2, 2], strides=strides, pads=pads,
                          ceil_mode=1)
    m = mk([q1, mp], [2, 3, 6, 7], i1)
    exact(m, {"x": grid(rng, (2, 3, 6, 7), -500, 500, 6)})


def test_avgpool_padding_only_windows_are_refused():
    m = mk([helper.make_node("AveragePool", ["x"], ["y"], name="ap", kernel_shape=[2, 2], pads=[2, 2, 2, 2])],
           [1, 3, 5, 5])
    msg = refused(m)
    assert "'ap'" in msg and "windows of padding only" in msg


@pytest.mark.parametrize("opset,keepdims", [(13, 1), (13, 0), (18, 1)])
def test_reduce_mean_over_spatial_axes_is_a_global_avg_pool(rng, opset, keepdims):
    q1, i1 = quant("qin", "x", "a", 2.0 ** -3, 6)
    inits = dict(i1)
    if opset >= 18:
        rm = helper.make_node("ReduceMean", ["a", "axes"], ["y"], name="rm", keepdims=keepdims)
        inits["axes"] = np.array([-1, 2], np.int64)
    else:
        rm = helper.make_node("ReduceMean", ["a"], ["y"], name="rm", axes=[2, 3], keepdims=keepdims)
    m = mk([q1, rm], [2, 3, 4, 4], inits, opset=opset)
    g = exact(m, {"x": grid(rng, (2, 3, 4, 4), -500, 500, 6)})
    assert "GlobalAvgPool" in ops(g)


def test_reduce_mean_over_channels_is_refused():
    m = mk([helper.make_node("ReduceMean", ["x"], ["y"], name="rm_c", axes=[1])], [1, 3, 4, 4])
    msg = refused(m)
    assert "'rm_c'" in msg and "spatial axes" in msg
