"""The compute-cost models the solvers minimize.

Built in: ``"macs"`` and ``"unit"`` (:func:`qdeploy.passes.memory.node_costs`).  Any other name
is a *cost provider* looked up in the active pass context
(:attr:`qdeploy.passes.manager.PassContext.cost_models`): a function ``fn(graph, options) ->
(node name -> cost, notes)``.  The passes import no backend; the user layer supplies providers --
:func:`qdeploy.api.compile` registers ``"cycles"`` (hls4ml estimator latency cycles,
:func:`qdeploy.backends.hls4ml.cycles.cycle_costs`), and a direct caller does::

    with PassContext(cost_models={"cycles": cycle_costs}):
        rematerialize(g, 0.9, cost="cycles")
"""
from __future__ import annotations

from ...compiler.errors import QDeployError
from ...compiler.ir.graph import Graph
from ..manager import current_context
from ..memory import node_costs

#: Cost models the solvers know without a provider.
BUILTIN_COST_MODELS = ("macs", "unit")
#: Every cost model name the ``remat`` pass documents (``"cycles"`` needs a provider).
COST_MODELS = ("macs", "cycles", "unit")

_HOW = ("supply a provider fn(graph, options) -> (costs, notes) in the pass context, e.g. "
        "`with PassContext(cost_models={'cycles': qdeploy.backends.hls4ml.cycles.cycle_costs}): ...` "
        "(qdeploy.api.compile registers it)")


def resolve_costs(graph: Graph, model: str, options: dict | None = None,
                  providers: dict | None = None) -> tuple[dict, list[str]]:
    """Per-node costs of ``graph`` under cost model ``model``: ``(node name -> cost, notes)``.

    ``"macs"``/``"unit"`` are built in; any other name is looked up in ``providers`` (default: the
    active pass context's ``cost_models``) and called as ``provider(graph, options)``.

    Raises:
        QDeployError: ``model`` is a known name (``"cycles"``) with no provider supplied (the
            message says how to supply one).
        ValueError: an unknown cost model name.
    """
    if model in BUILTIN_COST_MODELS:
        return node_costs(graph, model), []
    if providers is None:
        providers = current_context().cost_models
    fn = providers.get(model)
    if fn is None:
        if model in COST_MODELS:
            raise QDeployError(f"cost model {model!r} has no provider in this pass context; {_HOW}")
        known = sorted(set(COST_MODELS) | set(providers))
        raise ValueError(f"unknown cost {model!r}; one of {', '.join(known)}")
    costs, notes = fn(graph, options)
    return dict(costs), list(notes or [])
