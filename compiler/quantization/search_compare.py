"""Ablation of the bit allocation: Hessian vs uniform vs random vs trace-only, each fine-tuned.

:func:`compare_allocations` takes a search recipe (:mod:`.search_recipe`) and BOPs/size budgets and,
per budget, fine-tunes with the same QAT settings and seeds:

* ``hessian``: the ILP on the search's default sensitivities (``"hessian+measured"``:
  max(HAWQ-V3 Omega, 2 x measured loss increase), :func:`.search.compute_sensitivities`);
* ``trace``: the ILP on HAWQ-V3's Omega alone (Yao et al., arXiv 2011.10680, Eq. 10: Tr(H)/n times
  the quantization error), without the measured term;
* ``random``: the ILP on random sensitivities of HAWQ's form, c_i * 4^-b with one log-uniform
  factor c_i in [1e-3, 1e3] per tensor (weights; searched activations) -- an allocation that
  spends the same budget under the same constraints and ties, with no information on the layers;
* ``uniform``: the narrowest uniform width whose cost is equal to or larger than the budget in every
  budgeted kind (the baseline the allocation must beat with fewer or equal resources).

Every row holds the mean validation/test accuracy over the QAT seeds and per sample the fraction
of seeds that classify it right; :func:`.search_report.accuracy_noise` turns two rows into the
paired standard error of their difference.  The QAT runs are those of :func:`.search.run_search`:
the (allocation x seed) fine-tunes are jobs of :func:`.fanout.run_qat_jobs` (calibrated activation
scales, seeds ``seed .. seed+qat_seeds-1``, one torch thread each; in this process or on ``workers``
local processes, identical results either way); settings come from the recipe.
"""
from __future__ import annotations

import time
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from ..errors import QDeployError
from . import ilp, qat
from .hutchinson import hutchinson_traces
from .search_budget import budget_value, check_budget_kinds, check_uniform_bits, resolve_budget
from .search_plan import JobPlan, compare_allocations_at, comparison_row, random_sensitivities, uniform_at_or_above
from .search_recipe import check_qat_settings, check_recipe_result, load_recipe, recipe_xy
from .search_report import ROWS, comparison_table, plot_rows, set_bops_axis
from .search_specs import DEFAULT_BITS, check_ties, compute_sensitivities, layer_specs

__all__ = ["ROWS", "random_sensitivities", "uniform_at_or_above", "compare_allocations", "render_comparison",
           "plot_comparison"]

def compare_allocations(recipe, budgets: Sequence[Mapping], w_bits: Iterable[int] = DEFAULT_BITS,
                        a_bits: Iterable[int] | None = (), act_bits_fixed: int = 8, qat_seeds: int = 5,
                        seed: int = 0, probes: int = 100, tol: float = 1e-3, trace_method: str = "auto",
                        log=None, workers: int | str = 1) -> dict:
    """Fine-tune the four allocations of the module docstring at each budget and return the results.

    Args:
        recipe: a search recipe (callable, ``module:function``, ``file.py:function`` or YAML).
        budgets: ``[{kind: value}]`` with kinds ``bops`` / ``size`` (``"uniform:B"`` allowed).
        w_bits, a_bits: candidate widths; ``a_bits=()`` (default) keeps activations at
            ``act_bits_fixed`` (weights-only search), ``None`` searches them over ``w_bits``.
        qat_seeds: QAT runs per allocation (seeds ``seed`` ...).
        probes, tol, trace_method: Hessian trace settings (:func:`.hutchinson.hutchinson_traces`).
        log: optional ``log(str)`` for progress lines.
        workers: processes for the QAT jobs (:func:`.fanout.resolve_workers`: an int >= 1 or
            ``"auto"``; 1, the default: in this process).  Results do not depend on it.

    Returns:
        ``{"model", "float_accuracy", "settings", "layers", "budgets": [{"budget", "budget_resolved",
        "rows": {row: {"bits", "costs", "val_acc", "test_acc", "val_correct", "test_correct", ...}}}],
        "seconds"}`` (test entries only when the recipe has a test split).

    Raises:
        QDeployError: bad recipe, budgets, bit lists or workers (one line naming the setting), or a
            QAT job that failed twice.
    """
    from .fanout import resolve_workers, run_qat_jobs
    from .fanout_jobs import QatContext

    resolve_workers(workers, 1)  # a bad setting fails before the float training
    t_all = time.perf_counter()
    log = log or (lambda s: None)
    check_budget_kinds(budgets, None)
    budgets = [{k: budget_value(k, v) for k, v in b.items()} for b in budgets]
    if not budgets:
        raise QDeployError("no budget given")
    if int(qat_seeds) < 1:
        raise QDeployError(f"qat_seeds must be >= 1, got {qat_seeds}")
    w_bits = tuple(sorted(set(int(b) for b in w_bits)))
    a_bits = w_bits if a_bits is None else tuple(sorted(set(int(b) for b in a_bits)))
    check_uniform_bits(budgets, w_bits)
    fn, extra = load_recipe(recipe)
    torch.manual_seed(seed)
    r = fn(**extra) if extra else fn()
    check_recipe_result(r)
    model = r["model"]
    name = r.get("name", type(model).__name__)
    inp = {"bits": 8, "scale": 2.0 ** -4, "signed": False, **(r.get("input") or {})}
    qcfg = check_qat_settings({"epochs": 15, "lr": 3e-3, "batch_size": 64, **(r.get("qat") or {})})
    x_tr, y_tr = recipe_xy(r, "train")
    x_va, y_va = recipe_xy(r, "val")
    test = recipe_xy(r, "test") if r.get("test") is not None else None
    ns = int(r.get("trace_samples", len(x_tr)))
    specs = layer_specs(model, x_tr[:1], w_bits, a_bits, inp["bits"], act_bits_fixed)
    ties = check_ties(model, r.get("ties", ()))
    tr = hutchinson_traces(model, (x_tr[:ns], y_tr[:ns]), activations=[s.name for s in specs if s.a_bits],
                           tol=tol, max_probes=probes, seed=seed, method=trace_method)
    log(f"[{name}] traces: {tr.probes} probes ({'exact GGN' if tr.probes == 0 else 'Hutchinson'}), "
        f"{tr.seconds:.1f} s")
    sens = {"hessian": compute_sensitivities(model, specs, tr, x_tr[:ns], y_tr[:ns], mode="hessian+measured"),
            "trace": compute_sensitivities(model, specs, tr, x_tr[:ns], y_tr[:ns], mode="hessian")}
    float_acc = {"val": qat.accuracy(model, x_va, y_va), **({"test": qat.accuracy(model, *test)} if test else {})}
    # plan every allocation first (ILP only; the pieces run_search(compare=True) uses too), then
    # fine-tune each distinct one with every seed as independent jobs (.fanout), then assemble the rows
    plan = JobPlan(qat_seeds)
    plans = []
    for i, b_in in enumerate(budgets):
        b = resolve_budget(b_in, specs, None)
        allocs = {"hessian": ilp.allocate(specs, sens["hessian"], b, ties=ties),
                  **compare_allocations_at(specs, sens["trace"], b, i, seed, ties=ties)}
        ub, allocs["uniform"] = uniform_at_or_above(specs, w_bits, b)
        plans.append((b_in, b, {row: (a, plan.want(a.bits, f"b{i}_{row}", export=False)) for row, a in allocs.items()},
                      ub))
    jobs = plan.jobs()
    ctx = QatContext(model=model, x_tr=x_tr, y_tr=y_tr, x_va=x_va, y_va=y_va, test=test, inp=inp, qcfg=qcfg, ns=ns,
                     seed=seed, name=name, export=False, recipe=recipe if isinstance(recipe, str) else None)
    job_res, fanout_info = run_qat_jobs(ctx, jobs, workers=workers)
    log(f"[{name}] QAT: {len(jobs)} jobs on {fanout_info['engine']} ({fanout_info['workers']} worker(s)), "
        f"{fanout_info['seconds']:.0f} s")
    done: dict = {}

    def assemble(key, tag: str) -> dict:
        t0, rs = plan.results(job_res, key)
        if t0 not in done:
            res = done[t0] = plan.accuracy_row(rs, t0, test is not None)
            log(f"[{name}] {t0}: val {res['val_acc']:.4f}" + (f" test {res['test_acc']:.4f}" if test else "")
                + f" ({res['qat_seconds']:.0f} s of jobs)")
        return done[t0] if tag == t0 else {**done[t0], "same_as": t0}

    results = [{"budget": dict(b_in), "budget_resolved": b,
                "rows": {row: {**comparison_row(specs, a, b, None, ub if row == "uniform" else None), **assemble(*kt)}
                         for row, (a, kt) in allocs.items()}}
               for b_in, b, allocs, ub in plans]
    layers = [{"name": s.name, "n_weights": s.n_weights, "trace": tr.weights[s.name].trace,
               "stderr": tr.weights[s.name].stderr} for s in specs]
    return {"model": name, "float_accuracy": float_acc, "layers": layers, "budgets": results,
            "n_eval": {"val": int(len(x_va)), **({"test": int(len(test[0]))} if test else {})},
            "settings": {"w_bits": list(w_bits), "a_bits": list(a_bits), "act_bits_fixed": None if a_bits else act_bits_fixed,
                         "qat": qcfg, "qat_seeds": int(qat_seeds), "seed": seed, "ties": ties,
                         "trace": {"probes": tr.probes, "seconds": tr.seconds}},
            "qat_fanout": fanout_info,
            "seconds": time.perf_counter() - t_all}


def render_comparison(rep: dict, key: str = "test_acc") -> str:
    """Markdown table of :func:`compare_allocations`'s result: a heading (model, float accuracy,
    activations, seeds) and :func:`.search_report.comparison_table` -- per budget and row the BOPs,
    the accuracy ``key`` (mean over QAT seeds) and each allocation's difference to the uniform row
    with twice its paired standard error (:func:`.search_report.accuracy_noise`), in points."""
    split = key.split("_")[0]
    acts = rep["settings"]["act_bits_fixed"]
    head = (f"### {rep['model']} (float {split} {rep['float_accuracy'].get(split, float('nan')):.4f}; "
            f"activations {'fixed %s-bit' % acts if acts else 'searched'}; {rep['settings']['qat_seeds']} QAT seeds)")
    return head + "\n\n" + comparison_table(rep["budgets"], key)


def plot_comparison(rep: dict, path, key: str = "test_acc"):
    """PNG of accuracy ``key`` after QAT vs BOPs per sample for the four rows (error bars: one
    standard deviation over the QAT seeds; :func:`.search_report.plot_rows`) with the float accuracy
    as a line.  Returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    fig, ax = plt.subplots(figsize=(6, 4))
    plot_rows(ax, rep["budgets"], key)
    ax.axhline(rep["float_accuracy"].get(key.split("_")[0], np.nan), color="gray", lw=0.8, label="float")
    ax.set(xlabel="BOPs / sample", ylabel=key.replace("_", " "), title=f"{rep['model']}: after QAT")
    set_bops_axis(ax)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
