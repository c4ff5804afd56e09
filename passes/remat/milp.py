"""Checkmate's MILP of rematerialization, solved by HiGHS through SciPy: the comparison baseline.

Jain et al., "Checkmate: Breaking the Memory Wall with Optimal Tensor Rematerialization", MLSys
2020 (arXiv 1910.02653): the frontier-advancing MILP with ``R[t,i]`` (compute), ``S[t,i]``
(retain), ``FREE[t,i,k]`` and ``U[t,k]`` (memory) variables.
"""
from __future__ import annotations

import time

import numpy as np

from .evaluate import RematResult, evaluate, make_result
from .problem import Problem, Schedule


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
        return make_result(p, "checkmate-milp", status, None, budget, t0, notes=notes)
    x = res.x
    steps, latest = [], {}
    for t in range(n):
        for i in range(t + 1):
            if x[R[t, i]] > 0.5:
                steps.append((i, tuple(latest[u] for u in p.preds[i])))
                latest[i] = len(steps) - 1
    status = "optimal" if res.status == 0 else "feasible"
    bound = getattr(res, "mip_dual_bound", None)
    out = make_result(p, "checkmate-milp", status, Schedule(steps), budget, t0, notes=notes,
                  bound=None if bound is None or not np.isfinite(bound) else float(bound))
    out.timeline = [(out.solve_s, out.cost)]
    return out
