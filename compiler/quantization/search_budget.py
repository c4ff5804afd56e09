"""Budgets of the mixed-precision search: parsing, checking and resolving them to numbers.

A budget point is ``{kind: value}`` with kinds ``bops`` (bit operations per sample), ``size``
(weight bits), an FPGA estimator figure (:data:`.hw_costs.ESTIMATOR_KINDS`) or any cost
registered in :mod:`.ilp`; a value is a positive number or ``"uniform:B"``, the cost of the
uniform B-bit allocation (a fractional B interpolates between its two neighbours).  Not to be
confused with :func:`qdeploy.passes.memory.parse_budget` (a memory budget in bytes or a fraction).
"""
from __future__ import annotations

import math
from typing import Mapping

from ..errors import QDeployError
from . import ilp
from .hw_costs import ESTIMATOR_KINDS

__all__ = ["parse_search_budget", "budget_value", "resolve_budget", "check_budget_kinds", "check_uniform_bits"]


def parse_search_budget(text: str) -> dict:
    """``"bops=1.5e6,size=uniform:4"`` -> ``{"bops": 1.5e6, "size": "uniform:4"}``.  Raises QDeployError."""
    out = {}
    for part in [p for p in str(text).split(",") if p.strip()]:
        if "=" not in part:
            raise QDeployError(f"budget {part!r}: expected kind=value, e.g. bops=1.2e6 or size=uniform:4")
        k, v = (t.strip() for t in part.split("=", 1))
        if k in out:
            raise QDeployError(f"budget {text!r} names {k!r} twice (one value per kind in a budget point)")
        out[k] = budget_value(k, v)
    if not out:
        raise QDeployError("empty budget")
    return out


def budget_value(k: str, v):
    """A budget value checked: ``"uniform:B"`` (B a number) or a finite positive number."""
    if isinstance(v, str) and v.strip().startswith("uniform:"):
        v = v.strip()
        try:
            b = float(v.split(":", 1)[1])
        except ValueError:
            raise QDeployError(f"budget {k}={v}: uniform:B needs a number B (e.g. 4 or 3.5)") from None
        if not math.isfinite(b):
            raise QDeployError(f"budget {k}={v}: B must be a finite number")
        return v
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise QDeployError(f"budget {k}={v!r}: {v!r} is not a number or uniform:B") from None
    if not math.isfinite(x):
        raise QDeployError(f"budget {k}={v}: must be a finite number")
    if not x > 0:
        raise QDeployError(f"budget {k}={v} must be positive")
    return x


def _uniform_bits(v) -> float | None:
    """B of a ``"uniform:B"`` budget value, None for a plain number."""
    return float(v.split(":", 1)[1]) if isinstance(v, str) and v.startswith("uniform:") else None


def resolve_budget(b: Mapping, specs, costs) -> dict:
    """A budget point with every ``"uniform:B"`` value replaced by its cost (of kind ``k``) under
    the uniform B-bit allocation of ``specs`` (:func:`.ilp.total_cost` with ``costs``); plain
    numbers become floats."""
    out = {}
    for k, v in b.items():
        bits = _uniform_bits(v)
        if bits is not None:
            # uniform:B -- the cost of the uniform B-bit allocation; a fractional B interpolates
            # linearly between the costs of its two neighbours (uniform:3.5 = midway 3 and 4 bits)
            lo, t = int(math.floor(bits)), bits - math.floor(bits)

            def ucost(b):
                return ilp.total_cost(k, specs, {s.name: (b, b if s.a_bits else s.fixed_a_bits) for s in specs}, costs)
            out[k] = ucost(lo) if t == 0 else (1 - t) * ucost(lo) + t * ucost(lo + 1)
        else:
            out[k] = float(v)
    return out


def check_budget_kinds(budgets, costs) -> None:
    """Raise QDeployError for a budget kind no cost function knows (listing every known kind)."""
    known = sorted(set(ilp.COSTS) | set(ESTIMATOR_KINDS) | set(costs or {}))
    for b in budgets:
        for k in b:
            if k not in known:
                raise QDeployError(f"unknown budget {k!r}; known: {', '.join(known)}")


def check_uniform_bits(budgets, w_bits) -> None:
    """``uniform:B`` must lie within the candidate weight bit widths (else the budget is meaningless)."""
    lo, hi = min(w_bits), max(w_bits)
    for b in budgets:
        for k, v in b.items():
            bits = _uniform_bits(v)
            if bits is not None and not lo <= bits <= hi:
                raise QDeployError(f"budget {k}={v}: B must be within the candidate bit widths {lo}..{hi}")
