"""Relax lowerings of the ops of batch A (``Pad``, ...): registered into
:data:`qdeploy.backends.tvm.ops.LOWERING` by that module (this one imports nothing from it, so
the import graph keeps no cycle).

Each entry has the signature of every ``LOWERING`` entry, ``f(lw, n, ins, in_types, out_t)``, and
replicates the op's reference kernel step by step on integer codes (float32 reals for float
values): every entry here is ``accepts_narrow`` and computes in int32 where the bounds of its
input types (:mod:`.intplan`) prove it exact, else in int64.
"""
from __future__ import annotations

import numpy as np

from ...compiler.ir.types import FixedType
from .intplan import fits
from .relax_util import I64, accepts_narrow, cf, cint, nn, op


@accepts_narrow
def _pad(lw, n, ins, in_types, out_t):
    """Codes: shift so that the pad code becomes 0, pad with 0, shift back (relax ``nn.pad`` takes a
    float pad value; this keeps every code exact), in int32 when ``x - code`` fits it.  Float: pad
    with the float32 value."""
    rank = len(lw.g.values[n.inputs[0]].shape)
    p = [int(v) for v in n.attrs["pads"]]
    pw = [0, 0] + [v for i in range(rank) for v in (p[i], p[i + rank])]
    if isinstance(out_t, FixedType):
        c = int(n.attrs.get("code", 0))
        t = in_types[0]
        ok = fits(t.min_code - c, t.max_code - c, "int32") and fits(min(t.min_code, c), max(t.max_code, c), "int32")
        dt = "int32" if ok else I64
        y = lw.cast(ins[0], dt)
        y = lw.emit(op.subtract(y, cint(c, dt))) if c else y
        y = lw.emit(nn.pad(y, pw, pad_value=0.0))
        return lw.emit(op.add(y, cint(c, dt))) if c else y
    return lw.emit(nn.pad(ins[0], pw, pad_value=float(np.float32(n.attrs.get("value", 0.0)))))


#: IR op -> Relax lowering (registered by :mod:`.ops`).
ENTRIES = {"Pad": _pad}


@accepts_narrow
def _clip(lw, n, ins, in_types, out_t):
    """Codes: align to the output's fraction bits, then ``maximum``/``minimum`` with the bound codes
    (== the reference), in int32 when the aligned input and the bounds fit it; float: the same on
    float32 reals."""
    fb = int(n.attrs.get("frac_bits", 0))
    lo, hi = n.attrs.get("lo"), n.attrs.get("hi")
    if isinstance(out_t, FixedType):
        F = out_t.frac_bits
        t, k = in_types[0], F - in_types[0].frac_bits
        bounds = [int(v) << (F - fb) for v in (lo, hi) if v is not None] if F >= fb else None
        ok = 0 <= k <= 31 and bounds is not None and fits(t.min_code << k, t.max_code << k, "int32") and \
            all(fits(v, v, "int32") for v in bounds)
        dt = "int32" if ok else I64
        y = lw.lshift(lw.cast(ins[0], dt), k, n)
        if lo is not None:
            y = lw.emit(op.maximum(y, cint(int(lo) << (F - fb), dt)))
        if hi is not None:
            y = lw.emit(op.minimum(y, cint(int(hi) << (F - fb), dt)))
        return y
    y = ins[0]
    if lo is not None:
        y = lw.emit(op.maximum(y, cf(np.ldexp(float(lo), -fb))))
    if hi is not None:
        y = lw.emit(op.minimum(y, cf(np.ldexp(float(hi), -fb))))
    return y


_RELAX_BINARY = {"Sub": op.subtract, "Max": op.maximum, "Min": op.minimum}


@accepts_narrow
def _binary(lw, n, ins, in_types, out_t):
    """``Sub``/``Max``/``Min``: per-sample broadcast (unit axes after the batch, as ``Add``), align
    both codes to the output's fraction bits, apply (== the reference), in int32 when both aligned
    operands and the difference fit it; float: on float32 reals."""
    r = len(lw.g.values[n.output].shape)
    ta, tb = in_types
    if isinstance(out_t, FixedType):
        ka, kb = out_t.frac_bits - ta.frac_bits, out_t.frac_bits - tb.frac_bits
        ok = 0 <= ka <= 31 and 0 <= kb <= 31
        if ok:
            a_lo, a_hi, b_lo, b_hi = ta.min_code << ka, ta.max_code << ka, tb.min_code << kb, tb.max_code << kb
            ok = fits(a_lo, a_hi, "int32") and fits(b_lo, b_hi, "int32") and fits(a_lo - b_hi, a_hi - b_lo, "int32")
        ins = [lw.cast(x, "int32" if ok else I64) for x in ins]
    a, b = (lw.bcast_rank(x, len(lw.g.values[i].shape), r) for x, i in zip(ins, n.inputs))
    f = _RELAX_BINARY[n.op]
    if isinstance(out_t, FixedType):
        F = out_t.frac_bits
        return lw.emit(f(lw.lshift(a, F - ta.frac_bits, n), lw.lshift(b, F - tb.frac_bits, n)))
    return lw.emit(f(lw.real(a, ta), lw.real(b, tb)))


ENTRIES.update({"Clip": _clip, "Sub": _binary, "Max": _binary, "Min": _binary})
