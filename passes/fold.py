"""Folding passes: dead-code elimination, batch-norm (affine) folding, constant folding."""
from __future__ import annotations

import numpy as np

from ..compiler.ir.graph import Const, Graph, Node, rebuild
from ..compiler.ir.types import FixedType, FloatType


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


def fold_batchnorm(graph: Graph) -> tuple[Graph, list[str]]:
    """Fold a float ``Affine`` (inference batch norm, per-channel scale/shift) into the
    float ``Dense``/``Conv`` that alone feeds it: ``W' = W * s`` (per output channel),
    ``b' = b * s + t`` (Jacob et al., CVPR 2018, Sec. 3.2 "batch normalization folding").

    Only float layers are folded: folding a float scale into fixed-point weights would change
    their bit width; quantized graphs keep the Affine for :func:`passes.precision.affine_to_fixed`.
    """
    def step(g: Graph, nodes: list[Node]):
        for i, n in enumerate(nodes):
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
            nodes[_index(nodes, prod.name)] = new
            del nodes[i]
            return f"folded {n.name} into {prod.name}"
        return None

    return _until_fixpoint(graph, step)


def fold_affine_chains(graph: Graph) -> tuple[Graph, list[str]]:
    """Constant folding of elementwise constants: merge ``Affine(Affine(x))`` with float
    constants into one Affine (``s = s1*s2``, ``t = t1*s2 + t2``), and drop identity Affines
    (scale 1, bias 0) and Reshapes to the same shape."""
    def step(g: Graph, nodes: list[Node]):
        for i, n in enumerate(nodes):
            src = g.producer(n.inputs[0]) if n.inputs else None
            if n.op == "Affine" and _is_float(n.params.get("scale")) and _is_float(n.params.get("bias")):
                s = n.params.get("scale")
                t = n.params.get("bias")
                ident = (s is None or np.all(s.real() == 1)) and (t is None or np.all(t.real() == 0))
                if ident and n.output not in graph.outputs:
                    nodes[:] = _bypass(nodes, i, n.inputs[0], n.output)
                    return f"removed identity {n.name}"
                if (src is not None and src.op == "Affine" and _single_consumer(g, src.output) == n.name
                        and _is_float(src.params.get("scale")) and _is_float(src.params.get("bias"))):
                    s1 = src.params["scale"].real() if "scale" in src.params else np.float64(1)
                    t1 = src.params["bias"].real() if "bias" in src.params else np.float64(0)
                    s2 = s.real() if s is not None else np.float64(1)
                    t2 = t.real() if t is not None else np.float64(0)
                    merged = src.replace(params={"scale": Const(np.asarray(s1 * s2, np.float32), FloatType()),
                                                 "bias": Const(np.asarray(t1 * s2 + t2, np.float32), FloatType())},
                                         outputs=n.outputs)
                    nodes[_index(nodes, src.name)] = merged
                    del nodes[i]
                    return f"merged {src.name} and {n.name}"
            if n.op == "Reshape" and tuple(n.attrs["shape"]) == tuple(g.value(n.inputs[0]).shape) \
                    and n.output not in graph.outputs:
                nodes[:] = _bypass(nodes, i, n.inputs[0], n.output)
                return f"removed no-op reshape {n.name}"
        return None

    return _until_fixpoint(graph, step)


def _until_fixpoint(graph: Graph, step) -> tuple[Graph, list[str]]:
    """Apply ``step(g, nodes) -> note | None`` (which edits ``nodes`` in place) until it
    reports no change; return the rebuilt graph and the notes."""
    nodes = list(graph.nodes)
    notes = []
    while (note := step(rebuild(graph, nodes), nodes)) is not None:
        notes.append(note)
    return rebuild(graph, nodes), notes


def _bypass(nodes, i, src_value, dead_value):
    out = []
    for j, m in enumerate(nodes):
        if j == i:
            continue
        if dead_value in m.inputs:
            m = m.replace(inputs=tuple(src_value if v == dead_value else v for v in m.inputs))
        out.append(m)
    return out
