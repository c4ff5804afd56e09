"""Scaled-integer values, continued: elementwise ops, batch norm and graph outputs on a pending map.

The map ``real = r * P + B`` of an IR value ``r`` and its rules are described in :mod:`.onnx_scaled`;
this module holds the handlers that move it through ``Relu``, ``MaxPool``, ``Add``/``Sub``/``Mul``/``Div``
(by a constant, or of two scaled values), ``BatchNormalization``, and the float32 epilogue of a
graph output.  Each raises :class:`UnsupportedError` naming the node for what it cannot keep exact.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

from ..errors import UnsupportedError
from ..ir.graph import Const
from ..ir.types import FLOAT32, FixedType
from .onnx_scaled import (Scaled, channel, compact, fractions_of, int_const, is_pow2_frac, materialize, note,
                          relayout, scaled_of, zero_code)


# ---------------------------------------------------------------------- elementwise
def relu(cv, node, e) -> None:
    """``Relu`` of a scaled value: pending (folded into the next ``Quant``'s thresholds, or a float
    ReLU after a graph output's epilogue) when a ``Quant`` alone reads it or it is a graph output;
    else a ``Relu`` on the codes when ``P > 0`` and ``B == 0``.

    Raises:
        UnsupportedError: naming the node otherwise (ReLU of ``c * P + B`` is not a map of codes).
    """
    out = node.output[0]
    S = e.scaled
    cons = cv.consumers.get(out, [])
    shape = cv.b.values[e.value].shape
    if out in cv.graph_outputs or (len(cons) == 1 and cons[0].op_type == "Quant" and cons[0].input[0] == out):
        cv.bind(out, e.value, e.perm, e.rowperm, scaled=S.with_(relu=True))
        return
    if not S.relu and all(p > 0 for p in S.P.ravel()) and all(b == 0 for b in S.B.ravel()):
        v = cv.add(node.name, "Relu", [e.value], out=out)
        cv.bind(out, v, e.perm, e.rowperm, scaled=S)
        return
    raise UnsupportedError(f"Relu of a scaled-integer value with an offset or a negative scale ({S.describe()}) "
                           f"that no Quant follows is not supported", node.name)


def maxpool(cv, node, e, x, S, attrs, out, out_perm) -> None:
    """``MaxPool`` on codes: commutes with ``c * P + B`` (and a pending ReLU) when every ``P > 0``.

    Raises:
        UnsupportedError: a channel with ``P <= 0`` or a map varying across positions."""
    shape = cv.b.values[x].shape
    P, B = channel(S.P, shape), channel(S.B, shape)
    if P is None or B is None or any(p <= 0 for p in np.ravel(P)):
        raise UnsupportedError(f"MaxPool of a scaled-integer value needs a positive per-channel scale "
                               f"({S.describe()})", node.name)
    v = cv.add(node.name, "MaxPool", [x], attrs, out=out)
    cv.bind(out, v, out_perm, scaled=S.with_(P=P, B=B))


def avgpool(cv, node, e, x, S, attrs, out, out_perm) -> None:
    """``AveragePool``/``GlobalAveragePool`` of a scaled value as an exact integer window *sum* (a
    depthwise ``Conv`` with weights 1) and ``P / n`` in the map (``n`` elements per window): exact
    for any ``n``, where a fixed-point average truncates unless ``n`` is a power of two.  Padding
    (``count_include_pad=1``) holds the real 0: an IR ``Pad`` with its code first.

    Raises:
        UnsupportedError: naming the node for a pending ReLU, a map varying across positions, or
            padding whose real 0 is no single code."""
    if S.relu:
        materialize(cv, node, e)  # raises: the ReLU comes before the average
    shape = cv.b.values[x].shape
    P, B = channel(S.P, shape), channel(S.B, shape)
    if P is None or B is None:
        raise UnsupportedError(f"{node.op_type} of a scaled value whose scale/offset vary across positions", node.name)
    kernel, pads = tuple(attrs["kernel"]), tuple(attrs["pads"])
    nd = len(kernel)
    if any(pads):
        code = zero_code(cv, node, x, S, 0)
        x = cv.add(f"{node.name}__pad", "Pad", [x], {"pads": pads[:nd] + (0,) + pads[nd:] + (0,), "code": code},
                   out=f"{out}__padded")
    C = shape[-1]
    w = np.ones(kernel + (1, C), dtype=np.int64)
    v = cv.add(node.name, "Conv", [x], {"kernel": kernel, "strides": tuple(attrs["strides"]), "pads": (0,) * 2 * nd,
                                        "groups": C}, {"weight": int_const(w)}, out=out)
    n = int(np.prod(kernel))
    cv.bind(out, v, out_perm, scaled=S.with_(P=P / n, B=B))


def affine_const(cv, node, e, mul, add) -> None:
    """``x * mul + add`` (constants: scalars or IR channel vectors, exact Fractions) on a scaled
    value: folded into the map, no IR node."""
    S = e.scaled
    if S.relu:
        materialize(cv, node, e)  # raises: ReLU then an affine op is not a map of codes
    P, B = S.P, S.B
    if mul is not None:
        m = fractions_of(mul)
        P, B = P * m, B * m
    if add is not None:
        B = B + fractions_of(add)
    cv.bind(node.output[0], e.value, e.perm, e.rowperm, scaled=S.with_(P=P, B=B))


def binary(cv, node) -> bool:
    """``Add``/``Sub``/``Mul``/``Div`` where an input is a scaled value; False when none is (the
    caller then uses the plain importer).

    With a constant: folded into the map (``Div`` exactly, as a rational).  ``Add``/``Sub`` of two
    activations: codes are aligned per channel by the power-of-two ratio of their scales (an integer
    ``Affine``) and added; offsets add.

    Raises:
        UnsupportedError: naming the node for scales without a power-of-two ratio (both named), a
            ``Mul``/``Div`` of two activations, a constant of another shape, a division by 0.
    """
    op = node.op_type
    a, b = node.input[0], node.input[1]
    ins = [cv.env.get(t) for t in (a, b)]
    if not any(getattr(x, "scaled", None) is not None for x in ins):
        return False
    if cv.is_const(a) or cv.is_const(b):
        ea = ins[0] if ins[0] is not None else ins[1]
        cname = b if ins[0] is not None else a
        vec = cv.channel_vector(cv.consts[cname], ea)
        if vec is not None and vec.ndim and ea.rowperm is not None:
            vec = None  # per-element constants of a flattened tensor in the weights' row order: not mapped
        if vec is None:
            raise UnsupportedError(f"{op} with a constant of shape {np.shape(cv.consts[cname])} on a scaled value",
                                   node.name)
        c = fractions_of(vec)
        const_first = ins[0] is None
        if op == "Add":
            affine_const(cv, node, ea, None, c)
        elif op == "Sub":
            affine_const(cv, node, ea, -1 if const_first else None, c if const_first else -c)
        elif op == "Mul":
            affine_const(cv, node, ea, c, None)
        elif op == "Div" and not const_first and all(x != 0 for x in c.ravel()):
            affine_const(cv, node, ea, 1 / c, None)
        else:
            raise UnsupportedError(f"{op} of a constant and a scaled value (or by 0) is not supported", node.name)
        return True
    if op not in ("Add", "Sub"):
        raise UnsupportedError(f"{op} of two activations, one of them scaled-integer, is not supported", node.name)
    ea, eb = ins
    if ea.rowperm is not None or eb.rowperm is not None:
        raise UnsupportedError(f"{op} of a flattened scaled value feeding a MatMul/Gemm is not supported", node.name)
    Sa, Sb = scaled_of(cv, ea), scaled_of(cv, eb)
    if Sa is None or Sb is None or Sa.relu or Sb.relu:
        raise UnsupportedError(f"{op} of a scaled-integer value and a float (or pending ReLU) value", node.name)
    xb, Sb = relayout(cv, node, eb, ea.perm)
    shape = cv.b.values[ea.value].shape
    Pa, Pb = channel(Sa.P, shape), channel(Sb.P, shape)
    if Pa is None or Pb is None:
        raise UnsupportedError(f"{op}: scales vary across positions", node.name)
    C = shape[-1] if shape else 1
    pa, pb = np.broadcast_to(Pa, (C,)), np.broadcast_to(Pb, (C,))
    base, ma, mb = [], [], []
    for x, y in zip(pa, pb):
        if x == 0 or y == 0:
            raise UnsupportedError(f"{op} of a scaled value with a dead (scale 0) channel", node.name)
        p0 = min(abs(x), abs(y))
        rx, ry = x / p0, y / p0
        if rx.denominator != 1 or ry.denominator != 1 or is_pow2_frac(abs(rx)) is None \
                or is_pow2_frac(abs(ry)) is None:
            raise UnsupportedError(f"{op} of scaled values with scales {float(x):.6g} and {float(y):.6g}: their ratio "
                                   f"is not a power of two", node.name)
        base.append(p0)
        ma.append(int(rx))
        mb.append(int(ry) * (-1 if op == "Sub" else 1))

    def scaled_codes(v, m, tag):
        if all(k == 1 for k in m):
            return v
        s = m[0] if all(k == m[0] for k in m) else np.asarray(m)
        return cv.add(f"{node.name}__align_{tag}", "Affine", [v], {}, {"scale": int_const(s)},
                      out=f"{node.output[0]}__align_{tag}")

    va, vb = scaled_codes(ea.value, ma, "a"), scaled_codes(xb, mb, "b")
    v = cv.add(node.name, "Add", [va, vb], out=node.output[0])
    Bsum = Sa.B + (-Sb.B if op == "Sub" else Sb.B)
    cv.bind(node.output[0], v, ea.perm, scaled=Scaled(np.array(base, dtype=object), compact(Bsum, shape)))
    return True


def batchnorm(cv, node, e, g, h) -> None:
    """``BatchNormalization`` (eval) on a scaled value: ``P * g``, ``B * g + h`` with ``g``, ``h``
    the float64 ``gamma / sqrt(var + eps)`` and ``beta - mean * g`` taken as exact rationals."""
    rank = len(e.perm)
    shp = (len(g),) + (1,) * (rank - 1)
    if e.rowperm is not None:
        raise UnsupportedError("BatchNormalization of a flattened scaled value feeding a MatMul/Gemm", node.name)
    gv, hv = cv.channel_vector(np.reshape(g, shp), e), cv.channel_vector(np.reshape(h, shp), e)
    affine_const(cv, node, e, gv, None)
    e2 = cv.env[node.output[0]]
    affine_const(cv, node, e2, None, hv)


# ---------------------------------------------------------------------- graph outputs
def output(cv, o: str, e, layout, what: str | None = None) -> str:
    """The float32 epilogue of scaled graph output ``o`` in IR layout ``layout`` (also the float32
    input of a float op reading a scaled value, e.g. a ``Softmax`` on the logits: then ``o`` names
    the new values and ``what`` says what they are in messages, default "graph output 'o'").

    When ``B / P`` is a dyadic constant per channel (a ``Quant`` output: ``B / P = -z``), first an
    exact fixed-point ``Affine`` adds it (``q - z``), then a float32 ``Affine`` multiplies by
    ``float32(P)``: ``float32((q - z) * s)``, one rounding of the exact real, exactly qonnx's
    dequantization of a ``Quant`` output.  Otherwise one float32 ``Affine`` (``scale = float32(P)``,
    ``bias = float32(B)``; e.g. logits of a float-bias Linear): the float32 evaluation of the exact
    map, which the source's own float32 sums may round differently (noted).  A pending ReLU becomes
    a float ``Relu`` after it.

    Raises:
        UnsupportedError: a map varying across positions."""
    import onnx
    fake = onnx.helper.make_node("Identity", [o], [o], name=o)
    x, S = relayout(cv, fake, e, layout)
    shape = cv.b.values[x].shape
    P, B = channel(S.P, shape), channel(S.B, shape)
    if P is None or B is None:
        raise UnsupportedError(f"{what or f'graph output {o!r}'}: scale/offset vary across positions", o)
    Pf = np.asarray([float(p) for p in np.ravel(P)], dtype=np.float32).reshape(P.shape)
    t = cv.b.values[x].dtype
    C = (shape[-1],) if shape else (1,)
    shift = [b / p if p != 0 else None for p, b in zip(np.broadcast_to(P, C), np.broadcast_to(B, C))]
    dyadic = all(v is not None and v.denominator & (v.denominator - 1) == 0 for v in shift)
    params = {"scale": Const(Pf, FLOAT32)}
    if any(b != 0 for b in np.ravel(B)) and dyadic:
        off = np.asarray([float(v) for v in shift]) if len(set(shift)) > 1 else np.asarray(float(shift[0]))
        x = cv.add(f"{o}__zero_point", "Affine", [x], {}, {"bias": Const.from_real(off)}, out=f"{o}__zero_point")
        t = cv.b.values[x].dtype
    elif any(b != 0 for b in np.ravel(B)):
        params["bias"] = Const(np.asarray([float(b) for b in np.ravel(B)], dtype=np.float32).reshape(B.shape), FLOAT32)
    exact = "bias" not in params and all(Fraction(float(pf)) == p for pf, p in zip(np.ravel(Pf), np.ravel(P))) \
        and isinstance(t, FixedType) and max(abs(t.min_code), abs(t.max_code)) < (1 << 24)
    v = cv.add(f"{o}__dequant", "Affine", [x], {}, params, out=f"{o}__dequant")
    if S.relu:
        v = cv.add(f"{o}__relu", "Relu", [v], out=f"{o}__relu")
    if not exact:
        note(cv, f"{what or f'graph output {o!r}'} is float32 computed from the exact integer accumulator ({S.describe()}); the "
                 f"source computes it in float32 as well, so it may differ in the last bits")
    return v


def pad(cv, node, e, handler) -> None:
    """ONNX ``Pad`` (constant) of a scaled value: the plain ``Pad`` importer ``handler`` on the codes,
    padding with the code whose real is the constant (:func:`~.onnx_scaled.zero_code`: ``z`` for the
    real 0 after a zero-point ``Quant``), the map kept.

    Raises:
        UnsupportedError: naming the node when that is no single in-range code, for a pending ReLU, or
            a map varying across positions."""
    S = e.scaled
    shape = cv.b.values[e.value].shape
    P, B = channel(S.P, shape), channel(S.B, shape)
    value = 0.0
    if cv.opset < 11:
        value = float(cv.attr(node, "value", 0.0))
    elif len(node.input) > 2 and node.input[2]:
        value = float(np.asarray(cv.const(node, node.input[2])).ravel()[0])
    if S.relu or P is None or B is None:
        raise UnsupportedError(f"Pad of a scaled-integer value ({S.describe()}) with a pending ReLU or a map varying "
                               f"across positions", node.name)
    code = zero_code(cv, node, e.value, S, value)
    t = cv.b.values[e.value].dtype
    r0 = float(np.ldexp(float(code), -t.frac_bits))  # the IR real of that code: the plain importer pads with it
    import onnx
    n2 = onnx.NodeProto()
    n2.CopyFrom(node)
    if cv.opset < 11:
        for a in n2.attribute:
            if a.name == "value":
                a.f = r0
        if not any(a.name == "value" for a in n2.attribute):
            n2.attribute.append(onnx.helper.make_attribute("value", r0))
    else:
        cname = f"{node.name}__pad_code"
        cv.consts[cname] = np.asarray(r0, dtype=np.float64)
        while len(n2.input) < 3:
            n2.input.append("")
        n2.input[2] = cname
    inp = node.input[0]
    saved = cv.env[inp]
    cv.env[inp] = type(saved)(saved.value, saved.perm, saved.rowperm)  # the codes, as a plain value
    try:
        handler(cv, n2)
    finally:
        cv.env[inp] = saved
    cv.env[node.output[0]].scaled = S.with_(P=P, B=B)
