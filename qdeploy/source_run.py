"""Running the user's *source* model for the fidelity check (:mod:`qdeploy.fidelity`): a
PyTorch/Brevitas module itself, and float64 re-evaluations of the source used to explain
differences (a float32 tie that the source rounds the other way).

* :func:`run_torch_source` -- the module in ``eval()`` mode under ``torch.no_grad()`` on the golden
  inputs (source layout, NCHW), in float32 or in float64 (a deep copy of the module, ``.double()``).
* :func:`to_double` / :func:`execute_double` -- a float64 copy of a QONNX/ONNX model and an
  executor for it: qonnx's ``execute_node`` (onnxruntime, one node at a time) for standard ops and
  qonnx's ``int_quant`` (the function behind the QONNX ``Quant`` op, qonnx
  ``custom_op/general/intquant.py``) evaluated in float64 for ``Quant``; qonnx's own ``Quant``
  kernel casts its result to float32, which this avoids.

Nothing here compares results; :mod:`qdeploy.fidelity` does.
"""
from __future__ import annotations

import copy
import warnings

import numpy as np

#: ONNX domains of the QONNX ``Quant`` op evaluated in float64 here.
QUANT_DOMAINS = ("qonnx.custom_op.general", "onnx.brevitas", "finn.custom_op.general")


class SourceRunError(Exception):
    """The source could not be run as asked (the message says why); the caller reports it as
    "not checked" / "not classified", never as a compile failure."""


# ---------------------------------------------------------------------------------- PyTorch
def is_torch_module(model) -> bool:
    """True when ``model`` is a ``torch.nn.Module`` (torch imported only if already loaded)."""
    import sys
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def module_outputs(out) -> list:
    """The output tensors of a module call, in order: a tensor; a Brevitas ``QuantTensor``
    (its ``.value``, the dequantized float tensor, Brevitas ``brevitas/quant_tensor``); or a
    tuple/list/dict of these (flattened depth first, dict values in insertion order).

    Raises:
        SourceRunError: anything else (e.g. None, a Python number), naming its type.
    """
    import torch
    if torch.is_tensor(out):
        return [out]
    v = getattr(out, "value", None)
    if torch.is_tensor(v):  # QuantTensor (a NamedTuple in Brevitas >= 0.10: check it before tuple)
        return [v]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        res = []
        for o in out:
            res += module_outputs(o)
        return res
    raise SourceRunError(f"the module returned a {type(out).__name__}, not tensors")


def _call(module, xs: list, dtype):
    import torch
    ts = [torch.as_tensor(np.ascontiguousarray(x), dtype=dtype) for x in xs]
    return [t.detach().cpu().numpy() for t in module_outputs(module(*ts))]


def run_torch_source(module, inputs: list[np.ndarray], double: bool = False) -> tuple[list[np.ndarray], str]:
    """Run the module on the golden inputs.

    Args:
        module: the ``torch.nn.Module`` the user compiled.  It is run in ``eval()`` mode under
            ``torch.no_grad()`` and its training flag is restored afterwards; with ``double`` a deep
            copy is converted with ``.double()`` (the module itself is never changed).
        inputs: the forward arguments in order, each ``(n, *source shape)`` (NCHW for images).
        double: evaluate in float64 (inputs cast to float64) instead of float32.
    Returns:
        ``([output arrays (n, ...)], mode)``: ``mode`` is ``"batched"`` when the whole batch in one
        call gave sample 0 bit for bit as a call on sample 0 alone (eval-mode layers keep samples
        apart), else ``"per-sample: <why>"`` (one call per sample).
    Raises:
        SourceRunError: the module failed (message: exception type and text), or returned
            something other than tensors.
    """
    import torch
    dtype = torch.float64 if double else torch.float32
    m = copy.deepcopy(module).double() if double else module
    was_training = module.training
    n = inputs[0].shape[0]
    try:
        m.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            first = _call(m, [x[:1] for x in inputs], dtype)
            if n == 1:
                return first, "batched"
            why = ""
            try:
                full = _call(m, inputs, dtype)
            except Exception as e:  # e.g. a module written for batch 1
                full, why = None, f"the batched call failed ({type(e).__name__})"
            if full is not None:
                if len(full) == len(first) and all(f.shape[0] == n and np.array_equal(f[:1], s, equal_nan=True)
                                                   for f, s in zip(full, first)):
                    return full, "batched"
                why = "the batched call disagreed with sample 0 run alone"
            per = [first] + [_call(m, [x[i:i + 1] for x in inputs], dtype) for i in range(1, n)]
            return [np.concatenate([p[k] for p in per]) for k in range(len(first))], f"per-sample: {why}"
    except SourceRunError:
        raise
    except Exception as e:
        raise SourceRunError(f"{'float64 ' if double else ''}module call failed: "
                             + " ".join(f"{type(e).__name__}: {e}".split())[:300]) from None
    finally:
        if m is module:
            module.train(was_training)


# ---------------------------------------------------------------------------------- ONNX float64
def to_double(proto):
    """A float64 copy of an ONNX ``ModelProto``: every float32 initializer, graph input/output,
    value_info, ``Constant`` tensor and ``Cast(to=FLOAT)`` becomes float64; ONNX QDQ nodes are first
    rewritten into the equivalent QONNX ``Quant`` nodes (:func:`~qdeploy.compiler.frontends.onnx_qdq.
    normalize_qdq`), since QuantizeLinear / DequantizeLinear take no float64 scale.

    Raises:
        SourceRunError: a float tensor attribute this cannot convert (names the node).
    """
    import onnx
    from onnx import TensorProto, numpy_helper

    q = onnx.ModelProto()
    q.CopyFrom(proto)
    g = q.graph
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.node):
        # ONNX QDQ takes no float64 scales: use the equivalent QONNX Quant form (run by int_quant in float64)
        from .compiler.frontends.onnx_qdq import normalize_qdq

        for k, n in enumerate(g.node):
            n.name = n.name or f"{n.op_type}_{k}"
        normalize_qdq(q)
    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT:
            a = numpy_helper.to_array(t).astype(np.float64)
            g.initializer[i].CopyFrom(numpy_helper.from_array(a, t.name))
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.DOUBLE
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
            elif a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise SourceRunError(f"node {n.name or n.op_type} ({n.op_type}) has a subgraph; no float64 copy")
    return q


def execute_double(model, inputs: dict) -> dict:
    """Execute a :func:`to_double` model (a shape-inferred qonnx ``ModelWrapper``) in float64.

    Standard ops run through qonnx ``execute_node`` (onnxruntime, one single-node model each,
    with every float tensor declared float64), except ``Conv``, which onnxruntime's CPU provider
    implements for float32 only: :func:`conv_double`; ``Quant`` is qonnx's ``int_quant`` in float64;
    any other custom op runs through qonnx and its result is cast to float64.

    Args:
        inputs: ``{graph input: array}`` (cast to float64).
    Returns:
        ``{graph output: array}``.
    Raises:
        SourceRunError: a node failed (names it).
    """
    from onnx import TensorProto, helper, numpy_helper
    from qonnx.core.onnx_exec import execute_node
    from qonnx.custom_op.general.intquant import int_quant

    g = model.graph
    for vi in list(g.value_info) + list(g.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    ctx = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    ctx.update({k: np.asarray(v, dtype=np.float64) for k, v in inputs.items()})
    for vi in list(g.value_info) + list(g.output):  # execute_node compares shapes with preallocated buffers
        if vi.name not in ctx:
            ctx[vi.name] = np.zeros([d.dim_value for d in vi.type.tensor_type.shape.dim], np.float64)
    opset = next((o.version for o in model.model.opset_import if o.domain in ("", "ai.onnx")),
                 model.model.opset_import[0].version)
    for n in g.node:
        try:
            if n.op_type in ("Quant", "IntQuant") and n.domain in QUANT_DOMAINS:
                a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
                mode = a.get("rounding_mode", "ROUND")
                mode = mode.decode() if isinstance(mode, bytes) else mode
                x, s, z, b = (np.asarray(ctx[i], dtype=np.float64) for i in n.input[:4])
                ctx[n.output[0]] = np.asarray(int_quant(x, s, z, b, int(a.get("signed", 1)), int(a.get("narrow", 0)),
                                                        mode), dtype=np.float64)
            elif n.op_type == "Conv" and n.domain in ("", "ai.onnx"):
                a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
                ctx[n.output[0]] = conv_double(*(np.asarray(ctx[i], dtype=np.float64) for i in n.input if i), **a)
            else:
                execute_node(n, ctx, g, opset)
                if n.domain not in ("", "ai.onnx"):
                    for o in n.output:
                        ctx[o] = np.asarray(ctx[o], dtype=np.float64)
        except Exception as e:
            raise SourceRunError(f"float64 copy failed at node {n.name or n.op_type} ({n.op_type}): "
                                 + " ".join(f"{type(e).__name__}: {e}".split())[:200]) from None
    return {o.name: np.asarray(ctx[o.name]) for o in g.output}


def conv_double(x, w, b=None, *, pads=None, strides=None, dilations=None, group=1, auto_pad=b"NOTSET",
                kernel_shape=None):
    """ONNX ``Conv`` (https://onnx.ai/onnx/operators/onnx__Conv.html) in float64 with NumPy: a sum
    over the kernel taps of strided slices of the zero-padded input, each a ``tensordot`` over the
    group's input channels.

    Args:
        x: ``(N, C, *spatial)``; w: ``(M, C/group, *kernel)``; b: ``(M,)`` or None.
        pads: ONNX order (all begins, then all ends); strides, dilations: per spatial axis.
    Returns:
        ``(N, M, *out)`` float64.
    Raises:
        SourceRunError: ``auto_pad`` other than NOTSET.
    """
    ap = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if ap not in ("NOTSET", ""):
        raise SourceRunError(f"Conv auto_pad={ap} in the float64 copy")
    nd = x.ndim - 2
    pads = list(pads or [0] * 2 * nd)
    strides = list(strides or [1] * nd)
    dil = list(dilations or [1] * nd)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    k = w.shape[2:]
    out_sp = [(xp.shape[2 + i] - dil[i] * (k[i] - 1) - 1) // strides[i] + 1 for i in range(nd)]
    m, cg = w.shape[0], w.shape[1]
    mg = m // group
    y = np.zeros((x.shape[0], m, *out_sp))
    for gi in range(group):
        xs = xp[:, gi * cg:(gi + 1) * cg]
        ws = w[gi * mg:(gi + 1) * mg]
        for tap in np.ndindex(*k):
            sl = tuple(slice(tap[i] * dil[i], tap[i] * dil[i] + strides[i] * (out_sp[i] - 1) + 1, strides[i])
                       for i in range(nd))
            patch = xs[(slice(None), slice(None)) + sl]  # (N, cg, *out)
            y[:, gi * mg:(gi + 1) * mg] += np.moveaxis(np.tensordot(patch, ws[(slice(None), slice(None)) + tap],
                                                                    axes=([1], [1])), -1, 1)
    if b is not None:
        y += b.reshape(1, m, *([1] * nd))
    return y
