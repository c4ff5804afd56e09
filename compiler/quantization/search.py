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

This module is the driver; recipes are loaded and checked in :mod:`.search_recipe`, budgets parsed
and resolved in :mod:`.search_budget` (:func:`~.search_budget.parse_search_budget`), and the report
rendered by :mod:`.search_report`.
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
from . import hessian, ilp, qat, qat_fx, sensitivity
from .hutchinson import hutchinson_traces
from .qat_layers import is_chain
from .search_budget import budget_value, check_budget_kinds, check_uniform_bits, resolve_budget
from .search_recipe import check_qat_settings, check_recipe_result, load_recipe, recipe_xy
from .search_report import json_default, plot_pareto, render_markdown

__all__ = ["DEFAULT_BITS", "SENSITIVITY_MODES", "layer_specs", "compute_sensitivities", "check_ties", "run_search"]

DEFAULT_BITS = tuple(range(2, 9))


# --------------------------------------------------------------------------- specs / sensitivities


@torch.no_grad()
def layer_specs(model: nn.Module, example_input, w_bits=DEFAULT_BITS, a_bits=DEFAULT_BITS,
                input_bits: int = 8, fixed_act_bits: int = 8) -> list[ilp.LayerSpec]:
    """One :class:`~.ilp.LayerSpec` per weight layer, shapes measured on ``example_input`` (batch first).

    The layers that read the model input (an ``nn.Sequential``'s first layer; for any other module
    those :func:`.qat_fx.input_layers` finds) have their input fixed at ``input_bits``; every other
    layer's input activation is searched over ``a_bits`` (``a_bits=()`` keeps every activation at
    ``fixed_act_bits``, default 8: a weights-only search with one uniform activation width).

    Raises:
        QDeployError: bad bit lists, or a non-Sequential model ``torch.fx`` cannot trace.
    """
    w_bits = tuple(sensitivity.check_bits(w_bits))
    a_bits = tuple(sensitivity.check_bits(a_bits)) if a_bits else ()
    shapes = {}
    hooks = []
    for n, m in hessian.weight_layers(model):
        hooks.append(m.register_forward_hook(lambda mod, a, o, n=n: shapes.__setitem__(n, (a[0].shape, o.shape))))
    was = model.training
    model.eval()
    try:
        model(torch.as_tensor(np.asarray(example_input, dtype=np.float32))[:1])
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    wl = hessian.weight_layers(model)
    first = {wl[0][0]} if is_chain(model) and wl else set(qat_fx.input_layers(model))
    specs = []
    for n, m in wl:
        _, oshape = shapes[n]
        if isinstance(m, nn.Linear):
            n_in, n_out, pos, kind = m.in_features, m.out_features, int(np.prod(oshape[1:-1])) or 1, "dense"
        else:
            n_in = int(np.prod(m.kernel_size)) * m.in_channels // m.groups
            n_out, pos, kind = m.out_channels, int(np.prod(oshape[2:])), "conv"
        specs.append(ilp.LayerSpec(name=n, n_in=int(n_in), n_out=int(n_out), positions=int(pos),
                                   n_weights=int(m.weight.numel()), w_bits=w_bits,
                                   a_bits=a_bits if n not in first else (),
                                   fixed_a_bits=int(input_bits) if n in first else int(fixed_act_bits),
                                   kind=kind))
    return specs


SENSITIVITY_MODES = ("hessian", "hessian+measured", "measured")


def compute_sensitivities(model, specs, traces: hessian.TraceResult, x, y=None, mode: str = "hessian",
                          details: dict | None = None) -> dict:
    """{layer: {(w_bits, a_bits): Omega_w(w_bits) + Omega_a(a_bits)}} per tensor.

    Modes:
        ``"hessian"``: HAWQ-V3 Eq. 10, Omega = Tr(H)/n * ||Q_b(T) - T||^2 (arXiv 2011.10680);
        ``"hessian+measured"``: max(Omega, 2 Delta L) with Delta L the measured loss increase of
        quantizing that tensor alone (:func:`.sensitivity.measured_loss_increase`; needs ``y``):
        the Hessian estimate except where the measurement shows the quadratic model under-estimates;
        ``"measured"``: 2 Delta L only (an ablation; no Hessian).
    ``details`` (optional dict) receives per layer ``{"omega_w", "measured_w", "omega_a", "measured_a"}``.

    Raises:
        QDeployError: unknown mode, or a measured mode without labels ``y``.
    """
    if mode not in SENSITIVITY_MODES:
        raise QDeployError(f"sensitivity mode {mode!r}: expected one of {', '.join(SENSITIVITY_MODES)}")
    if mode != "hessian" and y is None:
        raise QDeployError(f"sensitivity mode {mode!r} needs the labels of the trace data")
    mods = dict(model.named_modules())
    acts = hessian.layer_inputs(model, x, [s.name for s in specs if s.a_bits])
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    yt = None if y is None else torch.as_tensor(np.asarray(y)).long()

    def combine(om, name, bits, what):
        if mode == "hessian":
            return om, None
        ml = sensitivity.measured_loss_increase(model, xt, yt, name, bits, what=what)
        if mode == "measured":
            return {b: max(2.0 * ml[b], 0.0) for b in om}, ml
        return {b: max(om[b], 2.0 * ml[b]) for b in om}, ml

    out = {}
    for s in specs:
        w = mods[s.name].weight.detach()
        om_w = sensitivity.weight_sensitivity(traces.weights[s.name].mean, w, s.w_bits)
        ow, mw = combine(om_w, s.name, s.w_bits, "weight")
        d = {"omega_w": om_w, "measured_w": mw}
        if s.a_bits:
            om_a = sensitivity.act_sensitivity(traces.activations[s.name].mean, acts[s.name], s.a_bits)
            oa, ma = combine(om_a, s.name, s.a_bits, "act")
            d.update(omega_a=om_a, measured_a=ma)
        else:
            oa = {s.fixed_a_bits: 0.0}
        if details is not None:
            details[s.name] = d
        out[s.name] = {(wb, ab): ow[wb] + oa[ab] for wb, ab in s.options()}
    return out


def check_ties(model, ties) -> list[list[str]]:
    """The tie groups as lists, checked: every name is a weight layer (Linear/Conv) of ``model``.

    For a model that is not an ``nn.Sequential`` the ties its QAT model imposes
    (:func:`.qat_fx.required_ties`: layers sharing an input quantizer, layers joined by an add) are
    merged in, so every allocation the ILP returns can be built.

    Raises:
        QDeployError: a name that is not a module of the model, or a module without weights.
    """
    mods = dict(model.named_modules())
    for g in ties or ():
        for n in g:
            if n not in mods:
                raise QDeployError(f"tie names {n!r}, which is not a module of the model")
            if not isinstance(mods[n], hessian.WEIGHT_TYPES):
                raise QDeployError(f"tie names layer {n!r} ({type(mods[n]).__name__}), which has no weights")
    out = [list(g) for g in ties or ()]
    if not is_chain(model):
        out = qat_fx.merge_ties(out + qat_fx.required_ties(model))
    return out


# --------------------------------------------------------------------------- driver


def _early_pool(workers, ray, n_budgets: int, qat_seeds: int):
    """The local worker pool for the QAT jobs, started now so that the workers' start-up (imports,
    several seconds of CPU each) overlaps the float training and traces; None when the jobs will run
    in this process or on Ray.  A budget gives at most 3 allocations (Hessian, uniform, uniform above),
    so at most ``3 * n_budgets * qat_seeds`` jobs: no more workers than that are started."""
    if ray is not None:
        return None
    from .fanout import LocalPool, resolve_workers
    most = 3 * n_budgets * qat_seeds
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
               ray: str | None = None) -> dict:
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

    Raises:
        QDeployError: bad recipe, budgets, bit lists or ties (one-line message).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if sensitivity_mode not in SENSITIVITY_MODES:
        raise QDeployError(f"sensitivity mode {sensitivity_mode!r}: expected one of {', '.join(SENSITIVITY_MODES)}")
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
    pool = _early_pool(workers, ray, len(budgets), int(qat_seeds))  # workers start up during the traces
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
            # (ILP only), then run the jobs on the chosen engine (.fanout), then assemble the rows
            first_tag: dict = {}  # allocation key -> tag of its first occurrence (later ones: same_as)

            def want(bits: dict, tag: str) -> dict:
                first_tag.setdefault(tuple(sorted(bits.items())), tag)
                return {"bits_key": tuple(sorted(bits.items())), "tag": tag}

            plans = []
            for i, (b_in, b) in enumerate(zip(budgets, resolved)):
                alloc = ilp.allocate(specs, sens, b, costs=costs, ties=ties)
                h = want(alloc.bits, f"b{i}_hessian")
                uni = None
                for ub in sorted(w_bits, reverse=True):
                    ua = ilp.uniform_allocation(specs, ub, sens, costs)
                    ucost = {k: ilp.total_cost(k, specs, ua.bits, costs) for k in b}
                    if all(ucost[k] <= b[k] * (1 + 1e-9) for k in b):
                        ua.costs.update(ucost)
                        uni = ({"bits": ub, "allocation": ua.to_dict()}, want(ua.bits, f"b{i}_uniform{ub}"))
                        break
                # between two uniform points (e.g. uniform:3.5) the uniform that fits has fewer BOPs than
                # the budget; the next width up (more BOPs than the budget) is trained too, for the
                # "equal or larger BOPs" comparison
                above = None
                tight = uni is not None and all(uni[0]["allocation"]["costs"][k] >= b[k] * (1 - 1e-9) for k in b)
                if not tight:
                    for ub in sorted(w_bits):
                        if uni is not None and ub <= uni[0]["bits"]:
                            continue
                        ua = ilp.uniform_allocation(specs, ub, sens, costs)
                        ua.costs.update({k: ilp.total_cost(k, specs, ua.bits, costs) for k in b})
                        above = ({"bits": ub, "allocation": ua.to_dict()}, want(ua.bits, f"b{i}_uniform{ub}"))
                        break
                plans.append((b_in, b, alloc, h, uni, above))

            import os
            from .fanout import run_qat_jobs
            from .fanout_jobs import KILL_ENV, QatContext, QatJob
            jobs = [QatJob(tag=t, k=k, bits=key) for key, t in first_tag.items() for k in range(qat_seeds)]
            ctx = QatContext(model=model, x_tr=x_tr, y_tr=y_tr, x_va=x_va, y_va=y_va, test=test, inp=inp,
                             qcfg=qcfg, ns=ns, seed=seed, name=name, export=export,
                             recipe=recipe if isinstance(recipe, str) else None,
                             kill_once=os.environ.get(KILL_ENV) or None)
            job_res, fanout_info = run_qat_jobs(ctx, jobs, workers=workers, ray=ray, pool=pool,
                                                progress=prog if progress else None, epoch_progress=progress)
            done: dict = {}

            def assemble(key, tag: str) -> dict:
                """The report row of one allocation from its seeds' jobs (in seed order, as before)."""
                t0 = first_tag[key]
                if t0 in done:
                    return done[t0] if tag == t0 else {**done[t0], "same_as": t0}
                rs = [job_res[QatJob(tag=t0, k=k, bits=key).name] for k in range(qat_seeds)]
                accs = {"val": [float(r.val_ok.mean()) for r in rs]}
                corr = {"val": sum(r.val_ok / qat_seeds for r in rs)}
                res = {"tag": t0, "qat_seconds": sum(r.seconds for r in rs), "val_acc": float(np.mean(accs["val"])),
                       "val_accs": accs["val"], "val_correct": [round(float(c), 4) for c in corr["val"]]}
                if test is not None:
                    accs["test"] = [float(r.test_ok.mean()) for r in rs]
                    corr["test"] = sum(r.test_ok / qat_seeds for r in rs)
                    res["test_acc"] = float(np.mean(accs["test"]))
                    res["test_accs"] = accs["test"]
                    res["test_correct"] = [round(float(c), 4) for c in corr["test"]]
                if sum(r.attempt for r in rs):
                    res["qat_retries"] = sum(r.attempt for r in rs)
                if export:
                    p = out_dir / "models" / f"{name}_{t0}.onnx"
                    p.write_bytes(rs[0].onnx)
                    res["qonnx"] = str(p.relative_to(out_dir))
                    if check_import:
                        from ..frontends import load_model
                        g = load_model(str(p))
                        res["ir_nodes"] = len(g.nodes)
                done[t0] = res
                return res if tag == t0 else {**res, "same_as": t0}

            results = []
            for b_in, b, alloc, h, uni, above in plans:
                results.append({"budget": dict(b_in), "budget_resolved": b,
                                "hessian": {**alloc.to_dict(), **assemble(h["bits_key"], h["tag"])},
                                "uniform": None if uni is None else {**uni[0], **assemble(uni[1]["bits_key"], uni[1]["tag"])},
                                "uniform_above": None if above is None else
                                {**above[0], **assemble(above[1]["bits_key"], above[1]["tag"])}})
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

