"""The mixed-precision search driver: traces -> sensitivities -> ILP per budget -> QAT -> report.

    run_search(recipe, out_dir, budgets=[{"bops": "uniform:4"}, {"size": 20000}])

writes ``search_report.json``, ``search_report.md``, ``pareto.png`` and ``models/*.onnx`` (QONNX that
``qdeploy compile`` takes) under ``out_dir``.

A *recipe* is a callable (or ``"module:function"``, ``"path/file.py:function"``, or a YAML file with
``recipe: <one of those>`` and optional ``args:``, keyword arguments for it) returning a dict:

=================  ===========================================================================
``model``          trained float ``nn.Sequential`` (Linear/Conv, ReLU, pooling, Flatten, Dropout, BN),
                   or any ``torch.fx``-traceable module of those plus adds/concatenations (:mod:`.qat_fx`)
``train``          ``(x, y)`` arrays: fine-tuning data and Hessian data
``val``            ``(x, y)``: accuracy reported per allocation
``test``           ``(x, y)`` optional: accuracy reported per allocation (the comparison figure)
``input``          ``{"bits": 8, "scale": 2**-4, "signed": False}``: the model input's fixed-point format
``name``           optional model name
``qat``            optional ``{"epochs", "lr", "batch_size", "distill_alpha", "distill_temperature"}``;
                   ``distill_alpha`` > 0 distills from the float model during QAT
                   (:func:`.qat.fine_tune`; default 0: plain cross-entropy)
``ties``           optional groups of tied layer names
``trace_samples``  optional number of training samples for the Hessian (default all)
=================  ===========================================================================

Budgets: ``{kind: value}`` with kinds ``bops`` (bit operations per sample), ``size`` (weight bits)
or any cost registered in :mod:`.ilp`; a value may be ``"uniform:B"``, the cost of the uniform
B-bit allocation.  For each budget the uniform baseline is the largest uniform bit width that fits.

With ``compare=True`` (``qdeploy search --compare``) each budget also fine-tunes the trace-only,
random and uniform-at-or-above allocations of :mod:`.search_compare`, and the report shows the
four-row comparison.

This module is the driver; recipes are loaded and checked in :mod:`.search_recipe`, budgets parsed
and resolved in :mod:`.search_budget` (:func:`~.search_budget.parse_search_budget`), layers and
sensitivities in :mod:`.search_specs` (re-exported here), allocations planned and their QAT jobs
assembled into rows in :mod:`.search_plan`, and the report rendered by :mod:`.search_report`.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import QDeployError
from . import ilp, qat, sensitivity
from .hutchinson import hutchinson_traces
from .search_budget import budget_value, check_budget_kinds, check_uniform_bits, resolve_budget
from .search_plan import JobPlan, compare_allocations_at, comparison_row, uniform_at_or_above, uniform_fitting
from .search_recipe import check_qat_settings, check_recipe_result, load_recipe, recipe_xy
from .search_specs import DEFAULT_BITS, SENSITIVITY_MODES, check_ties, compute_sensitivities, layer_specs
from .search_report import json_default, plot_pareto, render_markdown

__all__ = ["DEFAULT_BITS", "SENSITIVITY_MODES", "layer_specs", "compute_sensitivities", "check_ties", "run_search"]


# --------------------------------------------------------------------------- driver


def _early_pool(workers, ray, n_budgets: int, qat_seeds: int, per_budget: int = 3):
    """The local worker pool for the QAT jobs, started now so that the workers' start-up (imports,
    several seconds of CPU each) overlaps the float training and traces; None when the jobs will run
    in this process or on Ray.  A budget gives at most ``per_budget`` allocations (3: Hessian, uniform,
    uniform above; 6 with the comparison's trace, random and uniform-at-or-above), so at most
    ``per_budget * n_budgets * qat_seeds`` jobs: no more workers than that are started."""
    if ray is not None:
        return None
    from .fanout import LocalPool, resolve_workers
    most = per_budget * n_budgets * qat_seeds
    n = min(resolve_workers(workers, most), most)
    return LocalPool(n) if n > 1 else None


def run_search(recipe, out_dir, budgets: Sequence[Mapping] = ({"bops": "uniform:4"},),
               w_bits: Iterable[int] = DEFAULT_BITS, a_bits: Iterable[int] | None = None,
               ties: Sequence[Sequence[str]] | None = None, costs: Mapping | None = None,
               probes: int = 100, tol: float = 1e-3, batch_probes: int = 10, qat_epochs: int | None = None,
               trace_method: str = "auto", sensitivity_mode: str = "hessian+measured",
               qat_lr: float | None = None, qat_seeds: int = 1, sweep_points: int = 25, seed: int = 0, progress: bool = True,
               export: bool = True, check_import: bool = True, act_bits_fixed: int = 8,
               estimator: Mapping | None = None, force: bool = False, workers: int | str | None = None,
               ray: str | None = None, compare: bool = False) -> dict:
    """Run the whole search and write the report; returns the report dict (also in search_report.json).

    Args:
        recipe: see the module docstring.
        out_dir: output directory.  Everything is written to a staging folder next to it and moved
            into place only when the search has finished, so a failed or interrupted search leaves
            no output and an earlier search (replaced with ``force``) survives a failed new one.
        budgets: budget points, each ``{kind: value}`` (all constraints of one point hold at once).
        w_bits, a_bits: candidate weight / activation bit widths (a_bits default = w_bits).
        ties: groups of tied layer names (override the recipe's).
        costs: extra per-layer cost functions ``fn(spec, w_bits, a_bits)`` by budget kind.
        act_bits_fixed: activation width of every searched layer's input when ``a_bits=()``
            (weights-only search; the model input keeps the recipe's ``input`` format).
        estimator: hls4ml estimator config (``part``, ``clock_period``, ``reuse_factor``,
            ``strategy``, ``io_type``) for the FPGA budgets ``lut``, ``ff``, ``dsp``, ``bram_18k``,
            ``latency_cycles``, ``latency_ns`` (:mod:`.hw_costs`: the Dense/Conv rows of
            ``backends/hls4ml/estimate.py`` per layer, plus the ReLU / Quantize / pooling rows
            between two layers as pair costs); used when a budget names one of them.
        probes, tol, batch_probes: Hutchinson settings (cap, relative tolerance, vmap width).
        trace_method: ``"auto"`` (default): exact Gauss-Newton traces when the float model is a
            piecewise-linear ``nn.Sequential`` with cross-entropy (there the Hessian block equals
            the GN block), else Hutchinson; or ``"hutchinson"`` / ``"ggn_exact"``
            (:func:`qdeploy.compiler.quantization.hutchinson.hutchinson_traces`).
        sensitivity_mode: ``"hessian+measured"`` (default), ``"hessian"`` or ``"measured"``
            (:func:`compute_sensitivities`; the report prints Omega and the measured loss increase).
        qat_epochs, qat_lr: fine-tuning settings (override the recipe's ``qat``).
        qat_seeds: fine-tune each allocation with this many seeds (seed, seed+1, ...) and report the
            mean accuracy (per-seed values kept); the exported QONNX is the first seed's model.
        sweep_points: budgets in the sensitivity-vs-cost frontier sweep (no QAT there).
        seed: seeds probes, model building and fine-tuning.
        progress: show rich progress bars.
        export: write the chosen models as QONNX; check_import: import each into the IR.
        force: replace an earlier search output in ``out_dir`` (never a folder of anything else).
        workers: processes for the (allocation x seed) QAT fine-tunes, which are independent jobs
            (:mod:`.fanout`): ``"auto"``: one per CPU this process may use, at most one per job (one:
            they run in this process); an integer N: N worker processes (1: in this process, one
            after the other).  None (the default): the environment variable ``QDEPLOY_QAT_WORKERS``
            when set (the test suite sets 1), else ``"auto"``.  Results are identical whatever runs them.
            The worker processes are started before the recipe runs (:class:`.fanout.LocalPool`), so
            their start-up overlaps the float training and the traces.
        ray: run the QAT jobs as Ray tasks instead: ``"auto"`` (the Ray this process started, else the
            running cluster), ``"local"`` (a local Ray with ``workers`` CPUs) or a cluster address;
            needs ``pip install qdeploy[ray]``.  The report's ``qat_fanout`` says what ran (engine,
            workers, retried / failed jobs).
        compare: also fine-tune, per budget, the ``trace`` allocation (the ILP on HAWQ-V3's Omega
            alone, ``mode="hessian"``), the ``random`` one (the ILP on
            :func:`.search_plan.random_sensitivities` seeded ``seed * 1000 + i`` for budget ``i``) and
            the narrowest uniform width at or above the budget, as jobs of the same fan-out (an
            allocation met twice is fine-tuned once); the allocations equal those of
            :func:`.search_compare.compare_allocations`.  Each budget of the report then has
            ``"compare": {"hessian", "trace", "random", "uniform"}`` rows, ``search_report.md`` their
            table (:func:`.search_report.comparison_table`) and ``pareto.png`` their accuracies.  Not
            exported (only the Hessian and uniform allocations are deployment artifacts).  Default
            off: no extra jobs.

    Raises:
        QDeployError: bad recipe, budgets, bit lists or ties (one-line message); ``compare`` with
            ``sensitivity_mode="hessian"`` (the trace row would be the Hessian row), or a budget no
            uniform width reaches.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if sensitivity_mode not in SENSITIVITY_MODES:
        raise QDeployError(f"sensitivity mode {sensitivity_mode!r}: expected one of {', '.join(SENSITIVITY_MODES)}")
    if not isinstance(compare, bool):
        raise QDeployError(f"compare must be True or False, got {compare!r}")
    if compare and sensitivity_mode == "hessian":
        raise QDeployError("compare=True (--compare) adds the trace-only row, the ILP on Omega alone, which with "
                           "sensitivity mode 'hessian' is the Hessian row itself: compare with --sensitivity "
                           "hessian+measured or measured")
    check_budget_kinds(budgets, costs)
    budgets = [{k: budget_value(k, v) for k, v in b.items()} for b in budgets]
    if not a_bits and a_bits is not None and not 2 <= int(act_bits_fixed) <= 32:
        raise QDeployError(f"act_bits_fixed must be an integer in 2..32, got {act_bits_fixed}")
    if int(qat_seeds) < 1:
        raise QDeployError(f"qat_seeds must be >= 1, got {qat_seeds}")
    if qat_epochs is not None and int(qat_epochs) < 0:
        raise QDeployError(f"qat_epochs must be >= 0, got {qat_epochs}")
    from .fanout import resolve_workers
    if workers is None:
        import os
        workers = os.environ.get("QDEPLOY_QAT_WORKERS") or "auto"
        try:
            resolve_workers(workers, 1)
        except QDeployError:
            raise QDeployError(f"environment variable QDEPLOY_QAT_WORKERS={workers!r}: expected a positive integer "
                               "or 'auto'") from None
    if ray is None:
        resolve_workers(workers, 1)  # a bad setting fails here, before the traces
    from ...runtime.artifact import check_out_dir, check_replaceable, publish, staging_dir

    out_final = check_out_dir(out_dir)
    if out_final.exists() and not out_final.is_dir():
        raise QDeployError(f"output path {out_final} exists and is a file, not a directory")
    if out_final.exists() and any(out_final.iterdir()):
        if not (out_final / "search_report.json").is_file():
            raise QDeployError(f"output directory {out_final} exists and is not a qdeploy search output "
                               "(no search_report.json): choose a new directory")
        if not force:
            raise QDeployError(f"output directory {out_final} holds an earlier search (use --force / force=True "
                               "to replace it)")
        check_replaceable(out_final, recipe if isinstance(recipe, str) else None,
                          is_ours=lambda d: (d / "search_report.json").is_file(), kind="a qdeploy search output")
    # an earlier search is replaced only when the new one has finished (written to a staging folder)
    if int(probes) < 1:
        raise QDeployError(f"probes must be >= 1, got {probes}")
    if not (math.isfinite(float(tol)) and float(tol) > 0):
        raise QDeployError(f"tol must be a positive number, got {tol}")
    fn, extra = load_recipe(recipe)
    w_bits = tuple(sensitivity.check_bits(list(w_bits)))
    a_bits = w_bits if a_bits is None else tuple(sensitivity.check_bits(list(a_bits))) if a_bits else ()
    if not budgets:
        raise QDeployError("no budget given: pass at least one, e.g. --budget bops=uniform:4")
    check_uniform_bits(budgets, w_bits)
    t_all = time.perf_counter()
    pool = _early_pool(workers, ray, len(budgets), int(qat_seeds), 6 if compare else 3)  # workers start up during the traces
    try:
        torch.manual_seed(seed)
        r = fn(**extra) if extra else fn()
        check_recipe_result(r)
        model: nn.Module = r["model"]
        name = r.get("name", type(model).__name__)
        inp = {"bits": 8, "scale": 2.0 ** -4, "signed": False, **(r.get("input") or {})}
        qcfg = {"epochs": 15, "lr": 3e-3, "batch_size": 64, **(r.get("qat") or {})}
        if qat_epochs is not None:
            qcfg["epochs"] = qat_epochs
        if qat_lr is not None:
            qcfg["lr"] = qat_lr
        qcfg = check_qat_settings(qcfg)
        ties = check_ties(model, ties if ties is not None else r.get("ties", ()))
        x_tr, y_tr = recipe_xy(r, "train")
        x_va, y_va = recipe_xy(r, "val")
        test = recipe_xy(r, "test") if r.get("test") is not None else None
        for key, x in (("train", x_tr), ("val", x_va), ("test", None if test is None else test[0])):
            if x is None:
                continue
            try:
                with torch.no_grad():
                    model.eval()(torch.as_tensor(np.asarray(x[:2], dtype=np.float32)))
            except Exception as e:
                raise QDeployError(f"recipe {key!r} inputs of shape {tuple(x.shape)} do not fit the model: "
                                   f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
        ns = int(r.get("trace_samples", len(x_tr)))
        specs = layer_specs(model, x_tr[:1], w_bits, a_bits, inp["bits"], act_bits_fixed)
        from .hw_costs import ESTIMATOR_KINDS, estimator_costs
        hw = [k for b in budgets for k in b if k in ESTIMATOR_KINDS and k not in (costs or {})]
        if hw:
            costs = {**estimator_costs(model, specs, x_tr[:min(len(x_tr), 512)], inp, estimator,
                                       kinds=sorted(set(hw))), **(costs or {})}
        resolved = [resolve_budget(b, specs, costs) for b in budgets]
        cmp_uniform = []  # compare=True: per budget the narrowest uniform (bits, allocation) at or above it
        for i, b in enumerate(resolved if compare else ()):
            try:
                cmp_uniform.append(uniform_at_or_above(specs, w_bits, b, costs))
            except QDeployError as e:
                raise QDeployError(f"--compare: budget {i} {budgets[i]}: {e}; the comparison's uniform row needs a "
                                   "width at or above the budget (lower it or add wider --bits)") from None
        new_parents = [d for d in out_final.parents if not d.exists()]  # removed again if the search fails
        out_dir = staging_dir(out_final)
    except BaseException:
        if pool is not None:
            pool.close()
        raise
    try:
        (out_dir / "models").mkdir(parents=True, exist_ok=True)

        prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        disable=not progress, transient=True)
        with prog:
            task = prog.add_task(f"[{name}] Hessian traces (probes)", total=probes)
            tr = hutchinson_traces(model, (x_tr[:ns], y_tr[:ns]), activations=[s.name for s in specs if s.a_bits],
                                           tol=tol, max_probes=probes, batch_probes=batch_probes, seed=seed,
                                           progress=lambda d: prog.update(task, completed=d), method=trace_method)
            prog.remove_task(task)
            sens_details: dict = {}
            sens = compute_sensitivities(model, specs, tr, x_tr[:ns], y_tr[:ns], mode=sensitivity_mode,
                                         details=sens_details)
            float_acc = {"val": qat.accuracy(model, x_va, y_va)}
            if test is not None:
                float_acc["test"] = qat.accuracy(model, *test)

            # the (allocation x seed) fine-tunes are independent jobs: plan every allocation first
            # (ILP only; the deployment rows of every budget before the comparison-only rows, so an
            # allocation both share keeps its exported tag), run the jobs (.fanout), assemble the rows
            plan = JobPlan(qat_seeds)
            plans = []
            for i, (b_in, b) in enumerate(zip(budgets, resolved)):
                alloc = ilp.allocate(specs, sens, b, costs=costs, ties=ties)
                unis = [u and (u, plan.want(u[1].bits, f"b{i}_uniform{u[0]}"))
                        for u in uniform_fitting(specs, w_bits, b, sens, costs)]
                plans.append((b_in, b, alloc, plan.want(alloc.bits, f"b{i}_hessian"), *unis))
            cmp = []  # compare=True: per budget {row: (allocation, (key, tag))}, rows as search_compare.ROWS
            if compare:
                trace_sens = compute_sensitivities(model, specs, tr, x_tr[:ns], mode="hessian")
                for i, (b, p, (ub, ua)) in enumerate(zip(resolved, plans, cmp_uniform)):
                    allocs = {"hessian": p[2], **compare_allocations_at(specs, trace_sens, b, i, seed, costs, ties),
                              "uniform": ua}
                    cmp.append({row: (a, ub if row == "uniform" else None,
                                      plan.want(a.bits, f"b{i}_{row}", export=False)) for row, a in allocs.items()})

            import os
            from .fanout import run_qat_jobs
            from .fanout_jobs import KILL_ENV, QatContext
            ctx = QatContext(model=model, x_tr=x_tr, y_tr=y_tr, x_va=x_va, y_va=y_va, test=test, inp=inp,
                             qcfg=qcfg, ns=ns, seed=seed, name=name, export=export,
                             recipe=recipe if isinstance(recipe, str) else None,
                             kill_once=os.environ.get(KILL_ENV) or None)
            job_res, fanout_info = run_qat_jobs(ctx, plan.jobs(), workers=workers, ray=ray, pool=pool,
                                                progress=prog if progress else None, epoch_progress=progress)
            done: dict = {}

            def assemble(key, tag: str) -> dict:
                """The report row of one allocation from its seeds' jobs (in seed order)."""
                t0, rs = plan.results(job_res, key)
                if t0 not in done:
                    res = done[t0] = plan.accuracy_row(rs, t0, test is not None)
                    if export and t0 in plan.export_tags:
                        p = out_dir / "models" / f"{name}_{t0}.onnx"
                        p.write_bytes(rs[0].onnx)
                        res["qonnx"] = str(p.relative_to(out_dir))
                        if check_import:
                            from ..frontends import load_model
                            res["ir_nodes"] = len(load_model(str(p)).nodes)
                return done[t0] if tag == t0 else {**done[t0], "same_as": t0}

            def uniform_row(u):
                return None if u is None else {"bits": u[0][0], "allocation": u[0][1].to_dict(), **assemble(*u[1])}

            results = []
            for i, (b_in, b, alloc, h, uni, above) in enumerate(plans):
                results.append({"budget": dict(b_in), "budget_resolved": b,
                                "hessian": {**alloc.to_dict(), **assemble(*h)},
                                "uniform": uniform_row(uni), "uniform_above": uniform_row(above)})
                if compare:
                    results[-1]["compare"] = {row: {**comparison_row(specs, a, b, costs, ub), **assemble(*kt)}
                                              for row, (a, ub, kt) in cmp[i].items()}
            frontier = {}
            for kind in sorted({k for b in resolved for k in b} | {"bops"}):
                frontier[kind] = [{"cost": a.costs[kind], "objective": a.objective, "bops": a.costs["bops"],
                                   "size": a.costs["size"]}
                                  for a in ilp.pareto_frontier(specs, sens, kind, sweep_points, costs, ties)]
            uniform_pts = []
            for ub in w_bits:
                ua = ilp.uniform_allocation(specs, ub, sens, costs)
                uniform_pts.append({"bits": ub, "objective": ua.objective, **ua.costs})

        layers = []
        for s in specs:
            t = tr.weights[s.name]
            row = {"name": s.name, "kind": s.kind, "n_weights": s.n_weights, "n_in": s.n_in, "n_out": s.n_out,
                   "positions": s.positions, "trace": t.trace, "stderr": t.stderr, "probes": t.probes,
                   "mean_trace": t.mean}
            if s.name in tr.activations:
                a = tr.activations[s.name]
                row.update(act_trace=a.trace, act_stderr=a.stderr, act_mean_trace=a.mean, act_n=a.n)
            row["chosen"] = [list(res["hessian"]["bits"][s.name].values()) for res in results]
            row["sensitivity"] = {k: ({str(b): float(x) for b, x in v.items()} if v is not None else None)
                                  for k, v in sens_details[s.name].items()}
            layers.append(row)
        report = {
            "model": name, "seed": seed, "float_accuracy": float_acc,
            "n_eval": {"val": int(len(x_va)), **({"test": int(len(test[0]))} if test is not None else {})},
            "settings": {"recipe": recipe if isinstance(recipe, str) else getattr(recipe, "__name__", repr(recipe)),
                         "recipe_args": dict(extra or {}),
                         "w_bits": list(w_bits), "a_bits": list(a_bits), "input": inp, "qat": qcfg,
                         "probes_cap": probes, "tol": tol, "qat_seeds": qat_seeds, "trace_samples": ns, "ties": ties,
                         "compare": compare,
                         "act_bits_fixed": None if a_bits else act_bits_fixed, "sensitivity_mode": sensitivity_mode,
                         "estimator": dict(estimator or {}) if hw else None},
            "trace": {"probes": tr.probes, "converged": tr.converged, "seconds": tr.seconds,
                      "method": "ggn_exact" if tr.probes == 0 else "hutchinson", "estimator": tr.estimator},
            "layers": layers, "budgets": results, "frontier": frontier, "uniform_points": uniform_pts,
            "seconds": time.perf_counter() - t_all, "qat_fanout": fanout_info,
        }
        (out_dir / "search_report.json").write_text(json.dumps(report, indent=1, default=json_default))
        (out_dir / "search_report.md").write_text(render_markdown(report))
        plot_pareto(report, out_dir / "pareto.png")
        publish(out_dir, out_final)  # replaces an empty folder or (with force) an earlier search
        return report
    except BaseException:
        if pool is not None:
            pool.close()  # (run_qat_jobs closes it; this covers a failure before the QAT)
        shutil.rmtree(out_dir, ignore_errors=True)  # a failed search leaves nothing half-written
        for d in new_parents:  # innermost first; only folders this run created and left empty
            try:
                d.rmdir()
            except OSError:
                break
        raise

