"""Scaled-integer values in the ONNX/QONNX converter: QONNX ``Quant`` with any scale and zero point.

A QONNX ``Quant`` whose scale is not one power of two (per tensor or per channel) or whose zero point
is not 0 has no fixed-point type.  Its integer codes do: the IR value carries integer codes ``c``
and the converter's :class:`~.onnx_convert.Entry` a *pending exact affine map* (:class:`Scaled`)
``real = r * P + B`` of the IR value ``r`` (its codes times ``2**-F``; ``r = c`` for integer codes) with ``P``, ``B`` exact rationals (:class:`fractions.Fraction` of the float32
constants), per element of the IR value (stored compactly: a scalar, a channel vector along the IR's
last axis, or the full per-sample array).  The real-number semantics of QONNX ``Quant``
(``y = clamp(round(x / s + z))``, dequantized ``(y - z) * s``: qonnx ``IntQuant``,
``qonnx.custom_op.general.intquant``) are kept exactly:

* a ``Quant`` becomes a ``MultiThreshold`` on the codes before it (:mod:`qdeploy.compiler.ir.requant`),
  whose output codes are ``y - z`` (so the code 0 is the real 0, also for zero padding) with the
  pending map ``P = s``, ``B = 0``;
* ``MatMul``/``Gemm``/``Conv`` with ``Quant``'ed weights (integer codes ``W``, per-output-channel scale
  ``s_w``) are integer layers: ``acc = sum W * c`` and ``P' = P * s_w``, ``B' = s_w * (W^T B) + bias``;
* ``BatchNormalization``, ``Add``/``Sub``/``Mul``/``Div`` by a constant fold into ``P``, ``B``; ``Relu``
  right before a ``Quant`` folds into its thresholds; ``MaxPool`` (``P > 0``), ``Reshape``, ``Flatten``,
  ``Transpose`` move the map along; an ``Add`` of two scaled values aligns power-of-two scale ratios;
* a graph output gets a float32 ``Affine`` epilogue: ``float32(c * s)``, the dequantized ``Quant``
  output as qonnx computes it (one rounding), or ``float32(c * P) + B`` after a float bias (not
  bit-exact: the source sums in float32 too; noted).

Anything else on a scaled value is refused naming the node (:meth:`OnnxConverter.entry` calls
:func:`materialize`).  Source of the thresholding idea: Umuroglu & Jahre, "Streamlined Deployment
for Quantized Neural Networks", arXiv 1709.04060, section 3.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

from ..errors import UnsupportedError
from ..ir.graph import Const
from ..ir.requant import QuantSpec, float_input_thresholds, frac, multithreshold_params
from ..ir.types import FLOAT32, FixedType, fixed_for_range


class Scaled:
    """A pending exact affine map ``real = r * P + B`` of an IR value r (its codes times 2**-F).

    Attributes:
        P, B: object ndarrays of :class:`Fraction`, shape ``()``, ``(C,)`` (the IR's last axis) or the
            value's per-sample IR shape.
        relu: a ReLU applied after the map (only a ``Quant`` or a graph output may read it).
    """

    __slots__ = ("P", "B", "relu")

    def __init__(self, P, B, relu: bool = False):
        self.P, self.B, self.relu = _fr(P), _fr(B), bool(relu)

    def with_(self, **kw) -> "Scaled":
        d = {"P": self.P, "B": self.B, "relu": self.relu}
        d.update(kw)
        return Scaled(**d)

    def describe(self) -> str:
        def one(a):
            v = sorted({float(x) for x in a.ravel()})
            return f"{v[0]:.6g}" if len(v) == 1 else f"{v[0]:.6g}..{v[-1]:.6g} ({len(v)} values)"
        return f"scale {one(self.P)}, offset {one(self.B)}"


def _fr(a) -> np.ndarray:
    arr = np.asarray(a, dtype=object)
    out = np.empty(arr.shape, dtype=object)
    for i, v in np.ndenumerate(arr):
        out[i] = frac(v)
    return out


def compact(a: np.ndarray, shape) -> np.ndarray:
    """``a`` (broadcastable to ``shape``) as a scalar, a last-axis vector or the full array."""
    full = np.broadcast_to(a, tuple(shape)) if tuple(shape) else a.reshape(())
    flat = full.ravel()
    if flat.size == 0 or all(x == flat[0] for x in flat):
        return np.array(flat[0] if flat.size else Fraction(0), dtype=object).reshape(())
    rows = full.reshape(-1, full.shape[-1])
    if all((rows[i] == rows[0]).all() for i in range(1, rows.shape[0])):
        return rows[0].copy()
    return full.copy()


def channel(a: np.ndarray, shape):
    """``a`` as a channel vector ``[C]`` (``C`` = last axis of ``shape``) or a scalar; None when it
    varies along another axis."""
    c = compact(a, shape)
    return c if c.ndim <= 1 else None


def _inv(p):
    inv = [0] * len(p)
    for i, a in enumerate(p):
        inv[a] = i
    return tuple(inv)


def is_pow2_frac(f: Fraction) -> int | None:
    """``e`` with ``f == 2**e`` (f > 0), else None."""
    if f <= 0:
        return None
    n, d = f.numerator, f.denominator
    if n & (n - 1) or d & (d - 1):
        return None
    return (n.bit_length() - 1) - (d.bit_length() - 1)


def int_const(codes) -> Const:
    """An integer constant of the narrowest exact type."""
    c = np.asarray(codes, dtype=np.int64)
    return Const(c, fixed_for_range(int(c.min(initial=0)), int(c.max(initial=0)), 0))


def _note(cv, text: str) -> None:
    cv.b.meta.setdefault("notes", []).append(text)


# ---------------------------------------------------------------------- entries
def scaled_of(cv, e) -> Scaled | None:
    """The map of entry ``e``: its pending one, the identity for a plain fixed-point value, or None
    for a float value."""
    if getattr(e, "scaled", None) is not None:
        return e.scaled
    return Scaled(1, 0) if isinstance(cv.dtype(e), FixedType) else None


def relayout(cv, node, e, q):
    """``(IR value, Scaled)`` of scaled entry ``e`` in layout ``q`` (the map follows the Transpose)."""
    v = cv.layout(node, e, q)
    S = scaled_of(cv, e)
    if v == e.value or S is None:
        return v, S
    r = tuple(_inv(e.perm)[a] for a in tuple(q))
    shape = cv.b.values[e.value].shape
    moved = [compact(np.broadcast_to(a, shape).transpose(r), cv.b.values[v].shape) if a.ndim else a
             for a in (S.P, S.B)]
    return v, S.with_(P=moved[0], B=moved[1])


def reshaped(S: Scaled | None, in_shape, out_shape) -> Scaled | None:
    """The map of a value reshaped (row-major, IR order) from ``in_shape`` to ``out_shape``."""
    if S is None:
        return None
    out = [compact(np.broadcast_to(a, tuple(in_shape)).reshape(tuple(out_shape)), out_shape) if a.ndim else a
           for a in (S.P, S.B)]
    return S.with_(P=out[0], B=out[1])


def materialize(cv, node, e):
    """The plain (fixed-point) form of scaled entry ``e`` for a consumer that reads only plain
    values: a scalar ``P = 2**k`` with ``B == 0`` is a fixed-point value (an exact power-of-two
    ``Affine`` when ``k != 0``).

    Raises:
        UnsupportedError: naming ``node`` for any other map (non-power-of-two or per-channel scale,
            zero point or bias, a pending ReLU).
    """
    S = e.scaled
    shape = cv.b.values[e.value].shape
    P, B = compact(S.P, shape), compact(S.B, shape)
    ex = is_pow2_frac(P.item()) if P.ndim == 0 else None
    if S.relu or ex is None or any(b != 0 for b in B.ravel()):
        why = "a ReLU that is not followed by a Quant" if S.relu else S.describe()
        raise UnsupportedError(f"{node.op_type} on a scaled-integer value ({why}) is not supported: only "
                               f"Quant, MatMul/Gemm/Conv with Quant'ed weights, BatchNormalization, Relu, MaxPool, "
                               f"Add/Sub/Mul/Div by a constant and shape ops read it", node.name)
    if ex == 0:
        return type(e)(e.value, e.perm, e.rowperm)
    key = (e.value, "plain", ex)
    if key not in cv._layout_cache:
        cv._layout_cache[key] = cv.add(f"{node.name}__rescale", "Affine", [e.value], {},
                                       {"scale": Const.from_real(2.0 ** ex)}, out=f"{e.value}__plain")
    return type(e)(cv._layout_cache[key], e.perm, e.rowperm)


# ---------------------------------------------------------------------- constants
def quant_codes(x, scale, zp, bw, signed: bool, narrow: bool, mode: str):
    """Integer codes ``y - z`` of a constant ``Quant`` exactly as qonnx's ``int_quant`` computes ``y``
    (float32 ``x / scale + zp``, clamp, round), and the scale broadcast to their shape (float64);
    None when the zero point is not an integer."""
    from qonnx.custom_op.general.intquant import max_int, min_int, resolve_rounding_mode
    x, scale, zp = np.asarray(x), np.asarray(scale), np.asarray(zp)
    if np.any(zp != np.round(zp)):
        return None
    y = x / scale + zp
    b = int(np.ravel(bw)[0])
    if b == 1 and signed:
        y = np.where(y >= 0.0, 1.0, -1.0)
    else:
        y = np.clip(y, min_int(signed, narrow, b), max_int(signed, narrow, b))
        y = resolve_rounding_mode(str(mode))(y)
    codes = (np.asarray(y, np.float64) - np.asarray(zp, np.float64)).astype(np.int64)
    return codes, np.broadcast_to(np.asarray(scale, np.float64), codes.shape).copy()


def weight_codes(cv, node, t: str, out_axis: int, perm=None):
    """``(codes, s_w)`` of Quant'ed weight constant ``t``: integer codes (axes reordered by ``perm``)
    and the per-output-channel scales ``[O]`` (Fractions) along ``out_axis`` of the *original* tensor.

    Raises:
        UnsupportedError: naming ``node`` when ``t`` does not come from a Quant with an integer zero
            point, or when its scale varies along another axis than the output channel.
    """
    qc = cv.qcodes.get(t)
    if qc is None:
        raise UnsupportedError(f"{node.op_type} weight {t!r} is not produced by a Quant (float weights on a "
                               f"scaled-integer input have no exact integer form)", node.name)
    codes, scale = qc
    s = np.moveaxis(scale, out_axis, 0).reshape(scale.shape[out_axis], -1)
    if not np.all(s == s[:, :1]):
        raise UnsupportedError(f"{node.op_type} weight {t!r}: the Quant scale varies along an input axis (only "
                               f"per-tensor or per-output-channel scales)", node.name)
    if perm is not None:
        codes = codes.transpose(perm)
    return codes, [Fraction(float(v)) for v in s[:, 0]]


def bias_fractions(cv, t: str | None, n: int, node, factor=Fraction(1)):
    """A bias constant as ``n`` exact Fractions: ``codes * scale`` from its Quant, else the float32
    values (an exact dyadic rational each), times ``factor``; None when ``t`` is None."""
    if t is None:
        return None
    qc = cv.qcodes.get(t)
    if qc is not None:
        vals = [Fraction(int(c)) * Fraction(float(s)) for c, s in zip(qc[0].ravel(), qc[1].ravel())]
    else:
        vals = [Fraction(float(v)) for v in np.asarray(cv.const(node, t), np.float32).ravel()]
    if len(vals) == 1:
        vals = vals * n
    if len(vals) != n:
        raise UnsupportedError(f"{node.op_type} bias {t!r} has {len(vals)} values for {n} output channels", node.name)
    return [v * factor for v in vals]


# ---------------------------------------------------------------------- Quant -> MultiThreshold
def _quant_spec(cv, node, e, scale, zp, bw, signed, narrow, mode):
    if bw.size != 1 or float(bw.ravel()[0]) != int(bw.ravel()[0]):
        raise UnsupportedError(f"Quant bit width {bw.ravel().tolist()} is not one integer", node.name)
    if np.any(zp != np.round(zp)):
        raise UnsupportedError(f"Quant zero point {zp.ravel()[:4].tolist()} is not an integer (no integer code for "
                               f"the real 0)", node.name)
    sv, zv = cv.channel_vector(scale, e), cv.channel_vector(zp, e)
    if sv is None or zv is None:
        raise UnsupportedError(f"Quant scale {scale.shape} / zero point {zp.shape} vary along a non-channel axis",
                               node.name)
    if e.rowperm is not None and (sv.ndim or zv.ndim):
        raise UnsupportedError("per-channel Quant of a flattened tensor feeding a MatMul/Gemm is not supported",
                               node.name)
    q = QuantSpec(tuple(Fraction(float(s)) for s in np.ravel(sv)), tuple(int(z) for z in np.ravel(zv)),
                  int(bw.ravel()[0]), signed, narrow, mode.upper())
    return q, sv


def import_quant(cv, node, e, scale, zp, bw, signed: bool, narrow: bool, mode: str) -> None:
    """A QONNX ``Quant`` with any scale/zero point (or on a scaled value) as a ``MultiThreshold``.

    On a fixed-point or scaled input the thresholds are accumulator codes
    (:func:`~qdeploy.compiler.ir.requant.multithreshold_params`); on a float32 input the value is cast
    first into a fixed-point grid fine enough for every float32 threshold
    (:func:`~qdeploy.compiler.ir.requant.float_input_thresholds`).  The output codes are ``y - z``: a
    plain fixed-point type when the scale is one power of two ``2**-F`` and ``z == 0``, else a scaled
    value ``P = s``.

    Raises:
        UnsupportedError: naming the node for a non-integer zero point, a scale varying along a
            non-channel axis, a map varying across positions, too wide a grid or quantizer.
    """
    quant, sv = _quant_spec(cv, node, e, scale, zp, bw, signed, narrow, mode)
    out = node.output[0]
    shape = cv.b.values[e.value].shape
    C = shape[-1] if shape else 1
    ex = is_pow2_frac(Fraction(float(sv))) if sv.ndim == 0 else None
    plain = ex is not None and all(z == 0 for z in quant.zero_point)
    xt = cv.dtype(e)
    try:
        if isinstance(xt, FixedType):
            S = scaled_of(cv, e)
            P, B = channel(S.P, shape), channel(S.B, shape)
            if P is None or B is None:
                raise UnsupportedError(f"Quant of a value whose scale/offset vary across positions ({S.describe()})",
                                       node.name)
            per = C if (P.ndim or B.ndim or len(quant.scale) > 1 or len(quant.zero_point) > 1) else 1
            lsb = Fraction(1, 1 << xt.frac_bits) if xt.frac_bits >= 0 else Fraction(1 << -xt.frac_bits)
            p = multithreshold_params(xt.min_code, xt.max_code, [p * lsb for p in np.broadcast_to(P, (per,))],
                                      list(np.broadcast_to(B, (per,))), quant, S.relu, xt.frac_bits,
                                      -ex if plain else 0)
            x = e.value
        else:
            per = C if (len(quant.scale) > 1 or len(quant.zero_point) > 1) else 1
            grid, p = float_input_thresholds(quant, per)
            x = cv.add(f"{node.name}__grid", "Quantize", [e.value], {"to": grid}, out=f"{out}__grid")
    except UnsupportedError as err:
        raise UnsupportedError(str(err).split(" (node ")[0], node.name) from None
    params = {"thresholds": Const(p.thresholds, p.threshold_type), "base": int_const(p.base),
              "sign": int_const(p.sign)}
    v = cv.add(node.name, "MultiThreshold", [x], {"to": p.out_type}, params, out=out)
    if p.dead:
        _note(cv, f"{node.name}: channel(s) {list(p.dead)[:8]} have scale 0 before this Quant: constant outputs")
    cv.bind(out, v, e.perm, e.rowperm, scaled=None if plain else Scaled(sv, 0))


# ---------------------------------------------------------------------- linear layers
def wants_linear(cv, e, wname: str) -> bool:
    """True when a MatMul/Gemm/Conv must take the scaled-integer path: its input is scaled, or its
    weights come from a Quant that is not one power-of-two scale per tensor (on an integer input)."""
    if getattr(e, "scaled", None) is not None:
        return True
    if not isinstance(cv.dtype(e), FixedType) or wname not in cv.qcodes:
        return False
    s = np.unique(cv.qcodes[wname][1])
    return not (s.size == 1 and is_pow2_frac(Fraction(float(s[0]))) is not None)


def _common_factor(P, node):
    """``(ratio ints [K], P0)`` with ``P[k] == ratio[k] * P0`` and every ratio 0 or +-2**e."""
    nz = [p for p in P if p != 0]
    if not nz:
        return [0] * len(P), Fraction(1)
    p0 = min(abs(p) for p in nz)
    ratio = []
    for p in P:
        r = p / p0
        if r != 0 and (r.denominator != 1 or is_pow2_frac(abs(r)) is None):
            raise UnsupportedError(f"{node.op_type} input channels have scales {float(p0):.6g} and {float(p):.6g} "
                                   f"whose ratio is not a power of two: no common integer accumulator", node.name)
        ratio.append(int(r))
    return ratio, p0


def _input(cv, node, e, rank_layout):
    S = scaled_of(cv, e)
    if S is None:
        raise UnsupportedError(f"{node.op_type}: a float input with Quant'ed non-power-of-two weights", node.name)
    if S.relu:
        return materialize(cv, node, e)  # raises
    if e.rowperm is not None:
        return e.value, S
    return relayout(cv, node, e, rank_layout)


def dense(cv, node, e, codes, s_w, bias, out: str, alpha=Fraction(1)) -> None:
    """Integer ``Dense``: ``acc[n] = sum_k W[k, n] * c[k]``; ``P' = alpha * P0 * s_w[n]``,
    ``B' = alpha * s_w[n] * sum_k W[k, n] * B[k] + bias[n]`` (``P[k] = ratio[k] * P0`` is folded
    into the weights).  ``codes``: ``[K, N]`` weight codes; ``s_w``, ``bias``: ``N`` Fractions.

    Raises:
        UnsupportedError: float input, input scales without power-of-two ratios, a map varying
            across positions.
    """
    rank = len(e.perm)
    x, S = _input(cv, node, e, tuple(range(rank)))
    if e.rowperm is not None:
        codes = codes[e.rowperm]
    shape = cv.b.values[x].shape
    P, B = channel(S.P, shape), channel(S.B, shape)
    if P is None or B is None:
        raise UnsupportedError(f"{node.op_type} input scale/offset vary across positions", node.name)
    K, N = codes.shape
    ratio, p0 = _common_factor(list(np.broadcast_to(P, (K,))), node)
    Bk = list(np.broadcast_to(B, (K,)))
    W = codes.astype(np.int64) * np.asarray(ratio, dtype=np.int64)[:, None]
    Pout, Bout = [], []
    for n in range(N):
        off = sum((int(codes[k, n]) * Bk[k] for k in range(K) if Bk[k] != 0), Fraction(0))
        Pout.append(alpha * p0 * s_w[n])
        Bout.append(alpha * s_w[n] * off + (bias[n] if bias is not None else 0))
    v = cv.add(node.name, "Dense", [x], {}, {"weight": int_const(W)}, out=out)
    cv.bind(out, v, tuple(range(len(cv.b.values[v].shape))), scaled=Scaled(np.array(Pout, dtype=object),
                                                                          np.array(Bout, dtype=object)))


def conv(cv, node, e, x_layout, codes, s_w, bias, attrs: dict, out: str, out_perm) -> None:
    """Integer ``Conv`` (channels-last weight codes ``[*k, I/g, O]``), as :func:`dense` per output
    channel.  Zero padding holds the code 0, the real ``B[i]``: refused unless ``B == 0``.

    Raises:
        UnsupportedError: as :func:`dense`, and for padding of a value with an offset.
    """
    x, S = _input(cv, node, e, x_layout)
    shape = cv.b.values[x].shape
    P, B = channel(S.P, shape), channel(S.B, shape)
    if P is None or B is None:
        raise UnsupportedError(f"{node.op_type} input scale/offset vary across positions", node.name)
    cin, O, g = shape[-1], codes.shape[-1], int(attrs["groups"])
    Pi, Bi = list(np.broadcast_to(P, (cin,))), list(np.broadcast_to(B, (cin,)))
    if any(attrs["pads"]) and any(b != 0 for b in Bi):
        raise UnsupportedError(f"{node.op_type} pads a value with an offset ({S.describe()}): the padding code 0 "
                               f"would not be the real 0", node.name)
    ratio, p0 = _common_factor(Pi, node)
    il = codes.shape[-2]
    in_ch = (np.arange(O)[None, :] // (O // g)) * il + np.arange(il)[:, None]  # [I/g, O]
    W = codes.astype(np.int64) * np.asarray(ratio, dtype=np.int64)[in_ch]
    flat = codes.reshape(-1, il, O)
    Pout, Bout = [], []
    for o in range(O):
        off = Fraction(0)
        for i in range(il):
            bi = Bi[int(in_ch[i, o])]
            if bi != 0:
                off += int(flat[:, i, o].sum()) * bi
        Pout.append(p0 * s_w[o])
        Bout.append(s_w[o] * off + (bias[o] if bias is not None else 0))
    v = cv.add(node.name, "Conv", [x], attrs, {"weight": int_const(W)}, out=out)
    cv.bind(out, v, out_perm, scaled=Scaled(np.array(Pout, dtype=object), np.array(Bout, dtype=object)))


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


def affine_const(cv, node, e, mul, add) -> None:
    """``x * mul + add`` (constants: scalars or IR channel vectors, exact Fractions) on a scaled
    value: folded into the map, no IR node."""
    S = e.scaled
    if S.relu:
        materialize(cv, node, e)  # raises: ReLU then an affine op is not a map of codes
    P, B = S.P, S.B
    if mul is not None:
        m = _fr(mul)
        P, B = P * m, B * m
    if add is not None:
        B = B + _fr(add)
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
        if vec is None:
            raise UnsupportedError(f"{op} with a constant of shape {np.shape(cv.consts[cname])} on a scaled value",
                                   node.name)
        c = _fr(vec)
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
    Sa, Sb = scaled_of(cv, ea), scaled_of(cv, eb)
    if Sa is None or Sb is None or Sa.relu or Sb.relu:
        raise UnsupportedError(f"{op} of a scaled-integer value and a float (or pending ReLU) value", node.name)
    xb, Sb = relayout(cv, node, eb, ea.perm) if eb.rowperm is None else (eb.value, Sb)
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
    gv, hv = cv.channel_vector(np.reshape(g, shp), e), cv.channel_vector(np.reshape(h, shp), e)
    affine_const(cv, node, e, gv, None)
    e2 = cv.env[node.output[0]]
    affine_const(cv, node, e2, None, hv)


# ---------------------------------------------------------------------- graph outputs
def output(cv, o: str, e, layout) -> str:
    """The float32 epilogue of scaled graph output ``o`` in IR layout ``layout``: ``Affine`` with
    ``scale = float32(P)`` (and ``bias = float32(B)``), then ``Relu`` for a pending ReLU.

    ``float32(c * s)`` is exactly qonnx's dequantization ``(y - z) * s`` of a ``Quant`` output (one
    float32 rounding of the exact real); with a bias (e.g. logits of a float-bias Linear) or a
    scale that is not a float32 the output is the float32 evaluation of the exact map (the source's
    own float32 sum may round differently): noted.

    Raises:
        UnsupportedError: a map varying across positions."""
    import onnx
    fake = onnx.helper.make_node("Identity", [o], [o], name=o)
    x, S = relayout(cv, fake, e, layout)
    shape = cv.b.values[x].shape
    P, B = channel(S.P, shape), channel(S.B, shape)
    if P is None or B is None:
        raise UnsupportedError(f"graph output {o!r}: scale/offset vary across positions", o)
    Pf = np.asarray([float(p) for p in np.ravel(P)], dtype=np.float32).reshape(P.shape)
    Bf = np.asarray([float(b) for b in np.ravel(B)], dtype=np.float32).reshape(B.shape)
    params = {"scale": Const(Pf, FLOAT32)}
    has_bias = any(b != 0 for b in np.ravel(B))
    if has_bias:
        params["bias"] = Const(Bf, FLOAT32)
    t = cv.b.values[x].dtype
    exact = not has_bias and all(Fraction(float(pf)) == p for pf, p in zip(np.ravel(Pf), np.ravel(P))) \
        and max(abs(t.min_code), abs(t.max_code)) < (1 << 24)
    v = cv.add(f"{o}__dequant", "Affine", [x], {}, params, out=f"{o}__dequant")
    if S.relu:
        v = cv.add(f"{o}__relu", "Relu", [v], out=f"{o}__relu")
    if not exact:
        _note(cv, f"graph output {o!r} is float32 computed from the exact integer accumulator ({S.describe()}); the "
                  f"source computes it in float32 as well, so it may differ in the last bits")
    return v
