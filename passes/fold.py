"""Folding passes: dead-code elimination, batch-norm (affine) folding, constant folding."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..compiler.ir.float32 import float32_affine
from ..compiler.ir.graph import Const, Graph, Node, rebuild
from ..compiler.ir.types import FixedType, FloatType
from .manager import current_context, register_pass


@register_pass("dce")
def dce(graph: Graph) -> Graph:
    """Dead-code elimination: drop nodes none of whose outputs reach a graph output."""
    live = set(graph.outputs)
    keep = []
    for n in reversed(graph.nodes):
        if any(o in live for o in n.outputs):
            keep.append(n)
            live.update(n.inputs)
    keep.reverse()
    return graph.with_(nodes=keep)


def _single_consumer(graph: Graph, value: str) -> str | None:
    """Name of the only node reading ``value`` (None if several, none, or a graph output)."""
    cons = graph.consumers(value)
    if len(cons) == 1 and value not in graph.outputs:
        return cons[0].name
    return None


def _index(nodes, name):
    return next(i for i, m in enumerate(nodes) if m.name == name)


def _is_float(c: Const | None) -> bool:
    return c is None or isinstance(c.dtype, FloatType)


def _producer_name(graph: Graph, value: str) -> set:
    p = graph.producer(value)
    return {p.name} if p is not None else set()


@dataclass(frozen=True)
class _Rewrite:
    """One local rewrite found in a sweep: the nodes whose current form it depends on
    (``reads``), the nodes it replaces, removes or rewires (``writes``), the in-place edit of the
    node list (by node name) and its note."""

    reads: frozenset
    writes: frozenset
    apply: Callable[[list], None]
    note: str


@register_pass("fold_batchnorm")
def fold_batchnorm(graph: Graph) -> Graph:
    """Fold a float ``Affine`` (inference batch norm, per-channel scale/shift) into the
    float ``Dense``/``Conv`` that alone feeds it: ``W' = W * s`` (per output channel),
    ``b' = b * s + t`` (Jacob et al., CVPR 2018, Sec. 3.2 "batch normalization folding").

    Only float layers are folded: folding a float scale into fixed-point weights would change
    their bit width; quantized graphs keep the Affine for :func:`passes.precision.affine_to_fixed`.
    Notes (pass context): one per fold.
    """
    def find(g: Graph) -> list[_Rewrite]:
        found = []
        for n in g.nodes:
            if n.op != "Affine" or not _is_float(n.params.get("scale")) or not _is_float(n.params.get("bias")):
                continue
            prod = g.producer(n.inputs[0])
            if prod is None or prod.op not in ("Dense", "Conv") or _single_consumer(g, prod.output) != n.name:
                continue
            w, b = prod.params["weight"], prod.params.get("bias")
            if not (_is_float(w) and _is_float(b)) or isinstance(g.value(prod.inputs[0]).dtype, FixedType):
                continue
            cout = w.shape[-1]
            s = n.params.get("scale")
            t = n.params.get("bias")
            s = np.broadcast_to(s.real(), (cout,)) if s is not None else np.ones(cout)
            t = np.broadcast_to(t.real(), (cout,)) if t is not None else np.zeros(cout)
            w2 = (w.real() * s).astype(np.float32)
            b2 = ((b.real() if b is not None else 0.0) * s + t).astype(np.float32)
            new = prod.replace(params={"weight": Const(w2, FloatType()), "bias": Const(b2, FloatType())},
                               outputs=n.outputs)
            found.append(_Rewrite(frozenset({prod.name, n.name}), frozenset({prod.name, n.name}),
                                  _replace_and_drop(prod.name, new, n.name), f"folded {n.name} into {prod.name}"))
        return found

    return _until_fixpoint(graph, find)


@register_pass("fold_affine_chains")
def fold_affine_chains(graph: Graph) -> Graph:
    """Constant folding of elementwise constants: merge ``Affine(Affine(x))`` with float
    constants into one Affine (``s = s1*s2``, ``t = t1*s2 + t2``), and drop identity Affines
    (scale 1, bias 0) and Reshapes to the same shape.  Chains merge left to right (the
    float32 rounding of each partial product is that of merging one pair at a time from the
    chain's start).  On a fixed-point input a merge is made only where it gives the unmerged
    chain's float32 result on every input code (or after the ``Quantize`` that alone reads it):
    ``float32(float32(x*s1)*s2)`` is not ``float32(x*float32(s1*s2))`` in general, and the unmerged
    chain is what the source computes.  Notes (pass context): one per rewrite or merge kept apart."""
    ctx_notes: set = set()

    def find(g: Graph) -> list[_Rewrite]:
        found = []
        for n in g.nodes:
            src = g.producer(n.inputs[0]) if n.inputs else None
            if n.op == "Affine" and _is_float(n.params.get("scale")) and _is_float(n.params.get("bias")):
                s = n.params.get("scale")
                t = n.params.get("bias")
                ident = (s is None or np.all(s.real() == 1)) and (t is None or np.all(t.real() == 0))
                if ident and n.output not in graph.outputs:
                    found.append(_bypass_rewrite(g, n, f"removed identity {n.name}"))
                    continue
                if (src is not None and src.op == "Affine" and _single_consumer(g, src.output) == n.name
                        and _is_float(src.params.get("scale")) and _is_float(src.params.get("bias"))):
                    why = _merge_changes_result(g, src, n)
                    if why:
                        ctx_notes.add(f"kept {src.name} and {n.name} apart: {why}")
                        continue
                    s1 = src.params["scale"].real() if "scale" in src.params else np.float64(1)
                    t1 = src.params["bias"].real() if "bias" in src.params else np.float64(0)
                    s2 = s.real() if s is not None else np.float64(1)
                    t2 = t.real() if t is not None else np.float64(0)
                    merged = src.replace(params={"scale": Const(np.asarray(s1 * s2, np.float32), FloatType()),
                                                 "bias": Const(np.asarray(t1 * s2 + t2, np.float32), FloatType())},
                                         outputs=n.outputs)
                    # reading src's producer defers a merge whose src is itself being merged this
                    # sweep: chains then merge left to right, as one pair at a time would
                    reads = frozenset({src.name, n.name} | (_producer_name(g, src.inputs[0]) if src.inputs else set()))
                    found.append(_Rewrite(reads, frozenset({src.name, n.name}),
                                          _replace_and_drop(src.name, merged, n.name), f"merged {src.name} and {n.name}"))
                    continue
            if n.op == "Reshape" and tuple(n.attrs["shape"]) == tuple(g.value(n.inputs[0]).shape) \
                    and n.output not in graph.outputs:
                found.append(_bypass_rewrite(g, n, f"removed no-op reshape {n.name}"))
        return found

    out = _until_fixpoint(graph, find)
    ctx = current_context()
    for text in sorted(ctx_notes):
        ctx.note(text)
    return out


def _merge_changes_result(g: Graph, first: Node, second: Node, max_codes: int = 1 << 16) -> str | None:
    """Why merging float Affines ``first`` -> ``second`` into one could change the result, or None.

    None when ``first``'s input is float (unbounded: merged as before) or when, for every code of
    its fixed-point input, the merged Affine's float32 output equals the chain's -- compared after
    the ``Quantize`` that alone reads ``second`` where the raw values differ."""
    xt = g.value(first.inputs[0]).dtype
    if not isinstance(xt, FixedType):
        return None
    n_codes = xt.max_code - xt.min_code + 1
    if n_codes > max_codes:
        return f"the float32 rounding of the merged constants cannot be checked on {n_codes} input codes"

    def real(node, role):
        c = node.params.get(role)
        return c.real() if c is not None else None

    s1, t1, s2, t2 = real(first, "scale"), real(first, "bias"), real(second, "scale"), real(second, "bias")
    x = xt.to_real(np.arange(xt.min_code, xt.max_code + 1))[:, None]
    chain = float32_affine(float32_affine(x, s1, t1), s2, t2)
    one = np.float64(1)
    ms = (one if s1 is None else s1) * (one if s2 is None else s2)
    mt = (0 if t1 is None else t1) * (one if s2 is None else s2) + (0 if t2 is None else t2)
    merged = float32_affine(x, np.asarray(ms, np.float32), np.asarray(mt, np.float32))
    if np.array_equal(chain, merged):
        return None
    cons = g.consumers(second.output)
    if len(cons) == 1 and cons[0].op == "Quantize" and second.output not in g.outputs:
        qt = cons[0].attrs["to"]
        if np.array_equal(qt.quantize_real(chain), qt.quantize_real(merged)):
            return None
    return (f"the merged float32 constants round differently from the chain on "
            f"{int(np.sum(np.any(chain != merged, axis=-1)))} of {n_codes} input codes")


def _until_fixpoint(graph: Graph, find: Callable[[Graph], list[_Rewrite]]) -> Graph:
    """Apply the rewrites ``find(g)`` reports, sweep by sweep, until it reports none.

    Each sweep takes, in node order, every rewrite that does not conflict with one already taken
    (it reads or writes a node an earlier one writes, or writes a node an earlier one reads),
    applies them all to the node list, and rebuilds (re-infers) the graph once -- not once per
    rewrite.  The result is the graph that applying the first rewrite found, one at a time,
    gives.  The notes of the applied rewrites go to the pass context."""
    nodes = list(graph.nodes)
    ctx = current_context()
    while True:
        g = rebuild(graph, nodes)
        found = find(g)
        if not found:
            return g
        read, written = set(), set()
        for rw in found:
            if rw.reads & written or rw.writes & (read | written):
                continue
            read |= rw.reads
            written |= rw.writes
            rw.apply(nodes)
            ctx.note(rw.note)


def _replace_and_drop(keep: str, new: Node, drop: str) -> Callable[[list], None]:
    """Edit: node ``keep`` becomes ``new`` (in place), node ``drop`` is removed."""
    def apply(nodes: list) -> None:
        nodes[_index(nodes, keep)] = new
        del nodes[_index(nodes, drop)]
    return apply


def _bypass_rewrite(g: Graph, n: Node, note: str) -> _Rewrite:
    """Remove ``n`` and make every reader of its output read its first input instead."""
    src_value, dead_value = n.inputs[0], n.output

    def apply(nodes: list) -> None:
        nodes[:] = _bypass(nodes, _index(nodes, n.name), src_value, dead_value)
    return _Rewrite(frozenset({n.name}), frozenset({n.name} | {c.name for c in g.consumers(dead_value)}), apply, note)


def _bypass(nodes, i, src_value, dead_value):
    out = []
    for j, m in enumerate(nodes):
        if j == i:
            continue
        if dead_value in m.inputs:
            m = m.replace(inputs=tuple(src_value if v == dead_value else v for v in m.inputs))
        out.append(m)
    return out
