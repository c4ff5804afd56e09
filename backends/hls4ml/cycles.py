"""hls4ml estimator latency cycles as a per-node compute cost (the ``"cycles"`` cost model of
rematerialization).

The passes never import a backend: :func:`qdeploy.passes.remat.rematerialize` and the ``remat``
pass look a named cost model up in the active pass context
(:attr:`qdeploy.passes.manager.PassContext.cost_models`).  :func:`qdeploy.api.compile` registers
:func:`cycle_costs` there under ``"cycles"`` (:func:`qdeploy.api.cost_models`); to use it outside a
compile::

    from qdeploy.passes import PassContext
    from qdeploy.backends.hls4ml.cycles import cycle_costs
    with PassContext(cost_models={"cycles": cycle_costs}):
        g2, rep = rematerialize(g, 0.9, cost="cycles")
"""
from __future__ import annotations

from ...compiler.errors import QDeployError
from ...compiler.ir.graph import Graph
from ...passes.memory import node_costs


def cycle_costs(graph: Graph, estimator: dict | None = None) -> tuple[dict[str, int], list[str]]:
    """Per-node cost in clock cycles from the hls4ml estimator, MACs where it has no price.

    Each node the estimator places on the device costs its ``latency_cycles`` from
    :func:`qdeploy.backends.hls4ml.estimate.estimate` (``estimator``: its config: part,
    clock_period, reuse_factor, strategy, io_type, ...), at least 1 (elementwise ops chained into
    a neighbour's cycle are estimated at 0 cycles; a recomputation is never free).  Nodes it does
    not price (host prologue/epilogue: float results, Softmax on the host) cost their MACs
    (:func:`qdeploy.passes.memory.node_macs`); when the estimator refuses the graph (an op it does
    not support, an illegal reuse factor) every node costs its MACs.  Mixed units only arise with
    host nodes, which are float and off the device; the notes say which nodes fell back.

    This is a cost provider ``fn(graph, options) -> (costs, notes)`` for
    :attr:`qdeploy.passes.manager.PassContext.cost_models`.

    Returns:
        (node name -> cost, notes).
    """
    from .estimate import estimate  # looked up at call time (tests replace estimate.estimate)
    macs = node_costs(graph, "macs")
    try:
        est = estimate(graph, dict(estimator or {}))
    except QDeployError as e:
        return macs, [f"cost=cycles: the hls4ml estimator cannot price this graph ({e.one_line()}); "
                      f"MACs used for every node"]
    rows = {r["name"]: r for r in est.get("layers", [])}
    costs, fallback = {}, []
    for nd in graph.nodes:
        r = rows.get(nd.name)
        if r is None or r.get("host"):
            costs[nd.name] = macs[nd.name]
            fallback.append(nd.name)
        else:
            costs[nd.name] = max(1, int(r["latency_cycles"]))
    notes = []
    if fallback:
        notes.append(f"cost=cycles: {len(fallback)} node(s) not priced by the hls4ml estimator cost their MACs "
                     f"({', '.join(fallback)})")
    return costs, notes
