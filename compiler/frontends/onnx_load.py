"""Loading an ONNX/QONNX model and cleaning it up before conversion to the IR.

Steps 1-3 of :func:`qdeploy.compiler.frontends.qonnx.import_onnx`: load (file path, bytes or
ModelProto), structural checks naming the node at fault, and the QONNX cleanup (shape inference,
constant folding with ``Quant``/``BipolarQuant`` preserved, unused-tensor removal).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ModelImportError, QDeployError, UnsupportedError
from .finn_annotations import normalize_finn
from .onnx_qdq import normalize_qdq

#: Domains whose ``Quant`` / ``BipolarQuant`` nodes follow the QONNX definitions.
QONNX_DOMAINS = ("qonnx.custom_op.general", "finn.custom_op.general", "onnx.brevitas", "finn",
                 "qonnx.custom_op", "finn.custom_op")
#: The standard ONNX domain, under both of its spellings.
STD_DOMAINS = ("", "ai.onnx")
#: QONNX custom ops the importer maps.
QONNX_OPS = ("Quant", "BipolarQuant", "Trunc", "MultiThreshold", "FloatQuant")


def load_proto(model) -> tuple[onnx.ModelProto, str]:
    """(a private copy of the ModelProto, source name) of a file path, bytes or ModelProto.

    Raises:
        ModelImportError: missing file, unparsable or empty (truncated) model.
    """
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        return proto, "<ModelProto>"
    if isinstance(model, (bytes, bytearray)):
        data, source = bytes(model), "<bytes>"
    else:
        path = Path(model)
        if not path.is_file():
            raise ModelImportError(f"model file {str(path)!r} not found")
        data, source = path.read_bytes(), str(path)
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf DecodeError and friends
        raise ModelImportError(f"cannot parse ONNX model {source}: {type(e).__name__}: {e}") from None
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise ModelImportError(f"ONNX model {source} has no graph nodes (malformed or truncated file?)")
    return proto, source


def prepare(proto: onnx.ModelProto):
    """A qonnx ``ModelWrapper`` of ``proto`` ready for conversion.

    Names nodes, rewrites ONNX QDQ nodes into QONNX ``Quant`` (:func:`.onnx_qdq.normalize_qdq`) and integer
    ``finn_datatype`` annotations into scale-1 quantizers (:func:`.finn_annotations.normalize_finn`), checks domains/ops and input shapes, fixes the batch to 1, runs the QONNX cleanup.

    Raises:
        UnsupportedError: unknown op/domain or a dynamic non-batch input dimension (naming it).
        ModelImportError: structural problems (:func:`check_graph`) or a failed QONNX cleanup.
    """
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.fold_constants import FoldConstants
    from qonnx.transformation.general import GiveUniqueParameterTensors, RemoveStaticGraphInputs, RemoveUnusedTensors
    from qonnx.transformation.infer_shapes import InferShapes

    g = proto.graph
    used = {n.name for n in g.node if n.name}
    for i, n in enumerate(g.node):
        if not n.name:
            base = f"{n.op_type}_{i}"
            nm, k = base, 1
            while nm in used:
                nm, k = f"{base}_{k}", k + 1
            n.name = nm
            used.add(nm)
    normalize_qdq(proto)
    normalize_finn(proto)
    for n in g.node:
        if n.domain in STD_DOMAINS:
            if not onnx.defs.has(n.op_type):
                raise UnsupportedError(f"unsupported op type {n.op_type!r} (domain 'ai.onnx')", n.name)
        elif n.domain in QONNX_DOMAINS and n.op_type in QONNX_OPS:
            n.domain = "qonnx.custom_op.general"
        else:
            raise UnsupportedError(f"unsupported op type {n.op_type!r} (domain {n.domain!r})", n.name)
    check_graph(g)
    inits = {t.name for t in g.initializer}
    for inp in g.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        if not inp.type.HasField("tensor_type") or not tt.HasField("shape"):
            raise UnsupportedError(f"graph input {inp.name!r} has no static shape", inp.name)
        dims = tt.shape.dim
        if len(dims) == 0:
            raise UnsupportedError(f"graph input {inp.name!r} is a scalar: expected a batch dimension", inp.name)
        for ax, d in enumerate(dims[1:], start=1):
            if not d.HasField("dim_value") or d.dim_value <= 0:
                what = d.dim_param or "?"
                raise UnsupportedError(f"graph input {inp.name!r} has dynamic dimension {what!r} at axis {ax}: "
                                       f"only the first (batch) dimension may be dynamic", inp.name)
        dims[0].Clear()
        dims[0].dim_value = 1
    for out in g.output:
        tt = out.type.tensor_type
        if tt.HasField("shape"):
            tt.ClearField("shape")
    del g.value_info[:]
    try:
        m = ModelWrapper(proto)
        for t in (InferShapes(), GiveUniqueParameterTensors(),
                  FoldConstants(exclude_op_types=["Quant", "BipolarQuant", "FloatQuant", "QuantizeLinear",
                                                   "DequantizeLinear"]),
                  RemoveUnusedTensors(), RemoveStaticGraphInputs()):
            m = m.transform(t)
    except QDeployError:
        raise
    except Exception as e:
        raise ModelImportError(f"QONNX cleanup (shape inference / constant folding) failed: {type(e).__name__}: {e}") from None
    return m


def check_graph(g) -> None:
    """Structural checks on the raw graph, each naming the node at fault: node inputs that nothing
    produces, cycles, and NaN/Inf in the constants (initializers and ``Constant`` nodes)."""
    avail = {t.name for t in g.initializer} | {i.name for i in g.input}
    producer = {o: n for n in g.node for o in n.output if o}
    consumers = defaultdict(list)
    for n in g.node:
        for t in n.input:
            if not t:
                continue
            if t not in avail and t not in producer:
                raise ModelImportError(f"{n.op_type} input {t!r} is not produced by any node, initializer or graph "
                                   f"input (missing initializer?)", n.name)
            consumers[t].append(n)
    # cycles: Kahn's algorithm over node-to-node edges
    deps = {id(n): {id(producer[t]) for t in n.input if t in producer and t not in avail} for n in g.node}
    users = defaultdict(set)
    for n in g.node:
        for d in deps[id(n)]:
            users[d].add(id(n))
    ready = [k for k, d in deps.items() if not d]
    left = {k: set(d) for k, d in deps.items() if d}
    while ready:
        k = ready.pop()
        for u in users[k]:
            if u in left:
                left[u].discard(k)
                if not left[u]:
                    del left[u]
                    ready.append(u)
    if left:
        ring = set(left)
        changed = True
        while changed:  # drop nodes downstream of the cycle: keep those feeding another remaining node
            changed = False
            for k in list(ring):
                if not (users[k] & ring):
                    ring.discard(k)
                    changed = True
        names = [n.name for n in g.node if id(n) in (ring or left)]
        raise ModelImportError(f"the graph has a cycle through nodes {', '.join(names)}", names[0])

    def finite(arr, what, node):
        a = np.asarray(arr)
        if a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
            nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
            raise ModelImportError(f"{what} has non-finite values ({nan} NaN, {inf} Inf of {a.size})", node)

    for t in g.initializer:
        if consumers.get(t.name):
            n = consumers[t.name][0]
            finite(numpy_helper.to_array(t), f"{n.op_type} constant input {t.name!r}", n.name)
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    finite(numpy_helper.to_array(a.t), "Constant value", n.name)
