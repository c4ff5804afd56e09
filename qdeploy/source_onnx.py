"""Running a QONNX/ONNX *source* model for the fidelity check (:mod:`qdeploy.fidelity`) in one
onnxruntime session where its only custom op is QONNX ``Quant`` (:mod:`qdeploy.source_ort`), else with
qonnx's executor (onnxruntime underneath, one single-node session per standard op), on a whole golden batch
at once where the model provably keeps samples apart (:func:`batch_plan`), else sample by sample;
optionally on a float64 copy (:func:`qdeploy.source_run.to_double`) to classify differences.
"""
from __future__ import annotations

import os
import warnings

import numpy as np

FLOAT_RTOL = 1e-4
"""Relative tolerance of float (unquantized) outputs, relative to ``max(1, max |source|)``."""

# ONNX/QONNX ops whose result for sample i depends on sample i only, given the attribute checks in
# :func:`batch_plan`; a model made of these (batch fixed at 1) is run as one batch.
_PER_SAMPLE_OPS = {
    "Quant", "BipolarQuant", "Trunc", "Relu", "Sigmoid", "Tanh", "Clip", "Add", "Sub", "Mul", "Div", "Max",
    "Min", "Neg", "Abs", "Floor", "Ceil", "Round", "Sign", "Exp", "Erf", "LeakyRelu", "HardSigmoid", "HardSwish",
    "Identity", "Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "BatchNormalization",
    "Reshape", "Flatten", "Transpose", "Softmax", "LogSoftmax", "Concat", "Gemm", "MatMul", "DepthToSpace",
    "SpaceToDepth", "Cast", "QuantizeLinear", "DequantizeLinear", "FloatQuant", "MultiThreshold", "TopK",
    "Where", "GreaterOrEqual",
}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Clip", "BatchNormalization", "Quant", "BipolarQuant",
                "Trunc", "LeakyRelu", "FloatQuant", "Where", "GreaterOrEqual"}


def batch_plan(proto, shapes=None) -> tuple[bool, str]:
    """Whether ``proto`` (batch fixed at 1 or dynamic) can be run on a whole batch at once with
    the same per-sample results: every node an op of ``_PER_SAMPLE_OPS`` whose attributes keep
    axis 0 apart (Transpose keeps axis 0, Concat/Softmax/Flatten axis >= 1, Gemm/MatMul with the
    batch on the left operand only, constant Reshape shapes, elementwise constants of lower rank
    than the batch operand or with leading dimension 1).  ``shapes``: tensor name -> shape or None
    (e.g. a shape-inferred qonnx ``ModelWrapper.get_tensor_shape``); without it an elementwise
    constant of rank >= 2 and leading dimension > 1 is taken as batch-broadcasting.  Returns
    ``(ok, reason if not)``."""
    from onnx import helper, numpy_helper
    inits = {i.name: i for i in proto.graph.initializer}
    batch = {i.name for i in proto.graph.input if i.name not in inits}
    for n in proto.graph.node:
        ins = [t for t in n.input if t]
        carried = [t in batch for t in ins]
        if not any(carried):
            continue  # a constant computation (weight quantizers)
        if n.op_type not in _PER_SAMPLE_OPS or n.domain not in ("", "ai.onnx", "qonnx.custom_op.general",
                                                                 "onnx.brevitas", "finn.custom_op.general",
                                                                 "com.microsoft"):
            return False, f"node {n.name or n.op_type} ({n.op_type}) is not known to keep samples apart"
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        if n.op_type == "Transpose" and list(a.get("perm", [1]))[:1] != [0]:
            return False, f"Transpose {n.name} moves the batch axis"
        if n.op_type in ("Concat", "Softmax", "LogSoftmax", "Flatten") and int(a.get("axis", 1)) <= 0:
            return False, f"{n.op_type} {n.name} acts on axis {a.get('axis')}"
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and int(a.get("axis", 1)) <= 0 and not all(
                t in inits and len(inits[t].dims) == 0 for t in ins[1:]):
            return False, f"{n.op_type} {n.name} has a per-axis scale on axis {a.get('axis')}"
        layout = a.get("data_layout", b"")
        if n.op_type == "MultiThreshold" and (layout.decode() if isinstance(layout, bytes) else str(layout))[:1] == "C":
            return False, f"MultiThreshold {n.name} thresholds the batch axis"
        if n.op_type == "TopK" and int(a.get("axis", -1)) not in [-1] + list(range(1, 16)):
            return False, f"TopK {n.name} acts on axis {a.get('axis')}"
        if n.op_type in ("Gemm", "MatMul") and (carried[1:] != [False] * (len(carried) - 1)
                                                 or int(a.get("transA", 0))):
            return False, f"{n.op_type} {n.name} mixes the batch axis"
        if n.op_type == "Reshape":
            if carried[1] or ins[1] not in inits or int(numpy_helper.to_array(inits[ins[1]])[0]) not in (0, 1, -1):
                return False, f"Reshape {n.name} has a shape that is not a constant starting with the batch"
        if n.op_type in _ELEMENTWISE:
            shape = shapes(ins[carried.index(True)]) if shapes is not None else None
            for t, c in zip(ins, carried):
                if c or t not in inits or len(inits[t].dims) < 2 or inits[t].dims[0] == 1:
                    continue
                if shape is None or len(inits[t].dims) >= len(shape):
                    return False, f"{n.op_type} {n.name} broadcasts a constant along the batch axis"
        batch.update(o for o in n.output if o)
    missing = [o.name for o in proto.graph.output if o.name not in batch]
    if missing:
        return False, f"output(s) {missing} do not carry the batch"
    return True, ""


def _carriers(proto) -> set:
    """Names of the tensors that carry the batch axis: the non-constant graph inputs and every
    output of a node reading one."""
    inits = {i.name for i in proto.graph.initializer}
    batch = {i.name for i in proto.graph.input if i.name not in inits}
    for node in proto.graph.node:
        if any(t in batch for t in node.input if t):
            batch.update(o for o in node.output if o)
    return batch


def _batched_proto(proto, n: int):
    """A copy of the shape-inferred ``proto`` whose batch-carrying tensors (:func:`_carriers`:
    graph inputs/outputs and value_info) and batch-carrying constant Reshape shapes have batch
    ``n``; the other shapes are kept, so the copy needs no second shape inference.  Returns
    ``(copy, number of Reshape shapes rewritten)``: with none, the copy differs from ``proto``
    in declared batch sizes only."""
    import onnx
    from onnx import numpy_helper
    q = onnx.ModelProto()
    q.CopyFrom(proto)
    carriers = _carriers(q)
    inits = {i.name: i for i in q.graph.initializer}
    rewritten = 0
    for t in list(q.graph.input) + list(q.graph.output) + list(q.graph.value_info):
        if t.name in carriers and t.type.tensor_type.shape.dim:
            t.type.tensor_type.shape.dim[0].dim_value = n
    for k, node in enumerate(q.graph.node):
        if node.op_type == "Reshape" and node.input[1] in inits and node.input[0] in carriers:
            shape = numpy_helper.to_array(inits[node.input[1]]).astype(np.int64).copy()
            if shape[0] in (0, 1):
                shape[0] = n
                name = f"{node.input[1]}__batch{k}"
                q.graph.initializer.append(numpy_helper.from_array(shape, name))
                node.input[1] = name
                rewritten += 1
    return q, rewritten


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal, or (float results) within ``FLOAT_RTOL`` of the larger magnitude: onnxruntime may
    pick another kernel for a batch, which reorders float sums."""
    if a.shape != b.shape:
        return False
    if np.array_equal(a, b, equal_nan=True):
        return True
    tol = FLOAT_RTOL * max(1.0, float(np.max(np.abs(b), initial=0.0)))
    return bool(np.all(np.abs(a.astype(np.float64) - b.astype(np.float64)) <= tol))


def run_standard(proto, inputs: dict, outs: list, n: int) -> tuple[dict, str] | None:
    """``run_onnx_source`` through one onnxruntime session of the model with its ``Quant`` nodes
    as standard ops (:mod:`qdeploy.source_ort`: the same float32 values as qonnx's executor), whole
    batch at once under the same :func:`batch_plan` rule; None when the model has other custom ops
    or onnxruntime cannot run it (the caller then uses qonnx's executor)."""
    import onnx

    from .source_ort import session, standard_proto, symbolic_batch
    std = standard_proto(proto)
    if std is None:
        return None
    try:
        why = "one sample"
        if n > 1:
            inf = onnx.shape_inference.infer_shapes(std)
            shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
                      for v in list(inf.graph.value_info) + list(inf.graph.input) + list(inf.graph.output)}
            ok, why = batch_plan(std, shapes.get)
            sb = symbolic_batch(std, _carriers(std)) if ok else None
            if ok and sb is None:
                why = "a Reshape with allowzero=1"
            if sb is not None:
                sess = session(sb[0])
                res = dict(zip(outs, sess.run(outs, dict(inputs))))
                if all(res[o].shape[0] == n for o in outs):
                    if not sb[1]:
                        return res, "batched"
                    first = dict(zip(outs, sess.run(outs, {k: v[:1] for k, v in inputs.items()})))
                    if all(_same(res[o][:1], first[o]) for o in outs):
                        return res, "batched"
                why = "the batched run disagreed with sample 0 run alone"
        sess = session(std)
        per = [dict(zip(outs, sess.run(outs, {k: v[i:i + 1] for k, v in inputs.items()}))) for i in range(n)]
        return {o: np.concatenate([p[o] for p in per]) for o in outs}, f"per-sample: {why}"
    except Exception:  # onnxruntime refused the rewritten graph: qonnx's executor decides
        return None


def run_onnx_source(model, inputs: dict, double: bool = False, executor: bool = False) -> tuple:
    """Run a QONNX/ONNX model (path, bytes or ModelProto) as its source: with its ``Quant`` nodes
    rewritten into standard ops and run by one onnxruntime session (:func:`run_standard`; the
    same values as qonnx's executor), else with qonnx's ``execute_onnx``.

    Args:
        inputs: ``{graph input: (n, *source shape) array}``.
        double: run a float64 copy instead (:func:`qdeploy.source_run.to_double`, executed by
            :func:`qdeploy.source_run.execute_double`); inputs are cast to float64.
        executor: also return a description of what ran the model (a third element).
    Returns:
        ``({graph output: (n, ...) array}, mode)``; ``mode`` is ``"batched"`` (the model was shown to
        keep samples apart by :func:`batch_plan`, and, when a Reshape shape had to be rewritten for
        the batch, sample 0 run alone agreed) or ``"per-sample: <why>"``.
    Raises:
        whatever the executor raises (the caller reports it).
    """
    import onnx

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model))
    outs = [o.name for o in proto.graph.output]
    n = next(iter(inputs.values())).shape[0]
    if not double:
        fast = run_standard(proto, inputs, outs, n)
        if fast is not None:
            return (*fast, "onnxruntime, one session (QONNX Quant as standard ops)") if executor else fast
    how = "float64 copy through qonnx execute_node/int_quant" if double else "qonnx execute_onnx (onnxruntime)"
    res = _run_qonnx(proto, inputs, outs, n, double)
    return (*res, how) if executor else res


def _run_qonnx(proto, inputs: dict, outs: list, n: int, double: bool) -> tuple[dict, str]:
    """:func:`run_onnx_source` through qonnx's executor (or the float64 one)."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    from .source_run import execute_double, to_double
    conv = to_double if double else (lambda p: p)
    run = execute_double if double else execute_onnx
    if double:
        inputs = {k: np.asarray(v, dtype=np.float64) for k, v in inputs.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = ModelWrapper(conv(_batched_proto(proto, 1)[0]))  # a symbolic batch dim -> 1
        if not single.check_all_tensor_shapes_specified():  # exported/cleaned models carry them all
            single = single.transform(InferShapes())

        def one(i):
            r = run(single, {k: v[i:i + 1] for k, v in inputs.items()})
            return {o: np.asarray(r[o]) for o in outs}

        ok, why = batch_plan(proto, single.get_tensor_shape) if n > 1 else (False, "one sample")
        if ok:
            bproto, rewritten = _batched_proto(single.model, n)  # shapes of the single run, batch n
            r = run(ModelWrapper(bproto), dict(inputs))
            res = {o: np.asarray(r[o]) for o in outs}
            if not rewritten and all(res[o].shape[0] == n for o in outs):
                return res, "batched"  # only the declared batch size changed: nothing to cross-check
            first = one(0)  # a Reshape shape was rewritten: sample 0 alone must agree
            if all(res[o].shape[0] == n and _same(res[o][:1], first[o]) for o in outs):
                return res, "batched"
            why = "the batched run disagreed with sample 0 run alone"
        per = [one(i) for i in range(n)]
        return {o: np.concatenate([p[o] for p in per]) for o in outs}, f"per-sample: {why}"
