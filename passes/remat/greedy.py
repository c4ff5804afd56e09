"""The greedy rematerialization baseline and the CP model's warm start.

From the graph order or a low-memory list-scheduling order
(:func:`qdeploy.passes.remat.problem.low_memory_order`, whichever peaks lower), repeatedly split
the lifetime of a value held across the peak step by recomputing it right before its next
reader, picking the move with the largest drop of over-budget bytes per unit of added compute.
"""
from __future__ import annotations

import time

import numpy as np

from .evaluate import RematResult, evaluate, make_result
from .problem import Problem, Schedule, low_memory_order, no_remat


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
    return make_result(p, "greedy", status, Schedule(steps), budget, t0,
                   notes=[] if ev.peak <= budget else [f"greedy stopped at peak {ev.peak} > budget {budget}"])
