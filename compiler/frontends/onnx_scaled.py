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
  whose output codes are ``y`` itself (e.g. ``uint8``) with the pending map ``P = s``, ``B = -z * s``
  (the zero point is folded into the next layer's offset, Jacob et al., CVPR 2018, section 2.3;
  zero padding of such a value pads with the code ``z``, an explicit IR ``Pad``);
* ``MatMul``/``Gemm``/``Conv`` with ``Quant``'ed weights (integer codes ``W``, per-output-channel scale
  ``s_w``) are integer layers: ``acc = sum W * c`` and ``P' = P * s_w``, ``B' = s_w * (W^T B) + bias``;
* ``BatchNormalization``, ``Add``/``Sub``/``Mul``/``Div`` by a constant fold into ``P``, ``B`` (a BN on a
  plain fixed-point value that a ``Quant`` reads, directly or through a ``Relu``, too: identity map first); ``Relu``
  right before a ``Quant`` folds into its thresholds; ``MaxPool`` (``P > 0``), ``Reshape``, ``Flatten``,
  ``Transpose`` move the map along; an ``Add`` of two scaled values aligns power-of-two scale ratios;
* a graph output gets a float32 epilogue: ``float32((y - z) * s)`` (an exact ``Affine`` adding ``-z``,
  then a float32 one), the dequantized ``Quant`` output as qonnx computes it (one rounding), or
  ``float32(c * P) + B`` after a float bias (not bit-exact: the source sums in float32 too; noted).

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
from ..ir.types import FixedType, fixed_for_range


class Scaled:
    """A pending exact affine map ``real = r * P + B`` of an IR value r (its codes times 2**-F).

    Attributes:
        P, B: object ndarrays of :class:`Fraction`, shape ``()``, ``(C,)`` (the IR's last axis) or the
            value's per-sample IR shape.
        relu: a ReLU applied after the map (only a ``Quant`` or a graph output may read it).
    """

    __slots__ = ("P", "B", "relu")

    def __init__(self, P, B, relu: bool = False):
        self.P, self.B, self.relu = fractions_of(P), fractions_of(B), bool(relu)

    def with_(self, **kw) -> "Scaled":
        d = {"P": self.P, "B": self.B, "relu": self.relu}
        d.update(kw)
        return Scaled(**d)

    def describe(self) -> str:
        def one(a):
            v = sorted({float(x) for x in a.ravel()})
            return f"{v[0]:.6g}" if len(v) == 1 else f"{v[0]:.6g}..{v[-1]:.6g} ({len(v)} values)"
        return f"scale {one(self.P)}, offset {one(self.B)}"


def fractions_of(a) -> np.ndarray:
    """``a`` (scalar or array of floats, ints or Fractions) as an object array of exact Fractions."""
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


def note(cv, text: str) -> None:
    """Add a converter note (the compile report's notes)."""
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
    return q, sv, zv


def import_quant(cv, node, e, scale, zp, bw, signed: bool, narrow: bool, mode: str) -> None:
    """A QONNX ``Quant`` with any scale/zero point (or on a scaled value) as a ``MultiThreshold``.

    On a fixed-point or scaled input the thresholds are accumulator codes
    (:func:`~qdeploy.compiler.ir.requant.multithreshold_params`); on a float32 input the value is cast
    first into a fixed-point grid fine enough for every float32 threshold
    (:func:`~qdeploy.compiler.ir.requant.float_input_thresholds`).  The output codes are ``y``: a
    plain fixed-point type when the scale is one power of two ``2**-F`` and ``z == 0``, else a scaled
    value ``P = s``, ``B = -z * s``.

    Raises:
        UnsupportedError: naming the node for a non-integer zero point, a scale varying along a
            non-channel axis, a map varying across positions, too wide a grid or quantizer.
    """
    quant, sv, zv = _quant_spec(cv, node, e, scale, zp, bw, signed, narrow, mode)
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
        note(cv, f"{node.name}: channel(s) {list(p.dead)[:8]} have scale 0 before this Quant: constant outputs")
    cv.bind(out, v, e.perm, e.rowperm,
            scaled=None if plain else Scaled(fractions_of(sv), -fractions_of(zv) * fractions_of(sv)))


def zero_code(cv, node, x: str, S: Scaled, value=0) -> int:
    """The code of IR value ``x`` whose real is ``value`` under map ``S`` (``code * 2**-F * P + B``):
    one integer for every channel, inside the type's range (a zero point ``z``: the code ``z``).

    Raises:
        UnsupportedError: naming ``node`` when the channels disagree, the code is not an integer or
            outside the type.
    """
    t = cv.b.values[x].dtype
    shape = cv.b.values[x].shape
    P, B = channel(S.P, shape), channel(S.B, shape)
    lsb = Fraction(1, 1 << t.frac_bits) if t.frac_bits >= 0 else Fraction(1 << -t.frac_bits)
    codes = {(frac(value) - b) / (p * lsb) if p != 0 else None for p, b in
             zip(np.broadcast_to(P, shape[-1:] or (1,)), np.broadcast_to(B, shape[-1:] or (1,)))}
    c = codes.pop() if len(codes) == 1 else None
    if c is None or c.denominator != 1 or not t.min_code <= c <= t.max_code:
        raise UnsupportedError(f"{node.op_type} pads a scaled-integer value ({S.describe()}) whose real {float(value):g} "
                               f"is not one code of {t} in every channel", node.name)
    return int(c)


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
    channel.  Zero padding must hold the real 0: with an offset ``B`` (a zero point) the input is
    first padded explicitly with the code of the real 0 (an IR ``Pad``, see :func:`zero_code`) and
    the convolution runs unpadded.

    Raises:
        UnsupportedError: as :func:`dense`, and for padding of a value whose real 0 is no single code.
    """
    x, S = _input(cv, node, e, x_layout)
    shape = cv.b.values[x].shape
    P, B = channel(S.P, shape), channel(S.B, shape)
    if P is None or B is None:
        raise UnsupportedError(f"{node.op_type} input scale/offset vary across positions", node.name)
    cin, O, g = shape[-1], codes.shape[-1], int(attrs["groups"])
    Pi, Bi = list(np.broadcast_to(P, (cin,))), list(np.broadcast_to(B, (cin,)))
    if any(attrs["pads"]) and any(b != 0 for b in Bi):
        code = zero_code(cv, node, x, S, 0)
        nd = len(attrs["kernel"])
        p = tuple(attrs["pads"])
        x = cv.add(f"{node.name}__pad", "Pad", [x], {"pads": p[:nd] + (0,) + p[nd:] + (0,), "code": code},
                   out=f"{out}__padded")
        attrs = dict(attrs, pads=(0,) * len(p))
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
