"""``MultiThreshold``: a monotone step function of fixed-point codes, per channel.

``y[..., c] = base[c] + sign[c] * #{k : x[..., c] >= thresholds[c, k]}``

Sources: FINN's ``MultiThreshold`` custom op (Umuroglu et al., "FINN: A Framework for Fast,
Scalable Binarized Neural Network Inference", FPGA 2017, section 4.2 "thresholding"; the
qonnx/FINN ``MultiThreshold`` with ``out_bias`` and ``out_scale``), used here as the exact
requantizer: any monotone map from an integer accumulator to quantized output codes (a QONNX
``Quant`` with an arbitrary float scale and zero point after an affine map, a folded batch norm,
a ReLU) is exactly the count of thresholds the accumulator reaches.  The thresholds are computed
at compile time in exact rational arithmetic, so the op is exact with respect to the real-number
semantics of the source ops (:mod:`qdeploy.compiler.ir.requant` derives them;
:mod:`qdeploy.compiler.ir.shiftform` proves a multiply-and-shift form equal, which the
``requant_shift`` pass then emits).

Operands (channels-last; the channel axis is the last one):

* input ``x``: fixed-point codes of any :class:`FixedType` (shape ``(*spatial, C)``);
* ``params["thresholds"]``: a fixed-point :class:`Const` of shape ``[C, T]`` or ``[1, T]``
  (one row broadcast to every channel) whose codes share the input's binary point (same
  ``frac_bits``); each row is sorted ascending.  A threshold above the input's largest code is
  never reached (use it to give channels fewer steps);
* ``params["base"]``: integer :class:`Const` ``[C]`` or ``[1]``, the output code where no
  threshold is reached;
* ``params["sign"]``: integer :class:`Const` ``[C]`` or ``[1]`` of +1 (non-decreasing step) or -1
  (non-increasing step, e.g. a channel with a negative batch-norm scale).

Attribute ``to``: the output :class:`FixedType` whose codes ``y`` are (``base + sign*k`` must lie in
its range for every ``k`` in ``0..T``).
"""
from __future__ import annotations

import numpy as np

from ...errors import VerifyError
from ..types import FixedType
from .spec import OpSpec, register


def _param(node, role):
    p = node.params.get(role)
    if p is None:
        raise VerifyError(f"MultiThreshold needs parameter {role!r}", node.name)
    if not isinstance(p.dtype, FixedType):
        raise VerifyError(f"MultiThreshold parameter {role!r} must be fixed-point, got {p.dtype}", node.name)
    return p


def _rule(node, ins):
    x = ins[0]
    if not isinstance(x.dtype, FixedType):
        raise VerifyError(f"MultiThreshold needs a fixed-point input, got {x.dtype}", node.name)
    to = node.attrs.get("to")
    if not isinstance(to, FixedType):
        raise VerifyError("MultiThreshold needs attribute 'to' with a fixed-point type", node.name)
    t, base, sign = (_param(node, r) for r in ("thresholds", "base", "sign"))
    c = x.shape[-1] if x.shape else 1
    if t.data.ndim != 2 or t.shape[0] not in (1, c):
        raise VerifyError(f"MultiThreshold thresholds shape {t.shape} is not [C={c}, T] or [1, T]", node.name)
    if t.dtype.frac_bits != x.dtype.frac_bits:
        raise VerifyError(f"MultiThreshold thresholds have {t.dtype.frac_bits} fraction bits, the input "
                          f"{x.dtype.frac_bits}: they must share the binary point", node.name)
    if t.shape[1] > 1 and np.any(np.diff(t.data, axis=1) < 0):
        raise VerifyError("MultiThreshold thresholds are not sorted ascending in every channel", node.name)
    for role, p in (("base", base), ("sign", sign)):
        if p.data.ndim != 1 or p.shape[0] not in (1, c):
            raise VerifyError(f"MultiThreshold {role} shape {p.shape} is not [C={c}] or [1]", node.name)
        if not p.dtype.is_integer:
            raise VerifyError(f"MultiThreshold {role} must be an integer constant, got {p.dtype}", node.name)
    if not np.all(np.isin(sign.data, (-1, 1))):
        raise VerifyError("MultiThreshold sign must be +1 or -1 in every channel", node.name)
    n = t.shape[1]
    ends = np.stack(np.broadcast_arrays(base.data, base.data + sign.data * n))
    if ends.min() < to.min_code or ends.max() > to.max_code:
        raise VerifyError(f"MultiThreshold output codes {int(ends.min())}..{int(ends.max())} do not fit {to}",
                          node.name)
    return x.shape, to


def _reference(node, args, in_types, out_t):
    """Count per channel with ``searchsorted`` (memory O(N * elements), not O(N * elements * T))."""
    x = np.asarray(args[0], dtype=np.int64)
    t = node.params["thresholds"].data
    base = node.params["base"].data
    sign = node.params["sign"].data
    c = x.shape[-1]
    out = np.empty_like(x)
    for ch in range(c):
        row = t[ch if t.shape[0] > 1 else 0]
        b = base[ch if base.shape[0] > 1 else 0]
        s = sign[ch if sign.shape[0] > 1 else 0]
        out[..., ch] = b + s * np.searchsorted(row, x[..., ch], side="right")
    return out


def _macs(node, graph):
    """One comparison per threshold and output element."""
    return max(1, graph.values[node.output].size * int(node.params["thresholds"].shape[1]))


MULTI_THRESHOLD = register(OpSpec(
    name="MultiThreshold",
    summary="per-channel monotone step: base[c] + sign[c] * #(x >= thresholds[c, k])",
    infer=_rule, reference=_reference, attrs={"to": None}, params=("thresholds", "base", "sign"),
    macs=_macs, kind="elementwise"))
