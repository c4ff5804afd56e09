"""The mixed-precision search driver: traces -> sensitivities -> ILP per budget -> QAT -> report.

    run_search(recipe, out_dir, budgets=[{"bops": "uniform:4"}, {"size": 20000}])

writes ``search_report.json``, ``search_report.md``, ``pareto.png`` and ``models/*.onnx`` (QONNX that
``qdeploy compile`` takes) under ``out_dir``.

A *recipe* is a callable (or ``"module:function"``, ``"path/file.py:function"``, or a YAML file with
``recipe: <one of those>`` and optional ``args:``, keyword arguments for it) returning a dict:

=================  ===========================================================================
``model``          trained float ``nn.Sequential`` (Linear/Conv, ReLU, pooling, Flatten, Dropout, BN)
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
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import QDeployError
from . import hessian, ilp, qat, sensitivity

__all__ = ["load_recipe", "layer_specs", "compute_sensitivities", "parse_budget", "run_search",
           "render_markdown", "plot_pareto"]

DEFAULT_BITS = tuple(range(2, 9))
QAT_KEYS = ("epochs", "lr", "batch_size", "distill_alpha", "distill_temperature")


# --------------------------------------------------------------------------- recipe


def load_recipe(spec) -> tuple[Callable, dict]:
    """``(recipe_callable, keyword_arguments)`` from a callable, ``module:function``, ``file.py:function``
    or a YAML file (``recipe: module:function`` plus an optional ``args:`` mapping of keyword
    arguments for that function).  Raises QDeployError when it cannot be loaded."""
    if callable(spec):
        return spec, {}
    spec = str(spec)
    p = Path(spec)
    if p.suffix in (".yaml", ".yml"):
        import yaml
        if not p.is_file():
            raise QDeployError(f"recipe file {p} not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise QDeployError(f"recipe file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict) or "recipe" not in data:
            raise QDeployError(f"recipe file {p} must be a mapping with a 'recipe: module:function' key")
        extra = sorted(set(data) - {"recipe", "args"})
        if extra:
            raise QDeployError(f"recipe file {p}: unknown key(s) {extra}; it takes 'recipe' and 'args' (keyword "
                               "arguments of the recipe function); search settings are command-line options")
        args = data.get("args") or {}
        if not isinstance(args, dict):
            raise QDeployError(f"recipe file {p}: 'args' must be a mapping of keyword arguments")
        inner = str(data["recipe"])
        if Path(inner.rsplit(":", 1)[0] if ":" in inner else inner).suffix in (".yaml", ".yml"):
            raise QDeployError(f"recipe file {p}: 'recipe' must be module:function or path.py:function, "
                               f"not another YAML file ({inner})")
        fn, _ = load_recipe(inner)
        return fn, args
    if ":" not in spec:
        raise QDeployError(f"recipe {spec!r}: expected module:function, path.py:function or a YAML file")
    mod, fn = spec.rsplit(":", 1)
    try:
        if mod.endswith(".py") or os.sep in mod:
            mp = Path(mod)
            s = importlib.util.spec_from_file_location(f"_qdeploy_recipe_{mp.stem}", mp)
            if not mp.is_file():
                raise QDeployError(f"recipe file {mp} not found" + (" (it is a folder)" if mp.is_dir() else ""))
            if s is None:
                raise FileNotFoundError(mod)
            m = importlib.util.module_from_spec(s)
            sys.modules[s.name] = m
            s.loader.exec_module(m)
        else:
            m = importlib.import_module(mod)
        f = getattr(m, fn)
    except AttributeError:
        raise QDeployError(f"cannot load recipe {spec!r}: {mod} has no function {fn!r}") from None
    except (ImportError, FileNotFoundError) as e:
        raise QDeployError(f"cannot load recipe {spec!r}: {type(e).__name__}: {e}") from None
    if not callable(f):
        raise QDeployError(f"recipe {spec!r} is a {type(f).__name__}, not a function")
    return f, {}


# --------------------------------------------------------------------------- specs / sensitivities


@torch.no_grad()
def layer_specs(model: nn.Module, example_input, w_bits=DEFAULT_BITS, a_bits=DEFAULT_BITS,
                input_bits: int = 8, fixed_act_bits: int = 8) -> list[ilp.LayerSpec]:
    """One :class:`~.ilp.LayerSpec` per weight layer, shapes measured on ``example_input`` (batch first).

    The first layer's input is the model input (fixed at ``input_bits``); every other layer's input
    activation is searched over ``a_bits`` (``a_bits=()`` keeps every activation at
    ``fixed_act_bits``, default 8: a weights-only search with one uniform activation width).
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
    specs = []
    for i, (n, m) in enumerate(hessian.weight_layers(model)):
        _, oshape = shapes[n]
        if isinstance(m, nn.Linear):
            n_in, n_out, pos, kind = m.in_features, m.out_features, int(np.prod(oshape[1:-1])) or 1, "dense"
        else:
            n_in = int(np.prod(m.kernel_size)) * m.in_channels // m.groups
            n_out, pos, kind = m.out_channels, int(np.prod(oshape[2:])), "conv"
        specs.append(ilp.LayerSpec(name=n, n_in=int(n_in), n_out=int(n_out), positions=int(pos),
                                   n_weights=int(m.weight.numel()), w_bits=w_bits,
                                   a_bits=a_bits if i > 0 else (), fixed_a_bits=int(input_bits) if i == 0 else int(fixed_act_bits),
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


def parse_budget(text: str) -> dict:
    """``"bops=1.5e6,size=uniform:4"`` -> ``{"bops": 1.5e6, "size": "uniform:4"}``.  Raises QDeployError."""
    out = {}
    for part in [p for p in str(text).split(",") if p.strip()]:
        if "=" not in part:
            raise QDeployError(f"budget {part!r}: expected kind=value, e.g. bops=1.2e6 or size=uniform:4")
        k, v = (t.strip() for t in part.split("=", 1))
        if k in out:
            raise QDeployError(f"budget {text!r} names {k!r} twice (one value per kind in a budget point)")
        out[k] = _budget_value(k, v)
    if not out:
        raise QDeployError("empty budget")
    return out


def _budget_value(k: str, v):
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


def _resolve_budget(b: Mapping, specs, costs) -> dict:
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


def _check_budget_kinds(budgets, costs) -> None:
    """Raise QDeployError for a budget kind no cost function knows (listing every known kind)."""
    from .hw_costs import ESTIMATOR_KINDS
    known = sorted(set(ilp.COSTS) | set(ESTIMATOR_KINDS) | set(costs or {}))
    for b in budgets:
        for k in b:
            if k not in known:
                raise QDeployError(f"unknown budget {k!r}; known: {', '.join(known)}")


def _check_uniform_bits(budgets, w_bits) -> None:
    """``uniform:B`` must lie within the candidate weight bit widths (else the budget is meaningless)."""
    lo, hi = min(w_bits), max(w_bits)
    for b in budgets:
        for k, v in b.items():
            bits = _uniform_bits(v)
            if bits is not None and not lo <= bits <= hi:
                raise QDeployError(f"budget {k}={v}: B must be within the candidate bit widths {lo}..{hi}")


def _check_ties(model, ties):
    mods = dict(model.named_modules())
    for g in ties or ():
        for n in g:
            if n not in mods:
                raise QDeployError(f"tie names {n!r}, which is not a module of the model")
            if not isinstance(mods[n], hessian.WEIGHT_TYPES):
                raise QDeployError(f"tie names layer {n!r} ({type(mods[n]).__name__}), which has no weights")
    return [list(g) for g in ties or ()]


# --------------------------------------------------------------------------- driver


def run_search(recipe, out_dir, budgets: Sequence[Mapping] = ({"bops": "uniform:4"},),
               w_bits: Iterable[int] = DEFAULT_BITS, a_bits: Iterable[int] | None = None,
               ties: Sequence[Sequence[str]] | None = None, costs: Mapping | None = None,
               probes: int = 100, tol: float = 1e-3, batch_probes: int = 10, qat_epochs: int | None = None,
               trace_method: str = "auto", sensitivity_mode: str = "hessian+measured",
               qat_lr: float | None = None, qat_seeds: int = 1, sweep_points: int = 25, seed: int = 0, progress: bool = True,
               export: bool = True, check_import: bool = True, act_bits_fixed: int = 8,
               estimator: Mapping | None = None, force: bool = False) -> dict:
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
            (:func:`qdeploy.compiler.quantization.hessian.hutchinson_traces`).
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

    Raises:
        QDeployError: bad recipe, budgets, bit lists or ties (one-line message).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if sensitivity_mode not in SENSITIVITY_MODES:
        raise QDeployError(f"sensitivity mode {sensitivity_mode!r}: expected one of {', '.join(SENSITIVITY_MODES)}")
    _check_budget_kinds(budgets, costs)
    budgets = [{k: _budget_value(k, v) for k, v in b.items()} for b in budgets]
    if not a_bits and a_bits is not None and not 2 <= int(act_bits_fixed) <= 32:
        raise QDeployError(f"act_bits_fixed must be an integer in 2..32, got {act_bits_fixed}")
    if int(qat_seeds) < 1:
        raise QDeployError(f"qat_seeds must be >= 1, got {qat_seeds}")
    if qat_epochs is not None and int(qat_epochs) < 0:
        raise QDeployError(f"qat_epochs must be >= 0, got {qat_epochs}")
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
    _check_uniform_bits(budgets, w_bits)
    t_all = time.perf_counter()
    torch.manual_seed(seed)
    r = fn(**extra) if extra else fn()
    _check_recipe_result(r)
    model: nn.Module = r["model"]
    name = r.get("name", type(model).__name__)
    inp = {"bits": 8, "scale": 2.0 ** -4, "signed": False, **(r.get("input") or {})}
    qcfg = {"epochs": 15, "lr": 3e-3, "batch_size": 64, **(r.get("qat") or {})}
    if qat_epochs is not None:
        qcfg["epochs"] = qat_epochs
    if qat_lr is not None:
        qcfg["lr"] = qat_lr
    qcfg = _check_qat(qcfg)
    ties = _check_ties(model, ties if ties is not None else r.get("ties", ()))
    x_tr, y_tr = _xy(r, "train")
    x_va, y_va = _xy(r, "val")
    test = _xy(r, "test") if r.get("test") is not None else None
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
    resolved = [_resolve_budget(b, specs, costs) for b in budgets]
    new_parents = [d for d in out_final.parents if not d.exists()]  # removed again if the search fails
    out_dir = staging_dir(out_final)
    try:
        (out_dir / "models").mkdir(parents=True, exist_ok=True)

        prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        disable=not progress, transient=True)
        with prog:
            task = prog.add_task(f"[{name}] Hessian traces (probes)", total=probes)
            tr = hessian.hutchinson_traces(model, (x_tr[:ns], y_tr[:ns]), activations=[s.name for s in specs if s.a_bits],
                                           tol=tol, max_probes=probes, batch_probes=batch_probes, seed=seed,
                                           progress=lambda d: prog.update(task, completed=d), method=trace_method)
            prog.remove_task(task)
            sens_details: dict = {}
            sens = compute_sensitivities(model, specs, tr, x_tr[:ns], y_tr[:ns], mode=sensitivity_mode,
                                         details=sens_details)
            float_acc = {"val": qat.accuracy(model, x_va, y_va)}
            if test is not None:
                float_acc["test"] = qat.accuracy(model, *test)

            cache: dict = {}

            def train_eval(bits: dict, tag: str) -> dict:
                key = tuple(sorted(bits.items()))
                if key in cache:
                    return {**cache[key], "same_as": cache[key]["tag"]}
                accs = {"val": [], "test": []}
                corr: dict = {}  # per evaluation sample: fraction of the QAT seeds that classify it right
                t0 = time.perf_counter()
                for k in range(qat_seeds):
                    torch.manual_seed(seed + k)
                    qk = qat.build_qat_model(model, bits, input_bits=inp["bits"], input_scale=inp["scale"],
                                             input_signed=inp["signed"], calibration_x=x_tr[:ns])
                    qat.fine_tune(qk, x_tr, y_tr, epochs=qcfg["epochs"], lr=qcfg["lr"], batch_size=qcfg["batch_size"],
                                  seed=seed + k, progress=prog if progress else None,
                                  description=f"[{name}] QAT {tag} seed {seed + k}",
                                  teacher=model if qcfg.get("distill_alpha", 0.0) > 0 else None,
                                  distill_alpha=qcfg.get("distill_alpha", 0.0),
                                  distill_temperature=qcfg.get("distill_temperature", 2.0))
                    ok_va = qat.predict(qk, x_va).argmax(1) == y_va
                    accs["val"].append(float(ok_va.mean()))
                    corr["val"] = corr.get("val", 0) + ok_va / qat_seeds
                    if test is not None:
                        ok_te = qat.predict(qk, test[0]).argmax(1) == test[1]
                        accs["test"].append(float(ok_te.mean()))
                        corr["test"] = corr.get("test", 0) + ok_te / qat_seeds
                    if k == 0:
                        q = qk
                res = {"tag": tag, "qat_seconds": time.perf_counter() - t0, "val_acc": float(np.mean(accs["val"])),
                       "val_accs": accs["val"], "val_correct": [round(float(c), 4) for c in corr["val"]]}
                if test is not None:
                    res["test_acc"] = float(np.mean(accs["test"]))
                    res["test_accs"] = accs["test"]
                    res["test_correct"] = [round(float(c), 4) for c in corr["test"]]
                if export:
                    p = qat.export_qonnx(q, x_tr[:1], out_dir / "models" / f"{name}_{tag}.onnx")
                    res["qonnx"] = str(p.relative_to(out_dir))
                    if check_import:
                        from ..frontends import load_model
                        g = load_model(str(p))
                        res["ir_nodes"] = len(g.nodes)
                cache[key] = res
                return res

            results = []
            for i, (b_in, b) in enumerate(zip(budgets, resolved)):
                alloc = ilp.allocate(specs, sens, b, costs=costs, ties=ties)
                h = train_eval(alloc.bits, f"b{i}_hessian")
                uni = None
                for ub in sorted(w_bits, reverse=True):
                    ua = ilp.uniform_allocation(specs, ub, sens, costs)
                    ucost = {k: ilp.total_cost(k, specs, ua.bits, costs) for k in b}
                    if all(ucost[k] <= b[k] * (1 + 1e-9) for k in b):
                        ua.costs.update(ucost)
                        uni = {"bits": ub, "allocation": ua.to_dict(), **train_eval(ua.bits, f"b{i}_uniform{ub}")}
                        break
                # between two uniform points (e.g. uniform:3.5) the uniform that fits has fewer BOPs than
                # the budget; the next width up (more BOPs than the budget) is trained too, for the
                # "equal or larger BOPs" comparison of issue 4
                above = None
                tight = uni is not None and all(uni["allocation"]["costs"][k] >= b[k] * (1 - 1e-9) for k in b)
                if not tight:
                    for ub in sorted(w_bits):
                        if uni is not None and ub <= uni["bits"]:
                            continue
                        ua = ilp.uniform_allocation(specs, ub, sens, costs)
                        ua.costs.update({k: ilp.total_cost(k, specs, ua.bits, costs) for k in b})
                        above = {"bits": ub, "allocation": ua.to_dict(), **train_eval(ua.bits, f"b{i}_uniform{ub}")}
                        break
                results.append({"budget": dict(b_in), "budget_resolved": b, "hessian": {**alloc.to_dict(), **h},
                                "uniform": uni, "uniform_above": above})
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
                      "method": "ggn_exact" if tr.probes == 0 else "hutchinson"},
            "layers": layers, "budgets": results, "frontier": frontier, "uniform_points": uniform_pts,
            "seconds": time.perf_counter() - t_all,
        }
        (out_dir / "search_report.json").write_text(json.dumps(report, indent=1, default=_json))
        (out_dir / "search_report.md").write_text(render_markdown(report))
        plot_pareto(report, out_dir / "pareto.png")
        publish(out_dir, out_final)  # replaces an empty folder or (with force) an earlier search
        return report
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)  # a failed search leaves nothing half-written
        for d in new_parents:  # innermost first; only folders this run created and left empty
            try:
                d.rmdir()
            except OSError:
                break
        raise


RECIPE_KEYS = ("model", "train", "val", "test", "input", "name", "qat", "ties", "trace_samples")


def _check_recipe_result(r) -> None:
    """One-line QDeployError for a recipe result that is not the documented dict."""
    if not isinstance(r, Mapping):
        raise QDeployError(f"the recipe returned {type(r).__name__}, expected a dict with model, train, val "
                           "(optional test, input, name, qat, ties, trace_samples)")
    for k in ("model", "train", "val"):
        if k not in r:
            raise QDeployError(f"recipe result lacks {k!r} (needs model, train, val; optional test, input)")
    unknown = sorted(set(r) - set(RECIPE_KEYS))
    if unknown:
        raise QDeployError(f"recipe result has unknown key(s) {unknown}; known: {', '.join(RECIPE_KEYS)}")
    if not isinstance(r["model"], nn.Module):
        raise QDeployError(f"recipe 'model' is a {type(r['model']).__name__}, expected a torch nn.Module")
    for k in ("qat", "input"):
        if r.get(k) is not None and not isinstance(r[k], Mapping):
            raise QDeployError(f"recipe {k!r} must be a mapping, got {type(r[k]).__name__}")


def _xy(r, key: str):
    """``(x, y)`` arrays of recipe field ``key``, checked: a pair, same length, integer labels."""
    v = r[key]
    if not isinstance(v, (tuple, list)) or len(v) != 2:
        raise QDeployError(f"recipe {key!r} must be a pair (x, y), got {type(v).__name__}")
    x, y = np.asarray(v[0]), np.asarray(v[1])
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise QDeployError(f"recipe {key!r}: x must be (N, ...) and y (N,) with the same N > 0, got x "
                           f"{tuple(x.shape)} and y {tuple(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise QDeployError(f"recipe {key!r}: labels y must be integers, got {y.dtype}")
    return x, y


def _check_qat(q: Mapping) -> dict:
    """The recipe's QAT settings with types and ranges checked (one-line QDeployError naming the key)."""
    unknown = sorted(set(q) - set(QAT_KEYS))
    if unknown:
        raise QDeployError(f"recipe 'qat' has unknown key(s) {unknown}; known: {', '.join(QAT_KEYS)}")
    out = dict(q)
    for k, typ in (("epochs", int), ("batch_size", int), ("lr", float), ("distill_alpha", float),
                   ("distill_temperature", float)):
        if k not in out:
            continue
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or \
                (typ is int and float(v) != int(v)) or not math.isfinite(float(v)):
            raise QDeployError(f"recipe 'qat': {k} must be {'an integer' if typ is int else 'a number'}, got {v!r}")
        out[k] = typ(v)
    if out["epochs"] < 0:
        raise QDeployError(f"qat epochs must be >= 0, got {out['epochs']}")
    if out["batch_size"] < 1:
        raise QDeployError(f"recipe 'qat': batch_size must be >= 1, got {out['batch_size']}")
    if not out["lr"] > 0:
        raise QDeployError(f"recipe 'qat': lr must be > 0, got {out['lr']}")
    da, dt = out.get("distill_alpha", 0.0), out.get("distill_temperature", 2.0)
    if not (0.0 <= da <= 1.0 and dt > 0.0):
        raise QDeployError(f"recipe 'qat': distill_alpha must be in [0, 1] and distill_temperature > 0, got "
                           f"{da} and {dt}")
    return out


def _json(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def accuracy_noise(a: dict, b: dict, key: str, n: int | None = None) -> float:
    """One standard error (accuracy units) of the difference a[key] - b[key] of two allocations.

    Paired over the evaluation samples when both carry ``<split>_correct`` (per sample, the fraction
    of QAT seeds that classify it right): d_i = a_i - b_i, SE = std(d) / sqrt(n) -- the
    evaluation-set sampling noise of a paired comparison, with the seed spread folded into each
    d_i.  Otherwise the seeds' spread (std/sqrt(k) each) plus independent binomial errors
    sqrt(p(1-p)/n) (an upper bound).  0 when nothing is known.
    """
    split = key.split("_")[0]
    ca, cb = a.get(split + "_correct"), b.get(split + "_correct")
    if ca is not None and cb is not None and len(ca) == len(cb) and len(ca) > 1:
        d = np.asarray(ca, dtype=np.float64) - np.asarray(cb, dtype=np.float64)
        return float(d.std(ddof=1) / math.sqrt(len(d)))
    v = 0.0
    for r in (a, b):
        accs = r.get(key + "s") or []
        if len(accs) > 1:
            v += float(np.var(accs, ddof=1)) / len(accs)
        if n:
            p_ = r[key]
            v += p_ * (1 - p_) / n
    return math.sqrt(v)


def _verdict(h, u, key, n) -> str:
    d = h[key] - u[key]
    se = accuracy_noise(h, u, key, n)
    tag = "Hessian >= uniform" if d >= 0 else "uniform better"
    if se > 0:
        tag += f" ({d * 100:+.2f} points, {'within' if abs(d) <= 2 * se else 'beyond'} 2 standard errors = {2 * se * 100:.2f})"
    return tag


def _acc(r, key):
    return "n/a" if r is None or key not in r else f"{r[key]:.4f}"


def render_markdown(rep: dict) -> str:
    """``search_report.md``: settings, per-layer table, Hessian vs uniform per budget, frontier."""
    acc_key = "test_acc" if "test" in rep["float_accuracy"] else "val_acc"
    L = [f"# qdeploy search report: {rep['model']}", "",
         "- float accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in rep["float_accuracy"].items()),
         f"- candidate weight bits {rep['settings']['w_bits']}, activation bits {rep['settings']['a_bits']}, "
         f"input {rep['settings']['input']}",
         ("- Hessian traces: exact (Gauss-Newton block = Hessian block of a piecewise-linear network, "
          "no probes; standard error 0), " if rep['trace'].get('method') == "ggn_exact" else
          f"- Hutchinson: {rep['trace']['probes']} Rademacher probes (cap {rep['settings']['probes_cap']}, "
          f"tol {rep['settings']['tol']}, converged: {rep['trace']['converged']}), ")
         + f"{rep['settings']['trace_samples']} samples, {rep['trace']['seconds']:.2f} s",
         f"- QAT: {rep['settings']['qat']}, seed {rep['seed']}; total {rep['seconds']:.1f} s", "",
         "## Layers", "",
         "Trace = Tr(H) of the loss w.r.t. the layer's weights (± standard error); act trace = w.r.t. its input "
         "activation (all samples). Chosen bits per budget as w/a.", "",
         "| layer | kind | weights | trace | ± se | Tr/n | act trace | ± se | " +
         " | ".join(f"budget {i}" for i in range(len(rep["budgets"]))) + " |",
         "|---|---|---|---|---|---|---|---|" + "---|" * len(rep["budgets"])]
    for li, r in enumerate(rep["layers"]):
        L.append(f"| {r['name']} | {r['kind']} | {r['n_weights']} | {r['trace']:.4g} | {r['stderr']:.2g} | "
                 f"{r['mean_trace']:.3g} | "
                 + (f"{r['act_trace']:.4g} | {r['act_stderr']:.2g} | " if "act_trace" in r
                    else "- (model input) | - | " if li == 0 else "- (not searched) | - | ")
                 + " | ".join(f"{c[0]}/{c[1]}" for c in r["chosen"]) + " |")
    mode = rep["settings"].get("sensitivity_mode", "hessian")
    L += ["", "## Sensitivity per bit width", "",
          f"Mode `{mode}`. Omega = Tr(H)/n * ||Q_b(T) - T||^2 (HAWQ-V3 Eq. 10; ~2x the loss increase under the "
          "quadratic model); 2 dL = twice the measured loss increase of quantizing that tensor alone. "
          + ("The ILP minimizes max(Omega, 2 dL): where 2 dL > Omega the second-order model under-estimates "
             "(marked *)." if mode == "hessian+measured" else
             "The ILP minimizes 2 dL." if mode == "measured" else "The ILP minimizes Omega."), ""]
    wb = rep["settings"]["w_bits"]
    L += ["| tensor | " + " | ".join(f"{b} bits" for b in wb) + " |", "|---|" + "---|" * len(wb)]
    for r in rep["layers"]:
        sd = r.get("sensitivity") or {}
        for t, om_k, ml_k in (("W", "omega_w", "measured_w"), ("act", "omega_a", "measured_a")):
            om, ml = sd.get(om_k), sd.get(ml_k)
            if not om:
                continue
            cells = []
            for b in wb:
                o = om.get(str(b))
                if o is None:
                    cells.append("")
                    continue
                if ml is None:
                    cells.append(f"{o:.2g}")
                else:
                    m2 = 2 * ml[str(b)]
                    cells.append(f"{o:.2g} / {m2:.2g}" + ("*" if m2 > o else ""))
            L.append(f"| {r['name']} {t} | " + " | ".join(cells) + " |")
    L += ["", "## Hessian allocation vs uniform precision, per budget", "",
          f"Accuracies are means over the {rep['settings'].get('qat_seeds', 1)} QAT seed(s). BOPs here are dense "
          "(MACs x (w a + w + a + log2 fan-in) for w-bit weights and a-bit inputs, as the ILP budgets them); `qdeploy compile` reports BOPs "
          "after the trained zero weights are removed (the pruned fraction f_p of arXiv 2103.05579 Eq. 1), "
          "so its figure for the same QONNX model is lower. 'weight bits' = total weight storage in bits."]
    if any(k not in ("bops", "size") for b in rep["budgets"] for k in b["budget_resolved"]):
        L += ["", "FPGA budgets (LUT, FF, DSP, BRAM, latency) are estimator figures for the *float* model's weights "
              "quantized to each width before QAT (the ILP needs them before training): the Dense/Conv rows per "
              "layer plus the ReLU / requantization / pooling rows between two layers; before QAT they equal "
              "`qdeploy estimate` on the exported model. QAT moves the weights: when a layer's max |w| falls "
              "below a power of two its scale halves and its LUTs roughly double (seen on the digits models' first "
              "layers), so check the chosen model with `qdeploy estimate`."]
    L += ["",
          "| budget | allocation | BOPs | weight bits | sensitivity | val acc | test acc | QONNX |",
          "|---|---|---|---|---|---|---|---|"]
    for i, b in enumerate(rep["budgets"]):
        h, u = b["hessian"], b["uniform"]
        bud = ", ".join(f"{k}={v}" for k, v in b["budget"].items())
        hwk = [k for k in b["budget_resolved"] if k not in ("bops", "size")]
        hwc = lambda c: "".join(f" ({k} {c[k]:.4g})" for k in hwk if k in c)  # estimator budgets, e.g. lut
        L.append(f"| {i}: {bud} | Hessian ILP{hwc(h['costs'])} | {h['costs']['bops']:.4g} | {h['costs']['size']:.0f} | "
                 f"{h['objective']:.3g} | {_acc(h, 'val_acc')} | {_acc(h, 'test_acc')} | {h.get('qonnx', '')} |")
        if u:
            ua = u["allocation"]
            L.append(f"| {i} | uniform {u['bits']}-bit{hwc(ua['costs'])} | {ua['costs']['bops']:.4g} | {ua['costs']['size']:.0f} | "
                     f"{ua['objective']:.3g} | {_acc(u, 'val_acc')} | {_acc(u, 'test_acc')} | {u.get('qonnx', '')} |")
        else:
            L.append(f"| {i} | uniform: none fits | | | | | | |")
        ua2 = b.get("uniform_above")
        if ua2:
            c = ua2["allocation"]["costs"]
            L.append(f"| {i} | uniform {ua2['bits']}-bit (above budget){hwc(c)} | {c['bops']:.4g} | {c['size']:.0f} | "
                     f"{ua2['allocation']['objective']:.3g} | {_acc(ua2, 'val_acc')} | {_acc(ua2, 'test_acc')} | "
                     f"{ua2.get('qonnx', '')} |")
    n_ev = (rep.get("n_eval") or {}).get(acc_key.split("_")[0])
    L += ["", f"Comparison ({acc_key}, mean of the QAT seeds; difference in points with twice its paired "
              f"standard error over the {n_ev or '?'} evaluation samples):", ""]
    for i, b in enumerate(rep["budgets"]):
        h, u = b["hessian"], b["uniform"]
        if u:
            L.append(f"- budget {i}: Hessian {h[acc_key]:.4f} at {h['costs']['bops']:.4g} BOPs vs uniform "
                     f"{u['bits']}-bit {u[acc_key]:.4f} at {u['allocation']['costs']['bops']:.4g} BOPs: "
                     f"{_verdict(h, u, acc_key, n_ev)}")
        ua2 = b.get("uniform_above")
        if ua2:
            L.append(f"  - vs uniform {ua2['bits']}-bit {ua2[acc_key]:.4f} at {ua2['allocation']['costs']['bops']:.4g} "
                     f"BOPs (more than the budget): {_verdict(h, ua2, acc_key, n_ev)}")
    for kind, pts in rep["frontier"].items():
        L += ["", f"## Frontier: total sensitivity vs {kind} (ILP sweep, no QAT)", "", f"| {kind} | sensitivity |", "|---|---|"]
        L += [f"| {p['cost']:.4g} | {p['objective']:.4g} |" for p in pts]
    return "\n".join(L) + "\n"


def plot_pareto(rep: dict, path) -> Path:
    """``pareto.png``: sensitivity frontier vs BOPs (left) and accuracy after QAT vs BOPs (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc_key = "test_acc" if "test" in rep["float_accuracy"] else "val_acc"
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    fr = rep["frontier"].get("bops", [])
    ax[0].plot([p["bops"] for p in fr], [p["objective"] for p in fr], "o-", ms=3, label="ILP frontier")
    up = rep["uniform_points"]
    ax[0].plot([p["bops"] for p in up], [p["objective"] for p in up], "s--", label="uniform")
    for p in up:
        ax[0].annotate(str(p["bits"]), (p["bops"], p["objective"]), fontsize=7)
    ax[0].set(xscale="log", yscale="log", xlabel="BOPs / sample", ylabel="total sensitivity Σ Ω",
              title=f"{rep['model']}: sensitivity frontier")
    ax[0].legend()
    hb = [(b["hessian"]["costs"]["bops"], b["hessian"][acc_key]) for b in rep["budgets"]]
    ub = [(b["uniform"]["allocation"]["costs"]["bops"], b["uniform"][acc_key]) for b in rep["budgets"] if b["uniform"]]
    ax[1].plot(*zip(*sorted(hb)), "o-", label="Hessian ILP + QAT")
    if ub:
        ax[1].plot(*zip(*sorted(set(ub))), "s--", label="uniform + QAT")
    ax[1].axhline(rep["float_accuracy"].get(acc_key.replace("_acc", ""), np.nan), color="gray", lw=0.8, label="float")
    ax[1].set(xscale="log", xlabel="BOPs / sample", ylabel=acc_key.replace("_", " "), title="accuracy after QAT")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
