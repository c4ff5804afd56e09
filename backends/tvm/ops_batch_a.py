"""Relax lowerings of the ops of batch A (``Pad``, ...): registered into
:data:`qdeploy.backends.tvm.ops.LOWERING` by that module (this one imports nothing from it, so
the import graph keeps no cycle).

Each entry has the signature of every ``LOWERING`` entry, ``f(lw, n, ins, in_types, out_t)``, and
replicates the op's reference kernel step by step on int64 codes (float32 reals for float values).
"""
from __future__ import annotations

import numpy as np

from ...compiler.ir.types import FixedType
from .relax_util import c64, cf, nn, op


def _pad(lw, n, ins, in_types, out_t):
    """Codes: shift so that the pad code becomes 0, pad with 0, shift back (relax ``nn.pad`` takes a
    float pad value; this keeps every int64 code exact).  Float: pad with the float32 value."""
    rank = len(lw.g.values[n.inputs[0]].shape)
    p = [int(v) for v in n.attrs["pads"]]
    pw = [0, 0] + [v for i in range(rank) for v in (p[i], p[i + rank])]
    if isinstance(out_t, FixedType):
        c = int(n.attrs.get("code", 0))
        y = lw.emit(op.subtract(ins[0], c64(c))) if c else ins[0]
        y = lw.emit(nn.pad(y, pw, pad_value=0.0))
        return lw.emit(op.add(y, c64(c))) if c else y
    return lw.emit(nn.pad(ins[0], pw, pad_value=float(np.float32(n.attrs.get("value", 0.0)))))


#: IR op -> Relax lowering (registered by :mod:`.ops`).
ENTRIES = {"Pad": _pad}


def _clip(lw, n, ins, in_types, out_t):
    """Codes: align to the output's fraction bits, then ``maximum``/``minimum`` with the bound codes
    (== the reference); float: the same on float32 reals."""
    fb = int(n.attrs.get("frac_bits", 0))
    lo, hi = n.attrs.get("lo"), n.attrs.get("hi")
    if isinstance(out_t, FixedType):
        F = out_t.frac_bits
        y = lw.lshift(ins[0], F - in_types[0].frac_bits, n)
        if lo is not None:
            y = lw.emit(op.maximum(y, c64(int(lo) << (F - fb))))
        if hi is not None:
            y = lw.emit(op.minimum(y, c64(int(hi) << (F - fb))))
        return y
    y = ins[0]
    if lo is not None:
        y = lw.emit(op.maximum(y, cf(np.ldexp(float(lo), -fb))))
    if hi is not None:
        y = lw.emit(op.minimum(y, cf(np.ldexp(float(hi), -fb))))
    return y


_RELAX_BINARY = {"Sub": op.subtract, "Max": op.maximum, "Min": op.minimum}


def _binary(lw, n, ins, in_types, out_t):
    """``Sub``/``Max``/``Min``: per-sample broadcast (unit axes after the batch, as ``Add``), align
    both codes to the output's fraction bits, apply (== the reference); float: on float32 reals."""
    r = len(lw.g.values[n.output].shape)
    a, b = (lw.bcast_rank(x, len(lw.g.values[i].shape), r) for x, i in zip(ins, n.inputs))
    ta, tb = in_types
    f = _RELAX_BINARY[n.op]
    if isinstance(out_t, FixedType):
        F = out_t.frac_bits
        return lw.emit(f(lw.lshift(a, F - ta.frac_bits, n), lw.lshift(b, F - tb.frac_bits, n)))
    return lw.emit(f(lw.real(a, ta), lw.real(b, tb)))


ENTRIES.update({"Clip": _clip, "Sub": _binary, "Max": _binary, "Min": _binary})
