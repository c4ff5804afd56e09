"""Global average pools of scaled-integer values: the two corpus rows that were refused (issue 14:
``perchannel_depthwise_b6``, AdaptiveAvgPool2d(1) -> ReduceMean after a per-channel float-scale
layer; ``ort_cnn2d_bn_gap_s8``, GlobalAveragePool of a value with a zero point).

Mean over the ``N`` spatial positions of ``s_c * (q - z_c)`` is ``(s_c / N) * sum(q) - s_c * z_c``:
an integer window sum with an exact pending map per channel (:func:`.onnx_scaled_ops.avgpool`),
which the next Quant turns into a MultiThreshold.  Oracle: the float64 forward of
``test_scaled_import.eval64`` (qonnx's ``int_quant`` in float64), on every element.
"""
from __future__ import annotations

import numpy as np
import pytest

from .test_scaled_import import M, compare, f32, ops


@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_mean_of_a_per_channel_accumulator_with_bias(keepdims):
    """Conv with per-channel weight scales and a float bias (an accumulator whose scale and offset
    differ per channel, no Quant in between) -> ReduceMean over H, W (7 x 5 = 35 positions, not a
    power of two) -> Quant: the per-channel map ``(P_c / 35, B_c)`` folds into the thresholds."""
    rng = np.random.default_rng(21)
    m = M()
    h = m.quant("qin", "x", 0.0311, 8)
    w = m.wquant("w", rng.normal(0, 0.3, (5, 3, 1, 1)), f32(rng.uniform(0.002, 0.004, (5, 1, 1, 1))))
    h = m.op("Conv", [h, w, m.const("cb", rng.normal(0, 0.2, 5))], "conv", kernel_shape=[1, 1])
    h = m.op("ReduceMean", [h], "mean", axes=[2, 3], keepdims=keepdims)
    y = m.quant("qout", h, 0.0071, 8)
    x = f32(rng.uniform(-3, 3, (120, 3, 7, 5)))
    g, _ = compare(m.model([1, 3, 7, 5], y), x)
    assert "GlobalAvgPool" not in ops(g) and "MultiThreshold" in ops(g)
    (pool,) = [n for n in g.nodes if n.name == "mean"]
    assert pool.op == "Conv" and pool.attrs["groups"] == 5  # the exact window sum


def test_global_average_pool_of_zero_point_codes_per_channel():
    """Per-channel scales and zero points (ShiftedUint8-like, and the onnxruntime QInt8 CNN's offset)
    -> GlobalAveragePool (6 x 6 = 36) -> Flatten -> MatMul -> Quant: the offsets ``-s_c * z_c`` pass
    the pool unchanged and fold into the MatMul's offset."""
    rng = np.random.default_rng(22)
    m = M()
    s = (0.0485 * f32([1, 2, 0.5, 4])).reshape(1, 4, 1, 1)  # power-of-two ratios: one MatMul accumulator
    h = m.quant("qin", "x", s, 8, signed=0, zp=f32([6, 128, 0, 17]).reshape(1, 4, 1, 1))
    h = m.op("Flatten", [m.op("GlobalAveragePool", [h], "gap")], "flat")
    w = m.wquant("w", rng.normal(0, 0.3, (4, 3)), 0.0041)
    y = m.quant("qout", m.op("MatMul", [h, w], "fc"), 0.0057, 8)
    x = f32(rng.uniform(-1, 9, (150, 4, 6, 6)))
    g, _ = compare(m.model([1, 4, 6, 6], y), x)
    assert "GlobalAvgPool" not in ops(g) and ops(g).count("MultiThreshold") == 2
