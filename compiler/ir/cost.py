"""Storage cost of IR values: bits per element and bytes under a packing.

Packing of a ``W``-bit fixed-point element (parameter ``packing``):

``"byte"`` (default)
    ``ceil(W/8)`` bytes per element: byte-aligned storage (a 6-bit tensor takes 1 byte per
    element, a 12-bit one 2, an 18-bit one 3), as a byte-addressed SRAM buffer holds it.
``"container"``
    the C/TVM integer container: 1, 2, 4 or 8 bytes (``int8_t`` .. ``int64_t``) -- how C code on
    a microcontroller or a TVM build with narrowed dtypes stores it.
``"bit"``
    bit-packed: ``ceil(n*W/8)`` bytes for ``n`` elements, as a bit-packed FPGA BRAM holds it.
``"runtime"``
    8 bytes (int64 code) per element: how the reference interpreter and TVM lowering store it.

float32 values take 4 bytes per element in every mode.  Per-op compute costs are
``OpSpec.macs`` (:mod:`qdeploy.compiler.ir.ops`).
"""
from __future__ import annotations

from .graph import Value
from .types import FixedType

PACKINGS = ("byte", "container", "bit", "runtime")


def element_bits(v: Value) -> int:
    """Bits per element of ``v``: the fixed-point width, 32 for float."""
    return v.dtype.width if isinstance(v.dtype, FixedType) else 32


def value_bytes(v: Value, packing: str = "byte", batch: int = 1) -> int:
    """Bytes held by value ``v`` (``batch`` samples) under ``packing`` (see module docstring).

    Raises:
        ValueError: for a packing not in :data:`PACKINGS`.
    """
    if packing not in PACKINGS:
        raise ValueError(f"unknown packing {packing!r}; one of {', '.join(PACKINGS)}")
    n = v.size * int(batch)
    if not isinstance(v.dtype, FixedType):
        return 4 * n
    w = v.dtype.width
    if packing == "byte":
        return n * ((w + 7) // 8)
    if packing == "container":
        return n * next(c for c in (1, 2, 4, 8) if 8 * c >= w)
    if packing == "bit":
        return (n * w + 7) // 8
    return 8 * n
