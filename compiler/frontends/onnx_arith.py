"""ONNX arithmetic with constants (``Add``/``Sub``/``Mul``/``Div``) -> IR, exactly as the source rounds.

A constant operand becomes an exact fixed-point ``Affine`` only where that provably equals the
source's float32 result on every input code (:func:`~qdeploy.compiler.ir.float32.affine_float32_exact`);
otherwise the ``Affine`` keeps float32 constants, or (a ``Div`` whose reciprocal product differs) the
import is refused naming the node.  Handlers take ``(cv, node)`` like every entry of
:data:`~qdeploy.compiler.frontends.onnx_ops.IMPORTERS`.
"""
from __future__ import annotations

import numpy as np

from ..errors import UnsupportedError
from ..ir.float32 import affine_float32_exact
from ..ir.graph import Const
from ..ir.types import FLOAT32, FixedType
from .onnx_convert import Entry, is_pow2


def affine_by_constant(cv, node, e: Entry, scale, bias):
    """An Affine ``x * scale + bias`` for a Mul/Add/Sub by a float32 constant.

    On a fixed-point input the constants become exact fixed-point ones only where that provably
    gives the source's float32 result on every input code (:func:`affine_float32_exact`);
    otherwise the Affine keeps float32 constants (the source's own rounding), with a note."""
    fixed_in = isinstance(cv.dtype(e), FixedType)
    exact = fixed_in and affine_float32_exact(cv.dtype(e), scale, bias)
    if fixed_in and not exact:
        cv.b.meta.setdefault("notes", []).append(
            f"{node.name}: {node.op_type} by a float32 constant is not exact in fixed point on every input code "
            f"(float32 rounds the result as the source does); kept as a float32 Affine")
    params = {}
    for role, val in (("scale", scale), ("bias", bias)):
        if val is not None:
            params[role] = Const.from_real(val) if exact else Const(np.asarray(val, np.float32), FLOAT32)
    v = cv.add_fallback(node.name, "Affine", [e.value], {}, params, ("scale", "bias"), node.output[0])
    cv.env[node.output[0]] = Entry(v, e.perm)


def div_scale(cv, node, e: Entry, vec: np.ndarray) -> np.ndarray:
    """The multiplier that stands for the source's float32 ``x / vec``: ``1 / vec`` when every
    divisor is a power of two (exact), else ``float32(1 / vec)`` where ``float32(x * r)`` is shown
    to equal ``float32(x / vec)`` for every input code (before, or else after, the Quant that alone
    reads the quotient).  On a float input, or one of more than 2**16 codes, the reciprocal is used
    unverified, with a note.

    Raises:
        UnsupportedError: an input where the reciprocal product provably differs from the division.
    """
    if all(is_pow2(abs(float(v))) for v in np.ravel(vec)):
        return 1.0 / vec
    d = np.asarray(vec, np.float32)
    r = (np.float32(1) / d).astype(np.float32)
    xt = cv.dtype(e)
    n_codes = xt.max_code - xt.min_code + 1 if isinstance(xt, FixedType) else None
    if n_codes is None or n_codes > 1 << 16:
        cv.b.meta.setdefault("notes", []).append(
            f"{node.name}: Div by a float32 constant that is not a power of two is computed as a multiplication "
            f"by its float32 reciprocal, unverified on this {'float' if n_codes is None else 'wide'} input "
            f"(may differ from the source's x / c by 1 ulp)")
        return r.astype(np.float64)
    x = xt.to_real(np.arange(xt.min_code, xt.max_code + 1)).astype(np.float32)[:, None]
    mul, div = x * r.reshape(-1), x / d.reshape(-1)
    same = mul == div
    if not same.all():
        mul, div = through_quant(cv, node, mul), through_quant(cv, node, div)
        same = mul == div if mul is not None else same
    if not np.all(same):
        raise UnsupportedError(f"Div by a float32 constant that is not a power of two: x * float32(1/c) differs from "
                               f"the source's float32 x / c on {int((~np.asarray(same)).sum())} of {same.size} "
                               f"input codes x channels", node.name)
    return r.astype(np.float64)


def through_quant(cv, node, y: np.ndarray):
    """``y`` passed through the QONNX Quant that alone reads ``node``'s output (qonnx's own
    ``int_quant``, the source semantics), or None when there is no such constant-parameter Quant."""
    out = node.output[0]
    cons = cv.consumers.get(out, [])
    if out in cv.graph_outputs or len(cons) != 1 or cons[0].op_type != "Quant" or cons[0].input[0] != out:
        return None
    q = cons[0]
    if not all(cv.is_const(t) for t in q.input[1:4]):
        return None
    from qonnx.custom_op.general.intquant import int_quant
    return int_quant(y, *(cv.consts[t] for t in q.input[1:4]), int(cv.attr(q, "signed", 1)),
                     int(cv.attr(q, "narrow", 0)), cv.attr(q, "rounding_mode", "ROUND"))


def import_binary(cv, node):
    """ONNX ``Add``/``Sub``/``Mul``/``Div``: of two activations (IR ``Add``/``Sub``/``Mul`` nodes), or of an activation and a scalar or per-channel constant (an
    ``Affine``, see :func:`affine_by_constant`).

    Raises:
        UnsupportedError: naming the node for two constants, a constant of another shape, a Div by
            an activation or by 0, or a Div whose reciprocal product differs from the source.
    """
    op = node.op_type
    a, b = node.input[0], node.input[1]
    ca, cb = cv.is_const(a), cv.is_const(b)
    if not ca and not cb:
        ea, eb = cv.entry(node, a), cv.entry(node, b)
        xb = cv.layout(node, eb, ea.perm)
        xa = ea.value
        if op in ("Add", "Mul", "Sub"):
            v = cv.add(node.name, op, [xa, xb], out=node.output[0])
        else:
            raise UnsupportedError(f"{op} of two activations is not supported", node.name)
        cv.env[node.output[0]] = Entry(v, ea.perm)
        return
    if ca and cb:
        raise UnsupportedError(f"{op} of two constants was not folded", node.name)
    xname, cname = (b, a) if ca else (a, b)
    e = cv.entry(node, xname)
    if e.rowperm is not None:
        e = Entry(cv.layout(node, Entry(e.value, e.perm), e.perm), e.perm)
    c = cv.consts[cname]
    vec = cv.channel_vector(c, e)
    if vec is None:
        raise UnsupportedError(f"{op} with a constant of shape {tuple(np.shape(c))} that is neither a scalar nor "
                               f"per-channel is not supported", node.name)
    const_first = ca
    if op == "Add":
        affine_by_constant(cv, node, e, None, vec)
    elif op == "Sub":
        affine_by_constant(cv, node, e, -1.0 if const_first else None, vec if const_first else -vec)
    elif op == "Mul":
        affine_by_constant(cv, node, e, vec, None)
    elif op == "Div":
        if const_first:
            raise UnsupportedError("Div of a constant by an activation is not supported", node.name)
        if np.any(vec == 0):
            raise UnsupportedError("Div by a constant containing 0", node.name)
        affine_by_constant(cv, node, e, div_scale(cv, node, e, vec), None)
    else:
        raise UnsupportedError(f"unsupported op type {op!r}", node.name)
