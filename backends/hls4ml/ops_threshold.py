"""hls4ml translation and FPGA estimate row of ``MultiThreshold``, declared with the same
:func:`~.ops.hls4ml_op` decorator into the same tables (the package ``__init__`` imports this
module, so the entries exist whenever :mod:`.ops` is importable).

hls4ml has no thresholding layer.  A MultiThreshold is translated through its proved
multiply-and-shift form (:func:`qdeploy.compiler.ir.shiftform.node_shift_form`, the same search
and proof as the ``requant_shift`` pass), i.e. as the pass's ``Affine`` + ``Quantize`` would be:

* ``nnet_batchnorm.h``: ``res = (res_T)(x * scale + bias)`` at full precision (ap_fixed products
  and sums do not round) into the exact accumulator type ``x * K + R`` (``S + F_out`` fraction
  bits), with ``scale = K * 2**(F_in - S - F_out)`` and ``bias = R * 2**-(S + F_out)``;
* ``nnet_activation.h`` ``linear``: ``res = (res_T)x`` into the output type with ``AP_TRN`` (the
  floor of ``acc / 2**S``; ``AP_RND_CONV`` for a half-to-even form) and ``AP_SAT`` (the clamp).

Layer constants travel as float64 (``scale_data``/``bias_data``, printed in decimal into the
weight headers), exact up to 53 bits: the form is searched with that cap.  A node without a form
(irregular steps, round-half-even ties, too wide) is refused with the reason.
"""
from __future__ import annotations

import math

from ...compiler.errors import UnsupportedError
from ...compiler.ir.graph import Node
from ...compiler.ir.shiftform import affine_constants, clamp_type, node_shift_form
from ...compiler.ir.types import FixedType, fixed_for_range
from .ops import chained, hls4ml_op
from .resources import Cost, t_add, width

#: Widest multiplier / offset constant (bits) that hls4ml's float64 constants carry exactly.
MAX_CONST_BITS = 53


def threshold_cost(ctx, node) -> dict:
    """A12 for a threshold unit: per output element ``T`` comparators of the input width (one LUT
    per bit each) and an adder tree counting their ``T`` one-bit results (``T`` LUT bits); the
    delay is one comparator plus ``ceil(log2 T)`` adder levels of the count's width."""
    out = ctx.graph.value(node.output)
    xb = width(ctx.graph.value(node.inputs[0]).dtype)
    n_t = int(node.params["thresholds"].shape[1])
    levels = math.ceil(math.log2(max(n_t, 2)))
    return chained(ctx, out.size * n_t * (xb + 1), 0, t_add(xb) + levels * t_add(max(1, n_t.bit_length())))


@hls4ml_op("MultiThreshold", cost=Cost(threshold_cost))
def _multi_threshold(tr, n: Node):
    x = tr.graph.value(n.inputs[0])
    xt = tr.fixed(x.dtype, n.name)
    res = node_shift_form(n, xt, max_const_bits=MAX_CONST_BITS)
    if res.form is None:
        raise UnsupportedError(f"MultiThreshold without a multiply-and-shift form ({res.reason}); hls4ml has no "
                               "thresholding layer", n.name)
    f = res.form
    c = x.shape[-1] if x.shape else 1
    scale, bias = affine_constants(f, xt, c)
    acc_t = fixed_for_range(*f.acc_range(), f.S + f.out.frac_bits)
    if f.rounding != "TRN" and acc_t.width < f.S + 2:
        # ap_fixed rounding reads the bit below the new LSB: it must lie inside the type (sign-extend)
        acc_t = FixedType(f.S + 2, f.S + 2 - acc_t.frac_bits, True)
    mid = tr.bn_layer(n, x.size, c, scale.real(), bias.real(), scale.dtype.hls(), bias.dtype.hls(), acc_t,
                      tr.src(n.inputs[0]), None, base=f"{n.name}_mul")
    tr.bind(n.output, tr.layer(n, {"class_name": "Activation", "activation": "linear"},
                               {"result": clamp_type(f.out, f.rounding).hls()}, [mid]))
    tr.note(f"MultiThreshold '{n.name}' as multiply-and-shift: {f.k_bits}-bit multipliers, shift {f.S}")
