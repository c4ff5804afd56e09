"""``DepthToSpace`` and ``SpaceToDepth``: fixed permutations of a channels-last ``(H, W, C)`` tensor.

With block ``b`` (ONNX ``blocksize``), ``C' = C / b**2``:

* ``DepthToSpace`` mode ``DCR`` (ONNX default): ``y[h*b + i, w*b + j, c] = x[h, w, (i*b + j)*C' + c]``;
* ``DepthToSpace`` mode ``CRD`` (PyTorch ``nn.PixelShuffle``): ``y[h*b + i, w*b + j, c] =
  x[h, w, c*b*b + i*b + j]``;
* ``SpaceToDepth`` (the inverse of DCR): ``y[h, w, (i*b + j)*C + c] = x[h*b + i, w*b + j, c]``.

Source: ONNX ``DepthToSpace`` / ``SpaceToDepth`` (https://onnx.ai/onnx/operators/onnx__DepthToSpace.html:
the NCHW reshape-transpose-reshape definitions, rewritten here for channels-last).  Each op is
``reshape(mid) -> transpose(perm) -> reshape(out)`` (:func:`permutation_plan`), which the reference,
TVM and hls4ml all execute literally; codes only move, so the output type is the input type.
"""
from __future__ import annotations

from ...errors import UnsupportedError, VerifyError
from .spec import OpSpec, register

MODES = ("DCR", "CRD")


def permutation_plan(node, in_shape) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(mid_shape, perm, out_shape)`` of ``node`` (DepthToSpace / SpaceToDepth) on the per-sample
    channels-last ``in_shape = (H, W, C)``: the op is ``x.reshape(mid).transpose(perm).reshape(out)``.

    Raises:
        VerifyError: naming the node for a rank other than 3, a block < 1, a mode other than DCR /
            CRD, or sizes the block does not divide.
    """
    b = int(node.attrs["block"])
    if len(in_shape) != 3:
        raise VerifyError(f"{node.op} needs a channels-last (H, W, C) input, got shape {tuple(in_shape)}", node.name)
    if b < 1:
        raise VerifyError(f"{node.op} block {b} must be >= 1", node.name)
    H, W, C = (int(v) for v in in_shape)
    if node.op == "DepthToSpace":
        mode = str(node.attrs.get("mode", "DCR"))
        if mode not in MODES:
            raise VerifyError(f"DepthToSpace mode {mode!r} is not DCR or CRD", node.name)
        if C % (b * b):
            raise VerifyError(f"DepthToSpace: {C} channels are not a multiple of block**2 = {b * b}", node.name)
        c = C // (b * b)
        if mode == "DCR":
            return (H, W, b, b, c), (0, 2, 1, 3, 4), (H * b, W * b, c)
        return (H, W, c, b, b), (0, 3, 1, 4, 2), (H * b, W * b, c)
    if H % b or W % b:
        raise VerifyError(f"SpaceToDepth: spatial size {H}x{W} is not a multiple of block {b}", node.name)
    return (H // b, b, W // b, b, C), (0, 2, 1, 3, 4), (H // b, W // b, b * b * C)


def _rule(node, ins):
    return permutation_plan(node, ins[0].shape)[2], ins[0].dtype


def _reference(node, args, in_types, out_t):
    x = args[0]
    mid, perm, out = permutation_plan(node, x.shape[1:])
    n = x.shape[0]
    return x.reshape((n, *mid)).transpose((0, *(p + 1 for p in perm))).reshape((n, *out))


def _import_onnx(cv, node):
    """ONNX ``DepthToSpace(blocksize, mode)`` / ``SpaceToDepth(blocksize)`` on an NCHW tensor."""
    e = cv.entry(node, node.input[0])
    if len(e.perm) != 3:
        raise UnsupportedError(f"{node.op_type} of a rank-{len(e.perm) + 1} tensor: ONNX defines it on 4-D NCHW",
                               node.name)
    attrs = {"block": int(cv.attr(node, "blocksize"))}
    if node.op_type == "DepthToSpace":
        mode = str(cv.attr(node, "mode", "DCR")).upper()
        if mode not in MODES:
            raise UnsupportedError(f"DepthToSpace mode {mode!r} is not DCR or CRD", node.name)
        attrs["mode"] = mode
    canon = (1, 2, 0)
    x = cv.layout(node, e, canon)
    v = cv.add(node.name, node.op_type, [x], attrs, out=node.output[0])
    cv.bind(node.output[0], v, canon)


def _export_onnx(ex, n, x):
    base = n.output + "__ir"
    xt = ex.channels_first(x[0], 3, n.name)
    attrs = {"blocksize": int(n.attrs["block"])}
    if n.op == "DepthToSpace":
        attrs["mode"] = str(n.attrs.get("mode", "DCR"))
    y = ex.node(n.op, [xt], f"{base}_nchw_out", **attrs)
    return ex.channels_last(y, 3, n.name, out=base)


def _macs(node, graph) -> int:
    """Data movement only: one copy per output element."""
    return max(1, graph.values[node.output].size)


DEPTH_TO_SPACE = register(OpSpec(
    name="DepthToSpace", kind="layout", summary="move channel blocks into b x b spatial blocks (DCR or CRD order)",
    infer=_rule, reference=_reference, attrs={"block": None, "mode": "DCR"}, macs=_macs,
    onnx_import={"DepthToSpace": _import_onnx}, onnx_export=_export_onnx))

SPACE_TO_DEPTH = register(OpSpec(
    name="SpaceToDepth", kind="layout", summary="move b x b spatial blocks into channels (inverse of DCR)",
    infer=_rule, reference=_reference, attrs={"block": None}, macs=_macs,
    onnx_import={"SpaceToDepth": _import_onnx}, onnx_export=_export_onnx))
