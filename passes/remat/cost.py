"""The compute-cost models the solvers minimize: MACs (:func:`qdeploy.passes.memory.node_costs`)
or hls4ml estimator cycles (:func:`cycle_costs`)."""
from __future__ import annotations

from ...compiler.errors import QDeployError
from ...compiler.ir.graph import Graph
from ..memory import node_costs

COST_MODELS = ("macs", "cycles", "unit")


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

    Returns:
        (node name -> cost, notes).
    """
    from ...backends.hls4ml.estimate import estimate
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
