"""ONNX ``ReduceMean`` import: a mean over exactly the spatial axes is a ``GlobalAvgPool``.

Source: ONNX ``ReduceMean`` (https://onnx.ai/onnx/operators/onnx__ReduceMean.html; ``axes`` an
attribute before opset 18, an input from 18), what PyTorch ``AdaptiveAvgPool2d(1)`` /
``x.mean((2, 3))`` and Brevitas ``TruncAdaptiveAvgPool2d(1)`` export.  Handlers take ``(cv, node)``
like every entry of :data:`~qdeploy.compiler.frontends.onnx_ops.IMPORTERS`.
"""
from __future__ import annotations

import numpy as np

from ..errors import UnsupportedError
from .onnx_convert import Entry, canonical_perm


def import_reduce_mean(cv, node):
    """ONNX ``ReduceMean`` over exactly the spatial axes (what ``AdaptiveAvgPool2d(1)`` and Brevitas
    ``TruncAdaptiveAvgPool2d(1)`` export) -> ``GlobalAvgPool`` (+ a keepdims Reshape).

    Raises:
        UnsupportedError: naming the node for any other set of axes."""
    e = cv.entry(node, node.input[0])
    rank = len(e.perm)
    if cv.opset >= 18:
        axes = [int(a) for a in np.asarray(cv.const(node, node.input[1])).ravel()] \
            if len(node.input) > 1 and node.input[1] else []
    else:
        axes = [int(a) for a in (cv.attr(node, "axes", []) or [])]
    if not axes and int(cv.attr(node, "noop_with_empty_axes", 0)):
        cv.env[node.output[0]] = e
        return
    axes = sorted({a % (rank + 1) for a in axes}) if axes else list(range(rank + 1))
    if rank < 2 or axes != list(range(2, rank + 1)):
        raise UnsupportedError(f"ReduceMean over axes {axes} of a rank-{rank + 1} tensor: only the spatial axes "
                               f"{list(range(2, rank + 1))} (a global average pool) are supported", node.name)
    x = cv.layout(node, e, canonical_perm(rank))
    keep = int(cv.attr(node, "keepdims", 1))
    g = cv.add(node.name, "GlobalAvgPool", [x], out=f"{node.output[0]}__gap" if keep else node.output[0])
    if not keep:
        cv.env[node.output[0]] = Entry(g, (0,))
        return
    c = cv.b.values[g].shape[-1]
    v = cv.add(f"{node.name}__keepdims", "Reshape", [g], {"shape": (1,) * (rank - 1) + (c,)}, out=node.output[0])
    cv.env[node.output[0]] = Entry(v, canonical_perm(rank))
