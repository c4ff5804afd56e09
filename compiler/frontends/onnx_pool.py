"""ONNX pooling imports (MaxPool, AveragePool, GlobalAveragePool, ReduceMean over the spatial axes)
and :func:`spatial_attrs`, the stride/padding resolution shared with ``Conv``.

Handlers take ``(cv, node)`` like every entry of :data:`~.onnx_ops.IMPORTERS`; a scaled-integer
input (:mod:`.onnx_scaled`) goes to :func:`.onnx_scaled_ops.maxpool` / :func:`.onnx_scaled_ops.avgpool`.
"""
from __future__ import annotations

import numpy as np

from ..errors import UnsupportedError
from ..ir.types import FixedType
from . import onnx_scaled as scaled
from . import onnx_scaled_ops as scaled_ops
from .onnx_convert import Entry, canonical_perm


def spatial_attrs(cv, node, in_spatial, kernel, dilated=False):
    """(strides, pads) of a Conv/pool node (``auto_pad`` resolved on the dilated kernel extent);
    ``dilations`` other than 1 are refused unless ``dilated`` (Conv)."""
    nd = len(kernel)
    strides = tuple(int(s) for s in cv.attr(node, "strides", [1] * nd))
    dil = tuple(int(d) for d in cv.attr(node, "dilations", [1] * nd))
    if any(d != 1 for d in dil) and not dilated:
        raise UnsupportedError(f"{node.op_type} dilations {dil} are not supported (only 1)", node.name)
    if len(dil) != nd or any(d < 1 for d in dil):
        raise UnsupportedError(f"{node.op_type} dilations {dil} must be {nd} factor(s) >= 1", node.name)
    kernel = tuple(d * (k - 1) + 1 for d, k in zip(dil, kernel))
    if any(d != 1 for d in dil) and str(cv.attr(node, "auto_pad", "NOTSET")) in ("SAME_UPPER", "SAME_LOWER"):
        raise UnsupportedError(f"{node.op_type} with dilations {dil} and auto_pad SAME is not supported "
                               "(onnxruntime, the reference executor, refuses it too): give explicit pads", node.name)
    auto = str(cv.attr(node, "auto_pad", "NOTSET"))
    if auto in ("NOTSET", ""):
        pads = tuple(int(p) for p in cv.attr(node, "pads", [0] * 2 * nd))
    elif auto == "VALID":
        pads = (0,) * 2 * nd
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for L, k, s in zip(in_spatial, kernel, strides):
            total = max((-(-L // s) - 1) * s + k - L, 0)
            small = total // 2
            begins.append(small if auto == "SAME_UPPER" else total - small)
            ends.append(total - small if auto == "SAME_UPPER" else small)
        pads = tuple(begins + ends)
    else:
        raise UnsupportedError(f"{node.op_type} auto_pad {auto!r} is not supported", node.name)
    return strides, pads


def ceil_extra(cv, node, in_spatial, kernel, strides, pads) -> tuple[int, ...]:
    """Per spatial axis, how far the last window of a ``ceil_mode=1`` pool reaches past the end
    padding (0 without ceil_mode).  The output size is onnxruntime's (``pool_attributes.h``):
    ``ceil((L + p0 + p1 - k) / s) + 1``, minus one when the last window would start past the input
    and the begin padding; the overhang holds nothing -- it is not counted by an average and never
    wins a maximum -- which is exactly an extra end padding of the IR pools (MaxPool pads with the
    smallest code, AvgPool excludes padding from its count)."""
    if not int(cv.attr(node, "ceil_mode", 0)):
        return (0,) * len(kernel)
    nd, extra = len(kernel), []
    for i, (L, k, s) in enumerate(zip(in_spatial, kernel, strides)):
        span = L + pads[i] + pads[i + nd] - k
        out = -(-span // s) + 1
        if (out - 1) * s >= L + pads[i]:
            out -= 1
        extra.append(max((out - 1) * s + k - (L + pads[i] + pads[i + nd]), 0))
    return tuple(extra)


def _pool(cv, node, op):
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
        raise UnsupportedError("MaxPool with an Indices output is not supported", node.name)
    e = cv.entry(node, node.input[0], scaled=True)
    rank = len(e.perm)
    x, S = scaled.relayout(cv, node, e, canonical_perm(rank))
    kernel = tuple(int(k) for k in cv.attr(node, "kernel_shape"))
    in_spatial = cv.b.values[x].shape[:-1]
    strides, pads = spatial_attrs(cv, node, in_spatial, kernel)
    nd = len(kernel)
    extra = ceil_extra(cv, node, in_spatial, kernel, strides, pads)
    include = node.op_type == "AveragePool" and int(cv.attr(node, "count_include_pad", 0))
    if e.scaled is not None:
        if node.op_type == "AveragePool" and any(pads) and not include:
            raise UnsupportedError("AveragePool with padding excluded from the count (count_include_pad=0) of a "
                                   "scaled-integer value is not supported", node.name)
        if node.op_type == "AveragePool" and any(extra):
            raise UnsupportedError("AveragePool with ceil_mode=1 and a partial last window on a scaled-integer value "
                                   "is not supported", node.name)
        attrs = {"kernel": kernel, "strides": strides, "pads": pads[:nd] + tuple(p + o for p, o in zip(pads[nd:], extra))}
        pool = scaled_ops.maxpool if node.op_type == "MaxPool" else scaled_ops.avgpool
        pool(cv, node, e, x, S, attrs, node.output[0], canonical_perm(rank))
        return
    if not include:  # ceil_mode's overhang = more (uncounted / never maximal) end padding
        pads = pads[:nd] + tuple(p + o for p, o in zip(pads[nd:], extra))
    else:
        # count_include_pad=0 is the IR AvgPool's own padding; count_include_pad=1: the pads are zeros
        # counted in every window = a zero Pad, then a pool whose only padding is ceil_mode's uncounted overhang
        if any(pads):
            fixed = isinstance(cv.b.values[x].dtype, FixedType)
            x = cv.add(f"{node.name}__pad", "Pad", [x], {"pads": (*pads[:nd], 0, *pads[nd:], 0),
                                                          **({"code": 0} if fixed else {"value": 0.0})},
                       out=f"{node.output[0]}__pad")
        pads = (0,) * nd + extra
    v = cv.add(node.name, op, [x], {"kernel": kernel, "strides": strides, "pads": pads}, out=node.output[0])
    cv.env[node.output[0]] = Entry(v, canonical_perm(rank))

def import_MaxPool(cv, node):
    _pool(cv, node, "MaxPool")

def import_AveragePool(cv, node):
    _pool(cv, node, "AvgPool")

def import_GlobalAveragePool(cv, node):
    e = cv.entry(node, node.input[0], scaled=True)
    rank = len(e.perm)
    x, S = scaled.relayout(cv, node, e, canonical_perm(rank))
    if e.scaled is not None:
        attrs = {"kernel": cv.b.values[x].shape[:-1], "strides": (1,) * (rank - 1), "pads": (0,) * 2 * (rank - 1)}
        scaled_ops.avgpool(cv, node, e, x, S, attrs, node.output[0], canonical_perm(rank))
        return
    g = cv.add(node.name, "GlobalAvgPool", [x], out=f"{node.output[0]}__gap")
    c = cv.b.values[g].shape[-1]
    v = cv.add(f"{node.name}__keepdims", "Reshape", [g], {"shape": (1,) * (rank - 1) + (c,)}, out=node.output[0])
    cv.env[node.output[0]] = Entry(v, canonical_perm(rank))

def import_ReduceMean(cv, node):
    """ONNX ``ReduceMean`` over exactly the spatial axes (what ``AdaptiveAvgPool2d(1)`` and Brevitas
    ``TruncAdaptiveAvgPool2d(1)`` export) -> ``GlobalAvgPool`` (+ a keepdims Reshape).

    Raises:
        UnsupportedError: naming the node for any other set of axes."""
    e = cv.entry(node, node.input[0], scaled=True)
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
    keep = int(cv.attr(node, "keepdims", 1))
    if e.scaled is not None:  # an exact window sum with 1/n in the map, as GlobalAveragePool
        x, S = scaled.relayout(cv, node, e, canonical_perm(rank))
        attrs = {"kernel": cv.b.values[x].shape[:-1], "strides": (1,) * (rank - 1), "pads": (0,) * 2 * (rank - 1)}
        out = node.output[0] if keep else f"{node.output[0]}__sum"
        scaled_ops.avgpool(cv, node, e, x, S, attrs, out, canonical_perm(rank))
        if not keep:
            s = cv.env[out]
            c = cv.b.values[s.value].shape[-1]
            v = cv.add(f"{node.name}__squeeze", "Reshape", [s.value], {"shape": (c,)}, out=node.output[0])
            cv.bind(node.output[0], v, (0,), scaled=scaled.reshaped(s.scaled, cv.b.values[s.value].shape, (c,)))
        return
    x = cv.layout(node, e, canonical_perm(rank))
    g = cv.add(node.name, "GlobalAvgPool", [x], out=f"{node.output[0]}__gap" if keep else node.output[0])
    if not keep:
        cv.env[node.output[0]] = Entry(g, (0,))
        return
    c = cv.b.values[g].shape[-1]
    v = cv.add(f"{node.name}__keepdims", "Reshape", [g], {"shape": (1,) * (rank - 1) + (c,)}, out=node.output[0])
    cv.env[node.output[0]] = Entry(v, canonical_perm(rank))
