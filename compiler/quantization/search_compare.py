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
from .search import DEFAULT_BITS, check_ties, compute_sensitivities, layer_specs
from .search_budget import budget_value, check_budget_kinds, check_uniform_bits, resolve_budget
from .search_recipe import check_qat_settings, check_recipe_result, load_recipe, recipe_xy
from .search_report import accuracy_noise

__all__ = ["ROWS", "random_sensitivities", "uniform_at_or_above", "compare_allocations", "render_comparison",
           "plot_comparison"]

ROWS = ("hessian", "trace", "random", "uniform")


def random_sensitivities(specs: Sequence[ilp.LayerSpec], seed: int) -> dict:
    """{layer: {(w, a): c_w 4^-w + c_a 4^-a}} with c_w, c_a log-uniform in [1e-3, 1e3] (c_a only for
    searched activations), drawn from ``numpy.random.default_rng(seed)`` in spec order."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        cw = 10.0 ** rng.uniform(-3, 3)
        ca = 10.0 ** rng.uniform(-3, 3) if s.a_bits else 0.0
        out[s.name] = {(w, a): cw * 4.0 ** -w + (ca * 4.0 ** -a if s.a_bits else 0.0) for w, a in s.options()}
    return out


def uniform_at_or_above(specs, w_bits: Iterable[int], budget: Mapping[str, float]) -> tuple[int, ilp.Allocation]:
    """The narrowest uniform width (from ``w_bits``) whose cost is >= the budget in every kind.

    Raises:
        QDeployError: no candidate width reaches the budget.
    """
    for b in sorted(w_bits):
        ua = ilp.uniform_allocation(specs, b)
        ua.costs.update({k: ilp.total_cost(k, specs, ua.bits) for k in budget})
        if all(ua.costs[k] >= budget[k] * (1 - 1e-9) for k in budget):
            return b, ua
    raise QDeployError(f"no uniform width in {sorted(w_bits)} reaches the budget {dict(budget)}")


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
    from .fanout_jobs import QatContext, QatJob

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
    # plan every allocation first (ILP only), then fine-tune each distinct one with every seed as
    # independent jobs (.fanout), then assemble the rows
    first_tag: dict = {}  # allocation key -> tag of its first occurrence (later ones: same_as)
    plans = []
    for i, b_in in enumerate(budgets):
        b = resolve_budget(b_in, specs, None)
        allocs = {"hessian": ilp.allocate(specs, sens["hessian"], b, ties=ties),
                  "trace": ilp.allocate(specs, sens["trace"], b, ties=ties),
                  "random": ilp.allocate(specs, random_sensitivities(specs, seed * 1000 + i), b, ties=ties)}
        ub, ua = uniform_at_or_above(specs, w_bits, b)
        allocs["uniform"] = ua
        for row, a in allocs.items():
            first_tag.setdefault(tuple(sorted(a.bits.items())), f"b{i}_{row}")
        plans.append((b_in, b, allocs, ub))
    jobs = [QatJob(tag=t, k=k, bits=key) for key, t in first_tag.items() for k in range(int(qat_seeds))]
    ctx = QatContext(model=model, x_tr=x_tr, y_tr=y_tr, x_va=x_va, y_va=y_va, test=test, inp=inp, qcfg=qcfg, ns=ns,
                     seed=seed, name=name, export=False, recipe=recipe if isinstance(recipe, str) else None)
    job_res, fanout_info = run_qat_jobs(ctx, jobs, workers=workers)
    log(f"[{name}] QAT: {len(jobs)} jobs on {fanout_info['engine']} ({fanout_info['workers']} worker(s)), "
        f"{fanout_info['seconds']:.0f} s")
    done: dict = {}

    def assemble(key, tag: str) -> dict:
        t0 = first_tag[key]
        if t0 not in done:
            rs = [job_res[QatJob(tag=t0, k=k, bits=key).name] for k in range(int(qat_seeds))]
            res = {"tag": t0, "qat_seconds": sum(r.seconds for r in rs)}
            for split in ("val", "test") if test is not None else ("val",):
                oks = [r.val_ok if split == "val" else r.test_ok for r in rs]
                accs = [float(ok.mean()) for ok in oks]
                res[f"{split}_acc"] = float(np.mean(accs))
                res[f"{split}_accs"] = accs
                res[f"{split}_correct"] = [round(float(c), 4) for c in sum(ok / int(qat_seeds) for ok in oks)]
            done[t0] = res
            log(f"[{name}] {t0}: val {res['val_acc']:.4f}" + (f" test {res['test_acc']:.4f}" if test else "")
                + f" ({res['qat_seconds']:.0f} s of jobs)")
        return done[t0] if tag == t0 else {**done[t0], "same_as": t0}

    results = []
    for i, (b_in, b, allocs, ub) in enumerate(plans):
        rows = {}
        for row, a in allocs.items():
            costs = {k: ilp.total_cost(k, specs, a.bits) for k in sorted(set(b) | {"bops", "size"})}
            rows[row] = {"bits": {n: list(v) for n, v in a.bits.items()}, "costs": costs,
                         **({"uniform_bits": ub} if row == "uniform" else {}),
                         **assemble(tuple(sorted(a.bits.items())), f"b{i}_{row}")}
        results.append({"budget": dict(b_in), "budget_resolved": b, "rows": rows})
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
    """Markdown table of :func:`compare_allocations`'s result: per budget and row the BOPs, the
    accuracy ``key`` (mean over QAT seeds) and each allocation's difference to the uniform row with
    twice its paired standard error (:func:`.search_report.accuracy_noise`), in points."""
    lines = [f"### {rep['model']} (float {key.split('_')[0]} {rep['float_accuracy'].get(key.split('_')[0], float('nan')):.4f}; "
             f"activations {'fixed %s-bit' % rep['settings']['act_bits_fixed'] if rep['settings']['act_bits_fixed'] else 'searched'}; "
             f"{rep['settings']['qat_seeds']} QAT seeds)", "",
             "| budget | row | BOPs | " + key + " | minus uniform (2 paired se) |", "|---|---|---:|---:|---|"]
    for b in rep["budgets"]:
        u = b["rows"]["uniform"]
        for row in ROWS:
            r = b["rows"][row]
            tag = f"uniform {r['uniform_bits']}-bit" if row == "uniform" else row
            diff = ""
            if row != "uniform" and key in r:
                d, se = r[key] - u[key], accuracy_noise(r, u, key)
                diff = f"{d * 100:+.2f} ({2 * se * 100:.2f}){' *' if abs(d) > 2 * se else ''}"
            acc = f"{r[key]:.4f}" if key in r else "n/a"
            lines.append(f"| {list(b['budget'].values())[0]} | {tag} | {r['costs']['bops']:.4g} | {acc} | {diff} |")
    lines.append("")
    lines.append("`*`: the difference exceeds 2 paired standard errors (over the evaluation samples).")
    return "\n".join(lines) + "\n"


def plot_comparison(rep: dict, path, key: str = "test_acc"):
    """PNG of accuracy ``key`` after QAT vs BOPs per sample for the four rows (error bars: one
    standard deviation over the QAT seeds) with the float accuracy as a line.  Returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    fig, ax = plt.subplots(figsize=(6, 4))
    for row, style in zip(ROWS, ("o-", "^-", "x:", "s--")):
        pts = sorted({(b["rows"][row]["costs"]["bops"], b["rows"][row][key], float(np.std(b["rows"][row][key + "s"])))
                      for b in rep["budgets"] if key in b["rows"][row]})
        if pts:
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, fmt=style, ms=4, capsize=2, label=row)
    ax.axhline(rep["float_accuracy"].get(key.split("_")[0], np.nan), color="gray", lw=0.8, label="float")
    ax.set(xscale="log", xlabel="BOPs / sample", ylabel=key.replace("_", " "), title=f"{rep['model']}: after QAT")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
