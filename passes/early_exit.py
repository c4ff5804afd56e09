"""Early-exit splitting: cut a multi-exit IR graph into stages, and calibrate the gates.

Sources: BranchyNet (Teerapittayanon et al., ICPR 2016, arXiv 1709.01686) for exits and
max-softmax/entropy gating; EERO (arXiv 2402.03779) for choosing thresholds under a mean compute
budget.

:func:`split_exits` turns a graph whose outputs are the exits' logits (e.g. an
:class:`~qdeploy.compiler.frontends.early_exit.EarlyExitNet` exported with
``export_early_exit``) into a :class:`StagedProgram`: stage ``k`` holds the nodes that exit ``k``
needs and no earlier exit needs; its inputs are the values it reads from the program inputs or
from earlier stages (*carried* tensors, kept by the host), its outputs exit ``k``'s logits plus
the values later stages read.  The program is the control plan of
:class:`qdeploy.runtime.multistage.MultiStageModel`: run stage k, gate on exit k, continue with
the undecided inputs.

Cost of an exit = BOPs (:func:`qdeploy.compiler.ir.cost.node_bops`) of every stage up to it; the
calibration routines (:func:`calibrate`, :func:`evaluate_levels`) pick per-exit gate levels on a
validation set for a target accuracy drop or a mean-cost budget.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from ..compiler.errors import QDeployError
from ..compiler.ir.cost import node_bops
from ..compiler.ir.graph import Graph
from .partition import subgraph


class EarlyExitError(QDeployError):
    """Exits that cannot be identified or ordered (names the exit)."""


@dataclass
class StagedProgram:
    """The result of :func:`split_exits`.

    Attributes:
        graph: the whole graph the stages were cut from.
        exits: exit value names, in stage order.
        stages: one :class:`Graph` per exit (``<name>_stage<k>``).
        carried: per stage, the outputs other than the exit that later stages read.
        bops: per stage, BOPs per sample of its nodes; ``cum_bops[k]`` = cost of leaving at exit k.
        final_only_bops: BOPs of the final exit computed alone (the nodes it depends on, no heads).
    """

    graph: Graph
    exits: list
    stages: list
    carried: list
    bops: list = field(default_factory=list)

    @property
    def cum_bops(self) -> list:
        return [float(x) for x in np.cumsum(self.bops)]

    @property
    def final_only_bops(self) -> float:
        return graph_bops(self.graph, _ancestors(self.graph, self.exits[-1]))


def _ancestors(graph: Graph, value: str) -> set:
    """Names of the nodes ``value`` depends on (including its producer)."""
    out, stack = set(), [value]
    while stack:
        p = graph.producer(stack.pop())
        if p is None or p.name in out:
            continue
        out.add(p.name)
        stack.extend(p.inputs)
    return out


def graph_bops(graph: Graph, node_names=None) -> float:
    """Sum of :func:`qdeploy.compiler.ir.cost.node_bops` over ``node_names`` (default: all nodes)."""
    return float(sum(node_bops(graph, n) for n in graph.nodes if node_names is None or n.name in node_names))


def split_exits(graph: Graph, exits=None) -> StagedProgram:
    """Split ``graph`` at its exits into stages.

    Args:
        graph: an IR graph (after the default passes, so types are final).
        exits: exit value names in order (earliest first).  Default: the graph outputs, in order,
            which must be at least two.
    Returns:
        :class:`StagedProgram`.
    Raises:
        EarlyExitError: fewer than two exits, an unknown exit name, an exit that depends on a
            later exit, or an exit that adds no computation after the previous one.
    """
    exits = list(graph.outputs if exits is None else exits)
    if len(exits) < 2:
        raise EarlyExitError(f"cannot identify exits in {graph.name!r}: it has {len(exits)} output(s) "
                             f"({', '.join(exits) or 'none'}); export one output per exit (a module returning a list "
                             f"of logits, see qdeploy.compiler.frontends.early_exit) or pass exits=[value names]",
                             graph.name)
    for e in exits:
        if e not in graph.values:
            raise EarlyExitError(f"exit {e!r} is not a value of {graph.name!r}; graph outputs: "
                                 f"{', '.join(graph.outputs)}", e)
        if graph.producer(e) is None:
            raise EarlyExitError(f"exit {e!r} is a graph input, not computed by any node", e)
    if len(set(exits)) != len(exits):
        raise EarlyExitError(f"exits listed twice: {exits}", graph.name)
    anc = [_ancestors(graph, e) for e in exits]
    for k, e in enumerate(exits):
        for j in range(k + 1, len(exits)):
            if graph.producer(exits[j]).name in anc[k]:
                raise EarlyExitError(f"exit {k} ({e!r}) depends on exit {j} ({exits[j]!r}), a later stage: "
                                     f"list the exits in the order they are computed", e)
    # an exit listed before another must be cheaper to reach: leaving at it is the point of the split
    # (the reverse order, e.g. [final, early], would make stage 0 the whole model and exit there)
    cost = [graph_bops(graph, a) for a in anc]
    for k in range(len(exits)):
        for j in range(k + 1, len(exits)):
            if cost[k] > cost[j] or (cost[k] == cost[j] and len(anc[k]) > len(anc[j])):
                raise EarlyExitError(
                    f"exit {k} ({exits[k]!r}) costs more to reach ({cost[k]:.4g} BOPs, {len(anc[k])} nodes) than the "
                    f"later exit {j} ({exits[j]!r}, {cost[j]:.4g} BOPs, {len(anc[j])} nodes): list the exits "
                    f"earliest (cheapest) first", exits[k])
    stage_of = {}
    for k, a in enumerate(anc):
        for name in a:
            stage_of.setdefault(name, k)
    for k, e in enumerate(exits):
        if stage_of[graph.producer(e).name] != k:
            raise EarlyExitError(f"exit {k} ({e!r}) needs nothing beyond exit {stage_of[graph.producer(e).name]}'s "
                                 f"stage: it cannot be a later exit (reorder or drop it)", e)
    produced_in = {n.output: stage_of.get(n.name) for n in graph.nodes}
    stage_nodes = [[n for n in graph.nodes if stage_of.get(n.name) == k] for k in range(len(exits))]
    stages, carried, bops = [], [], []
    for k, nodes in enumerate(stage_nodes):
        own = {n.output for n in nodes}
        inputs = []
        for n in nodes:
            for i in n.inputs:
                if i not in own and i not in inputs:
                    inputs.append(i)
        later_reads = {i for n in graph.nodes if (stage_of.get(n.name) or 0) > k for i in n.inputs}
        carry = [n.output for n in nodes if n.output in later_reads and n.output != exits[k]]
        for i in inputs:  # sanity: every input comes from the program inputs or an earlier stage
            src = produced_in.get(i)
            if src is not None and src > k:
                raise EarlyExitError(f"stage {k} reads {i!r} from later stage {src}", i)
        g = subgraph(graph, nodes, inputs, [exits[k]] + carry, f"stage{k}")
        stages.append(g)
        carried.append(carry)
        bops.append(graph_bops(graph, {n.name for n in nodes}))
    return StagedProgram(graph, exits, stages, carried, bops)


# --------------------------------------------------------------------------- gating analysis
def exit_table(levels, conf, correct, cum_cost):
    """Exit index per input for gate ``levels`` (one per gated exit; ``inf`` = never).

    ``conf[k]`` confidences (n,) of the gated exits 0..K-2, ``correct[k]`` bool (n,) for all K
    exits, ``cum_cost[k]`` cost of leaving at exit k.  Returns (exit index (n,), accuracy, mean
    cost)."""
    K = len(correct)
    n = len(correct[0])
    ex = np.full(n, K - 1, dtype=np.int64)
    undecided = np.ones(n, dtype=bool)
    for k, lv in enumerate(levels):
        m = undecided & (conf[k] >= lv)
        ex[m] = k
        undecided &= ~m
    corr = np.asarray(correct)[ex, np.arange(n)]
    return ex, float(corr.mean()), float(np.asarray(cum_cost, dtype=np.float64)[ex].mean())


def evaluate_levels(levels, conf, correct, cum_cost) -> dict:
    """Exit distribution, accuracy per exit and overall, mean/worst cost for gate ``levels``."""
    ex, acc, cost = exit_table(levels, conf, correct, cum_cost)
    K = len(correct)
    n = len(ex)
    corr = np.asarray(correct)
    dist = [int(np.sum(ex == k)) for k in range(K)]
    return {
        "levels": [None if (isinstance(lv, float) and math.isinf(lv)) else lv for lv in levels],
        "exit_counts": dist, "exit_fraction": [c / n for c in dist],
        "accuracy": acc,
        "accuracy_at_exit": [float(corr[k][ex == k].mean()) if dist[k] else None for k in range(K)],
        "accuracy_if_all_exit": [float(corr[k].mean()) for k in range(K)],
        "mean_cost": cost, "worst_cost": float(np.asarray(cum_cost)[ex.max()]) if n else 0.0,
    }


def _candidates(c, max_candidates):
    u = np.unique(c)
    if u.size > max_candidates:
        u = np.unique(np.quantile(u, np.linspace(0, 1, max_candidates), method="nearest"))
    return list(u) + [math.inf]


def calibrate(conf, correct, cum_cost, *, max_drop=None, budget=None, budget_band: float = 0.02, z: float = 0.0,
              max_candidates: int = 96, max_grid: int = 200_000) -> dict:
    """Pick gate levels (one per early exit) on a validation set.

    Exactly one of:
        max_drop: accuracy may be at most this many **points** (percent) below the final exit
            alone; minimizes the mean cost (ties: higher accuracy).
        budget: mean cost per input (same unit as ``cum_cost``, e.g. BOPs) to spend; maximizes
            accuracy among settings whose mean cost lies in ``[(1 - budget_band) budget, budget]``
            (EERO-style: the budget is spent, not undercut), else among those under the budget
            (ties: the cost closest to the budget).

    ``z`` (accuracy mode): a safety margin for small validation sets: the paired accuracy
    difference ``D = mean(correct_exit - correct_final)`` must satisfy ``D - z * SE(D) >= -max_drop``
    with ``SE(D) = std(d) / sqrt(n)`` (0 = the plain rule).

    Candidate levels per exit: the observed confidences (at most ``max_candidates`` quantiles)
    plus "never".  All combinations are tried when there are at most ``max_grid``, otherwise
    coordinate descent from "never exit".

    Returns:
        :func:`evaluate_levels`'s dict plus ``mode``, ``target``.
    Raises:
        ValueError: both or neither of ``max_drop``/``budget``; no setting meets the target
            (a budget below the first exit's cost).
    """
    if (max_drop is None) == (budget is None):
        raise ValueError("give exactly one of max_drop (accuracy points) or budget (mean cost)")
    cands = [_candidates(np.asarray(c), max_candidates) for c in conf]
    final_acc = float(np.mean(correct[-1]))

    corr_arr = np.asarray(correct)
    n_val = corr_arr.shape[1]
    if max_drop is not None:
        floor = final_acc - float(max_drop) / 100.0 - 1e-12

        def margin(lv):
            if not z:
                return 0.0
            ex, _, _ = exit_table(lv, conf, correct, cum_cost)
            d = corr_arr[ex, np.arange(n_val)].astype(np.float64) - corr_arr[-1]
            return float(z * d.std() / math.sqrt(n_val))

        def key(acc, cost, lv=None):
            ok = acc >= floor and (not z or acc - margin(lv) >= floor)
            return (0, -cost, acc) if ok else (-1, acc, -cost)
    else:
        B = float(budget)

        def key(acc, cost, lv=None):
            if cost > B * (1 + 1e-12):
                return (-2, -cost, acc)
            if cost >= (1 - budget_band) * B:
                return (1, acc, cost)
            return (0, acc, cost)

    best, best_key = None, None
    n_grid = int(np.prod([len(c) for c in cands], dtype=np.float64))
    if n_grid <= max_grid:
        for lv in itertools.product(*cands):
            _, acc, cost = exit_table(lv, conf, correct, cum_cost)
            kk = key(acc, cost, lv)
            if best_key is None or kk > best_key:
                best, best_key = list(lv), kk
    else:
        best = [math.inf] * len(cands)
        _, acc, cost = exit_table(best, conf, correct, cum_cost)
        best_key = key(acc, cost, best)
        for _ in range(4):
            improved = False
            for k in range(len(cands)):
                for v in cands[k]:
                    lv = list(best)
                    lv[k] = v
                    _, acc, cost = exit_table(lv, conf, correct, cum_cost)
                    kk = key(acc, cost, lv)
                    if kk > best_key:
                        best, best_key, improved = lv, kk, True
            if not improved:
                break
    if best_key[0] < 0:
        what = f"accuracy within {max_drop} points of the final exit" if max_drop is not None else \
            f"mean cost <= {budget:.6g}"
        raise ValueError(f"no gate setting reaches {what} on the calibration set")
    out = evaluate_levels(best, conf, correct, cum_cost)
    out.update(mode="accuracy" if max_drop is not None else "budget", z=float(z),
               target=float(max_drop) if max_drop is not None else float(budget), final_accuracy=final_acc)
    out["levels_raw"] = best
    return out


__all__ = ["EarlyExitError", "StagedProgram", "split_exits", "graph_bops", "exit_table", "evaluate_levels",
           "calibrate"]
