"""IR costs: storage of values (bits per element, bytes under a packing) and the BOPs of a node.

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
``OpSpec.macs`` (:mod:`qdeploy.compiler.ir.ops`); bit operations of a Dense/Conv node are
:func:`node_bops` (Baskin et al., arXiv 2103.05579 Eq. 1).
"""
from __future__ import annotations

import math

import numpy as np

from .graph import Graph, Node, Value
from .types import FixedType

PACKINGS = ("byte", "container", "bit", "runtime")


def type_bits(t) -> int:
    """Bits per element of type ``t``: the fixed-point width, 32 for float."""
    return t.width if isinstance(t, FixedType) else 32


def element_bits(v: Value) -> int:
    """Bits per element of ``v``: the fixed-point width, 32 for float."""
    return type_bits(v.dtype)


def node_bops(graph: Graph, node: Node) -> float:
    """Bit operations of a Dense/Conv node per sample (unit: BOPs, one inference of one sample).

    BOPs = P * m * n * ((1 - f_p) * b_a * b_w + b_a + b_w + log2 n) with n inputs per output
    (K, or kh*kw*C_in/groups), m outputs per position, P output positions, activation bits b_a,
    weight bits b_w (32 for float), and f_p the measured fraction of zero weights
    (Baskin et al., arXiv 2103.05579 Eq. 1; ``../shared/refs/README.md``).  0 for other ops.
    """
    if node.op not in ("Dense", "Conv"):
        return 0.0
    w = node.params["weight"]
    b_a = type_bits(graph.value(node.inputs[0]).dtype)
    b_w = type_bits(w.dtype)
    m = w.shape[-1]
    n = int(np.prod(w.shape[:-1]))
    fp = float(np.mean(w.data == 0)) if w.data.size else 0.0
    out_shape = graph.value(node.output).shape
    positions = int(np.prod(out_shape[:-1])) if len(out_shape) > 1 else 1
    return float(positions * m * n * ((1 - fp) * b_a * b_w + b_a + b_w + math.log2(max(n, 1))))


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
