"""A float-equivalent plain-ONNX copy of a QONNX model, for onnxruntime (which has no QONNX ops).

:func:`float_equivalent` turns every ``Quant`` / ``BipolarQuant`` node into standard ONNX ops that
compute qonnx's own formulas in float32 (``qonnx.custom_op.general.intquant.int_quant`` and
``bipolar_quant.binary_quant``, qonnx 1.0):

* ``Quant(x, s, z, b)``: ``y = x / s + z``, clamped to ``[min_int, max_int]`` (``Max``/``Min``),
  rounded (``Round`` is round-half-to-even like ``np.round``; ``Floor``/``Ceil``), then
  ``(y - z) * s``; a signed 1-bit ``Quant`` is ``where(y >= 0, 1, -1)`` like qonnx's;
* ``BipolarQuant(x, s)``: ``where(x >= 0, 1, -1) * s``.

Nodes whose inputs are all constants (the weight quantizers) are folded first with qonnx's own
executor (``FoldConstantsFiltered``; ``Shape`` nodes excluded, so the batch stays free).  The batch
dimension of the graph inputs and outputs is then made symbolic (``N``), stale ``value_info`` is
dropped, and a ``Reshape`` of a batch-carrying tensor to a constant shape that starts with 1 gets
-1 there (0, "copy the input's dimension", when the shape has a -1 already), so one model runs any
batch size.  ``Trunc`` and other
QONNX ops are refused (``NotImplementedError`` naming the node).

The opset is raised to at least 13 (``Round`` needs 11, ``GreaterOrEqual`` 12); a model whose ops change
meaning between its opset and 13 would show as "outputs differ" in the benchmark's check.
"""
from __future__ import annotations

import numpy as np

__all__ = ["float_equivalent"]

_QONNX_DOMAINS = ("qonnx.custom_op.general", "finn.custom_op.general", "onnx.brevitas")


def _const(model, name: str):
    return model.get_initializer(name)


def float_equivalent(path):
    """The float-equivalent ``onnx.ModelProto`` of the QONNX/ONNX file ``path`` (see the module
    docstring).  A plain ONNX model comes back with only the batch made symbolic.

    Raises:
        NotImplementedError: a QONNX op other than ``Quant``/``BipolarQuant`` on a
            batch-carrying tensor, or a ``Quant`` whose bit width is not a constant.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.fold_constants import FoldConstantsFiltered
    from qonnx.util.cleanup import cleanup_model

    model = cleanup_model(ModelWrapper(str(path)))
    model = model.transform(FoldConstantsFiltered(lambda m, n: n.op_type != "Shape"))
    g = model.graph
    new_nodes, extra_inits = [], []
    k = [0]

    def fresh(stem):
        k[0] += 1
        return f"__fe_{stem}_{k[0]}"

    def const(value, stem):
        name = fresh(stem)
        extra_inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def emit(op, ins, out=None, **attrs):
        out = out or fresh(op.lower())
        new_nodes.append(helper.make_node(op, ins, [out], **attrs))
        return out

    for n in g.node:
        if n.domain not in _QONNX_DOMAINS:
            new_nodes.append(n)
            continue
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        x, out = n.input[0], n.output[0]
        ins = list(n.input)
        for j in range(1, min(3, len(ins))):  # scale, zero point: float32 like qonnx computes
            c = _const(model, ins[j])
            if c is not None and c.dtype != np.float32:
                ins[j] = const(c, "qparam")
        n = helper.make_node(n.op_type, ins, list(n.output), name=n.name)
        if n.op_type == "BipolarQuant":
            sign = emit("Where", [emit("GreaterOrEqual", [x, const(0.0, "zero")]), const(1.0, "one"),
                                  const(-1.0, "mone")])
            emit("Mul", [sign, n.input[1]], out)
        elif n.op_type == "Quant":
            bw = _const(model, n.input[3])
            if bw is None:
                raise NotImplementedError(f"node {n.name}: Quant with a non-constant bit width")
            b = int(np.asarray(bw).reshape(-1)[0])
            signed, narrow = bool(a.get("signed", 1)), bool(a.get("narrow", 0))
            mode = a.get("rounding_mode", b"ROUND")
            mode = (mode.decode() if isinstance(mode, bytes) else str(mode)).upper()
            y = emit("Add", [emit("Div", [x, n.input[1]]), n.input[2]])
            if b == 1 and signed:
                y = emit("Where", [emit("GreaterOrEqual", [y, const(0.0, "zero")]), const(1.0, "one"),
                                   const(-1.0, "mone")])
            else:
                lo = -(2 ** (b - 1)) + (1 if narrow else 0) if signed else 0
                hi = 2 ** (b - 1) - 1 if signed else 2 ** b - 1 - (1 if narrow else 0)
                y = emit("Min", [emit("Max", [y, const(lo, "lo")]), const(hi, "hi")])
                op = {"ROUND": "Round", "HALF_EVEN": "Round", "FLOOR": "Floor", "CEIL": "Ceil"}.get(mode)
                if op is None:
                    raise NotImplementedError(f"node {n.name}: Quant rounding mode {mode}")
                y = emit(op, [y])
            emit("Mul", [emit("Sub", [y, n.input[2]]), n.input[1]], out)
        else:
            raise NotImplementedError(f"node {n.name}: QONNX op {n.op_type} has no float equivalent here")
    inits = {i.name for i in g.initializer} | {i.name for i in extra_inits}
    for n in new_nodes:  # Reshape of a batch-carrying tensor to [1, ...] -> [0, ...]
        if n.op_type == "Reshape" and n.input[0] not in inits and n.input[1] in inits:
            shape = _const(model, n.input[1])
            if shape is not None and shape.size and int(shape.reshape(-1)[0]) == 1:
                s = shape.astype(np.int64).copy().reshape(-1)
                s[0] = 0 if (s == -1).any() else -1
                model.set_initializer(n.input[1], s)
                for at in n.attribute:  # 0 must mean "copy the input's dimension"
                    if at.name == "allowzero":
                        at.i = 0
    proto = model.model
    del proto.graph.node[:]
    proto.graph.node.extend(new_nodes)
    proto.graph.initializer.extend(extra_inits)
    used = {i for n in proto.graph.node for i in n.input}
    unused = [i for i in proto.graph.initializer if i.name not in used]
    for i in unused:
        proto.graph.initializer.remove(i)
    del proto.graph.value_info[:]
    for v in list(proto.graph.input) + list(proto.graph.output):
        if v.name in inits:
            continue
        dims = v.type.tensor_type.shape.dim
        if len(dims):
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "N"
    for o in proto.graph.output:
        if o.type.tensor_type.elem_type == 0:
            o.type.tensor_type.elem_type = TensorProto.FLOAT
    std = max([13] + [op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")])
    keep = [helper.make_opsetid(op.domain, op.version) for op in proto.opset_import
            if op.domain not in ("", "ai.onnx") + _QONNX_DOMAINS]
    del proto.opset_import[:]
    proto.opset_import.extend(keep + [helper.make_opsetid("", std)])
    proto.ir_version = max(proto.ir_version, 7)  # opset 13 needs IR >= 7
    onnx.checker.check_model(proto)
    return proto
