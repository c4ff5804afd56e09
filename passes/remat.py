"""Tensor rematerialization under a peak-memory budget (issue 8).

Sources:

* Moccasin -- Bartan, Li, Jain, Rupp, et al., "Moccasin: Efficient Tensor Rematerialization
  for Neural Networks", ICML 2023 (arXiv 2304.14463): at most ``C`` copies per node, each an
  optional *retention interval* ``[start, end]`` with a presence literal; a cumulative
  constraint bounds the live bytes; a node's copy may run only while some copy of each input is
  retained; minimize the total compute cost.  Solved with OR-Tools CP-SAT (:func:`solve_cp`).
* Checkmate -- Jain et al., "Checkmate: Breaking the Memory Wall with Optimal Tensor
  Rematerialization", MLSys 2020 (arXiv 1910.02653): the frontier-advancing MILP with
  ``R[t,i]`` (compute), ``S[t,i]`` (retain), ``FREE[t,i,k]`` and ``U[t,k]`` (memory) variables,
  solved with HiGHS through SciPy (:func:`solve_milp`), the comparison baseline.
* a greedy baseline (:func:`solve_greedy`): repeatedly split the lifetime of a value held across
  the peak step by recomputing it right before its next reader, picking the move with the
  largest drop of over-budget bytes per unit of added compute.

All three return a :class:`Schedule` (the order of node executions including recomputations,
with the exact copy each execution reads) that :func:`evaluate` scores with the memory model of
:mod:`qdeploy.passes.memory` (tight liveness), so every peak quoted is the peak the reference
interpreter measures when it runs the rewritten graph.

:func:`rewrite` turns a schedule into an ordinary IR graph whose recomputations are explicit
nodes (``conv1__r1`` writing ``conv1_out__r1``): the reference interpreter, TVM and hls4ml run it
unchanged.  :func:`rematerialize` is the pass (budget in bytes or as a fraction of the peak).

Modelling decisions: graph inputs are held from the start until their last reader (they cannot
be recomputed); graph-output nodes are computed once and held to the end; constants (weights)
are not activation memory; every IR op is stateless (asserted: recomputing never changes state).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from ..compiler.errors import QDeployError, UnsupportedError
from ..compiler.ir.graph import Graph, Value
from ..compiler.ir.ops import OPS
from ..compiler.ir.verify import verify
from .memory import fmt_bytes, memory_profile, min_feasible_bytes, node_costs, parse_budget, value_bytes

#: Ops that may be recomputed: pure functions of their inputs and constants.  (Batch norm is
#: folded into ``Affine`` with frozen statistics by the importer, so inference graphs are stateless.)
STATELESS_OPS = frozenset(OPS)


class RematError(QDeployError):
    """The memory budget cannot be met (the message states the smallest feasible peak)."""


# =============================================================== problem and schedules
@dataclass
class Problem:
    """A rematerialization instance, independent of the IR (benchmarks build these directly).

    Attributes:
        names: compute nodes in topological order.
        preds: for each node, the distinct node indices it reads (in first-read order).
        src_preds: for each node, the distinct source (graph input) indices it reads.
        sizes / costs: output bytes and compute cost of each node.
        src_names / src_sizes: graph inputs (held from the start, never recomputed).
        outputs: node indices that are graph outputs (computed once, held to the end).
    """

    names: list
    preds: list
    src_preds: list
    sizes: list
    costs: list
    src_names: list = field(default_factory=list)
    src_sizes: list = field(default_factory=list)
    outputs: frozenset = frozenset()

    def __post_init__(self):
        self.n = len(self.names)
        self.users = [[] for _ in range(self.n)]
        for v, ps in enumerate(self.preds):
            for u in ps:
                if u >= v:
                    raise ValueError(f"node {self.names[v]!r} reads node {self.names[u]!r} that is not before it")
                self.users[u].append(v)
        self.src_users = [[] for _ in self.src_names]
        for v, ps in enumerate(self.src_preds):
            for x in ps:
                self.src_users[x].append(v)
        self.outputs = frozenset(self.outputs)

    @property
    def edges(self) -> int:
        """Node-to-node dependencies (reads of graph inputs not counted)."""
        return sum(len(p) for p in self.preds)

    def lower_bound(self) -> int:
        """No schedule can peak below this: a node's inputs + output, all sources, all outputs."""
        lb = max((self.sizes[v] + sum(self.sizes[u] for u in self.preds[v])
                  + sum(self.src_sizes[x] for x in self.src_preds[v]) for v in range(self.n)), default=0)
        return max(lb, sum(self.src_sizes), sum(self.sizes[o] for o in self.outputs))

    @staticmethod
    def from_graph(graph: Graph, packing: str = "byte", batch: int = 1, cost_model: str = "macs",
                   costs: dict | None = None) -> "Problem":
        """``cost_model``: ``macs``/``unit`` (:func:`qdeploy.passes.memory.node_costs`) or
        ``cycles`` (:func:`cycle_costs`, default estimator options); ``costs`` (node name -> cost)
        overrides it."""
        for nd in graph.nodes:
            if nd.op not in STATELESS_OPS or nd.attrs.get("stateful"):
                raise UnsupportedError(f"op {nd.op} is not known to be stateless; it cannot be recomputed", nd.name)
        idx = {nd.output: t for t, nd in enumerate(graph.nodes)}
        sidx = {x: k for k, x in enumerate(graph.inputs)}
        if costs is None:
            costs = cycle_costs(graph)[0] if cost_model == "cycles" else node_costs(graph, cost_model)
        preds, spreds = [], []
        for nd in graph.nodes:
            ins = list(dict.fromkeys(nd.inputs))
            preds.append(tuple(idx[i] for i in ins if i in idx))
            spreds.append(tuple(sidx[i] for i in ins if i not in idx))
        return Problem([nd.name for nd in graph.nodes], preds, spreds,
                       [value_bytes(graph.values[nd.output], packing, batch) for nd in graph.nodes],
                       [costs[nd.name] for nd in graph.nodes], list(graph.inputs),
                       [value_bytes(graph.values[x], packing, batch) for x in graph.inputs],
                       frozenset(idx[o] for o in graph.outputs if o in idx))


@dataclass
class Schedule:
    """Node executions in order.  ``steps[t] = (node, reads)``: ``reads[k]`` is the index of the
    earlier step whose output this execution reads for ``preds[node][k]``."""

    steps: list

    def __len__(self):
        return len(self.steps)


def no_remat(p: Problem) -> Schedule:
    return Schedule([(v, tuple(p.preds[v])) for v in range(p.n)])


@dataclass
class Evaluation:
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
        return self.schedule is not None and self.peak is not None and self.peak <= self.budget

    @property
    def overhead_pct(self) -> float | None:
        return None if self.cost is None else 100.0 * (self.cost - self.base_cost) / self.base_cost

    @property
    def bound_pct(self) -> float | None:
        return None if self.bound is None else 100.0 * (self.bound - self.base_cost) / self.base_cost

    def time_to_reach(self, cost: float) -> float | None:
        """Seconds until the solver first held a schedule of cost <= ``cost``."""
        for t, c in self.timeline:
            if c <= cost:
                return t
        return None


def _result(p, method, status, sched, budget, t0, **kw) -> RematResult:
    base = evaluate(p, no_remat(p))
    if sched is not None:
        sched = prune(p, sched)
        ev = evaluate(p, sched)
        peak, cost = ev.peak, ev.cost
    else:
        peak = cost = None
    return RematResult(method, status, sched, peak, cost, base.peak, base.cost, int(budget),
                       time.perf_counter() - t0, **kw)


# =============================================================== greedy baseline
def _insert_recompute(p: Problem, steps: list, r: int, block: list, v: int, readers: set) -> list:
    """Insert runs of the nodes ``block`` (topological order, ending with ``v``) at position ``r``,
    each reading the latest earlier run of its inputs, and rewire the reads of ``v`` at
    ``readers`` (steps >= r, old numbering) to the new run of ``v``."""
    latest = {}
    for t in range(r):
        latest[steps[t][0]] = t
    k = len(block)
    new = []
    for t, (w, rs) in enumerate(steps):
        if t == r:
            for j, u in enumerate(block):
                new.append((u, tuple(latest[x] for x in p.preds[u])))
                latest[u] = r + j
        rs2 = tuple(rr + k if rr >= r else rr for rr in rs)
        if t in readers:
            rs2 = tuple(r + k - 1 if u == v else rr2 for u, rr2 in zip(p.preds[w], rs2))
        new.append((w, rs2))
    return new


def _block_for(p: Problem, steps: list, last: list, r: int, v: int, copies: list, max_copies: int):
    """Nodes to recompute before step ``r`` so that ``v`` can run there: ``v`` and, recursively,
    each input whose latest run is no longer held at ``r`` (when it may be recomputed)."""
    latest = {}
    for t in range(r):
        latest[steps[t][0]] = t
    block, seen = [], set()

    def need(u):
        if u in seen:
            return
        seen.add(u)
        for x in p.preds[u]:
            e = latest.get(x)
            if last[e] < r - 1 and x not in p.outputs and copies[x] < max_copies and len(block) < 8:
                need(x)
        block.append(u)
    need(v)
    return sorted(block)


def solve_greedy(p: Problem, budget: int, max_copies: int = 2, time_limit: float = 30.0) -> RematResult:
    """Greedy baseline (see the module docstring).  Stops at the budget, when no move lowers the
    over-budget bytes, or at ``time_limit``."""
    t0 = time.perf_counter()
    steps = list(no_remat(p).steps)

    def score(st):
        ev = evaluate(p, Schedule(st))
        return ev, sum(max(0, m - budget) for m in ev.per_step)

    ev, excess = score(steps)
    copies = [1] * p.n
    while ev.peak > budget and time.perf_counter() - t0 < time_limit:
        t_star = max(range(len(steps)), key=lambda t: ev.per_step[t])
        readers_at = {}
        for t, (w, rs) in enumerate(steps):
            for r in rs:
                readers_at.setdefault(r, []).append(t)
        best = None
        for e, (v, _) in enumerate(steps[:t_star]):
            if v in p.outputs or copies[v] >= max_copies or ev.last[e] <= t_star:
                continue
            later = [t for t in readers_at.get(e, []) if t > t_star]
            if not later:
                continue
            r0 = min(later)
            block = _block_for(p, steps, ev.last, r0, v, copies, max_copies)
            cand = _insert_recompute(p, steps, r0, block, v, set(later))
            cev, cex = score(cand)
            if cex < excess:
                gain = (excess - cex) / max(1, sum(p.costs[u] for u in block))
                if best is None or gain > best[0]:
                    best = (gain, cand, cev, cex, block)
        if best is None:
            break
        _, steps, ev, excess, block = best
        for u in block:
            copies[u] += 1
    status = "feasible" if ev.peak <= budget else "infeasible"
    return _result(p, "greedy", status, Schedule(steps), budget, t0,
                   notes=[] if ev.peak <= budget else [f"greedy stopped at peak {ev.peak} > budget {budget}"])


# =============================================================== Moccasin CP-SAT model
def _workers(workers):
    return max(1, int(workers or os.cpu_count() or 1))


def solve_cp(p: Problem, budget: int | None, max_copies: int = 2, time_limit: float = 10.0,
             hint: Schedule | None = None, workers: int | None = None, minimize_peak: bool = False) -> RematResult:
    """Moccasin's CP model solved by CP-SAT.

    Variables per node ``v`` and copy ``i < C`` (``C = max_copies``, 1 for graph outputs): start
    ``s`` (the step it runs), end ``e`` (the last step it is retained), presence ``p`` (copy 0
    always present).  Constraints: one execution per step (NoOverlap of unit intervals); the
    retention intervals ``[s, e]`` with demand = bytes fit under ``budget`` (Cumulative, graph
    inputs as intervals from step 0); for each edge ``u -> v`` and each present copy of ``v``
    some present copy of ``u`` started before it and is retained until it (a literal per copy
    pair); copies of a node are ordered and disjoint; outputs are retained to the horizon.
    Objective: total compute cost.  The hint (warm start) is ``hint`` or the no-remat order.

    With ``minimize_peak`` the budget is a variable and the peak is minimized instead.
    """
    from ortools.sat.python import cp_model

    t0 = time.perf_counter()
    C = [1 if v in p.outputs else max(1, int(max_copies)) for v in range(p.n)]
    H = sum(C)
    m = cp_model.CpModel()
    S, E, P, I_run, I_ret, dem = {}, {}, {}, [], [], []
    for v in range(p.n):
        for i in range(C[v]):
            s = m.NewIntVar(1, H, f"s{v}_{i}")
            e = m.NewIntVar(1, H, f"e{v}_{i}")
            pr = m.NewConstant(1) if i == 0 else m.NewBoolVar(f"p{v}_{i}")
            if i == 0:
                I_run.append(m.NewFixedSizeIntervalVar(s, 1, f"run{v}_{i}"))
                sz = m.NewIntVar(1, H, f"len{v}_{i}")
                I_ret.append(m.NewIntervalVar(s, sz, e + 1, f"ret{v}_{i}"))
            else:
                I_run.append(m.NewOptionalFixedSizeIntervalVar(s, 1, pr, f"run{v}_{i}"))
                sz = m.NewIntVar(1, H, f"len{v}_{i}")
                I_ret.append(m.NewOptionalIntervalVar(s, sz, e + 1, pr, f"ret{v}_{i}"))
                m.AddImplication(pr, P[v, i - 1])
                m.Add(s > E[v, i - 1]).OnlyEnforceIf(pr)
            dem.append(p.sizes[v])
            if v in p.outputs:
                m.Add(e == H)
            S[v, i], E[v, i], P[v, i] = s, e, pr
    src_end = []
    for x, sz in enumerate(p.src_sizes):
        ex = m.NewIntVar(0, H, f"srcend{x}")
        I_ret.append(m.NewIntervalVar(0, ex + 1, ex + 1, f"src{x}"))
        dem.append(sz)
        src_end.append(ex)
        for v in p.src_users[x]:
            for j in range(C[v]):
                m.Add(ex >= S[v, j]).OnlyEnforceIf(P[v, j])
    Z = {}
    for v in range(p.n):
        for u in p.preds[v]:
            m.Add(S[u, 0] < S[v, 0])  # implied: the first copy of u is the earliest one
            for j in range(C[v]):
                lits = []
                for i in range(C[u]):
                    z = m.NewBoolVar(f"z{u}_{i}_{v}_{j}")
                    m.AddImplication(z, P[u, i])
                    m.Add(S[u, i] < S[v, j]).OnlyEnforceIf(z)
                    m.Add(E[u, i] >= S[v, j]).OnlyEnforceIf(z)
                    Z[u, i, v, j] = z
                    lits.append(z)
                if j == 0:
                    m.AddBoolOr(lits)
                else:
                    m.AddBoolOr(lits).OnlyEnforceIf(P[v, j])
    m.AddNoOverlap(I_run)
    if minimize_peak:
        cap = m.NewIntVar(p.lower_bound(), sum(dem), "peak")
        m.AddCumulative(I_ret, dem, cap)
        m.Minimize(cap)
    else:
        m.AddCumulative(I_ret, dem, int(budget))
        m.Minimize(sum(p.costs[v] * P[v, i] for v in range(p.n) for i in range(1, C[v])))

    hint = hint or no_remat(p)
    hint_ok = _add_hint(m, p, hint, C, H, S, E, P, Z, src_end)

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit)
    solver.parameters.num_workers = _workers(workers)
    base_cost = sum(p.costs)
    timeline = []

    class _CB(cp_model.CpSolverSolutionCallback):
        def on_solution_callback(self):
            obj = self.ObjectiveValue()
            timeline.append((time.perf_counter() - t0, obj if minimize_peak else base_cost + obj))

    st = solver.Solve(m, _CB())
    name = solver.StatusName(st)
    if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        if st != cp_model.INFEASIBLE and not minimize_peak and hint is not None and hint_ok \
                and evaluate(p, hint).peak <= budget:
            # timeout before CP-SAT reported a schedule: the warm start is the best one found
            return _result(p, "cp-sat", "feasible", hint, budget, t0, timeline=[(time.perf_counter() - t0,
                           evaluate(p, hint).cost)], notes=[f"CP-SAT status {name}: no schedule better than the warm "
                                                            f"start within {time_limit:g} s; not proven optimal"])
        return _result(p, "cp-sat", "infeasible" if st == cp_model.INFEASIBLE else "unknown", None,
                       budget or 0, t0, timeline=timeline)
    execs = sorted((solver.Value(S[v, i]), v, i) for v in range(p.n) for i in range(C[v])
                   if solver.Value(P[v, i]))
    pos = {(v, i): t for t, (_, v, i) in enumerate(execs)}
    steps = []
    for _, v, j in execs:
        reads = []
        for u in p.preds[v]:
            i = next(i for i in range(C[u]) if solver.Value(Z[u, i, v, j]))
            reads.append(pos[u, i])
        steps.append((v, tuple(reads)))
    bound = solver.BestObjectiveBound()
    if minimize_peak:
        res = _result(p, "cp-sat-minpeak", "optimal" if st == cp_model.OPTIMAL else "feasible",
                      Schedule(steps), solver.ObjectiveValue(), t0, timeline=timeline)
        res.bound = bound
        return res
    return _result(p, "cp-sat", "optimal" if st == cp_model.OPTIMAL else "feasible", Schedule(steps), budget,
                   t0, bound=base_cost + bound, timeline=timeline, notes=[f"CP-SAT status {name}"])


def _add_hint(m, p, hint: Schedule, C, H, S, E, P, Z, src_end):
    ev = evaluate(p, hint)
    k = [0] * p.n
    copy_of = []
    for t, (v, _) in enumerate(hint.steps):
        copy_of.append(k[v])
        k[v] += 1
    if any(k[v] > C[v] for v in range(p.n)):
        return False  # the hint needs more copies than the model has
    for t, (v, reads) in enumerate(hint.steps):
        i = copy_of[t]
        m.AddHint(S[v, i], t + 1)
        m.AddHint(E[v, i], H if ev.last[t] >= len(hint.steps) else ev.last[t] + 1)
        if i > 0:
            m.AddHint(P[v, i], 1)
        for j, (u, r) in enumerate(zip(p.preds[v], reads)):
            for ii in range(C[u]):
                m.AddHint(Z[u, ii, v, i], 1 if ii == copy_of[r] else 0)
    for v in range(p.n):
        for i in range(k[v], C[v]):
            m.AddHint(P[v, i], 0)
            for u in p.preds[v]:
                for ii in range(C[u]):
                    m.AddHint(Z[u, ii, v, i], 0)
    for x in range(len(p.src_sizes)):
        ts = [t for t, (v, _) in enumerate(hint.steps) if x in p.src_preds[v]]
        m.AddHint(src_end[x], (max(ts) + 1) if ts else H)
    return True


# =============================================================== Checkmate MILP baseline
def milp_size(p: Problem) -> int:
    """Number of variables of the Checkmate MILP of ``p`` (for skipping huge instances)."""
    n = p.n
    return 3 * n * (n + 1) // 2 + sum((n - k) * (len(p.preds[k]) + 1) for k in range(n)) + n * len(p.src_sizes)


def solve_milp(p: Problem, budget: int, time_limit: float = 30.0) -> RematResult:
    """Checkmate's MILP (frontier-advancing stages, Jain et al. 2020, Sec. 4) with HiGHS.

    Stage ``t`` computes node ``t`` (``R[t,t] = 1``) and may recompute any ``i < t``;
    ``S[t,i]``: ``i`` retained from stage ``t-1``; ``FREE[t,i,k]``: ``i`` is freed after ``k``
    ran in stage ``t`` (linearized with the hazard count); ``U[t,k] <= budget``: bytes live after
    ``k`` ran in stage ``t``.  Graph inputs: ``G[t,x]`` held in stage ``t`` (monotone, counted
    for the whole stage -- a slight over-approximation).  Outputs are computed once and held.
    No limit on copies.  The schedule found is re-scored exactly by :func:`evaluate`.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    t0 = time.perf_counter()
    n = p.n
    nvar = 0
    R, S, U = {}, {}, {}
    lo, hi, integ, obj = [], [], [], []

    def var(l, h, integer, c=0.0):
        nonlocal nvar
        lo.append(l), hi.append(h), integ.append(integer), obj.append(c)
        nvar += 1
        return nvar - 1

    for t in range(n):
        for i in range(t + 1):
            fixed1 = i == t
            fixed0 = (i in p.outputs and i != t)
            R[t, i] = var(1 if fixed1 else 0, 0 if fixed0 else 1, 1, p.costs[i])
        for i in range(t):
            S[t, i] = var(1 if i in p.outputs else 0, 1, 1)
    G = {}
    for t in range(n):
        for x in range(len(p.src_sizes)):
            G[t, x] = var(1 if t == 0 else 0, 1, 1)
    rows, cols, vals, clo, chi = [], [], [], [], []
    nrow = 0

    def con(terms, l, h):
        nonlocal nrow
        for c, a in terms:
            rows.append(nrow), cols.append(c), vals.append(a)
        clo.append(l), chi.append(h)
        nrow += 1

    INF = np.inf
    for t in range(n):
        for j in range(t + 1):
            for i in p.preds[j]:  # R[t,j] <= R[t,i] + S[t,i]
                terms = [(R[t, j], 1), (R[t, i], -1)] + ([(S[t, i], -1)] if i < t else [])
                con(terms, -INF, 0)
        if t > 0:
            for i in range(t):  # S[t,i] <= R[t-1,i] + S[t-1,i]
                terms = [(S[t, i], 1), (R[t - 1, i], -1)] + ([(S[t - 1, i], -1)] if i < t - 1 else [])
                con(terms, -INF, 0)
        for x in range(len(p.src_sizes)):
            if t > 0:
                con([(G[t, x], 1), (G[t - 1, x], -1)], -INF, 0)
            for v in p.src_users[x]:
                if v <= t:
                    con([(G[t, x], 1), (R[t, v], -1)], 0, INF)
    # memory
    for t in range(n):
        src_terms = [(G[t, x], p.src_sizes[x]) for x in range(len(p.src_sizes))]
        prev = None
        for k in range(t + 1):
            u = var(0, budget, 0)
            U[t, k] = u
            if k == 0:
                con([(u, 1)] + [(S[t, i], -p.sizes[i]) for i in range(t)] + [(R[t, 0], -p.sizes[0])]
                    + [(g, -a) for g, a in src_terms], 0, 0)
            else:
                # U[t,k] = U[t,k-1] - freed(t,k-1) + R[t,k] M_k
                terms = [(u, 1), (prev, -1), (R[t, k], -p.sizes[k])]
                for i, fv in FREE_prev:
                    terms.append((fv, p.sizes[i]))
                con(terms, 0, 0)
            # FREE[t,i,k] for i in preds[k] + {k}
            FREE_prev = []
            for i in list(p.preds[k]) + [k]:
                if i in p.outputs:
                    continue
                f = var(0, 1, 1)
                FREE_prev.append((i, f))
                later = [j for j in p.users[i] if k < j <= t]
                kappa = 2 + len(later)
                # hazards = 1 - R[t,k] + S[t+1,i] + sum R[t,j]
                haz = [(R[t, k], -1)] + ([(S[t + 1, i], 1)] if t + 1 < n else []) + [(R[t, j], 1) for j in later]
                # 1 - FREE <= hazards  ->  -FREE - sum haz <= 0 - 1 + 1 ... : FREE + haz_vars >= 0 (const 1 cancels)
                con([(f, 1)] + haz, 0, INF)
                # kappa (1 - FREE) >= hazards -> kappa*FREE + haz <= kappa - 1
                con([(f, kappa)] + haz, -INF, kappa - 1)
            prev = u
    A = coo_matrix((vals, (rows, cols)), shape=(nrow, nvar)).tocsr()
    build_s = time.perf_counter() - t0
    res = milp(np.asarray(obj), constraints=LinearConstraint(A, clo, chi), integrality=np.asarray(integ),
               bounds=Bounds(np.asarray(lo, float), np.asarray(hi, float)),
               options={"time_limit": max(1.0, time_limit - build_s), "disp": False})
    notes = [f"{nvar} variables, {nrow} constraints, built in {build_s:.2f} s; HiGHS: {res.message}"]
    if res.x is None:
        status = "infeasible" if res.status == 2 else "unknown"
        return _result(p, "checkmate-milp", status, None, budget, t0, notes=notes)
    x = res.x
    steps, latest = [], {}
    for t in range(n):
        for i in range(t + 1):
            if x[R[t, i]] > 0.5:
                steps.append((i, tuple(latest[u] for u in p.preds[i])))
                latest[i] = len(steps) - 1
    status = "optimal" if res.status == 0 else "feasible"
    bound = getattr(res, "mip_dual_bound", None)
    out = _result(p, "checkmate-milp", status, Schedule(steps), budget, t0, notes=notes,
                  bound=None if bound is None or not np.isfinite(bound) else float(bound))
    out.timeline = [(out.solve_s, out.cost)]
    return out


# =============================================================== rewrite and the pass
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
    from ..backends.hls4ml.estimate import estimate
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


def resolve_budget(budget, base_peak: int) -> int:
    kind, x = parse_budget(budget)
    return int(math.floor(x * base_peak)) if kind == "fraction" else int(x)


def rematerialize(graph: Graph, budget, *, packing: str = "byte", batch: int = 1, max_copies: int = 2,
                  time_limit: float = 10.0, method: str = "cp-sat", cost_model: str = "macs",
                  workers: int | None = None, cost: str | None = None,
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
        cost: per-node compute cost the solver minimizes: ``"macs"`` (default) or ``"cycles"``
            (hls4ml estimator latency cycles, MACs where it has no price: :func:`cycle_costs`);
            ``cost_model`` is the older name (also ``"unit"``).
        estimator: hls4ml estimator options for ``cost="cycles"`` (part, clock_period,
            reuse_factor, strategy, io_type).
    Returns:
        (new graph, report dict with peak before/after, overhead %, solve time, status).
    Raises:
        RematError: the budget is below the smallest feasible peak (stated in the message), or no
            schedule was found.
    """
    model = cost if cost is not None else cost_model
    if model not in COST_MODELS:
        raise ValueError(f"unknown cost {model!r}; one of macs, cycles")
    cost_notes = []
    if model == "cycles":
        costs, cost_notes = cycle_costs(graph, estimator)
    else:
        costs = node_costs(graph, model)
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
        raise RematError(f"memory budget {b} B ({fmt_bytes(b)}) is below the minimum feasible peak {lb} B "
                         f"({fmt_bytes(lb)}, {why}); no schedule can fit (unrematerialized peak {base.peak} B)")
    t0 = time.perf_counter()
    greedy = solve_greedy(p, b, max_copies, time_limit=min(time_limit, 30.0))
    if method == "greedy":
        res = greedy
    elif method == "milp":
        res = solve_milp(p, b, time_limit)
    elif method == "cp-sat":
        res = solve_cp(p, b, max_copies, time_limit, hint=greedy.schedule if greedy.feasible else None,
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
        raise RematError(f"memory budget {b} B ({fmt_bytes(b)}) cannot be met with at most {max_copies} copies "
                         f"per node ({method}: {res.status}); smallest feasible peak {best} B "
                         f"({fmt_bytes(best)}){proven}; lower bound {lb} B ({why})")
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


def remat_pass(budget, **kw):
    """A ``Graph -> Graph`` pass for the PassManager (its report is in ``graph.meta['remat']``)."""
    def remat(graph: Graph) -> Graph:
        return rematerialize(graph, budget, **kw)[0]
    remat.__name__ = "remat"
    return remat
