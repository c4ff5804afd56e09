"""Compile reports: per-layer types, parameters, bits and BOPs, exactness; JSON and Markdown."""
from __future__ import annotations

import numpy as np

from .compiler.ir.cost import node_bops, type_bits
from .compiler.ir.graph import Graph
from .compiler.ir.types import FixedType
from .compiler.reference import execute


def layer_table(graph: Graph) -> list[dict]:
    """One row a node: name, PyTorch/Brevitas module (``""`` when the source records none), op,
    output type and shape, parameter count and bits, BOPs."""
    mods = graph.meta.get("modules") or {}
    rows = []
    for n in graph.nodes:
        v = graph.value(n.output)
        params = sum(c.data.size for c in n.params.values())
        pbits = sum(c.data.size * type_bits(c.dtype) for c in n.params.values())
        rows.append({"name": n.name, "module": mods.get(n.name, ""), "op": n.op, "type": str(v.dtype),
                     "shape": list(v.shape),
                     "params": int(params), "param_bits": int(pbits),
                     "weight_type": str(n.params["weight"].dtype) if "weight" in n.params else "",
                     "bops": node_bops(graph, n)})
    return rows


def compare_outputs(graph: Graph, ref: dict, got: dict) -> dict:
    """Exactness of a backend against the reference on the golden set.

    Fixed-point outputs are compared code for code; float outputs by value.
    Returns ``{samples, mismatches (samples with any differing output), fixed_mismatches
    (samples with a differing fixed-point code), max_abs_error, float_outputs (names),
    bit_exact, per_output: {...}}``.  ``bit_exact`` is True only when every output of every
    sample is identical; for a graph with float outputs this is an observation on the golden
    set, not a guarantee (float arithmetic may be reassociated by a compiler).
    """
    per = {}
    n = None
    bad = None
    fixed_bad = None
    max_err = 0.0
    float_outs = []
    for o in graph.outputs:
        t = graph.value(o).dtype
        a, b = np.asarray(ref[o]), np.asarray(got[o])
        if a.shape != b.shape:
            raise ValueError(f"output {o!r}: backend shape {b.shape} != reference {a.shape}")
        n = a.shape[0]
        diff = (a != b).reshape(n, -1).any(axis=1)
        if isinstance(t, FixedType):
            err = float(np.max(np.abs(t.to_real(a) - t.to_real(b)), initial=0.0))
        else:
            err = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))
        per[o] = {"type": str(t), "mismatches": int(diff.sum()), "max_abs_error": err}
        bad = diff if bad is None else (bad | diff)
        if isinstance(t, FixedType):
            fixed_bad = diff if fixed_bad is None else (fixed_bad | diff)
        else:
            float_outs.append(o)
        max_err = max(max_err, err)
    mism = int(bad.sum()) if bad is not None else 0
    return {"samples": int(n or 0), "mismatches": mism,
            "fixed_mismatches": int(fixed_bad.sum()) if fixed_bad is not None else 0,
            "max_abs_error": max_err, "bit_exact": mism == 0, "float_outputs": float_outs, "per_output": per}


def static_batch_sizes(info: dict, library: str | None = None) -> list[int]:
    """Batch sizes with their own static library entry that the golden check must also run:
    1 for a TVM library with the batch-1 entry ``main_b1`` (``info["batch1_entry"]``; run on
    every golden row, one call each), and a tuned TVM library's ``main_b<B>``
    (``info["tune"]["batch"]``), when ``library`` (the CPU
    name of one of the artifact's libraries, as ``load_all`` gives it; None: the only one) is the
    tuned one (``info["tune"]["target"]["mcpu"]``); ``[]`` otherwise and for other artifacts."""
    sizes = [1] if (info or {}).get("batch1_entry") else []  # a TVM library's main_b1 (predict's batch of one)
    tune = (info or {}).get("tune")
    if not isinstance(tune, dict) or not tune.get("batch"):
        return sizes
    if library is not None and (tune.get("target") or {}).get("mcpu") != library:
        return sizes
    return sizes + [int(tune["batch"])]


def check_static_batches(exact: dict, graph: Graph, fn, feeds: dict, sizes) -> dict:
    """Add the check of each static entry in ``sizes`` to ``exact`` (from :func:`compare_outputs`).

    For ``B == 1`` each golden row (up to 64) is run alone; otherwise the golden inputs are cycled
    to ``B`` rows (row ``i`` is golden row ``i mod N``), run through
    ``fn`` (which calls the library's static entry for a batch of ``B``) and compared with the
    reference interpreter run on the same ``B`` rows.  ``exact["static_batches"][str(B)]`` gets
    ``{samples, mismatches, fixed_mismatches, max_abs_error, bit_exact}``; mismatches there are
    added to ``exact``'s ``mismatches`` / ``fixed_mismatches`` and clear ``bit_exact``, so a wrong
    static entry fails the compile like a wrong golden output.  A size equal to the golden batch
    was already run by the golden check: its figures are recorded with ``golden_batch: True``.

    Args:
        exact: the golden check's dict (updated in place and returned).
        graph: the compiled IR graph.  fn: the backend's loaded ``fn(feeds) -> outputs``.
        feeds: the golden runtime feeds ``{input: (N, ...)}``.  sizes: batch sizes.
    """
    n = int(next(iter(feeds.values())).shape[0]) if feeds else 0
    for b in sizes:
        if n == 0:
            continue
        if b == n:  # the golden check itself ran a batch of B through this library's main_b<B>
            exact.setdefault("static_batches", {})[str(b)] = {
                **{k: exact.get(k) for k in ("samples", "mismatches", "fixed_mismatches", "max_abs_error", "bit_exact")},
                "golden_batch": True}
            continue
        if b == 1:  # the batch-1 entry: every golden row (up to 64), one call each
            rows = min(n, 64)
            fb = {k: np.ascontiguousarray(v[:rows]) for k, v in feeds.items()}
            ones = [fn({k: v[i:i + 1] for k, v in fb.items()}) for i in range(rows)]
            got = {o: np.concatenate([r[o] for r in ones]) for o in graph.outputs}
        else:
            idx = np.arange(b) % n
            fb = {k: np.ascontiguousarray(v[idx]) for k, v in feeds.items()}
            got = fn(fb)
        sub = compare_outputs(graph, execute(graph, fb, codes=True), got)
        exact.setdefault("static_batches", {})[str(b)] = {k: sub[k] for k in ("samples", "mismatches",
                                                                              "fixed_mismatches", "max_abs_error",
                                                                              "bit_exact")}
        exact["mismatches"] += sub["mismatches"]
        exact["fixed_mismatches"] = exact.get("fixed_mismatches", 0) + sub["fixed_mismatches"]
        exact["max_abs_error"] = max(exact["max_abs_error"], sub["max_abs_error"])
        exact["bit_exact"] = bool(exact["bit_exact"] and sub["bit_exact"])
    return exact


def not_run_exactness(graph: Graph, ref: dict, why: str) -> dict:
    """The exactness dict for an artifact that was built but could not run on this machine
    (a cross-compiled library, a GPU library without a GPU): the keys of :func:`compare_outputs`,
    with ``bit_exact`` and ``mismatches`` None (unknown, not zero) and ``not_run`` = ``why``."""
    n = int(np.asarray(ref[graph.outputs[0]]).shape[0]) if graph.outputs else 0
    return {"samples": n, "mismatches": None, "fixed_mismatches": 0, "max_abs_error": None,
            "bit_exact": None, "float_outputs": [], "per_output": {}, "not_run": why}


def exactness_sentence(ex: dict) -> str:
    """One honest sentence about an exactness dict from :func:`compare_outputs` (or
    :func:`not_run_exactness`)."""
    if ex.get("not_run"):
        return f"NOT CHECKED: the artifact was built but not run here ({ex['not_run']})"
    head = f"{ex['samples']} golden samples, {ex['mismatches']} mismatching, max abs error {ex['max_abs_error']:.3g}"
    for b, s in (ex.get("static_batches") or {}).items():
        how = (f"run on {s['samples']} golden rows one at a time" if str(b) == "1" else
               "the golden batch itself" if s.get("golden_batch") else
               f"on the golden inputs cycled to {s['samples']} rows")
        head += f" (including the static batch-{b} entry {how}: {s['mismatches']} mismatching)"
    floats = ex.get("float_outputs") or []
    if ex["bit_exact"] and not floats:
        return head + ": bit-exact"
    if ex["bit_exact"]:
        return head + (f": identical on the golden set (float output(s) {', '.join(repr(f) for f in floats)}: "
                       f"exactness is observed, not guaranteed; use a tolerance in golden checks)")
    if ex.get("fixed_mismatches", ex["mismatches"]) == 0:
        return head + ": fixed-point outputs bit-exact; float outputs differ by float rounding (NOT bit-exact)"
    div = ex.get("divergence")
    return head + ": NOT bit-exact (measured error above)" + (f"; {div['sentence']}" if div else "")


def render_markdown(report: dict) -> str:
    """Human-readable ``report.md``."""
    L = [f"# qdeploy compile report: {report['model']} -> {report['target']}", ""]
    L.append(f"- source: `{report.get('source', '')}`")
    L.append(f"- IR digest: `{report['graph_digest']}`, {report['totals']['nodes']} nodes, "
             f"{report['totals']['params']} parameters ({report['totals']['param_bits']} bits), "
             f"{report['totals']['bops']:.4g} BOPs per sample")
    for note in report.get("notes", []) + report.get("import_notes", []):
        L.append(f"- note: {note}")
    ex = report["exactness"]
    L += ["", "## Exactness against the reference interpreter", "",
          exactness_sentence(ex), ""]
    if ex.get("variants"):
        L += ["Libraries checked (each one this machine can run): " + ", ".join(
            f"{n} ({'identical to the reference' if ok else 'DIFFERS'})" for n, ok in ex["variants"].items())
            + (f"; shown below: {ex['variant']}" if ex.get("variant") else ""), ""]
    L += ["| output | type | mismatches | max abs error |", "|---|---|---|---|"]
    for o, r in ex["per_output"].items():
        L.append(f"| {o} | {r['type']} | {r['mismatches']} | {r['max_abs_error']:.3g} |")
    fid = report.get("fidelity")
    if fid is not None:
        from .fidelity import fidelity_markdown
        L += ["", *fidelity_markdown(fid)]
    if report.get("host_nodes"):
        L += ["", f"Run on the host (float, NumPy): {', '.join(report['host_nodes'])}"]
    with_mod = any(r.get("module") for r in report["layers"])
    mh, ms = ("module | ", "---|") if with_mod else ("", "")
    L += ["", "## Layers", "", f"| node | {mh}op | output type | shape | weight type | params | param bits | BOPs |",
          f"|---|{ms}---|---|---|---|---|---|---|"]
    for r in report["layers"]:
        mc = f"{r.get('module', '')} | " if with_mod else ""
        L.append(f"| {r['name']} | {mc}{r['op']} | {r['type']} | {r['shape']} | {r['weight_type']} | {r['params']} | "
                 f"{r['param_bits']} | {r['bops']:.4g} |")
    if with_mod:
        L += ["", "Module: the PyTorch/Brevitas module each node came from (torch's export metadata); per-layer "
              "settings such as `hls4ml.reuse_factor` accept it in place of the node name."]
    est = report.get("estimate")
    if isinstance(est, dict) and isinstance(est.get("total"), dict):
        t = est["total"]
        part = est.get("part", "")
        part = part.get("name", part.get("key", "")) if isinstance(part, dict) else part
        if not part and (est.get("config") or {}).get("node_nm"):  # ASIC: the technology node and clock
            c = est["config"]
            part = f"{c['node_nm']} nm" + (f", clock period {c['clock_period']} ns" if c.get("clock_period") else "")
        L += ["", f"## Estimate ({est.get('target', 'hls4ml')}, {part}; no vendor tool)", ""]
        keys = [k for k in ("lut", "ff", "dsp", "bram_18k", "latency_cycles", "latency_ns", "ii_cycles",
                            "area_mm2", "power_mw", "energy_nj") if t.get(k) is not None]
        L += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
              "| " + " | ".join(f"{t[k]:.4g}" if isinstance(t[k], float) else str(t[k]) for k in keys) + " |"]
        util = t.get("utilization_pct")
        if util:
            L += ["", "Share of the part: " + ", ".join(f"{k.upper()} {v:.1f}%" for k, v in util.items())]
        if report.get("target") != "hls4ml":  # an hls4ml compile lists them in its project section
            L += [f"- **WARNING**: {w}" for w in est.get("warnings") or []]
        if est.get("note"):
            L += ["", f"{est['note']}"]
    elif isinstance(est, dict) and est.get("error"):
        L += ["", "## Estimate", "", f"not available: {est['error']}"]
    if isinstance(report.get("backend"), dict) and isinstance(report["backend"].get("tune"), dict):
        L += ["", *tune_markdown(report["backend"]["tune"])]
    if report.get("target") == "hls4ml" and isinstance(report.get("backend"), dict):
        L += ["", *hls4ml_markdown(report["backend"], est if isinstance(est, dict) else {})]
    L += ["", "## Passes", ""]
    if report.get("pipeline") is not None:
        L += [f"Pipeline: {pipeline_text(report['pipeline'])}", ""]
    L += ["| pass | ms | nodes before -> after | notes |", "|---|---|---|---|"]
    for p in report.get("passes", []):
        L.append(f"| {p['name']} | {p['ms']:.1f} | {p['nodes_before']} -> {p['nodes_after']} | "
                 f"{'; '.join(p['notes'])} |")
    if report.get("remat"):  # only when a memory budget was given
        L += [""] + remat_markdown(report["remat"])
    return "\n".join(L) + "\n"


def tune_markdown(t: dict) -> list[str]:
    """The "TVM tuning" section of ``report.md`` from the manifest's ``backend.tune`` dict."""
    how = {"tuned": f"tuned now: {t.get('trials_run')} trials run (asked {t.get('trials')}, seed {t.get('seed')}, "
                    f"{t.get('trials_per_iter')} per iteration, {t.get('threads')} TVM thread(s), "
                    f"{t.get('kernels')} kernel(s), {t.get('tune_seconds')} s)",
           "log": f"records applied from {t.get('log')}: 0 trials run",
           "artifact": "records already in the artifact applied (rebuild): 0 trials run"}.get(t.get("source"), "?")
    return ["## TVM tuning (meta-schedule)", "",
            f"- tuned batch: {t.get('batch')}" + (" (the default; set tvm.tune.batch)" if t.get("batch_default") else "")
            + f": static entry `main_b{t.get('batch')}`, called for batches of exactly that size; other sizes run "
              f"the untuned `main`",
            f"- {how}",
            f"- tuned library: the one built for CPU `{(t.get('target') or {}).get('mcpu')}` (the one this machine "
            f"loads); the artifact's other libraries, if any, are untuned",
            *([f"- kernels whose tuned schedule measured slower than (or as fast as) the default one: "
               f"{t['kernels_default_faster']} (no record kept: the default schedule stays)"]
              if t.get("kernels_default_faster") else []),
            f"- kernels scheduled from the records: {t.get('kernels_applied')}; records `{t.get('records')}/` "
            f"(digest {t.get('records_digest')}): a rebuild applies them without tuning"]


def hls4ml_markdown(info: dict, est: dict) -> list[str]:
    """The ``## hls4ml project`` section of ``report.md``: the settings hls4ml was given, warnings
    (reuse factors adjusted, a design over its part), the ports of the top function, and per IR
    node the hls4ml layer(s), weight headers, reuse factor and its estimate row with the share of
    the part (LUT/FF/DSP %), then where the testbench data came from."""
    part = est.get("part") if isinstance(est.get("part"), dict) else {}
    L = ["## hls4ml project", "",
         f"`{info.get('project_dir', 'hls4ml_prj')}/` (hls4ml {info.get('hls4ml_version', '?')}, backend "
         f"{info.get('backend')}): " + ("ASIC (Catapult, tech asic)" if info.get("backend") == "Catapult" else
                                        f"part `{info.get('part')}`") + f", clock period {info.get('clock_period')} ns, "
         f"`{info.get('io_type')}`, strategy {info.get('strategy')}, reuse factor "
         + (", ".join(f"{k}: {v}" for k, v in info["reuse_factor"].items()) if isinstance(info.get("reuse_factor"), dict)
            else str(info.get("reuse_factor"))) + ".", ""]
    for w in est.get("warnings") or []:
        L.append(f"- **WARNING**: {w}")
    L += ["", "| port | argument | hls4ml layer | IR value | type | shape | layout |", "|---|---|---|---|---|---|---|"]
    for kind, key in (("in", "device_inputs"), ("out", "device_outputs")):
        for d in info.get(key) or []:
            L.append(f"| {kind} | {d.get('port', d['layer'])} | {d['layer']} | {d['value']} | `{d['type']}` | {d['shape']} | "
                     + ("hls::stream, channels innermost" if info.get("io_type") == "io_stream" else "channels-last")
                     + " |")
    rows = {r["name"]: r for r in est.get("layers") or []}
    rfs = info.get("reuse_factors") or {}
    files = info.get("weight_files") or {}
    strat = info.get("layer_strategy") or {}  # hls4ml layer -> the strategy hls4ml built it with
    L += ["", "| IR node | hls4ml layer(s) | weight headers | RF | strategy | LUT | FF | DSP | BRAM18K | latency (cycles) | II | "
              "LUT / FF / DSP % of part |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for node, layers in (info.get("node_layers") or {}).items():
        r = rows.get(node, {})
        rf = rfs.get(node)
        rf_s = "" if rf is None else (f"{rf['requested']} -> {rf['used']}" if rf["requested"] != rf["used"]
                                      else str(rf["used"]))
        pct = " / ".join(f"{100.0 * r.get(k, 0) / part[k]:.2f}" for k in ("lut", "ff", "dsp")) \
            if r and all(part.get(k) for k in ("lut", "ff", "dsp")) else ""
        wf = ", ".join(f"`{f.rsplit('/', 1)[-1]}`" for lay in layers for f in files.get(lay, []))
        st = ", ".join(sorted({strat[lay] for lay in layers if lay in strat}))
        L.append(f"| {node} | {', '.join(layers) or '(no layer of its own: fused or a no-op)'} | {wf} | {rf_s} | {st} | {r.get('lut', '')} | "
                 f"{r.get('ff', '')} | {r.get('dsp', '')} | {r.get('bram_18k', '')} | {r.get('latency_cycles', '')} | "
                 f"{r.get('ii_cycles', '')} | {pct} |")
    tb = info.get("tb_data")
    if tb:
        L += ["", f"Testbench data (`tb_data/`): {tb['samples']} samples, {tb.get('golden', '')}"
              + ("" if tb.get("float32_exact", True) else "; some values need more than float32 (rounded by the "
                                                         "testbench's atof)") + "."]
    return L


def pipeline_text(pipeline: list[dict]) -> str:
    """A compile report's ``pipeline`` (:func:`qdeploy.passes.describe_pipeline`) as one line:
    pass names in order, each with its options that are set, e.g.
    ``dce -> quantize_inputs(calibration={'x': 'array[64, 16] float32'}) -> remat(budget=0.8)``."""
    out = []
    for p in pipeline:
        opts = {k: v for k, v in (p.get("options") or {}).items() if v is not None}
        out.append(p["name"] + (f"({', '.join(f'{k}={v!r}' for k, v in opts.items())})" if opts else ""))
    return " -> ".join(out)


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def remat_markdown(rm: dict) -> list[str]:
    """The ``## Memory (rematerialization)`` section of ``report.md`` as lines."""
    from .passes.memory import bytes_text

    def b(x):
        return "-" if x is None else bytes_text(x)
    before, after = rm.get("peak_before"), rm.get("peak_after")
    saved = (f", {100.0 * (before - after) / before:.1f}% lower" if before and after is not None and after < before
             else "")
    L = ["## Memory (rematerialization)", "",
         f"- budget: {b(rm.get('budget_bytes'))}, {rm.get('packing', '?')} packing",
         f"- peak activation memory: {b(before)} -> {b(after)}{saved}",
         f"- compute overhead: {_num(rm.get('overhead_pct'), '.2f')}% "
         f"(cost model: {rm.get('cost', 'macs')})"
         + (f", proven lower bound {rm['bound_overhead_pct']:.2f}%" if rm.get("bound_overhead_pct") is not None
            and rm.get("status") != "optimal" else ""),
         f"- solver: {rm.get('method', '?')}, status {rm.get('status', '?')}, solve time {_num(rm.get('solve_s'), '.2f')} s"
         + (f" (limit {rm['time_limit_s']:g} s, at most {rm.get('max_copies', '?')} copies per node)"
            if rm.get("time_limit_s") is not None else "")]
    rec = rm.get("recomputed") or []
    if rec:
        nb, na = rm.get("nodes_before"), rm.get("nodes_after")
        L.append(f"- recomputed: {len(rec)} node execution(s) ({', '.join(rec)})"
                 + (f"; nodes {nb} -> {na}" if nb is not None and na is not None else ""))
    elif rm.get("status") == "not-needed":
        L.append("- recomputed: none (the unrematerialized peak already fits the budget)")
    for note in rm.get("notes") or []:
        L.append(f"- note: {note}")
    return L
