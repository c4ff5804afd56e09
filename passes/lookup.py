"""``fold_lookup_quantize``: a float-valued ``Lookup`` table and the ``Quantize`` right after it
become one ``Lookup`` whose table holds output codes.

``Quantize(to)`` of a float32 value is ``to.quantize_real(value)`` (the reference kernel of
:mod:`qdeploy.compiler.ir.ops.quantize`); applying it to each table entry at compile time instead of
to each looked-up value at run time gives the same codes, so the fold is exact and puts the table
inside the fixed-point datapath (e.g. ONNX ``Sigmoid``/``Tanh`` between two ``Quant`` nodes, see
:mod:`qdeploy.compiler.ir.ops.lookup`).  Source of the method: evaluating an activation of a
low-precision input as a table over its codes, rounded once (hls4ml's lookup-table activations,
Duarte et al., JINST 13 P07027, 2018, sec. 3).
"""
from __future__ import annotations

import numpy as np

from ..compiler.ir.graph import Const, Graph
from ..compiler.ir.types import FixedType
from .manager import note, register_pass


@register_pass("fold_lookup_quantize")
def fold_lookup_quantize(graph: Graph) -> Graph:
    """Fold each float-table ``Lookup`` whose only consumer is a ``Quantize`` (and that is not a
    graph output) into a ``Lookup`` with the table ``to.quantize_real(table)`` of that Quantize's
    type; the Quantize disappears and its output value is kept.  Notes: one per fold."""
    nodes = list(graph.nodes)
    for n in graph.nodes:
        tab = n.params.get("table") if n.op == "Lookup" else None
        if tab is None or isinstance(tab.dtype, FixedType) or n.output in graph.outputs:
            continue
        cons = graph.consumers(n.output)
        if len(cons) != 1 or cons[0].op != "Quantize" or not np.all(np.isfinite(tab.data)):
            continue
        q = cons[0]
        to = q.attrs["to"]
        codes = to.quantize_real(tab.data)
        new = n.replace(params={"table": Const(codes, to)}, outputs=q.outputs)
        nodes = [new if m.name == n.name else m for m in nodes if m.name != q.name]
        note(f"folded Quantize '{q.name}' into the table of Lookup '{n.name}' ({to})")
    return graph.with_(nodes=nodes) if len(nodes) != len(graph.nodes) else graph
