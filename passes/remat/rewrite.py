"""Applying a schedule to the IR: recomputations become explicit nodes (``conv1__r1`` writing
``conv1_out__r1``), so the reference interpreter, TVM and hls4ml run the result unchanged."""
from __future__ import annotations

from ...compiler.ir.graph import Graph, Value
from ...compiler.ir.verify import verify
from .evaluate import evaluate
from .problem import Problem, Schedule


def rewrite(graph: Graph, p: Problem, s: Schedule) -> Graph:
    """The graph that runs ``s``: nodes in schedule order, the k-th recomputation of node ``n``
    named ``n__r<k>`` writing ``<output>__r<k>``; every read wired to the copy ``s`` chose."""
    evaluate(p, s)  # validates
    nodes = graph.nodes
    used_names = {nd.name for nd in nodes} | set(graph.values)
    count = [0] * p.n
    out_name = []
    new_nodes, values = [], dict(graph.values)
    for t, (v, reads) in enumerate(s.steps):
        nd = nodes[v]
        k = count[v]
        count[v] += 1
        if k == 0:
            name, out = nd.name, nd.output
        else:
            name, out = f"{nd.name}__r{k}", f"{nd.output}__r{k}"
            while name in used_names or out in used_names:
                k += 1
                name, out = f"{nd.name}__r{k}", f"{nd.output}__r{k}"
            used_names.update((name, out))
            ov = graph.values[nd.output]
            values[out] = Value(out, ov.shape, ov.dtype)
        out_name.append(out)
        src = {nodes[u].output: out_name[r] for u, r in zip(p.preds[v], reads)}
        new_nodes.append(nd.replace(name=name, inputs=tuple(src.get(i, i) for i in nd.inputs), outputs=(out,)))
    g = graph.with_(nodes=new_nodes, values=values)
    verify(g)
    return g
