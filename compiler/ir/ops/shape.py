"""Data movement: ``Concat``, ``Reshape`` and ``Transpose`` (per-sample axes; the batch axis
is never touched)."""
from __future__ import annotations

import numpy as np

from ...errors import VerifyError
from ..types import FLOAT32, FixedType, fixed_for_range
from .kernels import align, real_view
from .spec import OpSpec, all_fixed, register


def _concat_rule(node, ins):
    if len(ins) < 2:
        raise VerifyError("Concat needs at least two inputs", node.name)
    axis = int(node.attrs.get("axis", -1))
    rank = len(ins[0].shape)
    ax = axis % rank
    for v in ins[1:]:
        if len(v.shape) != rank or any(v.shape[i] != ins[0].shape[i] for i in range(rank) if i != ax):
            raise VerifyError(f"Concat inputs {[v.shape for v in ins]} differ off axis {axis}", node.name)
    shape = list(ins[0].shape)
    shape[ax] = sum(v.shape[ax] for v in ins)
    if all_fixed(*(v.dtype for v in ins)):
        F = max(v.dtype.frac_bits for v in ins)
        lo = min(v.dtype.min_code << (F - v.dtype.frac_bits) for v in ins)
        hi = max(v.dtype.max_code << (F - v.dtype.frac_bits) for v in ins)
        return tuple(shape), fixed_for_range(lo, hi, F)
    return tuple(shape), FLOAT32


def _concat_ref(node, args, in_types, out_t):
    axis = int(node.attrs.get("axis", -1))
    axis = axis + 1 if axis >= 0 else axis
    if isinstance(out_t, FixedType):
        parts = [align(a, t.frac_bits, out_t.frac_bits) for a, t in zip(args, in_types)]
    else:
        parts = [real_view(a, t) for a, t in zip(args, in_types)]
    return np.concatenate(parts, axis=axis)


CONCAT = register(OpSpec(name="Concat", kind="layout", summary="join two or more activations along a per-sample axis",
                         infer=_concat_rule, reference=_concat_ref, arity=None, attrs={"axis": -1}))


def _reshape_rule(node, ins):
    """Row-major reshape of the per-sample tensor (Flatten is Reshape to (size,))."""
    shape = tuple(int(s) for s in node.attrs["shape"])
    if int(np.prod(shape, dtype=np.int64)) != ins[0].size:
        raise VerifyError(f"Reshape from {ins[0].shape} to {shape} changes the element count", node.name)
    return shape, ins[0].dtype


def _reshape_ref(node, args, in_types, out_t):
    return args[0].reshape((args[0].shape[0], *node.attrs["shape"]))


RESHAPE = register(OpSpec(name="Reshape", kind="layout", summary="row-major reshape of the per-sample tensor",
                          infer=_reshape_rule, reference=_reshape_ref, attrs={"shape": None},
                          macs=lambda node, graph: 1))


def _transpose_rule(node, ins):
    perm = tuple(int(p) for p in node.attrs["perm"])
    if sorted(perm) != list(range(len(ins[0].shape))):
        raise VerifyError(f"Transpose perm {perm} is not a permutation of the {len(ins[0].shape)} per-sample axes",
                          node.name)
    return tuple(ins[0].shape[p] for p in perm), ins[0].dtype


def _transpose_ref(node, args, in_types, out_t):
    return np.transpose(args[0], (0, *(p + 1 for p in node.attrs["perm"])))


TRANSPOSE = register(OpSpec(name="Transpose", kind="layout", summary="permute the per-sample axes",
                            infer=_transpose_rule, reference=_transpose_ref, attrs={"perm": None}))
