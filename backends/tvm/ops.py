"""The TVM op table: one Relax lowering per IR op (:data:`LOWERING`).

Each entry is ``f(lw, n, ins, in_types, out_t) -> relax.Expr`` where ``lw`` is the
:class:`~.lower.RelaxLowering` building the function (``lw.emit`` adds a binding; its helpers
``lshift``, ``requantize``, ``quantize_real``, ``real``, ``bcast_rank``, ``conv``,
``window_sum``, ``avg_div`` are exact replicas of the reference interpreter's integer steps),
``n`` the node, ``ins`` its input expressions, ``in_types`` their IR dtypes and ``out_t`` the
output dtype.  Fixed-point values are int64 codes, float values float32, batch first; every
fixed-point entry must agree with the op's reference kernel bit for bit.  An entry marked
``@accepts_narrow`` receives codes in whatever integer dtype their producer computed them
(int32 where :mod:`.intplan` proved it exact) and may return any integer dtype.

The driver (:meth:`~.lower.RelaxLowering.node`) has already refused float inputs to a
non-quantizer op with a fixed-point output.  An op TVM cannot lower exactly is declared with
``LOWERING.reject(op, reason)``.
"""
from __future__ import annotations

import numpy as np
from tvm import relax, te

from ...compiler.errors import UnsupportedError
from ...compiler.ir.ops.depth_space import permutation_plan
from ...compiler.ir.ops import avg_shift
from ...compiler.ir.ops.pool import window_counts
from ...compiler.ir.optable import OpTable
from ...compiler.ir.types import FixedType
from .ops_batch_a import ENTRIES as _BATCH_A
from .softmax_lut import exp_table, library_softmax, softmax_te
from .intplan import affine_dtype, binary_dtype, fits, linear_plan
from .relax_util import F32, I64, accepts_narrow, c64, cf, check_shift, cint, dtype_of, nn, op

#: IR op name -> Relax lowering.
LOWERING = OpTable("tvm")


@LOWERING.register("Quantize")
@accepts_narrow
def _quantize(lw, n, ins, in_types, out_t):
    """Fixed input: :meth:`~.lower.RelaxLowering.requantize` (int32 where proved exact);
    float input: :meth:`~.lower.RelaxLowering.quantize_real` (float64; int32 codes where they fit)."""
    if isinstance(in_types[0], FixedType):
        return lw.requantize(ins[0], in_types[0].frac_bits, out_t, n, in_t=in_types[0])
    return lw.quantize_real(ins[0], out_t, n)


@LOWERING.register("Sign")
@accepts_narrow
def _sign(lw, n, ins, in_types, out_t):
    """``x >= 0 ? 1 : -1``, compared in ``x``'s own dtype; codes out in int32."""
    zero = cint(0, dtype_of(ins[0])) if isinstance(in_types[0], FixedType) else cf(0.0)
    return lw.emit(op.where(op.greater_equal(ins[0], zero), cint(1, "int32"), cint(-1, "int32")))


@LOWERING.register("Dense", "Conv")
@accepts_narrow
def _linear(lw, n, ins, in_types, out_t):
    """Quantized: matmul/conv on codes, in the dtypes :func:`.intplan.linear_plan` proves exact
    (int32 operands, accumulation and epilogue where the bounds allow, int64 else), then the
    alignment shift and the aligned bias (== the reference).  Float: float32."""
    w = n.params["weight"]
    b = n.params.get("bias")
    groups = int(n.attrs.get("groups", 1))
    dense = n.op == "Dense"
    if isinstance(out_t, FixedType):
        f = in_types[0].frac_bits + w.dtype.frac_bits
        s = out_t.frac_bits - f
        check_shift(s, n, "aligning binary points")
        bias = None
        if b is not None:
            bf = b.dtype.frac_bits
            check_shift(out_t.frac_bits - bf, n, "aligning the bias")
            bias = np.left_shift(b.data, out_t.frac_bits - bf)  # same wrap as the reference
        plan = linear_plan(in_types[0], w.data, s, bias)
        x = lw.cast(ins[0], plan.in_dtype)
        if dense:
            wc = relax.const(np.ascontiguousarray(w.data.astype(plan.in_dtype)), plan.in_dtype)
            acc = lw.emit(op.matmul(x, wc, out_dtype=plan.acc_dtype))
        else:
            acc = lw.conv(x, w.data, plan.acc_dtype, n, groups, w_dtype=plan.in_dtype)
        acc = lw.lshift(lw.cast(acc, plan.epi_dtype), s, n)
        if bias is not None:
            acc = lw.emit(op.add(acc, cint(bias, plan.epi_dtype)))
        return acc
    x = lw.real(ins[0], in_types[0])
    wr = w.real().astype(np.float32)
    if dense:
        y = lw.emit(op.matmul(x, cf(wr), out_dtype=F32))
    else:
        y = lw.conv(x, wr, F32, n, groups)
    if b is not None:
        y = lw.emit(op.add(y, cf(b.real().astype(np.float32))))
    return y


@LOWERING.register("Relu")
@accepts_narrow
def _relu(lw, n, ins, in_types, out_t):
    """``max(x, 0)`` in ``x``'s own dtype (codes of any width, or float32)."""
    zero = cint(0, dtype_of(ins[0])) if isinstance(in_types[0], FixedType) else cf(0.0)
    return lw.emit(op.maximum(ins[0], zero))


@LOWERING.register("LeakyRelu")
def _leaky_relu(lw, n, ins, in_types, out_t):
    """Codes: ``x >= 0 ? x << shift : x`` (== the reference); float: ``x * 2**-shift`` below 0."""
    s = int(n.attrs["shift"])
    if isinstance(out_t, FixedType):
        return lw.emit(op.where(op.greater_equal(ins[0], c64(0)), lw.lshift(ins[0], s, n), ins[0]))
    x = lw.real(ins[0], in_types[0])
    return lw.emit(op.where(op.greater_equal(x, cf(0.0)), x, op.multiply(x, cf(2.0 ** -s))))


@LOWERING.register("Add", "Mul")
@accepts_narrow
def _binary(lw, n, ins, in_types, out_t):
    """Codes: align both operands to the output's fraction bits and add, or multiply (== the
    reference), in int32 where :func:`.intplan.binary_dtype` proves it exact, else int64;
    per-sample broadcast (unit axes after the batch).  Float: on float32 reals."""
    r = len(lw.g.values[n.output].shape)
    ta, tb = in_types
    if isinstance(out_t, FixedType):
        dt = binary_dtype(n.op, ta, tb, out_t.frac_bits)
        ins = [lw.cast(x, dt) for x in ins]
    a, bb = (lw.bcast_rank(x, len(lw.g.values[i].shape), r) for x, i in zip(ins, n.inputs))
    if isinstance(out_t, FixedType):
        if n.op == "Add":
            F = out_t.frac_bits
            return lw.emit(op.add(lw.lshift(a, F - ta.frac_bits, n), lw.lshift(bb, F - tb.frac_bits, n)))
        return lw.emit(op.multiply(a, bb))
    a, bb = lw.real(a, ta), lw.real(bb, tb)
    return lw.emit(op.add(a, bb) if n.op == "Add" else op.multiply(a, bb))


@LOWERING.register("Affine")
@accepts_narrow
def _affine(lw, n, ins, in_types, out_t):
    """Codes: ``x * scale``, aligned to the output's fraction bits, ``+ bias`` (== the reference),
    in int32 where :func:`.intplan.affine_dtype` proves it exact, else int64.  Float: float32."""
    s = n.params.get("scale")
    b = n.params.get("bias")
    if isinstance(out_t, FixedType):
        f = in_types[0].frac_bits + (s.dtype.frac_bits if s is not None else 0)
        bias = None
        if b is not None:
            check_shift(out_t.frac_bits - b.dtype.frac_bits, n, "aligning the bias")
            bias = np.left_shift(b.data, out_t.frac_bits - b.dtype.frac_bits)  # the reference's wrap
        dt = affine_dtype(in_types[0], s.data if s is not None else None, out_t.frac_bits - f, bias)
        y = lw.cast(ins[0], dt)
        if s is not None:
            y = lw.emit(op.multiply(y, cint(s.data, dt)))
        y = lw.lshift(y, out_t.frac_bits - f, n)
        if bias is not None:
            y = lw.emit(op.add(y, cint(bias, dt)))
        return y
    y = lw.real(ins[0], in_types[0])
    if s is not None:
        y = lw.emit(op.multiply(y, cf(s.real().astype(np.float32))))
    if b is not None:
        y = lw.emit(op.add(y, cf(b.real().astype(np.float32))))
    return y


@LOWERING.register("Concat")
@accepts_narrow
def _concat(lw, n, ins, in_types, out_t):
    """Codes: each part aligned to the output's fraction bits (== the reference), in int32 when
    every aligned part's bound fits it, else int64.  Float: float32 reals."""
    axis = int(n.attrs.get("axis", -1))
    axis = axis + 1 if axis >= 0 else axis
    if isinstance(out_t, FixedType):
        sh = [out_t.frac_bits - t.frac_bits for t in in_types]
        ok = all(0 <= k <= 31 and fits(t.min_code << k, t.max_code << k, "int32") for k, t in zip(sh, in_types))
        dt = "int32" if ok else I64
        parts = [lw.lshift(lw.cast(x, dt), k, n) for x, k in zip(ins, sh)]
    else:
        parts = [lw.real(x, t) for x, t in zip(ins, in_types)]
    return lw.emit(op.concat(parts, axis=axis))


@LOWERING.register("Reshape")
@accepts_narrow
def _reshape(lw, n, ins, in_types, out_t):
    return lw.emit(op.reshape(ins[0], (lw.n, *(int(s) for s in n.attrs["shape"]))))


@LOWERING.register("Transpose")
@accepts_narrow
def _transpose(lw, n, ins, in_types, out_t):
    return lw.emit(op.permute_dims(ins[0], [0, *(int(p) + 1 for p in n.attrs["perm"])]))


@LOWERING.register("MaxPool", "AvgPool")
@accepts_narrow
def _pool(lw, n, ins, in_types, out_t):
    """Codes: ``MaxPool`` in the input's dtype when the shifted codes ``x - min_code`` fit it
    (else int64), padding with the type's min code; ``AvgPool`` window sums in int64, then the
    reference's ``floor(sum * 2**k / count)``.  Float: float32."""
    x = ins[0]
    in_v = lw.g.values[n.inputs[0]]
    if isinstance(in_v.dtype, FixedType):
        t_in = in_v.dtype
        if n.op == "MaxPool":
            keep = fits(0, t_in.max_code - t_in.min_code, dtype_of(x))
            x = x if keep else lw.cast(x, I64)
        else:  # window sums, times 2**k
            x = lw.cast(x, _sum_dtype(t_in, int(np.prod([int(v) for v in n.attrs["kernel"]]))))
    k = tuple(int(v) for v in n.attrs["kernel"])
    nd = len(k)
    if nd not in (1, 2) or len(in_v.shape) != nd + 1:
        raise UnsupportedError(f"{n.op} over {nd}-D windows (only 1-D and 2-D)", n.name)
    s = tuple(int(v) for v in n.attrs.get("strides", (1,) * nd))
    p = tuple(int(v) for v in n.attrs.get("pads", (0,) * 2 * nd))
    t0 = in_v.dtype
    C = in_v.shape[-1]
    layout = "NHWC" if nd == 2 else "NWC"
    mp = nn.max_pool2d if nd == 2 else nn.max_pool1d
    if n.op == "MaxPool":
        if isinstance(t0, FixedType):
            # pad with the type's min code: shift codes so that it becomes 0, pad with 0 explicitly
            lo, dt = t0.min_code, dtype_of(x)
            y = lw.emit(op.subtract(x, cint(lo, dt))) if lo else x
            if any(p):
                pw = [0, 0] + [v for i in range(nd) for v in (p[i], p[i + nd])] + [0, 0]
                y = lw.emit(nn.pad(y, pw, pad_value=0.0))
            y = lw.emit(mp(y, pool_size=k, strides=s, padding=(0,) * (2 * nd) if nd == 2 else (0, 0),
                           layout=layout))
            return lw.emit(op.add(y, cint(lo, dt))) if lo else y
        return lw.emit(mp(x, pool_size=k, strides=s, padding=p, layout=layout))
    cnt = int(np.prod(k))
    per = window_counts(n, in_v.shape)[None, ..., None] if any(p) else None  # padding not counted
    if isinstance(out_t, FixedType):
        dt = dtype_of(x)
        tot = lw.window_sum(x, n, dt, C)
        if per is None:
            return lw.avg_div(tot, cnt, n)
        return lw.emit(op.floor_divide(lw.lshift(tot, avg_shift(cnt), n), cint(per, dt)))
    xr = lw.real(x, t0)
    tot = lw.window_sum(xr, n, F32, C)
    return lw.emit(op.divide(tot, cf(np.float32(cnt) if per is None else per.astype(np.float32))))


def _sum_dtype(t: FixedType, cnt: int) -> str:
    """int32 when a sum of ``cnt`` codes of ``t`` (every partial sum), times ``2**avg_shift(cnt)``,
    fits int32; else int64."""
    k = avg_shift(cnt)
    return "int32" if fits(min(t.min_code, 0) * cnt << k, max(t.max_code, 0) * cnt << k, "int32") else I64


@LOWERING.register("GlobalAvgPool")
@accepts_narrow
def _global_avg_pool(lw, n, ins, in_types, out_t):
    """Codes: ``floor(sum * 2**k / count)`` (== the reference), in int32 when the scaled sum's
    bound fits it (:func:`_sum_dtype`), else int64.  Float: float32 mean."""
    in_v = lw.g.values[n.inputs[0]]
    rank = len(in_v.shape) + 1
    axes = list(range(1, rank - 1))
    cnt = int(np.prod(in_v.shape[:-1]))
    if isinstance(out_t, FixedType):
        tot = lw.emit(op.sum(lw.cast(ins[0], _sum_dtype(in_types[0], cnt)), axis=axes))
        return lw.avg_div(tot, cnt, n)
    return lw.emit(op.mean(lw.real(ins[0], in_types[0]), axis=axes))


@LOWERING.register("Softmax")
@accepts_narrow
def _softmax(lw, n, ins, in_types, out_t):
    """Fixed-point input that :func:`.softmax_lut.library_softmax` accepts: the reference's float32
    softmax bit for bit, from a NumPy exp table (:func:`.softmax_lut.softmax_te`); otherwise (a
    float input) TVM's float softmax."""
    if library_softmax(n, in_types):
        lut = exp_table(in_types[0])
        return lw.bb.emit_te(softmax_te, lw.cast(ins[0], "int32"), relax.const(lut, F32), primfunc_name_hint="softmax_lut")
    return lw.emit(nn.softmax(lw.real(ins[0], in_types[0]), axis=-1))


def _threshold_te(x, t, base, sign):
    """TE: ``base[c] + sign[c] * sum_k (x[..., c] >= t[c, k])`` (``c`` the last axis; a
    one-row / one-element parameter is shared by every channel), compared in the dtype of ``x``
    and ``t``, counted in the dtype of ``base`` and ``sign``."""
    def ch(idx, p):
        return idx[-1] if int(p.shape[0]) > 1 else 0

    n_t = int(t.shape[1])
    if n_t == 0:
        return te.compute(x.shape, lambda *i: base[ch(i, base)] + sign[ch(i, sign)] * 0, name="mt")
    k = te.reduce_axis((0, n_t), name="k")
    cnt = te.compute(x.shape, lambda *i: te.sum((x[i] >= t[ch(i, t), k]).astype(base.dtype), axis=k), name="mt_count")
    return te.compute(x.shape, lambda *i: base[ch(i, base)] + sign[ch(i, sign)] * cnt[i], name="mt")


@LOWERING.register("MultiThreshold")
@accepts_narrow
def _multi_threshold(lw, n, ins, in_types, out_t):
    """``base[c] + sign[c] * #{k : x[..., c] >= t[c, k]}`` (== the reference's ``searchsorted``
    count) as one TE reduction over ``k``: the comparisons happen inside the sum's loop, so no
    ``[batch, ..., C, T]`` intermediate exists at any batch size, fused or not.

    Thresholds are clipped to ``[min_code, max_code + 1]`` of the input type (every comparison
    with an input code is unchanged), so the comparisons run in int32 whenever the input type
    fits it; the count and the output run in int32 when the output type fits it."""
    p = n.params
    x_t = in_types[0]
    lo, hi = int(x_t.min_code), int(x_t.max_code)
    cmp_dt = "int32" if fits(lo, hi + 1, "int32") else I64
    out_dt = "int32" if fits(out_t.min_code, out_t.max_code, "int32") else I64
    t = np.clip(p["thresholds"].data, lo, hi + 1) if cmp_dt != I64 else p["thresholds"].data
    return lw.bb.emit_te(_threshold_te, lw.cast(ins[0], cmp_dt), cint(t, cmp_dt), cint(p["base"].data, out_dt),
                         cint(p["sign"].data, out_dt), primfunc_name_hint="multi_threshold")


@LOWERING.register("Resize")
@accepts_narrow
def _resize(lw, n, ins, in_types, out_t):
    """Nearest upsampling by integer factors: ``repeat`` along each spatial axis (== the reference)."""
    y = ins[0]
    for i, k in enumerate(int(v) for v in n.attrs["scales"]):
        if k > 1:
            y = lw.emit(op.repeat(y, k, axis=1 + i))
    return y


@LOWERING.register("DepthToSpace", "SpaceToDepth")
@accepts_narrow
def _depth_space(lw, n, ins, in_types, out_t):
    """``reshape -> permute_dims -> reshape`` of the op's :func:`permutation_plan` (== the reference)."""
    mid, perm, out = permutation_plan(n, lw.g.values[n.inputs[0]].shape)
    y = lw.emit(op.reshape(ins[0], (lw.n, *mid)))
    y = lw.emit(op.permute_dims(y, [0, *(p + 1 for p in perm)]))
    return lw.emit(op.reshape(y, (lw.n, *out)))


@LOWERING.register("FloatQuant")
def _float_quant(lw, n, ins, in_types, out_t):
    """Minifloat rounding in float32, step for step the reference
    (:func:`qdeploy.compiler.ir.ops.floatquant.minifloat_round`): exponent by exact comparisons,
    power-of-two scalings, floor plus the half-to-even tie rule; only ``x / scale`` and ``q * scale``
    round (single IEEE float32 operations, as in the reference)."""
    from ...compiler.ir.ops.floatquant import format_params

    p = format_params(n)
    x = lw.real(ins[0], in_types[0])
    X = lw.emit(op.divide(x, cf(p["scale"]))) if p["scale"] != 1.0 else x
    a = lw.emit(op.abs(X))
    M = p["M"]
    up, down = cf(2.0 ** (M - p["e_min"])), cf(2.0 ** (p["e_min"] - M))
    for k in range(p["e_min"] + 1, p["e_max"] + 1):
        ge = lw.emit(op.greater_equal(a, cf(2.0 ** k)))
        up = lw.emit(op.where(ge, cf(2.0 ** (M - k)), up))
        down = lw.emit(op.where(ge, cf(2.0 ** (k - M)), down))
    t = lw.emit(op.multiply(X, up))
    r = lw.emit(op.floor(t))
    d = lw.emit(op.subtract(t, r))
    odd = lw.emit(op.not_equal(op.subtract(r, op.multiply(cf(2.0), op.floor(op.multiply(r, cf(0.5))))), cf(0.0)))
    tie_up = op.logical_and(op.equal(d, cf(0.5)), odd)
    r = lw.emit(op.where(op.logical_or(op.greater(d, cf(0.5)), tie_up), op.add(r, cf(1.0)), r))
    q = lw.emit(op.multiply(r, down))
    q = lw.emit(op.where(op.less(X, cf(0.0)), op.negative(op.abs(q)), q))
    mx = cf(p["max"])
    if p["saturation"]:
        lo_v, hi_v = op.negative(mx), mx
    else:
        hi_v = cf(np.inf) if p["has_inf"] else cf(np.nan)
        lo_v = op.negative(hi_v)
    q = lw.emit(op.where(op.greater(q, mx), hi_v, op.where(op.less(q, op.negative(mx)), lo_v, q)))
    y = lw.emit(op.multiply(q, cf(p["scale"]))) if p["scale"] != 1.0 else q
    return lw.emit(op.where(op.isfinite(X), y, cf(np.nan)))


@LOWERING.register("TopK")
def _topk(lw, n, ins, in_types, out_t):
    """Ranks by exact comparisons, as the reference (:func:`qdeploy.compiler.ir.ops.topk.ranks`):
    no sort, so ties go to the lower index exactly as there."""
    c = lw.g.values[n.inputs[0]].shape[-1]
    k = int(n.attrs["k"])
    x = ins[0] if isinstance(in_types[0], FixedType) else lw.real(ins[0], in_types[0])
    a, b = lw.emit(op.expand_dims(x, -2)), lw.emit(op.expand_dims(x, -1))
    before = op.greater(a, b) if n.attrs.get("largest", True) else op.less(a, b)
    lower = relax.const(np.arange(c)[None, :] < np.arange(c)[:, None], "bool")
    r = lw.emit(op.add(op.sum(op.astype(before, I64), axis=-1),
                       op.sum(op.astype(op.logical_and(op.equal(a, b), lower), I64), axis=-1)))
    onehot = op.equal(op.expand_dims(r, -2), c64(np.arange(k).reshape(k, 1)))
    idx = lw.emit(op.sum(op.multiply(op.astype(onehot, I64), c64(np.arange(c))), axis=-1))
    return lw.emit(op.astype(idx, F32))


@LOWERING.register("Lookup")
def _lookup(lw, n, ins, in_types, out_t):
    """``take(table, x - min_code)``: a gather of the constant table (== the reference)."""
    tab = n.params["table"]
    lo = in_types[0].min_code
    idx = lw.emit(op.subtract(ins[0], c64(lo))) if lo else ins[0]
    const = c64(tab.data) if isinstance(tab.dtype, FixedType) else cf(tab.data)
    return lw.emit(op.take(const, idx, axis=0, mode="clip"))  # in range by the type; clip: never out of bounds


for _op, _fn in _BATCH_A.items():
    LOWERING.set(_op, _fn)
