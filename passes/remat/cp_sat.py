"""Moccasin's constraint model of rematerialization, solved by OR-Tools CP-SAT.

Bartan, Li, Jain, Rupp, et al., "Moccasin: Efficient Tensor Rematerialization for Neural
Networks", ICML 2023 (arXiv 2304.14463): at most ``C`` copies per node, each an optional
*retention interval* ``[start, end]`` with a presence literal; a cumulative constraint bounds the
live bytes; a node's copy may run only while some copy of each input is retained; minimize the
total compute cost.

Additions beyond the paper (measured in ``benchmarks/remat.py``): live-set cuts
(:func:`live_cuts`, on by default: when node ``w`` runs, an ancestor read after ``w`` is live
unless it has a second copy, so some of them must be recomputed when their bytes exceed the
budget -- these make CP-SAT's lower bound tight on training graphs), optional symmetry breaking
(no idle steps, no unread recomputation), static start domains from ancestor/descendant counts,
a complete warm start, and CP-SAT probing off (it cost seconds per presolve pass on graphs of a
few hundred nodes).
"""
from __future__ import annotations

import os
import time

from .evaluate import RematResult, evaluate, make_result
from .problem import Problem, Schedule, no_remat


def cp_workers(workers) -> int:
    """CP-SAT search workers: ``workers``, or the CPU count when None/0 (at least 1)."""
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

    * ``"cuts"``: live-set cuts (:func:`live_cuts`); they make the lower bound tight on the
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
        for const, ks in live_cuts(p, int(budget), C):
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
    solver.parameters.num_workers = cp_workers(workers)
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
            return make_result(p, "cp-sat", "feasible", hint, budget, t0, timeline=[(time.perf_counter() - t0,
                           evaluate(p, hint).cost)], notes=[f"CP-SAT status {name}: no schedule better than the warm "
                                                            f"start within its limit ({time_limit:g} s); not proven "
                                                            f"optimal"])
        return make_result(p, "cp-sat", "infeasible" if st == cp_model.INFEASIBLE else "unknown", None,
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
        res = make_result(p, "cp-sat-minpeak", "optimal" if st == cp_model.OPTIMAL else "feasible",
                      Schedule(steps), solver.ObjectiveValue(), t0, timeline=timeline)
        res.bound = bound
        return res
    if st == cp_model.OPTIMAL:
        notes = [f"CP-SAT status {name}: proven optimal ({len(extra)} optional copies, {n_cuts} live-set cuts)"]
    else:
        notes = [f"CP-SAT status {name}: stopped at its limit ({time_limit:g} s): the best schedule found, "
                 f"not proven optimal; proven lower bound on the recompute cost {bound:.0f} "
                 f"({100.0 * bound / base_cost:.3f}% overhead)"]
    return make_result(p, "cp-sat", "optimal" if st == cp_model.OPTIMAL else "feasible", Schedule(steps), budget,
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


def live_cuts(p: Problem, budget: int, C: list, max_terms: int = 40_000) -> list:
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
