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
* a greedy baseline (:func:`solve_greedy`): from the graph order or a low-memory list-scheduling
  order (:func:`low_memory_order`, whichever peaks lower), repeatedly split the lifetime of a
  value held across the peak step by recomputing it right before its next reader, picking the
  move with the largest drop of over-budget bytes per unit of added compute.  Its schedule is the
  CP model's warm start.

CP model additions beyond the paper (measured in ``benchmarks/remat.py``): live-set cuts
(:func:`_live_cuts`, on by default: when node ``w`` runs, an ancestor read after ``w`` is live
unless it has a second copy, so some of them must be recomputed when their bytes exceed the
budget -- these make CP-SAT's lower bound tight on training graphs), optional symmetry breaking
(no idle steps, no unread recomputation), static start domains from ancestor/descendant counts,
a complete warm start, and CP-SAT probing off (it cost seconds per presolve pass on graphs of a
few hundred nodes).

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


def assert_stateless(graph: Graph) -> None:
    """Check that every node of ``graph`` may be recomputed without changing any state.

    Inference graphs are stateless: the IR has no op with state (``STATELESS_OPS`` is every IR
    op), the importers fold eval-mode batch norm into ``Affine`` with frozen statistics and
    refuse batch norm in training mode.  A node of an op outside the IR, or one marked
    ``attrs["stateful"]`` by a pass, is refused here.

    Raises:
        UnsupportedError: naming the first stateful (or unknown) node.
    """
    for nd in graph.nodes:
        if nd.op not in STATELESS_OPS or nd.attrs.get("stateful"):
            raise UnsupportedError(f"op {nd.op} is not known to be stateless; it cannot be recomputed", nd.name)


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

    def reordered(self, order) -> "Problem":
        """The same instance with its nodes renumbered so that ``order`` (a topological order of
        node indices, e.g. the node sequence of :func:`low_memory_order`) is the index order;
        node ``k`` of the result is node ``order[k]`` of ``self``.

        Raises:
            ValueError: ``order`` is not a permutation or not topological.
        """
        order = list(order)
        if sorted(order) != list(range(self.n)):
            raise ValueError("order must be a permutation of the node indices")
        new = {v: k for k, v in enumerate(order)}
        q = Problem([self.names[v] for v in order], [tuple(new[u] for u in self.preds[v]) for v in order],
                    [self.src_preds[v] for v in order], [self.sizes[v] for v in order],
                    [self.costs[v] for v in order], list(self.src_names), list(self.src_sizes),
                    frozenset(new[o] for o in self.outputs))
        if hasattr(self, "title"):
            q.title = self.title
        return q

    @property
    def edges(self) -> int:
        """Node-to-node dependencies (reads of graph inputs not counted)."""
        return sum(len(p) for p in self.preds)

    def lower_bound(self) -> int:
        """No schedule can peak below this (bytes): a node's inputs + output, all sources, all outputs."""
        return self.lower_bound_why()[0]

    def lower_bound_why(self) -> tuple[int, str]:
        """:meth:`lower_bound` in bytes and its proof, e.g. ``"node 'conv2' runs with its inputs
        (1 x 3211264 B) and its output (3211264 B) live"``.  Every execution of a node (first run
        or recomputation) holds its distinct inputs and its output at once; the graph inputs are
        all live before the first step and the graph outputs all live after the last."""
        best, why = 0, "empty graph"
        for v in range(self.n):
            ins = [self.sizes[u] for u in self.preds[v]] + [self.src_sizes[x] for x in self.src_preds[v]]
            b = self.sizes[v] + sum(ins)
            if b > best:
                desc = " + ".join(f"{k} x {sz} B" for sz, k in sorted(
                    ((sz, ins.count(sz)) for sz in set(ins)), reverse=True)) or "none"
                best, why = b, (f"node {self.names[v]!r} runs with its inputs ({desc}) and its output "
                                f"({self.sizes[v]} B) live")
        b = sum(self.src_sizes)
        if b > best:
            best, why = b, f"the {len(self.src_sizes)} graph input(s) are all live before the first step"
        b = sum(self.sizes[o] for o in self.outputs)
        if b > best:
            best, why = b, f"the {len(self.outputs)} graph output(s) are all live after the last step"
        return best, why

    @staticmethod
    def from_graph(graph: Graph, packing: str = "byte", batch: int = 1, cost_model: str = "macs",
                   costs: dict | None = None) -> "Problem":
        """The instance of an IR graph: sizes in bytes (:func:`qdeploy.passes.memory.value_bytes`
        under ``packing``, ``batch`` samples), costs per ``cost_model``: ``macs``/``unit``
        (:func:`qdeploy.passes.memory.node_costs`) or ``cycles`` (:func:`cycle_costs`, default
        estimator options); ``costs`` (node name -> cost) overrides it.

        Raises:
            UnsupportedError: a node that is not stateless (:func:`assert_stateless`).
        """
        assert_stateless(graph)
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
    """The graph order, each node run once, reading the only run of each input."""
    return Schedule([(v, tuple(p.preds[v])) for v in range(p.n)])


def low_memory_order(p: Problem) -> Schedule:
    """A topological order without recomputation that keeps live bytes low (list scheduling).

    At each step, among the nodes whose inputs have all run, run the one that leaves the fewest
    bytes live after it (its output, if read later or a graph output, minus the inputs it was
    the last reader of), ties broken by the smaller live bytes while it runs, then by graph
    order.  Used as the greedy's starting order when its peak is lower than the graph order's
    (:func:`solve_greedy`), so the warm start of :func:`solve_cp` already exploits reordering.
    """
    left = [len(p.users[u]) for u in range(p.n)]
    src_left = [len(us) for us in p.src_users]
    missing = [len(p.preds[v]) for v in range(p.n)]
    ready = {v for v in range(p.n) if missing[v] == 0}
    pos, steps = {}, []
    live = sum(p.src_sizes)

    def delta(v):
        freed = sum(p.sizes[u] for u in p.preds[v] if left[u] == 1 and u not in p.outputs)
        freed += sum(p.src_sizes[x] for x in p.src_preds[v] if src_left[x] == 1)
        keep = p.sizes[v] if (p.users[v] or v in p.outputs) else 0
        return keep - freed, p.sizes[v], v

    while ready:
        v = min(ready, key=delta)
        ready.discard(v)
        d = delta(v)[0]
        live += d
        steps.append((v, tuple(pos[u] for u in p.preds[v])))
        pos[v] = len(steps) - 1
        for u in p.preds[v]:
            left[u] -= 1
        for x in p.src_preds[v]:
            src_left[x] -= 1
        for w in p.users[v]:
            missing[w] -= 1
            if missing[w] == 0:
                ready.add(w)
    return Schedule(steps)


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


def solve_greedy(p: Problem, budget: int, max_copies: int = 2, time_limit: float = 30.0,
                 candidates: int = 64) -> RematResult:
    """Greedy baseline (see the module docstring).  Starts from the graph order or from
    :func:`low_memory_order` (whichever peaks lower) and stops at the budget, when no move lowers
    the over-budget bytes, or at ``time_limit`` (seconds).  Each round scores the possible moves
    in batches of ``candidates`` (largest estimated gain per cost first: bytes freed x
    over-budget steps it spans / cost) and takes the best of the first batch
    that lowers the over-budget bytes (values below 1 mean 1).  ``status`` is
    ``feasible`` when the schedule meets ``budget`` (bytes), else ``infeasible`` (the schedule is
    still returned)."""
    t0 = time.perf_counter()
    steps = list(no_remat(p).steps)
    reordered = low_memory_order(p)
    if evaluate(p, reordered).peak < evaluate(p, Schedule(steps)).peak:
        steps = list(reordered.steps)

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
        moves = []
        over = np.concatenate([[0], np.cumsum(np.asarray(ev.per_step) > budget)])
        for e, (v, _) in enumerate(steps[:t_star]):
            if v in p.outputs or copies[v] >= max_copies or ev.last[e] <= t_star:
                continue
            rd = readers_at.get(e, [])
            later = [t for t in rd if t > t_star]
            if later:
                # estimate: bytes freed x over-budget steps between the last earlier read and r0
                lo = max([t for t in rd if t <= t_star], default=e) + 1
                est = p.sizes[v] * int(over[min(later)] - over[lo]) / max(1, p.costs[v])
                moves.append((-est, e, v, later))
        # score the moves in batches of `candidates`, largest estimate first; stop
        # after the first batch holding an improving move (each score is a pass over the schedule)
        moves.sort(key=lambda mv: mv[:2])
        for k0 in range(0, len(moves), max(1, candidates)):
            for _, e, v, later in moves[k0:k0 + max(1, candidates)]:
                r0 = min(later)
                block = _block_for(p, steps, ev.last, r0, v, copies, max_copies)
                cand = _insert_recompute(p, steps, r0, block, v, set(later))
                cev, cex = score(cand)
                if cex < excess:
                    gain = (excess - cex) / max(1, sum(p.costs[u] for u in block))
                    if best is None or gain > best[0]:
                        best = (gain, cand, cev, cex, block)
            if best is not None:
                break
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
             hint: Schedule | None = None, workers: int | None = None, minimize_peak: bool = False,
             tighten=True, params: dict | None = None) -> RematResult:
    """Moccasin's CP model solved by CP-SAT.

    Variables per node ``v`` and copy ``i < C`` (``C = max_copies``, 1 for graph outputs): start
    ``s`` (the step it runs), end ``e`` (the last step it is retained), presence ``p`` (copy 0
    always present).  Constraints: one execution per step (NoOverlap of unit intervals); the
    retention intervals ``[s, e]`` with demand = bytes fit under ``budget`` (Cumulative, graph
    inputs as intervals from step 0); for each edge ``u -> v`` and each present copy of ``v``
    some present copy of ``u`` started before it and is retained until it (a literal per copy
    pair); copies of a node are ordered and disjoint; outputs are retained to the horizon.
    Objective: total compute cost of the recomputations (copies ``i >= 1``).

    ``tighten`` adds constraints that remove only dominated or symmetric solutions (an optimal
    schedule always survives them); ``True`` (default) = ``DEFAULT_TIGHTENINGS`` = ``("cuts",)``,
    ``False`` = none, or a collection of names from ``TIGHTENINGS``:

    * ``"cuts"``: live-set cuts (:func:`_live_cuts`); they make the lower bound tight on the
      training graphs (proven optimal in seconds where the plain model's bound stays at 0%);
    * ``"read"``: every present copy of a node with readers is read by some execution;
    * ``"nogap"``: executions occupy steps ``1..L`` without idle steps (``L`` = executions).
      (No "at least one recomputation" cut: a different topological order alone may meet the
      budget.)  ``read``/``nogap`` are off by default: measured, they slow the search on the
      random DAGs (1000 nodes, 80% budget, 10 s: 2.3% overhead with both, 1.3% with cuts only;
      500 nodes: 2.2% either way) and do not speed up the training graphs.

    Warm start: ``hint`` (a schedule with at most ``C`` runs per node, e.g. the greedy one) or the
    no-remat order, given to CP-SAT as a *complete* assignment (every variable hinted), so CP-SAT
    reports it as its first solution when it meets the budget (and tries to repair it when it
    does not, e.g. a greedy run stopped by its time limit).  ``params``: extra CP-SAT
    parameters (name -> value).  ``workers``: CP-SAT search workers (default: the CPU count).

    With ``minimize_peak`` the budget is a variable and the peak is minimized instead.

    Returns:
        a :class:`RematResult`; ``status`` ``optimal`` (proven), ``feasible`` (time limit reached:
        the best schedule found, not proven optimal; ``bound`` is the proven lower bound on the
        total cost), ``infeasible`` (proven: no schedule with ``C`` copies fits) or ``unknown``.
    """
    from ortools.sat.python import cp_model

    t0 = time.perf_counter()
    C = [1 if v in p.outputs else max(1, int(max_copies)) for v in range(p.n)]
    H = sum(C)
    m = cp_model.CpModel()
    n_anc, n_desc = _ancestor_counts(p)
    S, E, P, LEN, I_run, I_ret, dem = {}, {}, {}, {}, [], [], []
    for v in range(p.n):
        for i in range(C[v]):
            # static domains (every ancestor runs before the first copy, every descendant after it);
            # they spare CP-SAT's presolve hundreds of propagation rounds on deep graphs
            lo = n_anc[v] + 1 + i
            s = m.NewIntVar(lo, H - n_desc[v] if i == 0 else H, f"s{v}_{i}")
            e = m.NewIntVar(lo, H, f"e{v}_{i}")
            if i == 0:
                pr = m.NewConstant(1)
                I_run.append(m.NewFixedSizeIntervalVar(s, 1, f"run{v}_{i}"))
                sz = m.NewIntVar(1, H, f"len{v}_{i}")
                I_ret.append(m.NewIntervalVar(s, sz, e + 1, f"ret{v}_{i}"))
            else:
                pr = m.NewBoolVar(f"p{v}_{i}")
                I_run.append(m.NewOptionalFixedSizeIntervalVar(s, 1, pr, f"run{v}_{i}"))
                sz = m.NewIntVar(1, H, f"len{v}_{i}")
                I_ret.append(m.NewOptionalIntervalVar(s, sz, e + 1, pr, f"ret{v}_{i}"))
                m.AddImplication(pr, P[v, i - 1])
                m.Add(s > E[v, i - 1]).OnlyEnforceIf(pr)
            dem.append(p.sizes[v])
            if v in p.outputs:
                m.Add(e == H)
            S[v, i], E[v, i], P[v, i], LEN[v, i] = s, e, pr, sz
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
    readers = {(v, i): [] for v in range(p.n) for i in range(C[v])}
    for v in range(p.n):
        for u in p.preds[v]:
            m.Add(S[u, 0] < S[v, 0])  # implied: the first copy of u is the earliest one
            for j in range(C[v]):
                lits = []
                for i in range(C[u]):
                    z = m.NewBoolVar(f"z{u}_{i}_{v}_{j}")
                    m.AddImplication(z, P[u, i])
                    m.AddImplication(z, P[v, j])
                    m.Add(S[u, i] < S[v, j]).OnlyEnforceIf(z)
                    m.Add(E[u, i] >= S[v, j]).OnlyEnforceIf(z)
                    Z[u, i, v, j] = z
                    readers[u, i].append(z)
                    lits.append(z)
                if j == 0:
                    m.AddBoolOr(lits)
                else:
                    m.AddBoolOr(lits).OnlyEnforceIf(P[v, j])
    m.AddNoOverlap(I_run)
    extra = [(v, i) for v in range(p.n) for i in range(1, C[v])]
    tight = _tightenings(tighten)
    if "read" in tight:
        for (v, i), zs in readers.items():
            if zs and v not in p.outputs:
                m.AddBoolOr(zs).OnlyEnforceIf(P[v, i])  # a present copy is read
    n_exec = None
    if "nogap" in tight:
        n_exec = m.NewIntVar(p.n, H, "n_exec")
        m.Add(n_exec == p.n + sum(P[v, i] for v, i in extra))
        for (v, i) in [(v, 0) for v in range(p.n)] + extra:
            m.Add(S[v, i] <= n_exec).OnlyEnforceIf(P[v, i])  # no gaps: steps 1..L
    n_cuts = 0
    if "cuts" in tight and not minimize_peak:
        for const, ks in _live_cuts(p, int(budget), C):
            # a value kept by its only copy from before w until a reader after w is live when w runs
            m.Add(sum(sz * P[u, 1] for u, sz in ks) >= const + sum(sz for _, sz in ks) - int(budget))
            n_cuts += 1
    recompute_cost = sum(p.costs[v] * P[v, i] for v, i in extra)
    if minimize_peak:
        cap = m.NewIntVar(p.lower_bound(), sum(dem), "peak")
        m.AddCumulative(I_ret, dem, cap)
        m.Minimize(cap)
    else:
        m.AddCumulative(I_ret, dem, int(budget))
        m.Minimize(recompute_cost)

    hint = hint or no_remat(p)
    hint_ok = _add_hint(m, p, hint, C, H, S, E, P, LEN, Z, src_end)
    if hint_ok and n_exec is not None:
        m.AddHint(n_exec, len(hint.steps))

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit)
    solver.parameters.num_workers = _workers(workers)
    # probing costs seconds per presolve pass on graphs of a few hundred nodes, before even the
    # warm start is reported (ResNet50 training graph: 1.5 s to proven optimal without, > 10 s with)
    solver.parameters.cp_model_probing_level = 0
    for k, val in (params or {}).items():
        setattr(solver.parameters, k, val)
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
                                                            f"start within its limit ({time_limit:g} s); not proven "
                                                            f"optimal"])
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
    if st == cp_model.OPTIMAL:
        notes = [f"CP-SAT status {name}: proven optimal ({len(extra)} optional copies, {n_cuts} live-set cuts)"]
    else:
        notes = [f"CP-SAT status {name}: stopped at its limit ({time_limit:g} s): the best schedule found, "
                 f"not proven optimal; proven lower bound on the recompute cost {bound:.0f} "
                 f"({100.0 * bound / base_cost:.3f}% overhead)"]
    return _result(p, "cp-sat", "optimal" if st == cp_model.OPTIMAL else "feasible", Schedule(steps), budget,
                   t0, bound=base_cost + bound, timeline=timeline, notes=notes)


TIGHTENINGS = ("cuts", "read", "nogap")
DEFAULT_TIGHTENINGS = ("cuts",)


def _tightenings(tighten) -> frozenset:
    """``True`` -> the defaults, ``False``/``None`` -> none, else a collection of names."""
    if tighten is True:
        return frozenset(DEFAULT_TIGHTENINGS)
    if not tighten:
        return frozenset()
    names = frozenset([tighten] if isinstance(tighten, str) else tighten)
    bad = names - set(TIGHTENINGS)
    if bad:
        raise ValueError(f"unknown tightening(s) {sorted(bad)}; known: {', '.join(TIGHTENINGS)}")
    return names


def _live_cuts(p: Problem, budget: int, C: list, max_terms: int = 40_000) -> list:
    """Valid inequalities "some value must be recomputed" for the CP model (``tighten``).

    When the first copy of node ``w`` runs, these are live whatever the schedule: ``w``'s output,
    its inputs, the graph inputs read by ``w`` or a descendant of ``w``, the graph outputs among
    ``w``'s ancestors, and every non-output ancestor ``u`` with a reader that descends from ``w``
    *unless* ``u`` has a second copy (its only copy runs before ``w`` and is read after it).
    Hence ``sum(size_u * [u has copy 1]) >= live bytes with no recomputation - budget``.  One cut
    per ``w`` whose right-hand side is positive, the most violated first, up to ``max_terms``
    terms in all.  Returns ``[(const, [(u, size_u), ...]), ...]`` with const = the unconditional
    live bytes.
    """
    anc, desc = [0] * p.n, [0] * p.n
    for v in range(p.n):
        for u in p.preds[v]:
            anc[v] |= anc[u] | (1 << u)
    for v in range(p.n - 1, -1, -1):
        for w in p.users[v]:
            desc[v] |= desc[w] | (1 << w)
    users = [sum(1 << x for x in p.users[u]) for u in range(p.n)]
    cuts = []
    for w in range(p.n):
        preds = set(p.preds[w])
        const = p.sizes[w] + sum(p.sizes[u] for u in preds)
        reach = desc[w] | (1 << w)
        const += sum(sz for x, sz in enumerate(p.src_sizes)
                     if any((reach >> y) & 1 for y in p.src_users[x]))
        ks = []
        a, u = anc[w], 0
        while a:
            if a & 1 and u not in preds:
                if u in p.outputs:
                    const += p.sizes[u]
                elif users[u] & desc[w] and C[u] >= 2:
                    ks.append((u, p.sizes[u]))
                elif users[u] & desc[w]:
                    const += p.sizes[u]
            a >>= 1
            u += 1
        rhs = const + sum(sz for _, sz in ks) - budget
        if rhs > 0 and ks:
            cuts.append((rhs, const, ks))
    cuts.sort(key=lambda c: -c[0])
    out, terms = [], 0
    for _, const, ks in cuts:
        if terms + len(ks) > max_terms:
            break
        out.append((const, ks))
        terms += len(ks)
    return out


def _ancestor_counts(p: Problem) -> tuple[list, list]:
    """Number of distinct ancestors and descendants of every node (bitsets as Python ints)."""
    anc = [0] * p.n
    for v in range(p.n):
        a = 0
        for u in p.preds[v]:
            a |= anc[u] | (1 << u)
        anc[v] = a
    desc = [0] * p.n
    for v in range(p.n - 1, -1, -1):
        d = 0
        for w in p.users[v]:
            d |= desc[w] | (1 << w)
        desc[v] = d
    return [bin(a).count("1") for a in anc], [bin(d).count("1") for d in desc]


def _add_hint(m, p, hint: Schedule, C, H, S, E, P, LEN, Z, src_end):
    """Hint every model variable from ``hint`` (absent copies: presence 0, start = end = H).
    Returns False (and hints nothing) when ``hint`` runs some node more than ``C`` times."""
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
        end = H if ev.last[t] >= len(hint.steps) else ev.last[t] + 1
        m.AddHint(S[v, i], t + 1)
        m.AddHint(E[v, i], end)
        m.AddHint(LEN[v, i], end - t)
        if i > 0:
            m.AddHint(P[v, i], 1)
        for j, (u, r) in enumerate(zip(p.preds[v], reads)):
            for ii in range(C[u]):
                m.AddHint(Z[u, ii, v, i], 1 if ii == copy_of[r] else 0)
    for v in range(p.n):
        for i in range(k[v], C[v]):
            m.AddHint(P[v, i], 0)
            m.AddHint(S[v, i], H)
            m.AddHint(E[v, i], H)
            m.AddHint(LEN[v, i], 1)
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


def solve_milp(p: Problem, budget: int, time_limit: float = 30.0, order=None) -> RematResult:
    """Checkmate's MILP (frontier-advancing stages, Jain et al. 2020, Sec. 4) with HiGHS.

    Stage ``t`` computes node ``t`` (``R[t,t] = 1``) and may recompute any ``i < t``;
    ``S[t,i]``: ``i`` retained from stage ``t-1``; ``FREE[t,i,k]``: ``i`` is freed after ``k``
    ran in stage ``t`` (linearized with the hazard count); ``U[t,k] <= budget``: bytes live after
    ``k`` ran in stage ``t``.  Graph inputs: ``G[t,x]`` held in stage ``t`` (monotone, counted
    for the whole stage -- a slight over-approximation).  Outputs are computed once and held.
    No limit on copies.  The schedule found is re-scored exactly by :func:`evaluate`.

    The stages follow one fixed topological order (Checkmate's input): the graph order, or
    ``order`` (node indices, e.g. from :func:`low_memory_order`); unlike the CP model the MILP
    cannot reorder.  ``time_limit``: seconds for HiGHS after the model is built (HiGHS may
    overrun it; ``solve_s`` is the measured total).  Status ``optimal`` (HiGHS proved it),
    ``feasible`` (limit hit with a schedule), ``infeasible`` or ``unknown`` (no schedule).
    """
    if order is not None:
        order = list(order)
        res = solve_milp(p.reordered(order), budget, time_limit)
        if res.schedule is not None:
            res.schedule = Schedule([(order[v], reads) for v, reads in res.schedule.steps])
            ev = evaluate(p, res.schedule)
            assert (ev.peak, ev.cost) == (res.peak, res.cost)
        res.notes.append("stages in the given order")
        return res
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
    """Budget in bytes from ``budget`` (bytes, text with a unit, or a fraction of ``base_peak``
    bytes: :func:`qdeploy.passes.memory.parse_budget`); fractions round down.

    Raises:
        ValueError: an unparsable or non-positive budget.
    """
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
