"""Activations: ``Relu`` (exact on codes) and ``Softmax`` (always float32)."""
from __future__ import annotations

import numpy as np

from ...errors import UnsupportedError
from ..types import FLOAT32, FixedType, fixed_for_range
from .kernels import real_view
from .spec import OpSpec, register


def _relu_rule(node, ins):
    t = ins[0].dtype
    if isinstance(t, FixedType):
        return ins[0].shape, fixed_for_range(0, max(t.max_code, 0), t.frac_bits)
    return ins[0].shape, FLOAT32


def _relu_ref(node, args, in_types, out_t):
    return np.maximum(args[0], 0)


RELU = register(OpSpec(name="Relu", summary="max(x, 0)", infer=_relu_rule, reference=_relu_ref))


def _softmax_rule(node, ins):
    """Softmax over the last axis, always float32."""
    if int(node.attrs.get("axis", -1)) not in (-1, len(ins[0].shape) - 1):
        raise UnsupportedError("Softmax only over the last (channel) axis", node.name)
    return ins[0].shape, FLOAT32


def _softmax_ref(node, args, in_types, out_t):
    x = real_view(args[0], in_types[0])
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


SOFTMAX = register(OpSpec(name="Softmax", summary="softmax over the last axis, float32",
                          infer=_softmax_rule, reference=_softmax_ref, attrs={"axis": -1}))
