"""Bit allocation as an integer linear program (HAWQ-V3, Yao et al., arXiv 2011.10680, Sec. 3.4).

One binary x_{i,o} per (layer i, option o), an option being a (weight bits, input-activation bits)
pair; exactly one option per layer; minimize the total sensitivity sum_i sum_o Omega_{i,o} x_{i,o}
subject to any set of budgets sum_i sum_o cost_k(i, o) x_{i,o} <= B_k.  Unary costs are separable per
layer, which covers:

* ``bops``: bit operations per sample, P*m*n*(b_a*b_w + b_a + b_w + log2 n) (Baskin et al.,
  arXiv 2103.05579 Eq. 1, unpruned; the formula of ``qdeploy.compiler.ir.cost.node_bops``);
* ``size``: weight memory in bits, n_weights * b_w (biases are not counted);
* any per-layer cost function ``fn(spec, w_bits, a_bits) -> float`` registered with
  :func:`register_cost` or passed in ``costs=`` -- the hook for LUT / DSP / latency figures of a
  backend estimator (e.g. ``backends/hls4ml/estimate.py``).

Pairwise costs.  The specs form a chain (consecutive specs are consecutive weight layers of an
``nn.Sequential``); a cost may also carry a part that depends on the options of two consecutive
layers (e.g. the ReLU / requantization / pooling between them, whose input width is the previous
layer's accumulator and whose output width is the next layer's activation bits).  Such a cost is a
:class:`PairCost`: ``cost(spec, w, a)`` is its unary part and ``cost.pair(prev_spec, prev_opt,
spec, opt)`` the pair part.  In the ILP each consecutive pair (i-1, i) with a non-zero pair part in a
budgeted kind gets continuous variables z_{p,q} in [0, 1] with the marginal constraints
sum_q z_{p,q} = x_{i-1,p} and sum_p z_{p,q} = x_{i,q}; with one-hot binaries x this forces
z_{p,q} = x_{i-1,p} x_{i,q}, so sum pair(p, q) z_{p,q} in the budget row is exact (options with
identical pair costs are merged first, which keeps the same exactness with fewer variables).
:func:`total_cost` is the cost of an allocation (unary + pair).  Unary-only costs build exactly the
model of before (no z variables).

Tied layers (e.g. a residual branch and its main branch) must take the same weight bits (and the
same activation bits where both are searched).  Solved with HiGHS through
``scipy.optimize.milp`` with a zero relative MIP gap, so the optimum is exact (objective rescaled so
HiGHS' absolute gap of 1e-6 is ~1e-12 of it).
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from ..errors import QDeployError

__all__ = ["LayerSpec", "Allocation", "COSTS", "PairCost", "register_cost", "layer_cost", "pair_cost", "total_cost",
           "cost_range", "allocate", "brute_force", "pareto_frontier", "options_of", "uniform_allocation"]


@dataclass(frozen=True)
class LayerSpec:
    """One weight layer of the search space.

    Attributes:
        name: module name.
        n_in: inputs per output n (K for dense, kh*kw*C_in/groups for conv).
        n_out: outputs per position m (units or output channels).
        positions: output positions P per sample (1 for dense, H_out*W_out for conv2d).
        n_weights: weight entries.
        w_bits: candidate weight bit widths (non-empty).
        a_bits: candidate bit widths of the layer's input activation; empty when it is fixed.
        fixed_a_bits: the input activation width when it is not searched (e.g. the model input).
        kind: ``"dense"`` or ``"conv"`` (informational).
    """

    name: str
    n_in: int
    n_out: int
    positions: int = 1
    n_weights: int = 0
    w_bits: tuple = (2, 3, 4, 5, 6, 7, 8)
    a_bits: tuple = ()
    fixed_a_bits: int = 8
    kind: str = "dense"

    def options(self) -> list[tuple[int, int]]:
        """(w_bits, a_bits) pairs, in a fixed order."""
        acts = self.a_bits if self.a_bits else (self.fixed_a_bits,)
        return [(w, a) for w in self.w_bits for a in acts]


def options_of(spec: LayerSpec) -> list[tuple[int, int]]:
    return spec.options()


def _bops(s: LayerSpec, wb: int, ab: int) -> float:
    n = max(s.n_in, 1)
    return float(s.positions * s.n_out * n * (ab * wb + ab + wb + math.log2(n)))


def _size(s: LayerSpec, wb: int, ab: int) -> float:
    return float(s.n_weights * wb)


COSTS: dict[str, Callable[[LayerSpec, int, int], float]] = {"bops": _bops, "size": _size}


def register_cost(name: str, fn: Callable[[LayerSpec, int, int], float]) -> None:
    """Make ``name`` usable as a budget key: ``fn(spec, w_bits, a_bits) -> cost`` (additive over layers),
    or a :class:`PairCost` (plus a part per pair of consecutive layers)."""
    COSTS[name] = fn


class PairCost:
    """A budget cost with a unary part per layer and a pairwise part per consecutive pair of layers.

    ``PairCost(unary, pair)``: ``unary(spec, w_bits, a_bits) -> float`` (the cost of the layer
    alone, as a plain cost function) and ``pair(prev_spec, prev_opt, spec, opt) -> float`` (the cost
    that depends on both layer ``i-1``'s option ``prev_opt`` and layer ``i``'s option ``opt``, each a
    ``(w_bits, a_bits)`` tuple), in the same unit as the unary part.  Calling the object evaluates
    the unary part, so it can be used wherever a per-layer cost function is expected.
    """

    def __init__(self, unary: Callable[[LayerSpec, int, int], float],
                 pair: Callable[[LayerSpec, tuple, LayerSpec, tuple], float]):
        self.unary = unary
        self._pair = pair

    def __call__(self, spec: LayerSpec, wb: int, ab: int) -> float:
        return self.unary(spec, wb, ab)

    def pair(self, prev_spec: LayerSpec, prev_opt: tuple, spec: LayerSpec, opt: tuple) -> float:
        """Cost of the pair (layer ``prev_spec`` at ``prev_opt``, next layer ``spec`` at ``opt``)."""
        return self._pair(prev_spec, prev_opt, spec, opt)


def _cost_fn(kind: str, costs: Mapping | None):
    fns = {**COSTS, **(costs or {})}
    if kind not in fns:
        raise QDeployError(f"unknown budget {kind!r}; known: {', '.join(sorted(fns))} "
                           "(register a per-layer cost with register_cost or costs=)")
    return fns[kind]


def _has_pair(kind: str, costs: Mapping | None) -> bool:
    return callable(getattr(_cost_fn(kind, costs), "pair", None))


def layer_cost(kind: str, spec: LayerSpec, wb: int, ab: int, costs: Mapping | None = None) -> float:
    """Unary cost of ``spec`` at (``wb``, ``ab``) bits in the unit of ``kind`` (BOPs per sample,
    bits, or the registered cost's unit).  Raises QDeployError for an unknown kind."""
    return float(_cost_fn(kind, costs)(spec, wb, ab))


def pair_cost(kind: str, prev: LayerSpec, prev_opt: tuple, spec: LayerSpec, opt: tuple,
              costs: Mapping | None = None) -> float:
    """Pairwise cost of consecutive layers ``prev`` at ``prev_opt`` and ``spec`` at ``opt``
    ((w_bits, a_bits) tuples), in the unit of ``kind``; 0 for a cost without a pair part.
    Raises QDeployError for an unknown kind, or a pair cost that fails (naming the layers)."""
    fn = _cost_fn(kind, costs)
    pf = getattr(fn, "pair", None)
    if not callable(pf):
        return 0.0
    try:
        return float(pf(prev, tuple(prev_opt), spec, tuple(opt)))
    except QDeployError:
        raise
    except Exception as e:  # noqa: BLE001 -- reported with the layer names
        raise QDeployError(f"pair cost {kind!r} between layers {prev.name!r} and {spec.name!r} failed: "
                           f"{type(e).__name__}: {e}") from e


def total_cost(kind: str, specs: Sequence[LayerSpec], bits: Mapping, costs: Mapping | None = None) -> float:
    """Total cost of an allocation: sum of the unary costs plus the pair costs of consecutive specs.

    Args:
        kind: budget kind (from :data:`COSTS` or ``costs``).
        specs: the layers, in chain order.
        bits: {layer name: (w_bits, a_bits)} for every spec.
        costs: extra cost functions (plain or :class:`PairCost`).

    Returns:
        The cost in the unit of ``kind``.

    Raises:
        QDeployError: an unknown kind, or a layer missing from ``bits`` (naming it).
    """
    for s in specs:
        if s.name not in bits:
            raise QDeployError(f"layer {s.name!r}: no bit widths in the allocation")
    tot = sum(layer_cost(kind, s, *bits[s.name], costs) for s in specs)
    if _has_pair(kind, costs):
        tot += sum(pair_cost(kind, p, bits[p.name], s, bits[s.name], costs) for p, s in zip(specs, specs[1:]))
    return float(tot)


def _tables(kind: str, specs, opts, costs):
    """Unary table [layer][option] and pair tables [i][p, q] (None for i = 0 or no pair part)."""
    un = [[layer_cost(kind, s, w, a, costs) for (w, a) in oo] for s, oo in zip(specs, opts)]
    pr = [None] * len(specs)
    if _has_pair(kind, costs):
        for i in range(1, len(specs)):
            pr[i] = np.array([[pair_cost(kind, specs[i - 1], p, specs[i], q, costs) for q in opts[i]]
                              for p in opts[i - 1]], dtype=np.float64)
    return un, pr


def cost_range(kind: str, specs: Sequence[LayerSpec], costs: Mapping | None = None) -> tuple[float, float]:
    """(minimum, maximum) total cost (:func:`total_cost`) over all allocations, ignoring ties and
    other budgets (dynamic programming over the chain, exact with pair costs).
    Raises QDeployError for an unknown kind."""
    opts = [s.options() for s in specs]
    un, pr = _tables(kind, specs, opts, costs)
    out = []
    for red in (np.min, np.max):
        dp = np.asarray(un[0], dtype=np.float64)
        for i in range(1, len(specs)):
            u = np.asarray(un[i], dtype=np.float64)
            dp = u + (red(dp[:, None] + pr[i], axis=0) if pr[i] is not None else red(dp))
        out.append(float(red(dp)))
    return out[0], out[1]


@dataclass
class Allocation:
    """An ILP (or brute-force) solution.

    Attributes:
        bits: {layer name: (w_bits, a_bits)}.
        objective: total sensitivity (sum of Omega).
        costs: {budget kind: total cost} for every budget kind asked for (plus bops and size).
        budgets: the budgets solved under.
        seconds: solver wall time.
    """

    bits: dict
    objective: float
    costs: dict
    budgets: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"bits": {k: {"w": int(v[0]), "a": int(v[1])} for k, v in self.bits.items()},
                "objective": self.objective, "costs": self.costs, "budgets": self.budgets,
                "seconds": self.seconds}


def _validate(specs: Sequence[LayerSpec], sens: Mapping, budgets: Mapping, costs, ties):
    if not specs:
        raise QDeployError("no layers to allocate bits to")
    names = [s.name for s in specs]
    for s in specs:
        if not s.w_bits:
            raise QDeployError(f"layer {s.name!r}: the list of candidate weight bit widths is empty")
        if s.name not in sens:
            raise QDeployError(f"layer {s.name!r}: no sensitivity given")
        missing = [o for o in s.options() if o not in sens[s.name]]
        if missing:
            raise QDeployError(f"layer {s.name!r}: no sensitivity for options {missing[:4]}")
    for k in budgets:
        fns = {**COSTS, **(costs or {})}
        if k not in fns:
            raise QDeployError(f"unknown budget {k!r}; known: {', '.join(sorted(fns))}")
    for k, b in budgets.items():
        lo = cost_range(k, specs, costs)[0] if _has_pair(k, costs) else \
            sum(min(layer_cost(k, s, w, a, costs) for w, a in s.options()) for s in specs)
        if not (b >= lo * (1 - 1e-12)):
            raise QDeployError(f"budget {k}={b:.6g} is below the cost of the all-minimum-bits allocation "
                               f"({lo:.6g}): no allocation fits; raise the budget or add smaller bit widths")
    groups = []
    for t in ties or ():
        t = list(t)
        for n in t:
            if n not in names:
                raise QDeployError(f"tie names {n!r}, which is not a layer with weights; "
                                   f"layers with weights: {', '.join(names)}")
        groups.append(t)
    by = {s.name: s for s in specs}
    for g in groups:
        base = by[g[0]]
        for n in g[1:]:
            if by[n].w_bits != base.w_bits or bool(by[n].a_bits) and bool(base.a_bits) and by[n].a_bits != base.a_bits:
                raise QDeployError(f"tied layers {g[0]!r} and {n!r} have different candidate bit widths")
    return groups


def allocate(specs: Sequence[LayerSpec], sens: Mapping[str, Mapping[tuple, float]],
             budgets: Mapping[str, float], costs: Mapping | None = None,
             ties: Iterable[Sequence[str]] = (), time_limit: float | None = None) -> Allocation:
    """Minimum-sensitivity allocation under ``budgets`` (HiGHS via ``scipy.optimize.milp``).

    Args:
        specs: the layers (:class:`LayerSpec`), each with its candidate options.
        sens: {layer: {(w_bits, a_bits): Omega}} for every option of every layer.
        budgets: {kind: upper bound}, kinds from :data:`COSTS` or ``costs``; units: BOPs per
            sample, bits of weight memory, or the registered cost's own unit.  May be empty.
        costs: extra per-layer cost functions for this call, ``fn(spec, w_bits, a_bits)``, or
            :class:`PairCost` objects (unary + pair part between consecutive specs).
        ties: groups of layer names that must share bit widths.
        time_limit: seconds for HiGHS (None: no limit).

    Returns:
        :class:`Allocation`.

    Raises:
        QDeployError: empty bit list, a budget below the all-minimum-bits cost, an unknown budget,
            a tie naming a layer without weights, or an infeasible combination of budgets/ties.
    """
    from scipy.optimize import LinearConstraint, milp
    from scipy.sparse import lil_matrix

    groups = _validate(specs, sens, budgets, costs, ties)
    opts = [s.options() for s in specs]
    offs = np.cumsum([0] + [len(o) for o in opts])
    nv = int(offs[-1])
    c = np.array([sens[s.name][o] for s, oo in zip(specs, opts) for o in oo], dtype=np.float64)
    scale = 1e6 / max(float(np.sum([max(abs(sens[s.name][o]) for o in oo) for s, oo in zip(specs, opts)])), 1e-300)
    cons = []
    A = lil_matrix((len(specs), nv))
    for i in range(len(specs)):
        A[i, offs[i]:offs[i + 1]] = 1.0
    cons.append(LinearConstraint(A.tocsr(), 1.0, 1.0))
    zblocks = []  # (i, row groups, column groups, z offset) per consecutive pair with pair costs
    pair_tabs = {}
    if budgets:
        kinds = list(budgets)
        for k in kinds:
            if _has_pair(k, costs):
                pair_tabs[k] = _tables(k, specs, opts, costs)[1]
        nz = nv
        for i in range(1, len(specs)):
            mats = [pair_tabs[k][i] for k in pair_tabs if np.any(pair_tabs[k][i] != 0)]
            if not mats:
                continue
            st = np.stack(mats)  # [kinds, p, q]
            rg = _groups([st[:, p, :].tobytes() for p in range(st.shape[1])])
            cg = _groups([st[:, :, q].tobytes() for q in range(st.shape[2])])
            zblocks.append((i, rg, cg, nz))
            nz += len(rg) * len(cg)
        ntot = nz
        B = np.zeros((len(kinds), ntot))
        for r, k in enumerate(kinds):
            bk = float(budgets[k])
            row = [layer_cost(k, s, w, a, costs) for s, oo in zip(specs, opts) for (w, a) in oo]
            B[r, :nv] = row
            if k in pair_tabs:
                for i, rg, cg, z0 in zblocks:
                    P = pair_tabs[k][i]
                    for gi, gp in enumerate(rg):
                        for gj, gq in enumerate(cg):
                            B[r, z0 + gi * len(cg) + gj] = P[gp[0], gq[0]]
            B[r] /= (bk if bk > 0 else 1.0)
        ub = np.array([1.0 if budgets[k] > 0 else 0.0 for k in kinds])
        if zblocks:
            A = lil_matrix((len(specs), ntot))
            for i in range(len(specs)):
                A[i, offs[i]:offs[i + 1]] = 1.0
            cons[0] = LinearConstraint(A.tocsr(), 1.0, 1.0)
            M = lil_matrix((sum(len(rg) + len(cg) for _, rg, cg, _ in zblocks), ntot))
            r = 0
            for i, rg, cg, z0 in zblocks:
                for gi, gp in enumerate(rg):  # sum_q z[p, q] = x[i-1, p]
                    for gj in range(len(cg)):
                        M[r, z0 + gi * len(cg) + gj] = 1.0
                    for p in gp:
                        M[r, offs[i - 1] + p] = -1.0
                    r += 1
                for gj, gq in enumerate(cg):  # sum_p z[p, q] = x[i, q]
                    for gi in range(len(rg)):
                        M[r, z0 + gi * len(cg) + gj] = 1.0
                    for q in gq:
                        M[r, offs[i] + q] = -1.0
                    r += 1
            cons.append(LinearConstraint(M.tocsr(), 0.0, 0.0))
        cons.append(LinearConstraint(B, -np.inf, ub))
    idx = {s.name: i for i, s in enumerate(specs)}
    rows = []
    for g in groups:
        a = idx[g[0]]
        for n in g[1:]:
            b = idx[n]
            for key in ("w", "a"):
                if key == "a" and not (specs[a].a_bits and specs[b].a_bits):
                    continue
                vals = sorted({o[0 if key == "w" else 1] for o in opts[a]})
                for v in vals:
                    r = np.zeros(nv)
                    for j, o in enumerate(opts[a]):
                        if o[0 if key == "w" else 1] == v:
                            r[offs[a] + j] += 1
                    for j, o in enumerate(opts[b]):
                        if o[0 if key == "w" else 1] == v:
                            r[offs[b] + j] -= 1
                    rows.append(r)
    ntot = nv + sum(len(rg) * len(cg) for _, rg, cg, _ in zblocks)
    if rows:
        R = np.vstack(rows)
        if ntot > nv:
            R = np.hstack([R, np.zeros((R.shape[0], ntot - nv))])
        cons.append(LinearConstraint(R, 0.0, 0.0))
    if ntot > nv:
        c = np.concatenate([c, np.zeros(ntot - nv)])
    options = {"mip_rel_gap": 0.0, "presolve": True}
    if time_limit:
        options["time_limit"] = float(time_limit)
    t0 = time.perf_counter()
    integ = np.concatenate([np.ones(nv), np.zeros(ntot - nv)])
    res = milp(c * scale, integrality=integ, bounds=(0, 1), constraints=cons, options=options)
    dt = time.perf_counter() - t0
    if res.x is None or res.status not in (0,):
        raise QDeployError(f"no bit allocation satisfies budgets {dict(budgets)} with ties {groups}: "
                           f"solver says {res.message}")
    x = np.round(res.x[:nv]).astype(int)
    bits = {}
    for i, s in enumerate(specs):
        j = int(np.argmax(x[offs[i]:offs[i + 1]]))
        bits[s.name] = opts[i][j]
    return _result(specs, sens, bits, budgets, costs, dt)


def _groups(keys: list) -> list[list[int]]:
    """Indices grouped by equal key, in first-appearance order."""
    g: dict = {}
    for j, k in enumerate(keys):
        g.setdefault(k, []).append(j)
    return list(g.values())


def _result(specs, sens, bits, budgets, costs, dt) -> Allocation:
    kinds = sorted(set(budgets) | {"bops", "size"})
    tot = {k: total_cost(k, specs, bits, costs) for k in kinds}
    obj = float(sum(sens[s.name][bits[s.name]] for s in specs))
    return Allocation(bits=dict(bits), objective=obj, costs=tot, budgets=dict(budgets), seconds=dt)


def brute_force(specs: Sequence[LayerSpec], sens, budgets: Mapping[str, float], costs=None,
                ties=()) -> Allocation:
    """Exhaustive search of the same problem, pair costs included (for tests; product of option
    counts evaluations).  Raises QDeployError like :func:`allocate`."""
    groups = _validate(specs, sens, budgets, costs, ties)
    t0 = time.perf_counter()
    opts = [s.options() for s in specs]
    tabs = {k: _tables(k, specs, opts, costs) for k in budgets}
    cost_tab = {k: tabs[k][0] for k in budgets}
    pair_tab = {k: tabs[k][1] for k in budgets if any(t is not None for t in tabs[k][1])}
    sens_tab = [[sens[s.name][o] for o in oo] for s, oo in zip(specs, opts)]
    idx = {s.name: i for i, s in enumerate(specs)}
    best, best_obj = None, math.inf
    for combo in itertools.product(*[range(len(o)) for o in opts]):
        ok = all(sum(cost_tab[k][i][j] for i, j in enumerate(combo))
                 + (sum(pair_tab[k][i][combo[i - 1], combo[i]] for i in range(1, len(combo))) if k in pair_tab else 0.0)
                 <= budgets[k] * (1 + 1e-9) for k in budgets)
        if ok and groups:
            for g in groups:
                o0 = opts[idx[g[0]]][combo[idx[g[0]]]]
                for n in g[1:]:
                    o1 = opts[idx[n]][combo[idx[n]]]
                    both_a = specs[idx[g[0]]].a_bits and specs[idx[n]].a_bits
                    if o0[0] != o1[0] or (both_a and o0[1] != o1[1]):
                        ok = False
        if not ok:
            continue
        obj = sum(sens_tab[i][j] for i, j in enumerate(combo))
        if obj < best_obj:
            best, best_obj = combo, obj
    if best is None:
        raise QDeployError("no allocation satisfies the budgets")
    bits = {s.name: opts[i][best[i]] for i, s in enumerate(specs)}
    return _result(specs, sens, bits, budgets, costs, time.perf_counter() - t0)


def uniform_allocation(specs: Sequence[LayerSpec], bits: int, sens=None, costs=None) -> Allocation:
    """Every weight and every searched activation at ``bits`` (fixed activations stay fixed); costs
    (bops, size) are totals (:func:`total_cost`)."""
    alloc = {s.name: (bits, bits if s.a_bits else s.fixed_a_bits) for s in specs}
    sens = sens or {s.name: {alloc[s.name]: 0.0} for s in specs}
    obj = sum(sens[s.name].get(alloc[s.name], float("nan")) for s in specs)
    tot = {k: total_cost(k, specs, alloc, costs) for k in ("bops", "size")}
    return Allocation(bits=alloc, objective=float(obj), costs=tot)


def pareto_frontier(specs: Sequence[LayerSpec], sens, cost: str = "bops", points: int = 20,
                    costs=None, ties=()) -> list[Allocation]:
    """Sweep ``points`` budgets of kind ``cost``, geometrically from the all-minimum to the
    all-maximum cost (pair costs included, :func:`cost_range`), and return the distinct optimal
    allocations (sensitivity vs cost).  Raises QDeployError for an unknown kind."""
    if _has_pair(cost, costs):
        lo, hi = cost_range(cost, specs, costs)
    else:
        lo = sum(min(layer_cost(cost, s, w, a, costs) for w, a in s.options()) for s in specs)
        hi = sum(max(layer_cost(cost, s, w, a, costs) for w, a in s.options()) for s in specs)
    out, seen = [], set()
    for b in np.geomspace(max(lo, 1e-12), max(hi, lo * (1 + 1e-9)), points):
        try:
            a = allocate(specs, sens, {cost: float(b)}, costs=costs, ties=ties)
        except QDeployError:
            continue
        key = tuple(sorted(a.bits.items()))
        if key not in seen:
            seen.add(key)
            out.append(a)
    return out
