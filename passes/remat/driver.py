"""The rematerialization pass: budget -> problem -> solver -> rewritten graph and a report."""
from __future__ import annotations

import time

import numpy as np

from ...compiler.errors import QDeployError
from ...compiler.ir.graph import Graph
from ..manager import current_context, register_pass
from ..memory import bytes_text, memory_profile, min_feasible_bytes
from .cost import resolve_costs
from .cp_sat import solve_cp
from .evaluate import evaluate
from .greedy import solve_greedy
from .milp import solve_milp
from .problem import Problem, RematError, no_remat, resolve_budget
from .rewrite import rewrite


def rematerialize(graph: Graph, budget, *, packing: str = "byte", batch: int = 1, max_copies: int = 2,
                  time_limit: float = 10.0, method: str = "cp-sat", cost: str | None = "macs",
                  workers: int | None = None,
                  estimator: dict | None = None) -> tuple[Graph, dict]:
    """Rematerialize ``graph`` so that its peak activation memory fits ``budget``.

    Args:
        budget: bytes (int, or text like ``"48KiB"``) or a fraction of the no-remat peak
            (``0.8``, ``"80%"``).
        packing / batch: the memory model (:mod:`qdeploy.passes.memory`).
        max_copies: Moccasin's C (copies per node, including the first).
        time_limit: solver seconds; on timeout the best schedule found is returned and the report
            says it is not proven optimal.
        method: ``cp-sat`` (Moccasin), ``milp`` (Checkmate/HiGHS) or ``greedy``.
        cost: per-node compute cost the solver minimizes: ``"macs"`` (default), ``"unit"`` (1 per
            node execution), or the name of a cost provider in the active pass context
            (:attr:`qdeploy.passes.manager.PassContext.cost_models`, :func:`.cost.resolve_costs`):
            ``"cycles"`` is hls4ml estimator latency cycles, MACs where it has no price
            (:func:`qdeploy.backends.hls4ml.cycles.cycle_costs`), registered by
            :func:`qdeploy.api.compile`; called directly, supply it with
            ``with PassContext(cost_models={"cycles": cycle_costs}): ...``.  None means ``"macs"``.
        workers: CP-SAT search workers (default: the CPU count).
        estimator: options given to the cost provider (for ``cost="cycles"``: the hls4ml
            estimator's part, clock_period, reuse_factor, strategy, io_type).
    Returns:
        (new graph, report dict with peak before/after, overhead %, solve time, status).
    Raises:
        RematError: the budget is below the smallest feasible peak (stated in the message), or no
            schedule was found.
        QDeployError: ``cost="cycles"`` with no provider in the pass context (the message says
            how to supply one).
        ValueError: an unknown cost model.
    """
    model = "macs" if cost is None else cost
    costs, cost_notes = resolve_costs(graph, model, estimator)
    p = Problem.from_graph(graph, packing, batch, model, costs=costs)
    base = evaluate(p, no_remat(p))
    assert base.peak == memory_profile(graph, packing, batch).peak
    b = resolve_budget(budget, base.peak)
    rep = {"budget_bytes": b, "peak_before": base.peak, "packing": packing, "method": method,
           "max_copies": max_copies, "time_limit_s": time_limit, "cost": model}
    if cost_notes:
        rep["notes"] = list(cost_notes)
    if base.peak <= b:
        rep.update(status="not-needed", peak_after=base.peak, overhead_pct=0.0, solve_s=0.0, recomputed=[])
        return graph, rep
    lb, why = min_feasible_bytes(graph, packing, batch)
    if b < lb:
        raise RematError(f"memory budget {bytes_text(b)} is below the minimum feasible peak {bytes_text(lb)} "
                         f"({why}); no schedule can fit (unrematerialized peak {bytes_text(base.peak)})")
    t0 = time.perf_counter()
    greedy = solve_greedy(p, b, max_copies, time_limit=min(time_limit, 30.0))
    if method == "greedy":
        res = greedy
    elif method == "milp":
        res = solve_milp(p, b, time_limit)
    elif method == "cp-sat":
        res = solve_cp(p, b, max_copies, time_limit, hint=greedy.schedule,
                       workers=workers)
        if not res.feasible and greedy.feasible and res.status != "infeasible":
            greedy.notes.append(f"CP-SAT found no schedule in {time_limit:g} s; using the greedy one")
            res = greedy
    else:
        raise ValueError(f"unknown method {method!r}; one of cp-sat, milp, greedy")
    if not res.feasible:
        mp = solve_cp(p, None, max_copies, time_limit, workers=workers, minimize_peak=True)
        best = min(x for x in (mp.peak, greedy.peak, base.peak) if x is not None)
        proven = " (proven minimum)" if mp.status == "optimal" and mp.peak == best else " (best found)"
        raise RematError(f"memory budget {bytes_text(b)} cannot be met with at most {max_copies} copies "
                         f"per node ({method}: {res.status}); smallest feasible peak {bytes_text(best)}"
                         f"{proven}; lower bound {bytes_text(lb)} ({why})")
    g = rewrite(graph, p, res.schedule)
    ext = [p.names[v] for v, c in enumerate(np.bincount([v for v, _ in res.schedule.steps], minlength=p.n))
           for _ in range(c - 1)]
    rep.update(status=res.status, proven_optimal=res.status == "optimal", peak_after=res.peak,
               overhead_pct=res.overhead_pct, bound_overhead_pct=res.bound_pct,
               solve_s=time.perf_counter() - t0, recomputed=ext, nodes_before=p.n, nodes_after=len(g.nodes),
               notes=list(cost_notes) + list(res.notes))
    if res.status != "optimal":
        rep["notes"] = list(rep["notes"]) + [f"{res.method} stopped at the time limit: the schedule meets the budget "
                                          f"but is not proven optimal"]
    meta = dict(g.meta)
    meta["remat"] = {k: v for k, v in rep.items() if k != "notes"}
    return g.with_(meta=meta), rep


#: Options of the ``remat`` pass besides ``budget`` (the YAML ``memory_budget`` mapping's keys).
REMAT_OPTIONS = ("packing", "max_copies", "time_limit", "method", "cost")


@register_pass("remat")
def remat_pass(graph: Graph, budget=None, **options) -> Graph:
    """The rematerialization pass: :func:`rematerialize` under ``budget`` (bytes, text with a unit,
    or a fraction of the unrematerialized peak) with ``options`` (packing, max_copies, time_limit,
    method, cost, ...).  Its report dict (peak before/after, overhead %, solve time, status,
    notes: what the compile report shows under "Memory") is the pass result in the pass context
    (``context.results["remat"]``); a one-line summary is its note.  Without a budget the graph is
    returned unchanged and no result is set.  ``cost`` stays data (a name): ``"macs"``/``"unit"``
    are built in, ``"cycles"`` is the provider of the pass context's ``cost_models``
    (:func:`qdeploy.api.compile` registers it).

    Raises:
        QDeployError: a bad budget or option (``"memory budget: ..."``).
        RematError: the budget cannot be met.
        QDeployError: a cost model with no provider in the pass context.
    """
    if budget is None:
        return graph
    try:
        new, rep = rematerialize(graph, budget, **options)
    except (ValueError, TypeError) as e:
        raise QDeployError(f"memory budget: {e}") from None
    ctx = current_context()
    ctx.set_result(rep)
    ctx.note(f"peak {rep['peak_before']} B -> {rep['peak_after']} B (budget {rep['budget_bytes']} B), "
             f"{len(rep['recomputed'])} recomputed node execution(s), {rep['status']}")
    return new
