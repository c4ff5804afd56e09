"""Elementwise binary ops on two activations beside ``Add``/``Mul``: ``Sub``, ``Max`` and ``Min``.

Sources: ONNX ``Sub``, ``Max``, ``Min`` (https://onnx.ai/onnx/operators/), PyTorch ``torch.sub``,
``torch.maximum``, ``torch.minimum``.  Per-sample shapes broadcast like NumPy.

Fixed point: both operands are aligned to ``F = max(F_a, F_b)`` fraction bits (exact left shifts);
``Sub`` is then an exact integer difference, ``Max``/``Min`` select one of the aligned codes.  The
output type is the narrowest holding every result (``Max``: codes ``[max(lo_a, lo_b), max(hi_a,
hi_b)]``; ``Min``: ``[min(lo_a, lo_b), min(hi_a, hi_b)]``; ``Sub``: ``[lo_a - hi_b, hi_a - lo_b]``).
``Max``/``Min`` of an activation and a scalar constant are imported as a ``Clip``
(:mod:`.clip`).
"""
from __future__ import annotations

import numpy as np

from ...errors import UnsupportedError
from ..types import FLOAT32, FixedType, fixed_for_range
from .clip import add_clip
from .kernels import align, per_sample_broadcast, real_view
from .spec import OpSpec, all_fixed, broadcast_shape, code_range, register, shift_range

_RANGE = {
    "Sub": lambda a, b: (a[0] - b[1], a[1] - b[0]),
    "Max": lambda a, b: (max(a[0], b[0]), max(a[1], b[1])),
    "Min": lambda a, b: (min(a[0], b[0]), min(a[1], b[1])),
}
_NUMPY = {"Sub": np.subtract, "Max": np.maximum, "Min": np.minimum}


def _rule(node, ins):
    """Broadcast shape; exact fixed type of the aligned results (see the module docstring)."""
    a, b = ins
    shape = broadcast_shape(node, a.shape, b.shape)
    if all_fixed(a.dtype, b.dtype):
        F = max(a.dtype.frac_bits, b.dtype.frac_bits)
        ra = shift_range(*code_range(a.dtype), F - a.dtype.frac_bits)
        rb = shift_range(*code_range(b.dtype), F - b.dtype.frac_bits)
        return shape, fixed_for_range(*_RANGE[node.op](ra, rb), F)
    return shape, FLOAT32


def _reference(node, args, in_types, out_t):
    a, b = per_sample_broadcast(*args)
    ta, tb = in_types
    f = _NUMPY[node.op]
    if isinstance(out_t, FixedType):
        F = out_t.frac_bits
        return f(align(a, ta.frac_bits, F), align(b, tb.frac_bits, F))
    return f(real_view(a, ta), real_view(b, tb)).astype(np.float32)


def _import_minmax(cv, node):
    """ONNX ``Max``/``Min`` (variadic): activations are combined pairwise into IR ``Max``/``Min``
    nodes (in the first activation's layout); constant inputs are reduced to one constant, which must
    be a scalar, and applied as a one-sided ``Clip`` (exact bound, :func:`.clip.add_clip`).

    Raises:
        UnsupportedError: naming the node for only constant inputs or a non-scalar constant.
    """
    acts = [t for t in node.input if t and not cv.is_const(t)]
    consts = [np.asarray(cv.consts[t], dtype=np.float32) for t in node.input if t and cv.is_const(t)]
    if not acts:
        raise UnsupportedError(f"{node.op_type} of constants only was not folded", node.name)
    if any(c.size != 1 for c in consts):
        raise UnsupportedError(f"{node.op_type} with a non-scalar constant (shape "
                               f"{next(c.shape for c in consts if c.size != 1)}) is not supported: only an "
                               f"activation and a scalar constant map to a Clip", node.name)
    e0 = cv.entry(node, acts[0])
    if e0.rowperm is not None:
        raise UnsupportedError(f"{node.op_type} between a Flatten and a Dense", node.name)
    out = node.output[0]
    cur = e0.value
    for i, t in enumerate(acts[1:]):
        xb = cv.layout(node, cv.entry(node, t), e0.perm)
        last = i == len(acts) - 2 and not consts
        cur = cv.add(node.name if i == 0 else f"{node.name}__{i}", node.op_type, [cur, xb],
                     out=out if last else f"{out}__{i}")
    if consts:
        c = float((np.max if node.op_type == "Max" else np.min)([c.ravel()[0] for c in consts]))
        mx = node.op_type == "Max"
        cur = add_clip(cv, node, cur, c if mx else None, None if mx else c, out,
                       name=node.name if len(acts) == 1 else f"{node.name}__const")
    cv.bind(out, cur, e0.perm)


def _export(ex, n, x):
    return ex.node(n.op, x, n.output + "__ir")


SUB = register(OpSpec(name="Sub", summary="elementwise difference of two activations",
                      infer=_rule, reference=_reference, arity=2, onnx_export=_export))
MAX = register(OpSpec(name="Max", summary="elementwise maximum of two activations",
                      infer=_rule, reference=_reference, arity=2, onnx_export=_export,
                      onnx_import={"Max": _import_minmax}))
MIN = register(OpSpec(name="Min", summary="elementwise minimum of two activations",
                      infer=_rule, reference=_reference, arity=2, onnx_export=_export,
                      onnx_import={"Min": _import_minmax}))
