"""Fidelity to the source model: run the *source* (the user's QONNX/ONNX model, through qonnx's
executor, onnxruntime underneath) on the golden inputs in its own layout and compare it with the
reference interpreter's outputs.

Reference-vs-target checks prove the backends agree with our interpreter; this check proves the
interpreter (and therefore the import, the passes and the layout handling) agrees with what the
user trained.  :func:`check_source` is called by :func:`qdeploy.api.compile` on every compile; its
dict is the report's ``fidelity`` section and :func:`fidelity_sentence` its one-line summary.

The source is fed exactly the inputs the compiled model sees: the golden arrays in the source's
layout (channels-first for ONNX), each value cast into the compiled input's fixed-point type when
it has one (the same elementwise rounding :func:`qdeploy.compiler.reference.prepare_feeds`
applies; the number of values that rounding changed is reported as ``inputs_rounded``).

Comparison rules (per output, per sample):

* a fixed-point output is *exact* when our exact value, cast to the source output's float dtype,
  equals the source value bit for bit; the error in output LSBs is ``|source - ours| / 2**-F``.
* a float32 output (unquantized tail) is within tolerance when ``|source - ours| <=
  FLOAT_RTOL * max(1, max |source|)`` (float32 sums in another order differ by a few ulps).

Every difference fails the check (``ok`` False): the cases where our exact arithmetic and the
source's float32 arithmetic legitimately differ (a tie float32 rounds the other way) are not yet
told apart from real errors, and the report says so.
"""
from __future__ import annotations

import os
import time
import warnings

import numpy as np

from .compiler.ir.graph import Graph
from .compiler.ir.types import FixedType
from .runtime.compiled import from_ir_layout

FLOAT_RTOL = 1e-4
"""Relative tolerance of float (unquantized) outputs, relative to ``max(1, max |source|)``."""

UNCLASSIFIED = ("differences are not classified yet (a float32 tie that the source rounds the other way is "
                "not told apart from an error), so every difference fails")

# ONNX/QONNX ops whose result for sample i depends on sample i only, given the attribute checks in
# :func:`batch_plan`; a model made of these (batch fixed at 1) is run as one batch.
_PER_SAMPLE_OPS = {
    "Quant", "BipolarQuant", "Trunc", "Relu", "Sigmoid", "Tanh", "Clip", "Add", "Sub", "Mul", "Div", "Max",
    "Min", "Neg", "Abs", "Floor", "Ceil", "Round", "Sign", "Exp", "Erf", "LeakyRelu", "HardSigmoid", "HardSwish",
    "Identity", "Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "BatchNormalization",
    "Reshape", "Flatten", "Transpose", "Softmax", "LogSoftmax", "Concat", "Gemm", "MatMul", "DepthToSpace",
    "SpaceToDepth", "Cast",
}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Clip", "BatchNormalization", "Quant", "BipolarQuant",
                "Trunc", "LeakyRelu"}


def is_onnx_source(model) -> bool:
    """True when ``model`` (what :func:`qdeploy.api.load` accepts) is a QONNX/ONNX model the
    fidelity check can run: an ``.onnx`` path, a path to an existing model file, or a ModelProto."""
    if isinstance(model, (str, os.PathLike)):
        s = os.fspath(model)
        return s.lower().endswith(".onnx") or os.path.isfile(s)
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx is a dependency
        return False
    return isinstance(model, onnx.ModelProto)


def input_casts(graph_src: Graph, graph: Graph) -> dict[str, FixedType]:
    """``{input: fixed-point type}`` the compiled graph casts each golden input into before any
    layer sees it: the input's own type when it is fixed-point, or the ``to`` type of a
    ``Quantize`` the passes inserted right after the float input (``quantize_inputs``: the
    artifact's declared input type, noted in the report)."""
    src_nodes = {n.name for n in graph_src.nodes}
    out = {}
    for name in graph.inputs:
        t = graph.value(name).dtype
        if isinstance(t, FixedType):
            out[name] = t
            continue
        cons = graph.consumers(name)
        if cons and all(c.op == "Quantize" and c.name not in src_nodes for c in cons):
            types = {c.attrs["to"] for c in cons}
            if len(types) == 1:
                out[name] = types.pop()
    return out


def source_inputs(graph_src: Graph, graph: Graph, feeds_ir: dict, user: dict | None) -> tuple[dict, int]:
    """The golden inputs as the source model takes them.

    Args:
        graph_src: the imported graph (before passes): its inputs and ``meta['input_perms']``.
        graph: the compiled graph (after passes): the input types the artifact casts into.
        feeds_ir: ``{input: (n, *IR shape) real array}``, the golden feeds in IR layout.
        user: ``{input: array}`` as the user gave them in the source layout (batch first, already
            checked against the source shape by :func:`qdeploy.api.golden_feeds`), or None (random
            golden inputs, or arrays the user declared channels-last: the IR feeds are then
            permuted back to the source layout).
    Returns:
        ``({input: (n, *source shape) float32 array}, number of input values the cast into the
        compiled input type (:func:`input_casts`) changed)``.  Nothing is inferred from shapes.
    """
    perms = graph_src.meta.get("input_perms") or {}
    out, rounded = {}, 0
    for name in graph_src.inputs:
        x_ir = np.asarray(feeds_ir[name])
        perm = perms.get(name)
        inv = list(np.argsort(perm)) if perm is not None and len(perm) == x_ir.ndim else None
        src_shape = tuple(np.transpose(x_ir[:1], inv).shape[1:]) if inv is not None else x_ir.shape[1:]
        u = None if user is None else user.get(name)
        if u is not None:
            x = np.asarray(u).reshape((-1, *src_shape))  # declared source layout (a lone sample gets its batch axis)
        else:
            x = np.transpose(x_ir, inv) if inv is not None else x_ir
        t = input_casts(graph_src, graph).get(name)
        if t is not None:
            q = t.to_real(t.quantize_real(x))
            rounded += int(np.count_nonzero(q != x))
            x = q
        out[name] = np.asarray(x, dtype=np.float32)
    return out, rounded


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
                                                                 "onnx.brevitas", "finn.custom_op.general"):
            return False, f"node {n.name or n.op_type} ({n.op_type}) is not known to keep samples apart"
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        if n.op_type == "Transpose" and list(a.get("perm", [1]))[:1] != [0]:
            return False, f"Transpose {n.name} moves the batch axis"
        if n.op_type in ("Concat", "Softmax", "LogSoftmax", "Flatten") and int(a.get("axis", 1)) <= 0:
            return False, f"{n.op_type} {n.name} acts on axis {a.get('axis')}"
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


def _batched_proto(proto, n: int):
    """A copy of ``proto`` whose graph inputs/outputs and batch-carrying constant Reshape shapes
    have batch ``n`` (value_info dropped: shapes are inferred again)."""
    import onnx
    from onnx import numpy_helper
    q = onnx.ModelProto()
    q.CopyFrom(proto)
    inits = {i.name: i for i in q.graph.initializer}
    for t in list(q.graph.input) + list(q.graph.output):
        if t.name not in inits and t.type.tensor_type.shape.dim:
            t.type.tensor_type.shape.dim[0].dim_value = n
    del q.graph.value_info[:]
    for k, node in enumerate(q.graph.node):
        if node.op_type == "Reshape" and node.input[1] in inits and node.input[0] not in inits:
            shape = numpy_helper.to_array(inits[node.input[1]]).astype(np.int64).copy()
            if shape[0] in (0, 1):
                shape[0] = n
                name = f"{node.input[1]}__batch{k}"
                q.graph.initializer.append(numpy_helper.from_array(shape, name))
                node.input[1] = name
    return q


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal, or (float results) within ``FLOAT_RTOL`` of the larger magnitude: onnxruntime may
    pick another kernel for a batch, which reorders float sums."""
    if a.shape != b.shape:
        return False
    if np.array_equal(a, b, equal_nan=True):
        return True
    tol = FLOAT_RTOL * max(1.0, float(np.max(np.abs(b), initial=0.0)))
    return bool(np.all(np.abs(a.astype(np.float64) - b.astype(np.float64)) <= tol))


def run_onnx_source(model, inputs: dict) -> tuple[dict, str]:
    """Run a QONNX/ONNX model (path, bytes or ModelProto) with qonnx's ``execute_onnx``.

    Args:
        inputs: ``{graph input: (n, *source shape) array}``.
    Returns:
        ``({graph output: (n, ...) array}, mode)``; ``mode`` is ``"batched"`` (the model was shown to
        keep samples apart by :func:`batch_plan` and sample 0 run alone agreed) or
        ``"per-sample: <why>"``.
    Raises:
        whatever the executor raises (the caller reports it).
    """
    import onnx
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model))
    outs = [o.name for o in proto.graph.output]
    n = next(iter(inputs.values())).shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = ModelWrapper(_batched_proto(proto, 1)).transform(InferShapes())  # a dynamic batch dim -> 1

        def one(i):
            r = execute_onnx(single, {k: v[i:i + 1] for k, v in inputs.items()})
            return {o: np.asarray(r[o]) for o in outs}

        ok, why = batch_plan(proto, single.get_tensor_shape) if n > 1 else (False, "one sample")
        if ok:
            m = ModelWrapper(_batched_proto(proto, n)).transform(InferShapes())
            r = execute_onnx(m, dict(inputs))
            res = {o: np.asarray(r[o]) for o in outs}
            first = one(0)
            if all(res[o].shape[0] == n and _same(res[o][:1], first[o]) for o in outs):
                return res, "batched"
            why = "the batched run disagreed with sample 0 run alone"
        per = [one(i) for i in range(n)]
        return {o: np.concatenate([p[o] for p in per]) for o in outs}, f"per-sample: {why}"


def compare_to_source(graph: Graph, ref: dict, source: dict) -> dict:
    """Compare the reference interpreter's outputs with the source model's.

    Args:
        graph: the compiled graph; its outputs' types and ``meta['output_perms']``.
        ref: ``{output: (n, *IR shape)}`` reference runtime arrays (int64 codes for fixed types).
        source: ``{output: (n, *source shape)}`` the source model's outputs.
    Returns:
        ``{samples, exact_matches (samples with every output equal / within tolerance), mismatches,
        max_abs_error, max_lsb_error (None without fixed-point outputs), argmax_agreement (fraction,
        None when no output is a (n, k>1) score vector), float_rtol, per_output: {name: {type,
        mismatches, max_abs_error, max_lsb_error, argmax_agreement}}, ok}``.
    Raises:
        ValueError: an output missing from the source or of another shape (names it).
    """
    per, bad, n = {}, None, 0
    max_err, max_lsb, agree = 0.0, None, None
    for pos, o in enumerate(graph.outputs):
        t = graph.value(o).dtype
        a = np.asarray(ref[o])
        ours = t.to_real(a) if isinstance(t, FixedType) else a.astype(np.float64)
        ours = from_ir_layout(graph, o, ours)
        src_name = o if o in source else list(source)[pos]
        s = np.asarray(source[src_name])
        if s.shape != ours.shape:
            raise ValueError(f"output {o!r}: source shape {s.shape} != compiled {ours.shape}")
        n = s.shape[0]
        err = np.abs(s.astype(np.float64) - ours).reshape(n, -1)
        e = float(np.max(err, initial=0.0))
        row = {"type": str(t), "max_abs_error": e}
        if isinstance(t, FixedType):
            sd = s.dtype if s.dtype.kind == "f" else np.dtype(np.float64)
            diff = (ours.astype(sd) != s.astype(sd)).reshape(n, -1).any(axis=1)
            row["max_lsb_error"] = e / t.lsb
            max_lsb = max(max_lsb or 0.0, row["max_lsb_error"])
        else:
            tol = FLOAT_RTOL * max(1.0, float(np.max(np.abs(s), initial=0.0)))
            diff = (err > tol).any(axis=1)
            row["max_lsb_error"] = None
        if s.ndim == 2 and s.shape[1] > 1:
            row["argmax_agreement"] = float(np.mean(s.argmax(1) == ours.argmax(1)))
            agree = row["argmax_agreement"] if agree is None else min(agree, row["argmax_agreement"])
        else:
            row["argmax_agreement"] = None
        row["mismatches"] = int(diff.sum())
        per[o] = row
        bad = diff if bad is None else (bad | diff)
        max_err = max(max_err, e)
    mism = int(bad.sum()) if bad is not None else 0
    return {"samples": int(n), "exact_matches": int(n) - mism, "mismatches": mism, "max_abs_error": max_err,
            "max_lsb_error": max_lsb, "argmax_agreement": agree, "float_rtol": FLOAT_RTOL, "per_output": per,
            "ok": mism == 0}


def check_source(model, graph_src: Graph, graph: Graph, feeds_ir: dict, user: dict | None, ref: dict) -> dict:
    """The report's ``fidelity`` section: the source model run on the golden inputs vs ``ref``.

    Args:
        model: what the user compiled (see :func:`qdeploy.api.load`); only QONNX/ONNX files and
            ModelProtos are run today.
        graph_src, graph, feeds_ir, user: see :func:`source_inputs`.
        ref: the reference interpreter's outputs on the golden feeds (runtime arrays, IR layout).
    Returns:
        ``{"checked": False, "reason": ...}`` when the source is not an ONNX model or the source
        executor cannot run it; else :func:`compare_to_source`'s dict plus ``checked: True``,
        ``source`` (the executor), ``mode`` (batched / per-sample), ``inputs_rounded``, ``time_s``
        and, when ``ok`` is False, ``note`` (why every difference fails).
    """
    if not is_onnx_source(model):
        return {"checked": False, "reason": f"source of type {type(model).__name__} is not run yet "
                                            f"(only QONNX/ONNX models are)"}
    t0 = time.perf_counter()
    inputs, rounded = source_inputs(graph_src, graph, feeds_ir, user)
    try:
        outs, mode = run_onnx_source(model, inputs)
    except Exception as e:  # the source executor, not the compile, failed: say so, do not hide it
        return {"checked": False, "reason": "qonnx execute_onnx failed on the source model: "
                                            + " ".join(f"{type(e).__name__}: {e}".split())[:300]}
    try:
        res = compare_to_source(graph, ref, outs)
    except ValueError as e:  # an output of another shape: nothing matches
        n = next(iter(inputs.values())).shape[0]
        res = {"samples": n, "exact_matches": 0, "mismatches": n, "max_abs_error": float("inf"),
               "max_lsb_error": None, "argmax_agreement": None, "float_rtol": FLOAT_RTOL, "per_output": {},
               "ok": False, "error": str(e)}
    res.update({"checked": True, "source": "qonnx execute_onnx (onnxruntime)", "mode": mode,
                "inputs_rounded": rounded, "time_s": time.perf_counter() - t0})
    if not res["ok"]:
        res["note"] = res.pop("error", None) or UNCLASSIFIED
    return res


def fidelity_sentence(fid: dict) -> str:
    """One line about a ``fidelity`` dict from :func:`check_source`."""
    if not fid.get("checked"):
        return f"NOT checked: {fid.get('reason', 'no source model')}"
    s = (f"{fid['samples']} golden samples, {fid['exact_matches']} matching, max abs error {fid['max_abs_error']:.3g}")
    if fid.get("max_lsb_error") is not None:
        s += f" ({fid['max_lsb_error']:.3g} LSB)"
    if fid.get("argmax_agreement") is not None:
        s += f", argmax agreement {fid['argmax_agreement']:.2%}"
    s += f" [{fid['source']}, {fid['time_s']:.2f} s]"
    if fid.get("inputs_rounded"):
        s += f"; {fid['inputs_rounded']} golden input value(s) rounded to the artifact's input type first"
    return s + (": matches the source" if fid["ok"] else f": DIFFERS from the source; {fid['note']}")


def fidelity_markdown(fid: dict) -> list[str]:
    """The ``report.md`` lines of a ``fidelity`` dict: a heading, :func:`fidelity_sentence` and a
    per-output table."""
    L = ["## Fidelity to the source model", "", fidelity_sentence(fid)]
    if fid.get("checked") and fid.get("per_output"):
        L += ["", "| output | type | mismatches | max abs error | max LSB error | argmax agreement |",
              "|---|---|---|---|---|---|"]
        for o, r in fid["per_output"].items():
            lsb = "-" if r["max_lsb_error"] is None else f"{r['max_lsb_error']:.3g}"
            am = "-" if r["argmax_agreement"] is None else f"{r['argmax_agreement']:.2%}"
            L.append(f"| {o} | {r['type']} | {r['mismatches']} | {r['max_abs_error']:.3g} | {lsb} | {am} |")
    return L
