"""A fast runner for a QONNX/ONNX *source* model: its QONNX ``Quant`` nodes rewritten into the
standard ONNX ops that compute exactly what qonnx's executor computes, and the whole graph run in
one onnxruntime session (instead of qonnx's ``execute_onnx``, which builds one onnxruntime session
per node: 0.1-0.4 s on the digits models, more than a reference compile).

qonnx's ``Quant`` (``qonnx.custom_op.general.intquant.int_quant``) is a chain of float32 NumPy
operations, each correctly rounded, so the same chain of ONNX ops gives the same bits:
``y = x / s``; ``y = y + z``; then either the bipolar ``where(y >= 0, 1, -1)`` (1-bit signed) or the
clamp ``min(max(y, qmin), qmax)`` followed by the rounding function of ``resolve_rounding_mode``
(``Round`` is half to even like ``np.round``; ``UP``: ``sign(y) * ceil(|y|)``; ``DOWN``: ``np.fix``,
``sign(y) * floor(|y|)``; ``HALF_UP``: ``sign(y) * floor(|y| + 0.5)``; ``HALF_DOWN``:
``sign(y) * ceil(|y| - 0.5)``); then ``(y - z) * s``.  The session runs with onnxruntime's graph
optimizations off (``ORT_DISABLE_ALL``), so no fusion changes a float32 result: each node runs
the kernel qonnx's single-node session would run.  Any other custom op (``MultiThreshold``,
``Trunc``, ``FloatQuant``, ...) or a ``Quant`` whose scale, zero point or bit width is not a
constant: :func:`standard_proto` returns None and the caller uses qonnx's executor.

Sources: QONNX ``Quant`` (Pappalardo et al., "QONNX: Representing Arbitrary-Precision Quantized
Neural Networks", 2022, section 3; ``qonnx/custom_op/general/intquant.py``); the ONNX operator
specification (``Round``: half to even; ``Reshape``: ``0`` copies the input dimension when
``allowzero`` is 0); onnxruntime ``SessionOptions.graph_optimization_level``.
"""
from __future__ import annotations

import numpy as np

QUANT_DOMAINS = ("qonnx.custom_op.general", "onnx.brevitas", "finn.custom_op.general")  # older exports: finn
STANDARD_DOMAINS = ("", "ai.onnx")

_ROUNDING = ("ROUND", "HALF_EVEN", "CEIL", "FLOOR", "UP", "DOWN", "HALF_UP", "HALF_DOWN")


def _const(proto):
    """``{name: array}`` of the initializers and ``Constant`` node outputs of ``proto``."""
    from onnx import helper, numpy_helper
    out = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.domain in STANDARD_DOMAINS:
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(helper.get_attribute_value(a))
    return out


def _quant_nodes(node, consts, uid):
    """The standard ONNX nodes (and new initializers) computing QONNX ``Quant`` ``node`` exactly as
    qonnx's ``int_quant`` does; None when its bit width is not a constant scalar integer or its
    scale / zero point are not float32 constants."""
    from onnx import helper, numpy_helper
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    mode = a.get("rounding_mode", b"ROUND")
    mode = (mode.decode() if isinstance(mode, bytes) else str(mode)).upper()
    x, s, z, bw = node.input[:4]
    if bw not in consts or s not in consts or z not in consts or mode not in _ROUNDING:
        return None
    if consts[s].dtype != np.float32 or consts[z].dtype != np.float32:
        return None  # e.g. an int64 zero point: NumPy then computes in float64 (qonnx's executor decides)
    b = np.asarray(consts[bw], dtype=np.float64).ravel()
    if b.size != 1 or b[0] != int(b[0]) or not 1 <= b[0] <= 32:
        return None
    bits, signed, narrow = int(b[0]), bool(int(a.get("signed", 1))), bool(int(a.get("narrow", 0)))
    p = f"{node.name or node.output[0]}__q{uid}"
    inits, nodes = [], []

    def c(name, v):
        inits.append(numpy_helper.from_array(np.asarray(v, dtype=np.float32), f"{p}_const_{name}"))
        return f"{p}_const_{name}"

    def op(t, ins, name, **attrs):
        nodes.append(helper.make_node(t, ins, [f"{p}_{name}"], name=f"{p}_{name}", **attrs))
        return f"{p}_{name}"

    y = op("Div", [x, s], "div")
    y = op("Add", [y, z], "add")
    if bits == 1 and signed:
        y = op("Where", [op("GreaterOrEqual", [y, c("zero", 0.0)], "ge"), c("one", 1.0), c("mone", -1.0)], "bip")
    else:
        # qonnx min_int / max_int
        qmin = -(1 << (bits - 1)) + int(narrow) if signed else 0
        qmax = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1 - int(narrow)
        y = op("Min", [y, c("max", qmax)], "min")
        y = op("Max", [y, c("min", qmin)], "max")
        if mode in ("ROUND", "HALF_EVEN"):
            y = op("Round", [y], "round")
        elif mode in ("CEIL", "FLOOR"):
            y = op(mode.capitalize(), [y], "rnd")
        else:
            sg, ab = op("Sign", [y], "sign"), op("Abs", [y], "abs")
            if mode == "HALF_UP":
                ab = op("Add", [ab, c("half", 0.5)], "half")
            elif mode == "HALF_DOWN":
                ab = op("Sub", [ab, c("half", 0.5)], "half")
            f = op("Ceil" if mode in ("UP", "HALF_DOWN") else "Floor", [ab], "mag")
            y = op("Mul", [sg, f], "rnd")
    y = op("Sub", [y, z], "sub")
    nodes.append(helper.make_node("Mul", [y, s], [node.output[0]], name=f"{p}_out"))
    return nodes, inits


def standard_proto(proto):
    """A copy of ``proto`` with every QONNX ``Quant`` node replaced by standard ONNX ops computing
    the same float32 values, and no ``value_info``; None when any other non-standard op remains
    (the caller then runs qonnx's executor)."""
    import onnx
    consts = _const(proto)
    q = onnx.ModelProto()
    q.CopyFrom(proto)
    new_nodes, new_inits = [], []
    for k, n in enumerate(q.graph.node):
        if n.domain in STANDARD_DOMAINS:
            new_nodes.append(n)
            continue
        if n.op_type != "Quant" or n.domain not in QUANT_DOMAINS:
            return None
        r = _quant_nodes(n, consts, k)
        if r is None:
            return None
        new_nodes += r[0]
        new_inits += r[1]
    del q.graph.node[:]
    q.graph.node.extend(new_nodes)
    q.graph.initializer.extend(new_inits)
    del q.graph.value_info[:]
    keep = [o for o in q.opset_import if o.domain in STANDARD_DOMAINS]
    del q.opset_import[:]
    q.opset_import.extend(keep)
    if not any(o.domain in STANDARD_DOMAINS for o in q.opset_import):
        q.opset_import.append(onnx.helper.make_opsetid("", 13))
    return q


def symbolic_batch(std, carriers) -> tuple[object, int] | None:
    """A copy of standard ``std`` whose graph inputs and outputs have a symbolic batch dimension
    ``N`` and whose batch-carrying constant ``Reshape`` shapes starting with 1 start with -1 (or,
    when the shape already has a -1, with 0: copy the batch); returns ``(copy, number of Reshape
    shapes rewritten)``, or None when neither is possible (a -1 elsewhere and ``allowzero=1``, or
    a shape that is not a constant)."""
    import onnx
    from onnx import helper, numpy_helper
    q = onnx.ModelProto()
    q.CopyFrom(std)
    for t in list(q.graph.input) + list(q.graph.output):
        if t.name in carriers and t.type.tensor_type.shape.dim:
            t.type.tensor_type.shape.dim[0].dim_param = "N"
    consts = _const(q)
    rewritten = 0
    for k, node in enumerate(q.graph.node):
        if node.op_type == "Reshape" and node.input[0] in carriers:
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            if node.input[1] not in consts:
                return None
            shape = np.asarray(consts[node.input[1]]).astype(np.int64).ravel().copy()
            if shape.size and shape[0] == 1:
                if -1 not in shape:
                    shape[0] = -1  # the batch, whatever allowzero says
                elif not int(a.get("allowzero", 0)):
                    shape[0] = 0  # copy the input's (batch) dimension
                else:
                    return None
                name = f"{node.input[1]}__nbatch{k}"
                q.graph.initializer.append(numpy_helper.from_array(shape, name))
                node.input[1] = name
                rewritten += 1
    return q, rewritten


def session(proto):
    """An onnxruntime CPU session of ``proto`` with graph optimizations off (see the module doc)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
