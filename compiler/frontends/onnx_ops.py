"""The ONNX import table: ONNX op type -> handler that adds the IR nodes for one ONNX node.

A handler is ``f(cv, node) -> None``: ``cv`` is the :class:`~.onnx_convert.OnnxConverter`
(``cv.entry``/``cv.const`` read inputs, ``cv.layout`` asks for a layout, ``cv.add`` adds an IR
node, ``cv.env[onnx_tensor] = Entry(ir_value, perm)`` records an output) and ``node`` the ONNX
``NodeProto``.  :data:`IMPORTERS` holds the built-in mappings; an IR op can declare more in its
``OpSpec.onnx_import`` (e.g. ``{"LeakyRelu": handler}``) without touching this file --
:func:`importer_for` looks in both.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..errors import UnsupportedError
from ..ir.graph import Const
from ..ir.ops import REGISTRY
from ..ir.requant import MAX_BITS
from ..ir.types import FLOAT32, FixedType
from . import onnx_scaled as scaled
from . import onnx_scaled_ops
from . import onnx_scaled_ops as scaled_ops
from .onnx_arith import import_binary
from .onnx_convert import Entry, canonical_perm, check_quant_params, inv_perm, is_pow2
from .onnx_finn import import_multithreshold, import_topk
from .onnx_minifloat import import_floatquant
from .onnx_pool import (import_AveragePool, import_GlobalAveragePool, import_MaxPool, import_ReduceMean,
                        spatial_attrs)
from .onnx_rounding import DIRECTED, ROUNDING_MAP, quantize_directed
from .onnx_trunc_avg import import_trunc



# -------------------------------------------------------------- quantizers
def _import_Quant(cv, node):
    e = cv.entry(node, node.input[0], scaled=True)
    scale, zp, bw = (np.asarray(cv.const(node, t), dtype=np.float64) for t in node.input[1:4])
    signed = bool(int(cv.attr(node, "signed", 1)))
    narrow = bool(int(cv.attr(node, "narrow", 0)))
    mode = str(cv.attr(node, "rounding_mode", "ROUND")).upper()
    check_quant_params(node, scale, zp, bw)
    if e.scaled is not None or np.any(zp != 0) or not np.all(scale == scale.ravel()[0]) \
            or not is_pow2(float(scale.ravel()[0])) or (mode not in ROUNDING_MAP and mode not in DIRECTED) \
            or (narrow and not signed) \
            or (float(bw.ravel()[0]) == 1 and signed and float(scale.ravel()[0]) != 1.0):
        # no fixed-point type (or no ap_fixed rounding mode): integer codes + a pending scale
        scaled.import_quant(cv, node, e, scale, zp, bw, signed, narrow, mode)
        return
    s = float(scale.ravel()[0])
    if bw.size != 1 or float(bw.ravel()[0]) != int(bw.ravel()[0]) or not 1 <= int(bw.ravel()[0]) <= 32:
        raise UnsupportedError(f"Quant bit width {bw.ravel().tolist()} is not an integer in 1..32", node.name)
    w = int(bw.ravel()[0])
    if w == 1 and signed:  # QONNX: 1-bit signed Quant is bipolar (+-scale; scale 1 here, others go scaled)
        v = cv.add(node.name, "Sign", [e.value], out=node.output[0])
    else:
        F = -int(round(math.log2(s)))
        to = FixedType(w, w - F, signed, ROUNDING_MAP.get(mode, "TRN"), "SAT_SYM" if (signed and narrow) else "SAT")
        if mode in DIRECTED:  # no ap_fixed mode: exact composition (onnx_rounding)
            v = quantize_directed(cv, node, e.value, mode, to, node.output[0])
        else:
            v = cv.add(node.name, "Quantize", [e.value], {"to": to}, out=node.output[0])
    cv.env[node.output[0]] = Entry(v, e.perm)


def _import_BipolarQuant(cv, node):
    e = cv.entry(node, node.input[0])
    scale = np.asarray(cv.const(node, node.input[1]), dtype=np.float64)
    if scale.size != 1 or float(scale.ravel()[0]) != 1.0:
        raise UnsupportedError(f"BipolarQuant on an activation with scale {scale.ravel().tolist()}: "
                               f"only scale 1 is supported", node.name)
    v = cv.add(node.name, "Sign", [e.value], out=node.output[0])
    cv.env[node.output[0]] = Entry(v, e.perm)

# -------------------------------------------------------------- linear layers
def _absorb(cv, node, out: str, w: np.ndarray, bias, w_float: bool, bias_quant: bool, nd: int):
    """Follow ``out`` through Add/Sub-of-constant (bias) and BatchNormalization (float weights only).

    ``w`` has the output channel on its last axis.  Returns (final onnx tensor, w, bias, bias_quant).
    """
    while out not in cv.graph_outputs and len(cv.consumers[out]) == 1:
        c = cv.consumers[out][0]
        if c.op_type in ("Add", "Sub") and len(c.input) == 2:
            other = c.input[1] if c.input[0] == out else c.input[0]
            if other == out or not cv.is_const(other) or (c.op_type == "Sub" and c.input[0] != out):
                break
            vec = _bias_vector(cv, cv.consts[other], w.shape[-1], nd)
            if vec is None:
                break
            if c.op_type == "Sub":
                vec = -vec
            bias_quant = (bias is None or bias_quant) and other in cv.quantized
            bias = vec if bias is None else bias + vec
        elif c.op_type == "BatchNormalization" and w_float and c.input[0] == out:
            if int(cv.attr(c, "training_mode", 0)) or len([o for o in c.output if o]) > 1:
                break
            if not all(cv.is_const(t) for t in c.input[1:5]):
                break
            scale, beta = _bn_params(cv, c)
            w = w * scale
            bias = (np.zeros(w.shape[-1]) if bias is None else bias) * scale + beta
            bias_quant = False
        else:
            break
        cv.absorbed.add(c.name)
        out = c.output[0]
    return out, w, bias, bias_quant

def _bias_vector(cv, c, n_out, nd):
    """A constant added to a Dense (nd=0) / Conv (nd spatial dims) output as a [n_out] vector, or None.

    Accepted: a scalar, or a tensor that broadcasts as ``[1, n_out, 1, ..., 1]`` (e.g. ``[C,1,1]``)."""
    c = np.asarray(c, dtype=np.float64)
    if c.size == 1:
        return np.full(n_out, float(c.ravel()[0]))
    if c.ndim > nd + 2:
        return None
    shp = (1,) * (nd + 2 - c.ndim) + tuple(c.shape)
    if shp[0] != 1 or shp[1] != n_out or any(d != 1 for d in shp[2:]):
        return None
    return c.reshape(n_out).copy()

def _bn_params(cv, c):
    gamma, beta, mean, var = (np.asarray(cv.consts[t], dtype=np.float64) for t in c.input[1:5])
    eps = float(cv.attr(c, "epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale

def _emit_dense(cv, node, e: Entry, w_name, w: np.ndarray, bias, bias_quant, out):
    if e.rowperm is not None:
        w = w[e.rowperm]
        x = e.value
    else:
        x = cv.layout(node, e, tuple(range(len(e.perm))))
    params = {"weight": cv.weight_const(w_name, w)}
    if bias is not None:
        params["bias"] = Const.from_real(bias) if (bias_quant or isinstance(params["weight"].dtype, FixedType)) \
            else Const(bias.astype(np.float32), FLOAT32)
    v = cv.add_fallback(node.name, "Dense", [x], {}, params, ("bias",), out)
    cv.env[out] = Entry(v, tuple(range(len(cv.b.values[v].shape))))

def _import_MatMul(cv, node):
    a, bname = node.input
    if cv.is_const(a):
        raise UnsupportedError("MatMul with a constant first operand (W x) is not supported: expected x W", node.name)
    if not cv.is_const(bname):
        raise UnsupportedError("MatMul of two activations is not supported (the weight must be constant)", node.name)
    w = np.asarray(cv.consts[bname], dtype=np.float64)
    if w.ndim != 2:
        raise UnsupportedError(f"MatMul weight of shape {w.shape}: only 2-D [K, N] weights", node.name)
    e = cv.entry(node, a, scaled=True)
    if scaled.wants_linear(cv, e, bname):
        codes, s_w = scaled.weight_codes(cv, node, bname, 1)
        scaled.dense(cv, node, e, codes, s_w, None, node.output[0])
        return
    e = cv.entry(node, a)
    out, w, bias, bq = _absorb(cv, node, node.output[0], w, None, bname not in cv.quantized, False, 0)
    _emit_dense(cv, node, e, bname, w, bias, bq, out)

def _import_Gemm(cv, node):
    a, bname = node.input[0], node.input[1]
    cname = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if int(cv.attr(node, "transA", 0)):
        raise UnsupportedError("Gemm with transA=1 is not supported", node.name)
    if not cv.is_const(bname) or cv.is_const(a):
        raise UnsupportedError("Gemm needs an activation A and a constant B", node.name)
    w = np.asarray(cv.consts[bname], dtype=np.float64)
    if int(cv.attr(node, "transB", 0)):
        w = w.T
    alpha, beta = float(cv.attr(node, "alpha", 1.0)), float(cv.attr(node, "beta", 1.0))
    quant = bname in cv.quantized
    if alpha != 1.0:
        w = w * alpha
        quant = quant and is_pow2(abs(alpha))
    bias, bq = None, False
    if cname is not None:
        bias = _bias_vector(cv, cv.const(node, cname), w.shape[1], 0)
        if bias is None:
            raise UnsupportedError(f"Gemm C of shape {cv.consts[cname].shape} is not a bias vector", node.name)
        bias = bias * beta
        bq = cname in cv.quantized and (beta == 1.0 or is_pow2(abs(beta)))
    e = cv.entry(node, a, scaled=True)
    if scaled.wants_linear(cv, e, bname):
        tb = bool(int(cv.attr(node, "transB", 0)))
        codes, s_w = scaled.weight_codes(cv, node, bname, 0 if tb else 1, (1, 0) if tb else None)
        b = scaled.bias_fractions(cv, cname, w.shape[1], node, scaled.frac(beta))
        scaled.dense(cv, node, e, codes, s_w, b, node.output[0], scaled.frac(alpha))
        return
    e = cv.entry(node, a)
    if quant:
        cv.quantized.add(bname + "__gemm")
    out, w, bias, bq = _absorb(cv, node, node.output[0], w, bias, not quant, bq, 0)
    _emit_dense(cv, node, e, bname + "__gemm" if quant else bname, w, bias, bq, out)

def _import_Conv(cv, node):
    xname, wname = node.input[0], node.input[1]
    bname = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if not cv.is_const(wname):
        raise UnsupportedError("Conv weight must be a constant", node.name)
    e = cv.entry(node, xname, scaled=True)
    rank = len(e.perm)
    w = np.asarray(cv.consts[wname], dtype=np.float64)  # [O, I/g, *k]
    if not scaled.wants_linear(cv, e, wname):
        e = cv.entry(node, xname)
    x = cv.layout(node, e, canonical_perm(rank))
    kernel = tuple(int(k) for k in w.shape[2:])
    if tuple(cv.attr(node, "kernel_shape", kernel)) != kernel:
        raise UnsupportedError(f"Conv kernel_shape {cv.attr(node, 'kernel_shape')} does not match weight {w.shape}",
                               node.name)
    in_spatial = cv.b.values[x].shape[:-1]
    strides, pads = spatial_attrs(cv, node, in_spatial, kernel, dilated=True)
    dil = tuple(int(d) for d in cv.attr(node, "dilations", [1] * len(kernel)))
    groups = int(cv.attr(node, "group", 1))
    if scaled.wants_linear(cv, e, wname):
        codes, s_w = scaled.weight_codes(cv, node, wname, 0, (*range(2, w.ndim), 1, 0))
        b = scaled.bias_fractions(cv, bname, w.shape[0], node)
        attrs = {"kernel": kernel, "strides": strides, "pads": pads, "groups": groups}
        if any(d != 1 for d in dil):
            attrs["dilations"] = dil
        scaled.conv(cv, node, e, canonical_perm(rank), codes, s_w, b, attrs, node.output[0], canonical_perm(rank))
        return
    w = w.transpose(*range(2, w.ndim), 1, 0)  # [*k, I/g, O]
    bias, bq = None, False
    if bname is not None:
        bias = np.asarray(cv.consts[bname], dtype=np.float64).reshape(-1)
        bq = bname in cv.quantized
    out, w, bias, bq = _absorb(cv, node, node.output[0], w, bias, wname not in cv.quantized, bq, len(kernel))
    params = {"weight": cv.weight_const(wname, w)}
    if bias is not None:
        params["bias"] = Const.from_real(bias) if (bq or isinstance(params["weight"].dtype, FixedType)) \
            else Const(bias.astype(np.float32), FLOAT32)
    attrs = {"kernel": kernel, "strides": strides, "pads": pads, "groups": groups}
    if any(d != 1 for d in dil):
        attrs["dilations"] = dil
    v = cv.add_fallback(node.name, "Conv", [x], attrs, params, ("bias",), out)
    cv.env[out] = Entry(v, canonical_perm(rank))

# -------------------------------------------------------------- normalization & elementwise
def _import_BatchNormalization(cv, node):
    if int(cv.attr(node, "training_mode", 0)) or len([o for o in node.output if o]) > 1:
        raise UnsupportedError("BatchNormalization in training mode (training_mode=1 or running-stat outputs) "
                               "is not supported: export the model in eval mode", node.name)
    for t in node.input[1:5]:
        cv.const(node, t)
    e = cv.entry(node, node.input[0], scaled=True)
    scale, bias = _bn_params(cv, node)
    if e.scaled is None and e.rowperm is None and isinstance(cv.dtype(e), FixedType) and _feeds_quant(cv, node):
        # an integer (fixed-point) value: the identity map, so that the BN folds exactly into the next
        # Quant's MultiThreshold, as on the scaled-integer path (a float32 Affine would stay in the datapath)
        e = Entry(e.value, e.perm, None, scaled.Scaled(1, 0))
    if e.scaled is not None:
        scaled_ops.batchnorm(cv, node, e, scale, bias)
        return
    rank = len(e.perm)
    x = cv.layout(node, e, canonical_perm(rank))
    params = {"scale": Const(scale.astype(np.float32), FLOAT32), "bias": Const(bias.astype(np.float32), FLOAT32)}
    v = cv.add(node.name, "Affine", [x], {}, params, out=node.output[0])
    cv.env[node.output[0]] = Entry(v, canonical_perm(rank))

def _feeds_quant(cv, node) -> bool:
    """True when BatchNormalization ``node``'s output is read by one QONNX ``Quant`` alone (of at most
    :data:`~qdeploy.compiler.ir.requant.MAX_BITS` bits), directly or through one ``Relu`` read by that
    Quant alone (Conv -> BN -> QuantReLU): the BN then folds into the Quant's exact requantizer
    (:func:`.onnx_scaled.import_quant`, a ``MultiThreshold``)."""
    out = node.output[0]
    for _ in range(2):
        cons = cv.consumers.get(out, [])
        if out in cv.graph_outputs or len(cons) != 1 or cons[0].input[0] != out:
            return False
        if cons[0].op_type == "Quant":
            bw = cv.consts.get(cons[0].input[3]) if len(cons[0].input) > 3 else None
            return bw is not None and np.size(bw) == 1 and 1 <= float(np.ravel(bw)[0]) <= MAX_BITS
        if cons[0].op_type != "Relu":
            return False
        out = cons[0].output[0]
    return False

def _unary(cv, node, op):
    e = cv.entry(node, node.input[0])
    if e.rowperm is not None:
        raise UnsupportedError(f"{node.op_type} between a Flatten and a Dense", node.name)
    v = cv.add(node.name, op, [e.value], out=node.output[0])
    cv.env[node.output[0]] = Entry(v, e.perm)

def _import_Relu(cv, node):
    e = cv.entry(node, node.input[0], scaled=True)
    if e.scaled is not None:
        scaled_ops.relu(cv, node, e)
        return
    _unary(cv, node, "Relu")

def _import_Identity(cv, node):
    cv.env[node.output[0]] = cv.entry(node, node.input[0], scaled=True)

def _import_binary(cv, node):
    if not scaled_ops.binary(cv, node):
        import_binary(cv, node)

def _import_Pad(cv, node):
    handler = REGISTRY["Pad"].onnx_import["Pad"]  # the Pad op's own importer, for plain values
    e = cv.entry(node, node.input[0], scaled=True)
    if e.scaled is not None:
        scaled_ops.pad(cv, node, e, handler)
    else:
        handler(cv, node)


# -------------------------------------------------------------- shape ops
def _reshape_to(cv, node, out_shape: tuple[int, ...]):
    e = cv.entry(node, node.input[0], scaled=True)
    out = node.output[0]
    rank_in = len(e.perm)
    ident = tuple(range(rank_in))
    if e.perm != ident and len(out_shape) == 1 and out not in cv.graph_outputs and cv.consumers[out] and all(
            c.op_type in ("MatMul", "Gemm") and c.input[0] == out for c in cv.consumers[out]):
        shp = cv.onnx_shape(e)
        idx = np.arange(int(np.prod(shp))).reshape(shp).transpose(e.perm).ravel()
        v = cv.add(node.name, "Reshape", [e.value], {"shape": out_shape}, out=out)
        rp = None if np.array_equal(idx, np.arange(idx.size)) else idx
        cv.env[out] = Entry(v, (0,), rp, scaled.reshaped(e.scaled, cv.b.values[e.value].shape, out_shape))
        return
    if e.scaled is not None and e.scaled.relu:
        e = cv.entry(node, node.input[0])  # refused: a pending ReLU is read by a Quant only
    x, S = scaled.relayout(cv, node, e, ident)
    v = cv.add(node.name, "Reshape", [x], {"shape": out_shape}, out=out)
    cv.env[out] = Entry(v, tuple(range(len(out_shape))), None,
                        scaled.reshaped(S, cv.b.values[x].shape, out_shape) if e.scaled is not None else None)

def _import_Reshape(cv, node):
    e = cv.entry(node, node.input[0], scaled=True)
    target = [int(t) for t in np.asarray(cv.const(node, node.input[1])).ravel()]
    full = (1, *cv.onnx_shape(e))
    if int(cv.attr(node, "allowzero", 0)) == 0:
        target = [full[i] if t == 0 and i < len(full) else t for i, t in enumerate(target)]
    try:
        new = np.empty(full, dtype=np.uint8).reshape(target).shape
    except ValueError as ex:
        raise UnsupportedError(f"Reshape to {target} is invalid for shape {full}: {ex}", node.name) from None
    if not new or new[0] != 1 or target[0] not in (1, -1):
        raise UnsupportedError(f"Reshape to {target} changes the batch dimension", node.name)
    _reshape_to(cv, node, tuple(new[1:]))

def _import_Flatten(cv, node):
    e = cv.entry(node, node.input[0], scaled=True)
    shp = cv.onnx_shape(e)
    axis = int(cv.attr(node, "axis", 1))
    if axis < 0:
        axis += len(shp) + 1
    if axis != 1:
        raise UnsupportedError(f"Flatten with axis={axis} is not supported (only 1: keep the batch)", node.name)
    _reshape_to(cv, node, (int(np.prod(shp)),))

def _import_Transpose(cv, node):
    e = cv.entry(node, node.input[0], scaled=True)
    rank = len(e.perm)
    P = [int(p) for p in cv.attr(node, "perm", list(range(rank, -1, -1)))]
    if len(P) != rank + 1 or P[0] != 0:
        raise UnsupportedError(f"Transpose perm {P} moves the batch dimension", node.name)
    Pp = [p - 1 for p in P[1:]]  # onnx_out axis j = onnx_in axis Pp[j]
    if e.rowperm is not None:
        raise UnsupportedError("Transpose of a flattened tensor feeding a Dense", node.name)
    Pinv = inv_perm(Pp)
    q = tuple(Pinv[a] for a in e.perm)  # zero-cost: only the layout bookkeeping changes
    cv.env[node.output[0]] = Entry(e.value, q, None, e.scaled)

def _import_Concat(cv, node):
    if any(cv.is_const(t) for t in node.input):
        raise UnsupportedError("Concat with a constant input is not supported", node.name)
    es = [cv.entry(node, t) for t in node.input]
    rank = len(es[0].perm)
    axis = int(cv.attr(node, "axis"))
    if axis < 0:
        axis += rank + 1
    if axis == 0:
        raise UnsupportedError("Concat along the batch axis is not supported", node.name)
    p = es[0].perm if es[0].rowperm is None else tuple(range(rank))
    xs = [cv.layout(node, ei, p) for ei in es]
    ir_axis = inv_perm(p)[axis - 1]
    v = cv.add(node.name, "Concat", xs, {"axis": ir_axis}, out=node.output[0])
    cv.env[node.output[0]] = Entry(v, p)

def _import_Softmax(cv, node):
    """ONNX ``Softmax`` over one non-batch axis (the IR's is over the last axis: a transpose first
    when needed).  On a scaled-integer value (logits of a float-scale Brevitas/QONNX layer) it reads
    their float32 dequantization, as the source does (:func:`.onnx_scaled_ops.output`)."""
    e = cv.entry(node, node.input[0], scaled=True)
    rank = len(e.perm)
    default = 1 if cv.opset < 13 else -1
    axis = int(cv.attr(node, "axis", default))
    if axis < 0:
        axis += rank + 1
    if axis == 0:
        raise UnsupportedError("Softmax over the batch axis is not supported", node.name)
    ax = axis - 1
    if cv.opset < 13 and ax != rank - 1:
        raise UnsupportedError(f"Softmax (opset {cv.opset}) axis={axis} flattens the trailing axes: only the "
                               f"last axis is supported", node.name)
    q = e.perm if e.perm[-1] == ax else tuple(a for a in range(rank) if a != ax) + (ax,)
    if e.scaled is not None:
        x = onnx_scaled_ops.output(cv, f"{node.name}__in", e, q, what=f"the input of Softmax {node.name!r}")
    else:
        x = cv.layout(node, e, q)
    v = cv.add(node.name, "Softmax", [x], {"axis": -1}, out=node.output[0])
    cv.env[node.output[0]] = Entry(v, q)


#: ONNX op type -> import handler (built-in mappings; see :func:`importer_for`).
IMPORTERS: dict[str, Callable] = {
    "Quant": _import_Quant, "BipolarQuant": _import_BipolarQuant, "Trunc": import_trunc,
    "MatMul": _import_MatMul, "Gemm": _import_Gemm, "Conv": _import_Conv,
    "BatchNormalization": _import_BatchNormalization,
    "Add": _import_binary, "Sub": _import_binary, "Mul": _import_binary, "Div": _import_binary,
    "Relu": _import_Relu, "Identity": _import_Identity, "Dropout": _import_Identity,
    "MaxPool": import_MaxPool, "AveragePool": import_AveragePool, "GlobalAveragePool": import_GlobalAveragePool,
    "ReduceMean": import_ReduceMean,
    "Reshape": _import_Reshape, "Flatten": _import_Flatten, "Transpose": _import_Transpose,
    "Concat": _import_Concat, "Pad": _import_Pad, "Softmax": _import_Softmax,
    "MultiThreshold": import_multithreshold, "TopK": import_topk, "FloatQuant": import_floatquant,
}


def importer_for(op_type: str) -> Callable | None:
    """The import handler of ONNX op ``op_type``: the built-in one (:data:`IMPORTERS`), else one an
    IR op declares in ``OpSpec.onnx_import``; ``None`` when nothing maps it."""
    handler = IMPORTERS.get(op_type)
    if handler is not None:
        return handler
    for spec in REGISTRY.values():
        if op_type in spec.onnx_import:
            return spec.onnx_import[op_type]
    return None
