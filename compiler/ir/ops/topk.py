"""``TopK``: the indices of the ``k`` largest (or smallest) entries along the last axis.

FINN's label select (ONNX ``TopK`` on the class scores).  Output: the indices, in order (largest
first; equal values: the lower index first, as the ONNX TopK specification requires), as float32
numbers so that the op runs on the host after a fixed-point core (an exact integer in float32 up to
``2**24`` entries).  Only the indices are produced (ONNX's values output is not).

The kernel ranks every entry by exact comparisons: ``rank[i] = #{j : x[j] > x[i]} +
#{j < i : x[j] == x[i]}`` (``<`` for ``largest=0``), a permutation of ``0..C-1``; the index at
position ``p`` is the ``i`` with ``rank[i] == p``.  No sort, so every backend orders ties alike.

Attributes: ``k`` (1..C), ``largest`` (True).

Sources: ONNX operator TopK (https://onnx.ai/onnx/operators/onnx__TopK.html); FINN's
``InsertTopK`` transformation (label select at the graph output).
"""
from __future__ import annotations

import numpy as np

from ...errors import VerifyError
from ..types import FLOAT32, FixedType
from .kernels import real_view
from .spec import OpSpec, register


def _rule(node, ins):
    x = ins[0]
    if not x.shape:
        raise VerifyError("TopK needs an input with at least one axis", node.name)
    k = int(node.attrs["k"])
    c = x.shape[-1]
    if not 1 <= k <= c:
        raise VerifyError(f"TopK k={k} must be in 1..{c} (the size of the last axis)", node.name)
    if c > 1 << 24:
        raise VerifyError(f"TopK over {c} entries: indices are not exact in float32", node.name)
    return (*x.shape[:-1], k), FLOAT32


def ranks(x: np.ndarray, largest: bool) -> np.ndarray:
    """Rank of every entry along the last axis (0 = first in the output), ties by lower index."""
    a, b = x[..., None, :], x[..., :, None]  # a[..., i, j] = x[j], b[..., i, j] = x[i]
    before = (a > b) if largest else (a < b)
    c = x.shape[-1]
    lower = np.arange(c)[None, :] < np.arange(c)[:, None]  # [i, j]: j < i
    return before.sum(-1) + ((a == b) & lower).sum(-1)


def _reference(node, args, in_types, out_t):
    x = args[0] if isinstance(in_types[0], FixedType) else real_view(args[0], in_types[0])
    r = ranks(x, bool(node.attrs.get("largest", True)))
    k = int(node.attrs["k"])
    c = x.shape[-1]
    onehot = r[..., None, :] == np.arange(k)[:, None]  # [..., p, i]
    return (onehot * np.arange(c)).sum(-1).astype(np.float32)


def _export_onnx(ex, node, x):
    """ONNX ``TopK`` (values output unused) and a ``Cast`` of the indices to float."""
    from onnx import helper

    k = ex.init(f"{node.name}_k", np.array([int(node.attrs["k"])], dtype=np.int64))
    vals, idx = ex.fresh(f"{node.output}__values"), ex.fresh(f"{node.output}__indices")
    ex.nodes.append(helper.make_node(
        "TopK", [x[0], k], [vals, idx], name=ex.fresh(f"{node.name}__node"), axis=-1,
        largest=int(bool(node.attrs.get("largest", True))), sorted=1))
    return ex.node("Cast", [idx], node.output + "__ir", to=1)


def _macs(node, graph):
    """C comparisons per input entry (the rank)."""
    c = graph.values[node.inputs[0]].shape[-1]
    return max(1, graph.values[node.inputs[0]].size * c)


TOPK = register(OpSpec(
    name="TopK", summary="indices (float32) of the k largest entries of the last axis, ties by lower index",
    infer=_rule, reference=_reference, attrs={"k": None, "largest": True}, macs=_macs, onnx_export=_export_onnx))
