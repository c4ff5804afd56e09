"""The Python API: ``load``, ``compile``, ``run``.

``compile(model, target, out_dir)`` = import -> passes -> backend emit/build -> golden
exactness check against the reference interpreter -> ``manifest.json`` + ``report.json`` +
``report.md``.  The artifact is written to a temporary sibling directory and renamed into place
only when complete, so a failed compile leaves no output directory behind.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .compiler.errors import CompileError, QDeployError
from .compiler.ir.graph import Graph
from .compiler.ir.types import FixedType
from .compiler.reference import execute, prepare_feeds
from .runtime.artifact import (check_out_dir, check_replaceable, file_hashes, publish, staging_dir, versions,
                               write_manifest)
from .inputs import check_config, golden_arrays, golden_feeds, load_array_file, load_config  # noqa: F401  (load_array_file: re-exported)
from .runtime.layout import manifest_layouts


class SourceMismatchError(QDeployError):
    """The reference interpreter's outputs differ from the source model's beyond float32 rounding
    (:func:`qdeploy.fidelity.check_source`): the compile fails unless ``allow_inexact``.

    Attributes:
        fidelity: the fidelity dict (the report's ``fidelity`` section).
    """

    def __init__(self, fidelity: dict):
        self.fidelity = fidelity
        outs = [o for o, r in (fidelity.get("per_output") or {}).items()
                if r.get("real_mismatches") or r.get("unclassified")]
        where = f" (output{'s' if len(outs) > 1 else ''} {', '.join(outs)})" if outs else ""
        super().__init__(f"outputs{where} differ from the source model on {fidelity.get('mismatches')} of "
                         f"{fidelity.get('samples')} golden samples: {fidelity.get('note', '')}; "
                         f"--allow-inexact (allow_inexact=True) keeps the artifact")


@dataclass
class CompileResult:
    """What :func:`compile` returns: the artifact directory, the report dict and the graph."""

    out_dir: Path
    report: dict
    graph: Graph

    def load(self):
        from .runtime import CompiledModel
        return CompiledModel.load(self.out_dir)


def load(model, example_input=None) -> Graph:
    """Import a model into the IR: a :class:`Graph`, a ``.onnx`` path (QONNX or ONNX), a
    ``module:function`` spec, or a torch/Brevitas ``nn.Module`` (needs ``example_input``).

    Raises:
        QDeployError (ModelImportError/UnsupportedError): naming the node at fault.
    """
    if isinstance(model, Graph):
        return model
    from .compiler import frontends
    if isinstance(model, (str, os.PathLike)):
        suffix = Path(str(model)).suffix.lower()
        if suffix in (".h5", ".hdf5", ".json", ".keras", ".pt", ".pth", ".pb", ".tflite"):
            raise QDeployError(f"{model}: unsupported model file type {suffix!r}; give a QONNX/ONNX (.onnx) file or a "
                               f"module:function returning a Brevitas/torch model (convert Keras/QKeras models with "
                               f"qonnx's from_keras first)")
        return frontends.load_model(str(model))
    try:
        import torch
        if isinstance(model, torch.nn.Module):
            if example_input is None:
                raise QDeployError("a torch model needs an example input to be exported")
            return frontends.import_brevitas(model, example_input)
    except ImportError:
        pass
    import onnx
    if isinstance(model, onnx.ModelProto):
        return frontends.import_onnx(model)
    raise QDeployError(f"cannot import a {type(model).__name__}: give a .onnx path, module:function, or nn.Module")


def _avgpool_notes(graph: Graph) -> list[str]:
    """Say where a fixed-point average truncates (window not a power of two)."""
    from .compiler.ir.ops import avg_shift
    out = []
    for n in graph.nodes:
        if n.op in ("AvgPool", "GlobalAvgPool") and isinstance(graph.value(n.output).dtype, FixedType):
            cnt = int(np.prod(n.attrs["kernel"])) if n.op == "AvgPool" else int(np.prod(graph.value(n.inputs[0]).shape[:-1]))
            if cnt & (cnt - 1):
                out.append(f"{n.name}: average over {cnt} elements (not a power of two) is truncated to "
                           f"2^-{graph.value(n.output).dtype.frac_bits} (floor(sum*2^{avg_shift(cnt)}/{cnt})), like "
                           f"Brevitas' TruncAvgPool; a float mean rounded later may differ by 1 LSB")
    return out


def compile(model, target: str = "hls4ml", out_dir="qdeploy_out", config=None, golden=None,
            example_input=None, force: bool = False, optimize: bool = True,
            memory_budget=None, golden_layout=None, allow_inexact: bool = False,
            source_check: bool = True, input_type=None, progress=None) -> CompileResult:
    """Compile ``model`` for ``target`` into ``out_dir``.

    Args:
        model: see :func:`load`.
        target: ``hls4ml``, ``tvm-llvm``, ``tvm-cuda`` or ``reference``.  An artifact that cannot
            run here (cross-compiled, or ``tvm-cuda`` without a GPU) is built but not run: its
            exactness is "not checked" (``exactness.not_run`` says why).
        out_dir: artifact directory; must not exist unless ``force``.
        config: dict or YAML path (:func:`load_config`).
        golden: golden inputs (array, list, dict by input name, or .npy/.npz path; batch first,
            the source model's layout).  Default: ``golden.samples`` random inputs.  They also
            calibrate the input type of models without an input quantizer.
        golden_layout: layout of ``golden``: None/``"source"`` or ``"channels-last"``
            (:func:`golden_feeds`).  The manifest declares each input's and output's source
            layout (``layout``) and IR layout (``ir_layout``).
        force: replace an existing ``out_dir``.
        memory_budget: peak activation memory budget: bytes (``"48KiB"``, 49152) or a
            fraction of the unrematerialized peak (``0.8``); default: the config's ``memory_budget``
            (a number/string, or a mapping with ``budget`` and optional ``packing``, ``max_copies``,
            ``time_limit``, ``method``, ``cost``).  Adds the ``remat`` pass
            (:func:`qdeploy.passes.remat.remat_pass`) at the end of the pipeline; ``cost: cycles``
            is priced by the provider :func:`cost_models` registers in the pass context.
        allow_inexact: keep (publish) the artifact even when the reference differs from the source
            model by more than float32 rounding (real mismatches, or differences that could not be
            classified; :func:`qdeploy.fidelity.check_source`); the report then says inexact.
        source_check: run the source model (a QONNX/ONNX file through qonnx's executor, a
            torch/Brevitas module itself, also when given as ``module:function``) on the golden
            inputs and compare (default); False skips it (the report says "not checked").
        input_type: fixed-point type of float model inputs that feed quantized layers (e.g.
            ``"fixed<16,6,RND_CONV,SAT>"``), overriding the config's ``input_type``.  Without one,
            the narrowest type that holds the golden inputs exactly is used, else hls4ml's
            default ``fixed<16,6>``, and then the source check compares against the source on the
            unrounded inputs (a guessed rounding is never hidden).
        progress: optional ``callable(stage: str)`` told each stage as it starts (importing,
            optimizing, checking the source, emitting, building, checking the target, writing), and
            ``"WARNING: ..."`` lines worth seeing before a long build (an io_parallel hls4ml design the
            estimate finds larger than its part); the CLI shows them with rich.
    Returns:
        :class:`CompileResult`.
    Raises:
        SourceMismatchError: the reference differs from the source model (see ``allow_inexact``);
            nothing is written, the error carries the fidelity dict.
        QDeployError: bad model/config or a backend that cannot compile it; nothing is written.
    """
    from .backends import get_backend
    from .passes import PassManager, default_pipeline
    from .fidelity import check_source
    from .report import (check_static_batches, compare_outputs, layer_table, not_run_exactness, render_markdown,
                         static_batch_sizes)

    cfg = load_config(config)
    if input_type is not None:
        cfg = check_config({**cfg, "input_type": str(input_type)}, "input_type")
    out_dir = check_out_dir(out_dir)
    if out_dir.exists() and not force:
        raise QDeployError(f"output directory {out_dir} exists (use --force / force=True to replace it)")
    if out_dir.exists():
        check_replaceable(out_dir, model)
    try:
        backend = get_backend(target)
    except ValueError as e:
        raise QDeployError(str(e)) from None
    t0 = time.perf_counter()
    say = progress or (lambda stage: None)
    say("importing the model")
    from .compiler.frontends import is_module_spec, resolve_module_spec
    if is_module_spec(model):  # resolved once: the same module is exported and run as the source
        model, example_input = resolve_module_spec(model)
    graph = graph_src = load(model, example_input)
    user_arrays = None if golden is None else golden_arrays(graph, golden)  # a golden file is read once
    feeds_real = feeds_src = golden_feeds(graph, user_arrays, cfg, golden_layout)
    remat_opts = remat_options(memory_budget, cfg)
    if optimize:
        pipeline = default_pipeline(cfg.get("input_type"), feeds_real, remat_opts)
    else:
        pipeline = [("remat", remat_opts)] if remat_opts is not None else []
    pm = PassManager(pipeline, cost_models=cost_models())
    say("optimizing (passes)")
    graph = pm.run(graph)
    remat_report = pm.context.results.get("remat")
    feeds_real = {k: v for k, v in feeds_real.items() if k in graph.inputs}
    feeds = prepare_feeds(graph, feeds_real)
    ref = execute(graph, feeds, codes=True)
    # the source sees the user's own arrays when they are in the source layout (as declared);
    # channels-last golden arrays (golden_layout) are permuted back from the IR feeds
    from .runtime.layout import channels_last_mode, graph_layouts
    user_src = golden is not None and not channels_last_mode(golden_layout, graph_layouts(graph_src)[0])
    if source_check:
        say("running the source model on the golden inputs")
    fidelity = check_source(model, graph_src, graph, feeds_src, user_arrays if user_src else None, ref,
                            enabled=source_check)
    if fidelity.get("checked") and not fidelity["ok"]:
        if not allow_inexact:
            raise SourceMismatchError(fidelity)
        fidelity["accepted_inexact"] = True

    tmp = staging_dir(out_dir)
    try:
        (tmp / "ir").mkdir()
        graph.save(str(tmp / "ir" / "model"))
        (tmp / "ir" / "model.txt").write_text(str(graph) + "\n")
        t1 = time.perf_counter()
        estimate = _compile_estimate(graph, cfg)  # FPGA estimate in every report (and a warning before a long build)
        if target == "hls4ml":
            for w in _big_design_warnings(estimate, cfg):
                say(f"WARNING: {w}")
        say(f"emitting the {target} artifact")
        info = backend.emit(graph, cfg, tmp) or {}
        say(f"building ({'g++ C simulation' if target == 'hls4ml' else target})")
        from .backends.progress import reporting
        with reporting(say):  # long backend steps (a TVM tuning) report progress
            backend.build(tmp, info)
        t_build = time.perf_counter() - t1
        say("checking the artifact against the reference")
        if info.get("not_run_here"):  # cross-compiled, or a GPU library without a GPU here
            exact = not_run_exactness(graph, ref, info["not_run_here"])
        else:
            # every library the artifact holds that runs here (a TVM CPU artifact: the portable one
            # and its faster CPU variants) is checked; the first that differs is reported.  A tuned
            # TVM library's static entry (main_b<B>) is checked too, on the golden inputs cycled to B
            fns = backend.load_all(tmp, info, graph) if hasattr(backend, "load_all") else \
                [(None, backend.load(tmp, info, graph))]
            per = {}
            for name, fn in fns:
                e = compare_outputs(graph, ref, fn({k: v for k, v in feeds.items()}))
                per[name] = check_static_batches(e, graph, fn, feeds, static_batch_sizes(info, name))
            bad = [n for n, e in per.items() if e.get("fixed_mismatches")]
            worst = bad[0] if bad else max(per, key=lambda n: float(per[n].get("max_abs_error") or 0.0))
            exact = dict(per[worst])
            # every library's static entries in the report (the tuned main_b<B> is in the tuned
            # library only, which need not be the one reported above)
            for e in per.values():
                for b, sb in (e.get("static_batches") or {}).items():
                    exact.setdefault("static_batches", {}).setdefault(b, sb)
            if len(per) > 1 or fns[0][0] is not None:
                exact["variants"] = {n: bool(e.get("bit_exact")) for n, e in per.items()}
                if bad:
                    exact["variant"] = bad[0]
        if exact.get("fixed_mismatches"):  # name the first layer that differs (only on failure)
            from .backends.divergence import localize
            exact["divergence"] = localize(backend, graph, cfg, tmp, info, feeds)
        if hasattr(backend, "finalize"):  # e.g. hls4ml: testbench data, final paths, project README
            g = cfg.get("golden", {}) or {}
            backend.finalize(tmp, info, graph, feeds, Path(out_dir).resolve(),
                             "from the golden inputs given to the compile" if golden is not None else
                             f"random (no golden inputs were given: seed {int(g.get('seed', 0))}, uniform codes over a "
                             f"fixed-point input's range, uniform [-1, 1) for a float input)")
        np.savez(tmp / "golden.npz", **{f"in:{k}": v for k, v in feeds_real.items()},
                 **{f"ref:{k}": v for k, v in ref.items()})
        notes = [n for r in pm.records for n in r.notes if r.name in ("quantize_inputs", "affine_to_fixed")]
        notes += list(graph.meta.get("notes", []))
        notes += [n for n in info.get("notes", []) if n.startswith("reuse factor adjusted")]
        notes += _avgpool_notes(graph)
        host = info.get("host_nodes", [])
        if isinstance(host, dict):  # {"prologue": [...], "epilogue": [...]}
            host = [n for part in host.values() for n in part]
        host = list(host)
        rows = layer_table(graph)
        report = {
            "model": graph.name, "target": target, "source": str(graph.meta.get("source", "")),
            "graph_digest": graph.digest(), "exactness": exact, "fidelity": fidelity,
            "inexact": bool(fidelity.get("accepted_inexact") or exact.get("fixed_mismatches")),
            "notes": notes, "host_nodes": host,
            "layers": rows,
            "totals": {"nodes": len(graph.nodes), "params": sum(r["params"] for r in rows),
                       "param_bits": sum(r["param_bits"] for r in rows), "bops": sum(r["bops"] for r in rows)},
            "pipeline": pm.describe(),
            "passes": [{"name": r.name, "ms": r.ms, "nodes_before": r.nodes_before, "nodes_after": r.nodes_after,
                        "notes": r.notes} for r in pm.records],
            "timing_s": {"total": time.perf_counter() - t0, "backend_build": t_build},
            "estimate": estimate,
            "backend": {k: v for k, v in info.items() if k != "layers"},  # what the target built (settings, ports)
            "remat": remat_report,  # peak before/after, overhead %, solve time (None: no budget)
        }
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str))
        (tmp / "report.md").write_text(render_markdown(report))
        lays = manifest_layouts(graph)
        manifest = {
            "format": 1, "target": target, "versions": versions(), "config": cfg, "backend": info,
            "graph_digest": graph.digest(),
            "inputs": [{"name": v.name, "shape": list(v.shape), "type": str(v.dtype),
                        "perm": (graph.meta.get("input_perms") or {}).get(v.name), **lays["inputs"][v.name]}
                       for v in graph.input_values()],
            "outputs": [{"name": v.name, "shape": list(v.shape), "type": str(v.dtype),
                         "perm": (graph.meta.get("output_perms") or {}).get(v.name), **lays["outputs"][v.name]}
                        for v in graph.output_values()],
            "exactness": {k: exact[k] for k in ("samples", "mismatches", "max_abs_error", "bit_exact", "not_run", "variants",
                                                "static_batches") if k in exact},
            "hashes": file_hashes(tmp),
        }
        write_manifest(tmp, manifest)
        publish(tmp, out_dir)
    except QDeployError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CompileError(f"{target} compile failed: {type(e).__name__}: {e}", graph.name) from e
    except BaseException:  # Ctrl-C / SystemExit: still no half-written staging directory
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CompileResult(out_dir, report, graph)


def cost_models() -> dict:
    """The named cost providers the user layer gives the passes (``PassContext.cost_models``):
    ``{"cycles": qdeploy.backends.hls4ml.cycles.cycle_costs}`` (hls4ml estimator latency cycles,
    the ``remat`` pass's ``cost: cycles``).  Passes import no backend; this is how a backend's cost
    reaches them.  ``"macs"`` and ``"unit"`` are built into the passes."""
    from .backends.hls4ml.cycles import cycle_costs
    return {"cycles": cycle_costs}


def remat_options(budget, cfg: dict) -> dict | None:
    """Options of the ``remat`` pass from the ``memory_budget`` argument and the config's
    ``memory_budget`` (a number/string, or a mapping with ``budget`` and optional ``packing``,
    ``max_copies``, ``time_limit``, ``method``, ``cost``; other keys are ignored); the argument
    overrides the config's budget.  None when no budget is set.

    Raises:
        QDeployError: a budget :func:`qdeploy.passes.memory.parse_memory_budget` cannot read.
    """
    from .passes.remat import REMAT_OPTIONS
    opts = cfg.get("memory_budget")
    opts = dict(opts) if isinstance(opts, dict) else ({} if opts is None else {"budget": opts})
    if budget is not None:
        opts["budget"] = budget
    if opts.get("budget") is None:
        return None
    from .passes.memory import parse_memory_budget
    try:  # a malformed budget is the user's argument, not a failure of the remat pass
        parse_memory_budget(opts["budget"])
    except ValueError as e:
        raise QDeployError(f"memory budget: {e}") from None
    return {"budget": opts["budget"], **{k: opts[k] for k in REMAT_OPTIONS if k in opts}}


# ---- estimates (qdeploy.backends.hls4ml.estimate / qdeploy.backends.asic) ----
ESTIMATE_TARGETS = ("hls4ml", "asic")


def estimate(model, target: str = "hls4ml", config=None, input_type=None) -> dict:
    """Resource/latency (hls4ml) or area/power/energy (asic) estimate of ``model``, no vendor tool.

    ``model`` as for :func:`load`; the default passes run first (exact types).  ``config`` is a
    dict of estimator options (hls4ml: part, clock_period [ns], reuse_factor, strategy, io_type,
    accum_type, softmax_on_device, dsp_rule; asic: node_nm, clock_mhz/clock_period [ns], weights,
    activity, tmr).  Returns ``{"total": {...}, "layers": [...], "note": ...}``: LUT/FF/DSP/BRAM_18K
    counts, latency in cycles and ns, II in cycles (hls4ml); area mm^2, power mW, energy nJ per
    inference (asic).  ``note`` states that the figure is an estimate and its measured error on the
    published reference.  See the estimator modules for every modelling assumption and its source.

    Raises:
        QDeployError: unknown target or part, an illegal reuse factor, an unsupported op.
    """
    from .passes import PassManager, default_pipeline
    if target not in ESTIMATE_TARGETS:
        raise QDeployError(f"unknown estimate target {target!r}; known: {', '.join(ESTIMATE_TARGETS)}")
    graph = PassManager(default_pipeline(input_type)).run(load(model))
    if target == "hls4ml":
        from .backends.hls4ml.estimate import estimate as est
    else:
        from .backends.asic import estimate as est
    return est(graph, dict(config or {}))


#: An io_parallel design whose estimate exceeds this share of the part's LUTs gets a warning before
#: its build: hls4ml unrolls every layer, and g++ and the vendor tool take minutes to hours on it.
BIG_DESIGN_LUT_PCT = 100.0


def _big_design_warnings(est: dict, cfg: dict) -> list[str]:
    """One line when an io_parallel hls4ml design is estimated over :data:`BIG_DESIGN_LUT_PCT` of its
    part's LUTs (suggesting io_stream), else nothing."""
    h = cfg.get("hls4ml") or {}
    pct = ((est or {}).get("total") or {}).get("utilization_pct", {}).get("lut")
    if h.get("io_type", "io_parallel") != "io_parallel" or pct is None or pct <= BIG_DESIGN_LUT_PCT:
        return []
    return [f"the io_parallel design is estimated at {pct:.0f}% of the part's LUTs: the C simulation build and "
            f"synthesis will be slow and it will not fit; consider --io-type io_stream (or a larger --reuse-factor)"]


def _compile_estimate(graph: Graph, cfg: dict) -> dict:
    """The estimate for a compile report: hls4ml FPGA resources with the config's hls4ml options, or,
    for hls4ml's Catapult backend (ASIC firmware), area/power/energy with the config's ``asic``
    options (:mod:`qdeploy.backends.asic`; the hls4ml clock period unless ``asic`` sets one)."""
    from .backends.hls4ml.estimate import estimate as est
    h = dict(cfg.get("hls4ml") or {})
    opts = {k: h[k] for k in ("part", "clock_period", "reuse_factor", "strategy", "io_type") if k in h}
    if h.get("backend") == "Catapult":  # the project's clock (hls4ml default 5 ns) unless asic sets one
        from .backends.asic import estimate as est
        from .backends.hls4ml import DEFAULTS
        opts = {"clock_period": float(h.get("clock_period", DEFAULTS["clock_period"])), **dict(cfg.get("asic") or {})}
    try:
        return est(graph, opts)
    except QDeployError as e:
        return {"target": "hls4ml", "error": e.one_line()}
    except Exception as e:  # an estimator bug must never fail a compile
        return {"target": "hls4ml", "error": f"estimator failed: {type(e).__name__}: {e}"}


def run(out_dir, *inputs, layout=None):
    """Load the artifact at ``out_dir`` and return its real-valued outputs on ``inputs``
    (:meth:`qdeploy.runtime.CompiledModel.predict`, ``layout`` as there)."""
    from .runtime import CompiledModel
    return CompiledModel.load(out_dir).predict(*inputs, layout=layout)


# ---- Hessian-guided mixed-precision search ----
def search(recipe, out_dir, budgets=("bops=uniform:4",), **kwargs) -> dict:
    """Mixed-precision search: Hessian traces -> ILP allocation per budget -> QAT -> report.

    ``budgets``: budget points as dicts (``{"bops": 1.2e6}``) or strings (``"bops=1.2e6,size=uniform:4"``).
    Other keywords go to :func:`qdeploy.compiler.quantization.search.run_search` (w_bits, a_bits,
    act_bits_fixed, ties, costs, estimator, probes, tol, qat_epochs, qat_seeds, seed, progress, workers, ray,
    compare: the four-row Hessian / trace-only / random / uniform comparison).
    Budget kinds: ``bops``, ``size``, and via the hls4ml estimator (``estimator={"part": ...,
    "clock_period": ..., "reuse_factor": ...}``) ``lut``, ``ff``, ``dsp``, ``bram_18k``,
    ``latency_cycles``, ``latency_ns``; a value ``"uniform:B"`` (B may be fractional, e.g. 3.5).  Writes
    ``out_dir/search_report.json``, ``search_report.md``, ``pareto.png`` and ``models/*.onnx``;
    returns the report dict.  Raises QDeployError on bad settings.
    """
    from .compiler.quantization.search import run_search
    from .compiler.quantization.search_budget import parse_search_budget
    pts = [parse_search_budget(b) if isinstance(b, str) else dict(b) for b in budgets]
    return run_search(recipe, Path(out_dir), budgets=pts, **kwargs)
