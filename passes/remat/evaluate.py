"""Scoring a schedule: exact peak and compute cost under the memory model of
:mod:`qdeploy.passes.memory` (tight liveness), pruning unread recomputations, and the
:class:`RematResult` every solver returns."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .problem import Problem, Schedule, no_remat


@dataclass
class Evaluation:
    """Result of :func:`evaluate`: ``peak`` (bytes), ``cost`` (sum of node costs, the units of
    ``Problem.costs``), ``per_step`` (bytes live while each step runs)."""

    peak: int
    cost: int
    per_step: list
    last: list  # step after which each step's output is freed (len(steps) = held to the end)


def evaluate(p: Problem, s: Schedule) -> Evaluation:
    """Exact peak and cost of ``s`` under the memory model of :mod:`qdeploy.passes.memory`.

    Raises:
        ValueError: when ``s`` is not a valid schedule (a read of a later step or of the wrong
            node, a node never run, an output computed more than once).
    """
    L = len(s.steps)
    last = list(range(L))
    src_last = [-1] * len(p.src_names)
    seen = [0] * p.n
    for t, (v, reads) in enumerate(s.steps):
        seen[v] += 1
        if len(reads) != len(p.preds[v]):
            raise ValueError(f"step {t} ({p.names[v]}) reads {len(reads)} values, needs {len(p.preds[v])}")
        for u, r in zip(p.preds[v], reads):
            if not (0 <= r < t) or s.steps[r][0] != u:
                raise ValueError(f"step {t} ({p.names[v]}) reads step {r}, not an earlier run of {p.names[u]}")
            last[r] = t
        for x in p.src_preds[v]:
            src_last[x] = t
    if min(seen, default=1) < 1:
        raise ValueError(f"node {p.names[seen.index(0)]} never runs")
    for o in p.outputs:
        if seen[o] != 1:
            raise ValueError(f"graph output {p.names[o]} must run exactly once")
    for t, (v, _) in enumerate(s.steps):
        if v in p.outputs:
            last[t] = L
    free = [0] * (L + 1)
    live = 0
    for x, sz in enumerate(p.src_sizes):
        live += sz
        free[src_last[x] if src_last[x] >= 0 else L] += sz
    peak = live
    per = []
    cost = 0
    for t, (v, _) in enumerate(s.steps):
        live += p.sizes[v]
        free[last[t]] += p.sizes[v]
        per.append(live)
        peak = max(peak, live)
        live -= free[t]
        cost += p.costs[v]
    return Evaluation(peak, cost, per, last)


def prune(p: Problem, s: Schedule) -> Schedule:
    """Drop executions nobody reads (and that are not outputs), repeatedly; renumber reads."""
    steps = list(s.steps)
    while True:
        read = set(r for _, rs in steps for r in rs)
        dead = [t for t, (v, _) in enumerate(steps) if t not in read and v not in p.outputs
                and sum(1 for w, _ in steps if w == v) > 1]
        if not dead:
            return Schedule(steps)
        drop = set(dead)
        new_idx, k = {}, 0
        for t in range(len(steps)):
            if t not in drop:
                new_idx[t] = k
                k += 1
        steps = [(v, tuple(new_idx[r] for r in rs)) for t, (v, rs) in enumerate(steps) if t not in drop]


# =============================================================== results
@dataclass
class RematResult:
    """What a solver returns.  ``status``: optimal, feasible (not proven optimal), infeasible,
    unknown (no schedule found in the time limit), not-needed."""

    method: str
    status: str
    schedule: Schedule | None
    peak: int | None
    cost: int | None
    base_peak: int
    base_cost: int
    budget: int
    solve_s: float
    bound: float | None = None  # lower bound on the total cost proven by the solver
    timeline: list = field(default_factory=list)  # (seconds, cost) of each improving schedule
    notes: list = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        """A schedule was found and its peak fits the budget."""
        return self.schedule is not None and self.peak is not None and self.peak <= self.budget

    @property
    def overhead_pct(self) -> float | None:
        """Added compute cost in percent of the no-remat cost (None without a schedule)."""
        return None if self.cost is None else 100.0 * (self.cost - self.base_cost) / self.base_cost

    @property
    def bound_pct(self) -> float | None:
        """The solver's proven lower bound on the cost as an overhead percentage (None if none)."""
        return None if self.bound is None else 100.0 * (self.bound - self.base_cost) / self.base_cost

    def time_to_reach(self, cost: float) -> float | None:
        """Seconds until the solver first held a schedule of cost <= ``cost``."""
        for t, c in self.timeline:
            if c <= cost:
                return t
        return None


def make_result(p: Problem, method: str, status: str, sched: Schedule | None, budget, t0: float, **kw) -> RematResult:
    """The :class:`RematResult` of a solver run: ``sched`` pruned (:func:`prune`) and scored exactly
    (:func:`evaluate`), against the no-remat baseline of ``p``; ``solve_s`` is the time since
    ``t0`` (``time.perf_counter()``); ``kw`` sets the other fields (bound, timeline, notes)."""
    base = evaluate(p, no_remat(p))
    if sched is not None:
        sched = prune(p, sched)
        ev = evaluate(p, sched)
        peak, cost = ev.peak, ev.cost
    else:
        peak = cost = None
    return RematResult(method, status, sched, peak, cost, base.peak, base.cost, int(budget),
                       time.perf_counter() - t0, **kw)
