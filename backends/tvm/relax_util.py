"""Relax constants and checks shared by the TVM lowering driver (:mod:`.lower`) and its op
table (:mod:`.ops`)."""
from __future__ import annotations

import numpy as np
from tvm import relax

from ...compiler.errors import UnsupportedError
from ...compiler.ir.graph import Node

#: Relax operator namespaces (``op.add``, ``nn.conv2d``, ...).
op = relax.op
nn = relax.op.nn

I64, F32, F64 = "int64", "float32", "float64"

#: Largest shift amount lowered (int64 shifts by >= 63 are undefined in LLVM).
MAX_SHIFT = 62


def c64(v) -> relax.Expr:
    """int64 constant (the dtype must be explicit: relax.const would silently narrow to int32)."""
    return relax.const(np.asarray(v, dtype=np.int64), I64)


def cf(v, dtype=F32) -> relax.Expr:
    """Float constant of ``dtype`` (float32 by default)."""
    return relax.const(np.asarray(v, dtype=dtype), dtype)


def check_shift(s: int, node: Node, what: str) -> None:
    """Raise :class:`UnsupportedError` naming ``node`` unless ``0 <= s <= MAX_SHIFT``."""
    if s < 0 or s > MAX_SHIFT:
        raise UnsupportedError(f"{what} needs a shift by {s} bits (only 0..{MAX_SHIFT} can be lowered exactly)",
                               node.name)


def cint(v, dtype: str) -> relax.Expr:
    """Integer constant of ``dtype`` (``v`` must fit it; the callers prove that)."""
    return relax.const(np.asarray(v, dtype=dtype), dtype)


def dtype_of(x) -> str:
    """The element dtype of a Relax tensor expression (``"int8"``, ``"int64"``, ``"float32"``...)."""
    return str(x.ty.dtype)


def accepts_narrow(fn):
    """Mark an op-table entry as taking fixed-point inputs in *any* integer dtype (int8..int64:
    each value is stored in whatever dtype its producer computed it in) and returning codes in an
    integer dtype of its choice; unmarked entries receive int64 codes (the driver casts).  The
    lowering casts graph outputs back to int64."""
    fn.accepts_narrow = True
    return fn
