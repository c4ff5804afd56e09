"""Tensor rematerialization under a peak-memory budget.

Sources:

* Moccasin -- Bartan, Li, Jain, Rupp, et al., "Moccasin: Efficient Tensor Rematerialization
  for Neural Networks", ICML 2023 (arXiv 2304.14463): solved with OR-Tools CP-SAT
  (:func:`solve_cp`, :mod:`.cp_sat`).
* Checkmate -- Jain et al., "Checkmate: Breaking the Memory Wall with Optimal Tensor
  Rematerialization", MLSys 2020 (arXiv 1910.02653): the frontier-advancing MILP solved with
  HiGHS through SciPy (:func:`solve_milp`, :mod:`.milp`), the comparison baseline.
* a greedy baseline (:func:`solve_greedy`, :mod:`.greedy`) whose schedule is the CP model's warm
  start.

The package, by concept:

* :mod:`.problem`: the IR-independent instance (:class:`Problem`), schedules, the
  no-recomputation orders, the budget (:func:`resolve_budget`);
* :mod:`.evaluate`: exact peak and cost of a schedule (:func:`evaluate`), :class:`RematResult`;
* :mod:`.greedy`, :mod:`.cp_sat`, :mod:`.milp`: the three solvers, each returning a
  :class:`RematResult` holding a :class:`Schedule` (the order of node executions including
  recomputations, with the exact copy each execution reads);
* :mod:`.rewrite`: a schedule -> an ordinary IR graph whose recomputations are explicit nodes;
* :mod:`.cost`: the compute-cost models (MACs and units built in; others, like hls4ml cycles,
  from providers in the pass context: :func:`resolve_costs`);
* :mod:`.driver`: :func:`rematerialize` and the registered ``remat`` pass.

Every peak quoted is the peak the reference interpreter measures when it runs the rewritten
graph (the memory model of :mod:`qdeploy.passes.memory`, tight liveness).
"""
from __future__ import annotations

from .cost import BUILTIN_COST_MODELS, COST_MODELS, resolve_costs
from .cp_sat import DEFAULT_TIGHTENINGS, TIGHTENINGS, cp_workers, live_cuts, solve_cp
from .driver import REMAT_OPTIONS, remat_pass, rematerialize
from .evaluate import Evaluation, RematResult, evaluate, make_result, prune
from .greedy import solve_greedy
from .milp import milp_size, solve_milp
from .problem import (STATELESS_OPS, Problem, RematError, Schedule, assert_stateless, low_memory_order, no_remat,
                      resolve_budget)
from .rewrite import rewrite

__all__ = ["BUILTIN_COST_MODELS", "COST_MODELS", "resolve_costs", "DEFAULT_TIGHTENINGS", "TIGHTENINGS", "cp_workers", "live_cuts", "solve_cp",
           "REMAT_OPTIONS", "remat_pass", "rematerialize", "Evaluation", "RematResult", "evaluate", "make_result", "prune",
           "solve_greedy", "milp_size", "solve_milp", "STATELESS_OPS", "Problem", "RematError", "Schedule",
           "assert_stateless", "low_memory_order", "no_remat", "resolve_budget", "rewrite"]
