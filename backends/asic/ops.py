"""The ASIC estimator's op table: for each IR op, its gate-equivalent cost.

:data:`ESTIMATE` (``OpTable("asic estimate")``) maps an IR op to ``fn(graph, node, opts) ->
(ge, ff, e_fj, stages)``: gate equivalents, physical flip-flops, dynamic energy per inference in
45 nm fJ (before node scaling and ``activity``), and full-adder stages on its combinational path
(assumptions B1-B8 of :mod:`qdeploy.backends.asic.estimate`).

Ops are priced per op where the model distinguishes them, and otherwise by their *kind*
(:data:`KIND_COSTS`): an op listed in :data:`OP_KINDS` without an entry of its own gets its
kind's generic cost, so a new elementwise op needs no code here: its kind is its ``OpSpec.kind``.
"""
from __future__ import annotations

import math

import numpy as np

from ...compiler.errors import UnsupportedError
from ...compiler.ir.optable import OpTable
from ...compiler.ir.ops import REGISTRY
from ...compiler.ir.types import FixedType
from .cells import E_FA_FJ_45, GE_AND2, GE_FA, registers

#: IR op -> ``fn(graph, node, opts) -> (ge, ff, e_fj, stages)``, or :class:`Rejected`.
ESTIMATE = OpTable("asic estimate")

#: IR op -> kind ("mac", "elementwise", "layout", "pool"), from each op's ``OpSpec.kind``; only
#: ops without an entry of their own read it.
OP_KINDS = {name: spec.kind for name, spec in REGISTRY.items()}


def _csd(codes):
    """Canonical-signed-digit (non-zero) digits of each |code|."""
    x = np.abs(np.asarray(codes, dtype=np.int64))
    xh = x >> 1
    return np.bitwise_count(xh ^ (x + xh)).astype(np.int64)


def _bitlen(codes):
    """Bits of each |code| (0 -> 0)."""
    a = np.abs(np.asarray(codes, dtype=np.int64))
    out = np.zeros(a.shape, dtype=np.int64)
    nz = a > 0
    out[nz] = np.floor(np.log2(a[nz])).astype(np.int64) + 1
    return out



def _tree(terms: np.ndarray, pw: np.ndarray, cap: int) -> tuple[int, int]:
    """(adder bits, depth) of balanced trees summing ``terms[j]`` values of ``pw[j]`` bits."""
    left = terms.astype(np.int64).copy()
    bits, lvl = 0, 0
    while (left > 1).any():
        lvl += 1
        bits += int(np.sum((left // 2) * np.minimum(cap, pw + lvl)))
        left = (left + 1) // 2
    return bits, lvl


@ESTIMATE.register("Dense", "Conv")
def _mac(graph, node, opts):
    """B2/B3: multipliers (general, or by constants with ``weights="constant"``), adder trees and
    the output register of a Dense or Conv, every output position its own hardware.

    Raises:
        UnsupportedError: float input, weight or output.
    """
    x = graph.value(node.inputs[0])
    w = node.params["weight"]
    b = node.params.get("bias")
    out = graph.value(node.output)
    if not all(isinstance(t, FixedType) for t in (x.dtype, w.dtype, out.dtype)):
        raise UnsupportedError(f"{node.op} on float data has no ASIC estimate (quantize it first)", node.name)
    xb, wb, ab = x.dtype.width, w.dtype.width, out.dtype.width
    codes = w.data.reshape(-1, w.shape[-1])
    n_in, n_out = codes.shape
    pos = int(np.prod(out.shape[:-1], dtype=np.int64)) if len(out.shape) > 1 else 1
    zero = codes == 0
    terms = np.count_nonzero(~zero, axis=0) + ((np.broadcast_to(b.data, (n_out,)) != 0).astype(np.int64)
                                                if b is not None else 0)
    if opts["weights"] == "programmable":
        # every weight is a register: all products are general multipliers (zeros are not known)
        n_mult = n_in * n_out
        pp = xb * wb
        mult_ge = n_mult * (pp * GE_AND2 + (xb - 1) * wb * GE_FA)
        mult_e_bits = n_mult * pp
        terms = np.full(n_out, n_in + (1 if b is not None else 0))
        pw = np.full(n_out, min(ab, xb + wb))
        w_ff = n_in * n_out * wb + (n_out * b.dtype.width if b is not None else 0)
        t_mult = xb + wb
    else:
        d, bl = _csd(codes), _bitlen(codes)
        adds = np.maximum(d - 1, 0) * (xb + bl + 1)
        mult_ge = float(np.sum(adds)) * GE_FA
        mult_e_bits = float(np.sum(adds))
        pw = np.where(zero, 0, np.minimum(ab, xb + bl + 1)).max(axis=0)
        w_ff = 0
        dmax = int(d.max(initial=1))
        t_mult = (math.ceil(math.log2(dmax)) if dmax > 1 else 0) * (xb + wb)
    tree_bits, depth = _tree(terms, pw, ab)
    ff = n_out * ab if node.output in graph.outputs else 0  # output register (B3)
    ge_per_pos = mult_ge + tree_bits * GE_FA
    reg_ge, reg_fj, n_ff = registers(ff * pos, w_ff, opts)
    ge = pos * ge_per_pos + reg_ge
    e_fj = pos * (mult_e_bits + tree_bits) * E_FA_FJ_45 + reg_fj
    stages = t_mult + depth * 2 + ab  # FA stages on the critical path (B7, ripple of the last add)
    return ge, n_ff, e_fj, stages



def _out_bits(graph, node) -> tuple[int, int]:
    """(element count, bit width; 32 for float) of ``node``'s output."""
    out = graph.value(node.output)
    return out.size, out.dtype.width if isinstance(out.dtype, FixedType) else 32


@ESTIMATE.register("Relu")
def _relu(graph, node, opts):
    """An AND2 per output bit (the sign gates the value), one gate stage."""
    size, ob = _out_bits(graph, node)
    return size * ob * GE_AND2, 0, size * ob * 0.3 * E_FA_FJ_45, 1


@ESTIMATE.register("Quantize")
def _quantize(graph, node, opts):
    """A rounding adder unless TRN, a saturation comparator unless WRAP (FA per output bit each)."""
    size, ob = _out_bits(graph, node)
    to = node.attrs["to"]
    bits = (size * ob if to.rounding != "TRN" else 0) + (size * ob if to.saturation != "WRAP" else 0)
    return bits * GE_FA, 0, bits * E_FA_FJ_45, ob if to.rounding != "TRN" else 1


@ESTIMATE.register("Sign")
def _wires(graph, node, opts):
    """No logic: wires (layout ops; Sign is the sign bit)."""
    return 0.0, 0, 0.0 * E_FA_FJ_45, 0


@ESTIMATE.register("Add")
def _adder_per_bit(graph, node, opts):
    """One full adder per output bit, a ripple of the output width (B2)."""
    size, ob = _out_bits(graph, node)
    return size * ob * GE_FA, 0, size * ob * E_FA_FJ_45, ob


@ESTIMATE.register("Mul")
def _mul(graph, node, opts):
    """A run-time multiplier per element, about ``5 * ob**2`` AND2 equivalents."""
    size, ob = _out_bits(graph, node)
    return size * ob * ob * GE_AND2 * 5, 0, size * ob * ob * E_FA_FJ_45, 2 * ob


ESTIMATE.set("Affine", _adder_per_bit)
ESTIMATE.set("Concat", _wires)
ESTIMATE.set("Reshape", _wires)
ESTIMATE.set("Transpose", _wires)


@ESTIMATE.register("MaxPool")
def _maxpool(graph, node, opts):
    """``k - 1`` comparators (2 FA per bit) per output, a tree of ``log2 k`` comparisons."""
    size, ob = _out_bits(graph, node)
    n = int(np.prod(node.attrs["kernel"]))
    return (size * (n - 1) * ob * 2 * GE_FA, 0, size * (n - 1) * ob * E_FA_FJ_45,
            ob * math.ceil(math.log2(max(n, 2))))


def _adder_tree(graph, node, n: int):
    size, ob = _out_bits(graph, node)
    return size * (n - 1) * ob * GE_FA, 0, size * (n - 1) * ob * E_FA_FJ_45, ob + math.ceil(math.log2(max(n, 2)))


@ESTIMATE.register("AvgPool")
def _avgpool(graph, node, opts):
    """An adder tree over the kernel window per output."""
    return _adder_tree(graph, node, int(np.prod(node.attrs["kernel"])))


@ESTIMATE.register("GlobalAvgPool")
def _global_avgpool(graph, node, opts):
    """An adder tree over all positions per channel."""
    return _adder_tree(graph, node, int(np.prod(graph.value(node.inputs[0]).shape[:-1])))


@ESTIMATE.register("MultiThreshold")
def _threshold(graph, node, opts):
    """Per output element ``T`` comparators of the input width (a carry chain: one FA per bit,
    B2) and a ``T``-input count (about ``T`` FAs); path: one comparator, then ``log2 T`` adder
    levels."""
    size, _ = _out_bits(graph, node)
    xt = graph.value(node.inputs[0]).dtype
    xb = xt.width if isinstance(xt, FixedType) else 32
    n_t = int(node.params["thresholds"].shape[1])
    fa = size * n_t * (xb + 1)
    return fa * GE_FA, 0, fa * E_FA_FJ_45, xb + math.ceil(math.log2(max(n_t, 2)))


ESTIMATE.reject("Softmax", "float32 op: it runs on the host (no fixed-point Softmax to price)")

#: Generic cost per op kind, for ops of :data:`OP_KINDS` without an entry of their own.
KIND_COSTS = {"mac": _mac, "elementwise": _adder_per_bit, "layout": _wires}


def fill_by_kind(table: OpTable, kinds: dict[str, str]) -> None:
    """Give each op of ``kinds`` (op -> kind) that has no entry in ``table`` its kind's generic
    cost from :data:`KIND_COSTS`; ops of a kind without a generic cost (e.g. "pool") are left
    without an entry (the coverage test then asks for one)."""
    for op, kind in kinds.items():
        if op not in table and kind in KIND_COSTS:
            table.set(op, KIND_COSTS[kind])


fill_by_kind(ESTIMATE, OP_KINDS)
