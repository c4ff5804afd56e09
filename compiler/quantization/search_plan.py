"""Planning the allocations of a search and turning their QAT jobs back into report rows.

Shared by :func:`.search.run_search` (Hessian and uniform allocations per budget, plus with
``compare=True`` the trace-only and random ones) and :func:`.search_compare.compare_allocations`
(all four), so both compute the same allocations for the same recipe, budget and seed:

* :func:`random_sensitivities`: HAWQ-shaped random sensitivities (the ``random`` row);
* :func:`uniform_fitting`: the widest uniform width within the budget (and the next one up when it
  does not reach the budget) -- the uniform rows of the search report;
* :func:`uniform_at_or_above`: the narrowest uniform width whose cost reaches the budget in every
  kind -- the ``uniform`` row of the four-row comparison;
* :func:`compare_allocations_at`: the ``trace`` (ILP on HAWQ-V3's Omega alone) and ``random``
  allocations of budget ``i``;
* :func:`comparison_row`: the bits and costs of one row of the comparison table;
* :class:`JobPlan`: each distinct allocation gets one tag (its first occurrence) and one QAT job per
  seed (:class:`.fanout_jobs.QatJob`); :meth:`JobPlan.row` assembles a row from the jobs' results.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from ..errors import QDeployError
from . import ilp
from .fanout_jobs import QatJob

__all__ = ["random_sensitivities", "uniform_fitting", "uniform_at_or_above", "compare_allocations_at",
           "random_seed", "comparison_row", "JobPlan"]


def random_sensitivities(specs: Sequence[ilp.LayerSpec], seed: int) -> dict:
    """{layer: {(w, a): c_w 4^-w + c_a 4^-a}} with c_w, c_a log-uniform in [1e-3, 1e3] (c_a only for
    searched activations), drawn from ``numpy.random.default_rng(seed)`` in spec order.

    The 4^-b decay is that of the quantization error power of a b-bit uniform quantizer (HAWQ-V3,
    arXiv 2011.10680, Eq. 10 without the trace): an allocation that spends the budget under the same
    constraints and ties with no information on the layers."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        cw = 10.0 ** rng.uniform(-3, 3)
        ca = 10.0 ** rng.uniform(-3, 3) if s.a_bits else 0.0
        out[s.name] = {(w, a): cw * 4.0 ** -w + (ca * 4.0 ** -a if s.a_bits else 0.0) for w, a in s.options()}
    return out


def random_seed(seed: int, i: int) -> int:
    """The seed of budget ``i``'s random sensitivities in a search seeded ``seed``: ``seed * 1000 + i``."""
    return int(seed) * 1000 + int(i)


def uniform_at_or_above(specs, w_bits: Iterable[int], budget: Mapping[str, float],
                        costs: Mapping | None = None) -> tuple[int, ilp.Allocation]:
    """The narrowest uniform width (from ``w_bits``) whose cost is >= the budget in every kind.

    Args:
        specs: the layers; w_bits: candidate widths; budget: resolved ``{kind: value}``;
        costs: extra cost functions (:func:`.ilp.total_cost`).

    Returns:
        ``(bits, allocation)``, the allocation's ``costs`` holding every budget kind.

    Raises:
        QDeployError: no candidate width reaches the budget.
    """
    for b in sorted(w_bits):
        ua = ilp.uniform_allocation(specs, b, costs=costs)
        ua.costs.update({k: ilp.total_cost(k, specs, ua.bits, costs) for k in budget})
        if all(ua.costs[k] >= budget[k] * (1 - 1e-9) for k in budget):
            return b, ua
    raise QDeployError(f"no uniform width in {sorted(w_bits)} reaches the budget {dict(budget)}")


def uniform_fitting(specs, w_bits, budget: Mapping[str, float], sens, costs=None):
    """``(fits, above)``: the widest uniform width whose cost is within the budget in every kind, and,
    when that one does not reach the budget (e.g. between two uniform points, ``uniform:3.5``), the
    next width up (more than the budget: the "equal or larger BOPs" comparison).  Each is
    ``(bits, allocation)`` or None; allocation costs hold every budget kind, objectives are under
    ``sens``."""
    fits = None
    for ub in sorted(w_bits, reverse=True):
        ua = ilp.uniform_allocation(specs, ub, sens, costs)
        ucost = {k: ilp.total_cost(k, specs, ua.bits, costs) for k in budget}
        if all(ucost[k] <= budget[k] * (1 + 1e-9) for k in budget):
            ua.costs.update(ucost)
            fits = (ub, ua)
            break
    if fits is not None and all(fits[1].costs[k] >= budget[k] * (1 - 1e-9) for k in budget):
        return fits, None
    for ub in sorted(w_bits):
        if fits is not None and ub <= fits[0]:
            continue
        ua = ilp.uniform_allocation(specs, ub, sens, costs)
        ua.costs.update({k: ilp.total_cost(k, specs, ua.bits, costs) for k in budget})
        return fits, (ub, ua)
    return fits, None


def compare_allocations_at(specs, trace_sens, budget: Mapping[str, float], i: int, seed: int,
                           costs=None, ties=()) -> dict:
    """``{"trace": allocation, "random": allocation}`` of budget number ``i`` (resolved ``budget``):
    the ILP (:func:`.ilp.allocate`) on ``trace_sens`` (HAWQ-V3 Omega alone, ``mode="hessian"`` of
    :func:`.search.compute_sensitivities`) and on :func:`random_sensitivities` seeded
    :func:`random_seed` ``(seed, i)``."""
    return {"trace": ilp.allocate(specs, trace_sens, budget, costs=costs, ties=ties),
            "random": ilp.allocate(specs, random_sensitivities(specs, random_seed(seed, i)), budget, costs=costs,
                                   ties=ties)}


class JobPlan:
    """The distinct allocations of a search and their QAT jobs.

    :meth:`want` registers an allocation under a tag; an allocation asked for again keeps its first
    tag (fine-tuned once, the later rows are ``same_as`` it).  :meth:`jobs` lists one
    :class:`~.fanout_jobs.QatJob` per distinct allocation and seed index; ``export`` marks the tags
    whose first seed's model is exported (allocations first asked for with ``export=True``).
    """

    def __init__(self, qat_seeds: int):
        self.qat_seeds = int(qat_seeds)
        self.first_tag: dict = {}  # allocation key -> tag of its first occurrence
        self.export_tags: set = set()

    @staticmethod
    def key(bits: Mapping) -> tuple:
        """The hashable key of an allocation ``{layer: (w, a)}``."""
        return tuple(sorted((n, tuple(v)) for n, v in bits.items()))

    def want(self, bits: Mapping, tag: str, export: bool = True) -> tuple:
        """Register allocation ``bits`` under ``tag``; returns ``(key, tag)`` for :meth:`row`."""
        k = self.key(bits)
        if k not in self.first_tag:
            self.first_tag[k] = tag
            if export:
                self.export_tags.add(tag)
        return k, tag

    def jobs(self) -> list:
        """Every (distinct allocation x seed index) job, allocations in the order first asked for."""
        return [QatJob(tag=t, k=k, bits=key, export=t in self.export_tags)
                for key, t in self.first_tag.items() for k in range(self.qat_seeds)]

    def results(self, job_res: Mapping, key) -> tuple[str, list]:
        """``(first tag, [JobResult per seed index])`` of allocation ``key``."""
        t0 = self.first_tag[key]
        return t0, [job_res[QatJob(tag=t0, k=k, bits=key, export=t0 in self.export_tags).name]
                    for k in range(self.qat_seeds)]

    def accuracy_row(self, rs: Sequence, t0: str, with_test: bool) -> dict:
        """The accuracy fields of one allocation from its seeds' job results (seed order): ``tag``,
        ``qat_seconds``, per split ``<split>_acc`` (mean over seeds), ``<split>_accs`` (per seed) and
        ``<split>_correct`` (per evaluation sample, the fraction of seeds right; rounded to 4 digits),
        ``qat_retries`` when a job was retried."""
        res = {"tag": t0, "qat_seconds": sum(r.seconds for r in rs)}
        for split in ("val", "test") if with_test else ("val",):
            oks = [r.val_ok if split == "val" else r.test_ok for r in rs]
            accs = [float(ok.mean()) for ok in oks]
            res[f"{split}_acc"] = float(np.mean(accs))
            res[f"{split}_accs"] = accs
            res[f"{split}_correct"] = [round(float(c), 4) for c in sum(ok / len(rs) for ok in oks)]
        if sum(r.attempt for r in rs):
            res["qat_retries"] = sum(r.attempt for r in rs)
        return res


def comparison_row(specs, alloc: ilp.Allocation, budget: Mapping[str, float], costs=None,
                   uniform_bits: int | None = None) -> dict:
    """The allocation part of a comparison row: ``{"bits": {layer: [w, a]}, "costs": {kind: total}}``
    (every budget kind plus ``bops`` and ``size``; :func:`.ilp.total_cost` with ``costs``), and
    ``uniform_bits`` for the uniform row."""
    out = {"bits": {n: list(v) for n, v in alloc.bits.items()},
           "costs": {k: ilp.total_cost(k, specs, alloc.bits, costs) for k in sorted(set(budget) | {"bops", "size"})}}
    if uniform_bits is not None:
        out["uniform_bits"] = int(uniform_bits)
    return out
