"""Fidelity to the source model: run the *source* (the user's QONNX/ONNX model through qonnx's
executor, onnxruntime underneath; or the user's PyTorch/Brevitas module itself, in eval mode) on
the golden inputs in its own layout and compare it with the reference interpreter's outputs.

Reference-vs-target checks prove the backends agree with our interpreter; this check proves the
interpreter (and therefore the import, the passes and the layout handling) agrees with what the
user trained.  :func:`check_source` is called by :func:`qdeploy.api.compile` on every compile; its
dict is the report's ``fidelity`` section and :func:`fidelity_sentence` its one-line summary.

The source is fed the golden arrays in the source's layout (channels-first for ONNX and torch).
Where the model or the user fixed the compiled input's fixed-point type, each value is cast into it
first (the same elementwise rounding :func:`qdeploy.compiler.reference.prepare_feeds` applies; the
number of values that rounding changed is reported as ``inputs_rounded``): that rounding is the
model's or the user's own.  Where the type is only hls4ml's default (a model without an input
quantizer, no ``input_type`` given, calibration data with no exact type), the source gets the
*unrounded* values, so any output that the guessed input rounding changes is a mismatch against
the source (``inputs_rounded_by_default`` says how many input values that type rounds, and the
failure note says to set ``input_type``): nothing the user did not choose is hidden.

Comparison rules (per output value):

* a fixed-point output *differs* when our exact value, cast to the source output's float dtype,
  is not the source value bit for bit; the error in output LSBs is ``|source - ours| / 2**-F``.
* a float32 output (unquantized tail) differs when ``|source - ours| > FLOAT_RTOL * max(1, max
  |source|)`` (float32 sums in another order differ by a few ulps).

Differences are explained only when there are some (the default path stays one source run): the
source is re-evaluated in float64 (the module's ``.double()`` copy; for ONNX a float64 copy of the
model, :mod:`qdeploy.source_run`).  A differing value that the float64 source reproduces is
"float32 rounding in the source" (e.g. a float32 sum of products that rounds across a quantizer's
rounding boundary while our integer arithmetic is exact); any other differing value is a real
mismatch, and when the float64 run fails every difference stays unclassified.  Real mismatches
and unclassified differences fail the check (``ok`` False); ties alone do not.
"""
from __future__ import annotations

import os
import time

import numpy as np

from .compiler.ir.graph import Graph
from .compiler.ir.types import FixedType
from .runtime.compiled import from_ir_layout

from .source_onnx import FLOAT_RTOL, batch_plan, run_onnx_source  # noqa: F401  (re-exported)


def is_onnx_source(model) -> bool:
    """True when ``model`` (what :func:`qdeploy.api.load` accepts) is a QONNX/ONNX model the
    fidelity check can run: an ``.onnx`` path, a path to an existing model file, or a ModelProto."""
    if isinstance(model, (str, os.PathLike)):
        s = os.fspath(model)
        return s.lower().endswith(".onnx") or os.path.isfile(s)
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx is a dependency
        return False
    return isinstance(model, onnx.ModelProto)


def input_casts(graph_src: Graph, graph: Graph) -> dict[str, FixedType]:
    """``{input: fixed-point type}`` the compiled graph casts each golden input into before any
    layer sees it: the input's own type when it is fixed-point, or the ``to`` type of a
    ``Quantize`` the passes inserted right after the float input (``quantize_inputs``: the
    artifact's declared input type, noted in the report)."""
    src_nodes = {n.name for n in graph_src.nodes}
    out = {}
    for name in graph.inputs:
        t = graph.value(name).dtype
        if isinstance(t, FixedType):
            out[name] = t
            continue
        cons = graph.consumers(name)
        if cons and all(c.op == "Quantize" and c.name not in src_nodes for c in cons):
            types = {c.attrs["to"] for c in cons}
            if len(types) == 1:
                out[name] = types.pop()
    return out


def source_inputs(graph_src: Graph, graph: Graph, feeds_ir: dict, user: dict | None) -> tuple[dict, int, int]:
    """The golden inputs as the source model takes them.

    Args:
        graph_src: the imported graph (before passes): its inputs and ``meta['input_perms']``.
        graph: the compiled graph (after passes): the input types the artifact casts into.
        feeds_ir: ``{input: (n, *IR shape) real array}``, the golden feeds in IR layout.
        user: ``{input: array}`` as the user gave them in the source layout (batch first, already
            checked against the source shape by :func:`qdeploy.api.golden_feeds`), or None (random
            golden inputs, or arrays the user declared channels-last: the IR feeds are then
            permuted back to the source layout).
    Returns:
        ``({input: (n, *source shape) float32 array}, number of input values the cast into the
        compiled input type (:func:`input_casts`) changed and the source saw rounded, number of input
        values the artifact rounds to a *default* input type (``graph.meta["default_input_types"]``)
        while the source sees them unrounded)``.  Nothing is inferred from shapes.
    """
    perms = graph_src.meta.get("input_perms") or {}
    guessed = graph.meta.get("default_input_types") or {}
    out, rounded, by_default = {}, 0, 0
    for name in graph_src.inputs:
        x_ir = np.asarray(feeds_ir[name])
        perm = perms.get(name)
        inv = list(np.argsort(perm)) if perm is not None and len(perm) == x_ir.ndim else None
        src_shape = tuple(np.transpose(x_ir[:1], inv).shape[1:]) if inv is not None else x_ir.shape[1:]
        u = None if user is None else user.get(name)
        if u is not None:
            x = np.asarray(u).reshape((-1, *src_shape))  # declared source layout (a lone sample gets its batch axis)
        else:
            x = np.transpose(x_ir, inv) if inv is not None else x_ir
        t = input_casts(graph_src, graph).get(name)
        if t is not None:
            q = t.to_real(t.quantize_real(x))
            if name in guessed:
                by_default += int(np.count_nonzero(q != x))
            else:
                rounded += int(np.count_nonzero(q != x))
                x = q
        out[name] = np.asarray(x, dtype=np.float32)
    return out, rounded, by_default


def _our_outputs(graph: Graph, ref: dict, source: dict):
    """``[(output, IR type, our real array in the source layout, source key)]``."""
    res = []
    for pos, o in enumerate(graph.outputs):
        t = graph.value(o).dtype
        a = np.asarray(ref[o])
        ours = t.to_real(a) if isinstance(t, FixedType) else a.astype(np.float64)
        res.append((o, t, from_ir_layout(graph, o, ours), o if o in source else list(source)[pos]))
    return res


def compare_to_source(graph: Graph, ref: dict, source: dict, source64: dict | None = None) -> dict:
    """Compare the reference interpreter's outputs with the source model's.

    Args:
        graph: the compiled graph; its outputs' types and ``meta['output_perms']``.
        ref: ``{output: (n, *IR shape)}`` reference runtime arrays (int64 codes for fixed types).
        source: ``{output: (n, *source shape)}`` the source model's outputs (float32).
        source64: the same outputs of the source re-evaluated in float64, or None (not run or
            failed): each differing value is then *classified* -- "float32 rounding in the source"
            when the float64 value equals ours (fixed-point outputs: exactly; float outputs: within
            the float tolerance), a real mismatch otherwise.  Without it every differing value is
            unclassified.
    Returns:
        ``{samples, exact_matches (samples with every output equal / within tolerance), mismatches
        (samples with a difference), differing_values, float32_rounding (differing values the float64
        source explains), real_mismatches (values it does not), unclassified (values not classified),
        real_mismatch_samples, max_abs_error, max_lsb_error (None without fixed-point outputs),
        argmax_agreement (fraction, None when no output is a (n, k>1) score vector), float_rtol,
        per_output: {name: {type, mismatches, differing_values, float32_rounding, real_mismatches,
        max_abs_error, max_lsb_error, argmax_agreement}}, ok (no real or unclassified difference)}``.
    Raises:
        ValueError: an output missing from the source or of another shape (names it).
    """
    per, bad, real_s, n = {}, None, None, 0
    max_err, max_lsb, agree = 0.0, None, None
    tot = {"differing_values": 0, "float32_rounding": 0, "real_mismatches": 0, "unclassified": 0}
    for o, t, ours, key in _our_outputs(graph, ref, source):
        s = np.asarray(source[key])
        if s.shape != ours.shape:
            raise ValueError(f"output {o!r}: source shape {s.shape} != compiled {ours.shape}")
        n = s.shape[0]
        err = np.abs(s.astype(np.float64) - ours)
        e = float(np.max(err, initial=0.0))
        row = {"type": str(t), "max_abs_error": e}
        tol = FLOAT_RTOL * max(1.0, float(np.max(np.abs(s), initial=0.0)))
        if isinstance(t, FixedType):
            sd = s.dtype if s.dtype.kind == "f" else np.dtype(np.float64)
            dmask = ours.astype(sd) != s.astype(sd)
            row["max_lsb_error"] = e / t.lsb
            max_lsb = max(max_lsb or 0.0, row["max_lsb_error"])
        else:
            dmask = err > tol
            row["max_lsb_error"] = None
        if source64 is not None and dmask.any():
            s64 = np.asarray(source64[key], dtype=np.float64).reshape(ours.shape)
            agree64 = (s64 == ours) if isinstance(t, FixedType) else (np.abs(s64 - ours) <= tol)
            tie = dmask & agree64
            realm = dmask & ~agree64
            unc = np.zeros_like(dmask)
        else:
            tie = np.zeros_like(dmask)
            realm = np.zeros_like(dmask)
            unc = dmask
        if s.ndim == 2 and s.shape[1] > 1:
            row["argmax_agreement"] = float(np.mean(s.argmax(1) == ours.argmax(1)))
            agree = row["argmax_agreement"] if agree is None else min(agree, row["argmax_agreement"])
        else:
            row["argmax_agreement"] = None
        diff = dmask.reshape(n, -1).any(axis=1)
        rs = (realm | unc).reshape(n, -1).any(axis=1)
        counts = {"differing_values": int(dmask.sum()), "float32_rounding": int(tie.sum()),
                  "real_mismatches": int(realm.sum()), "unclassified": int(unc.sum())}
        row.update(mismatches=int(diff.sum()), **counts)
        for k, v in counts.items():
            tot[k] += v
        per[o] = row
        bad = diff if bad is None else (bad | diff)
        real_s = rs if real_s is None else (real_s | rs)
        max_err = max(max_err, e)
    mism = int(bad.sum()) if bad is not None else 0
    return {"samples": int(n), "exact_matches": int(n) - mism, "mismatches": mism, **tot,
            "real_mismatch_samples": int(real_s.sum()) if real_s is not None else 0,
            "max_abs_error": max_err, "max_lsb_error": max_lsb, "argmax_agreement": agree,
            "float_rtol": FLOAT_RTOL, "per_output": per,
            "ok": tot["real_mismatches"] == 0 and tot["unclassified"] == 0}


def _run_source(model, graph_src: Graph, inputs: dict, double: bool) -> tuple[dict, str, str]:
    """``({source output: array}, mode, executor description)`` of ``model`` on ``inputs``
    (float64 when ``double``).  Raises whatever the executor raises."""
    from .source_run import run_torch_source
    if is_onnx_source(model):
        return run_onnx_source(model, inputs, double=double, executor=True)
    arrays = [inputs[k] for k in graph_src.inputs]
    outs, mode = run_torch_source(model, arrays, double=double)
    if len(outs) != len(graph_src.outputs):
        from .source_run import SourceRunError
        raise SourceRunError(f"the module returns {len(outs)} output tensor(s), the exported graph has "
                             f"{len(graph_src.outputs)}; outputs are matched by position only when the counts agree")
    return dict(zip(graph_src.outputs, outs)), mode, ("PyTorch module, eval(), .double() copy" if double
                                                      else "PyTorch module itself, eval(), torch.no_grad()")


def check_source(model, graph_src: Graph, graph: Graph, feeds_ir: dict, user: dict | None, ref: dict,
                 enabled: bool = True) -> dict:
    """The report's ``fidelity`` section: the source model run on the golden inputs vs ``ref``.

    Args:
        model: what the user compiled (see :func:`qdeploy.api.load`): QONNX/ONNX files and
            ModelProtos run as :func:`qdeploy.source_onnx.run_onnx_source` runs them (one onnxruntime
            session, else qonnx's executor), a ``torch.nn.Module`` (Brevitas or plain) is
            called itself (:func:`qdeploy.source_run.run_torch_source`); other sources are not run.
        graph_src, graph, feeds_ir, user: see :func:`source_inputs`.
        ref: the reference interpreter's outputs on the golden feeds (runtime arrays, IR layout).
        enabled: False: the check is skipped at the user's request (``--no-source-check``).
    Returns:
        ``{"checked": False, "reason": ...}`` when skipped, when the source is neither an ONNX model
        nor a module, or when it cannot be run; else :func:`compare_to_source`'s dict plus
        ``checked: True``, ``source`` (the executor), ``mode`` (batched / per-sample),
        ``inputs_rounded``, ``time_s``, ``classification`` (how differing values were classified,
        or why they were not: only computed when some value differs) and, when ``ok`` is False,
        ``note`` (why the differences fail).
    """
    from .source_run import SourceRunError, is_torch_module
    if not enabled:
        return {"checked": False, "reason": "skipped (--no-source-check / source_check=False)"}
    if isinstance(model, Graph):
        return {"checked": False, "reason": "the model was given as an IR Graph (a stage of a multi-stage program, or "
                                            "a graph built in Python): there is no source model to run"}
    if not (is_onnx_source(model) or is_torch_module(model)):
        return {"checked": False, "reason": f"source of type {type(model).__name__} is not run (only QONNX/ONNX "
                                            f"models and torch/Brevitas modules are)"}
    t0 = time.perf_counter()
    inputs, rounded, by_default = source_inputs(graph_src, graph, feeds_ir, user)
    try:
        outs, mode, src = _run_source(model, graph_src, inputs, False)
    except Exception as e:  # the source executor, not the compile, failed: say so, do not hide it
        what = "the ONNX source (onnxruntime / qonnx execute_onnx)" if is_onnx_source(model) else "the PyTorch module"
        return {"checked": False, "reason": f"{what} failed on the golden inputs: "
                                            + (str(e) if isinstance(e, SourceRunError) else
                                               " ".join(f"{type(e).__name__}: {e}".split())[:300])}
    try:
        res = compare_to_source(graph, ref, outs)
    except ValueError as e:  # an output of another shape: nothing matches
        n = next(iter(inputs.values())).shape[0]
        res = {"samples": n, "exact_matches": 0, "mismatches": n, "max_abs_error": float("inf"),
               "max_lsb_error": None, "argmax_agreement": None, "float_rtol": FLOAT_RTOL, "per_output": {},
               "ok": False, "error": str(e)}
    cls = ("nothing to classify (no value differs)" if not res.get("max_abs_error") else
           f"nothing to classify (float outputs within the float tolerance: {FLOAT_RTOL:g} x max(1, max |output|); "
           f"fixed-point outputs identical)")
    if res.get("differing_values"):
        try:
            outs64, _, src64 = _run_source(model, graph_src, inputs, True)
            res = compare_to_source(graph, ref, outs, outs64)
            cls = f"re-evaluated in float64 ({src64})"
        except Exception as e:
            why = str(e) if isinstance(e, SourceRunError) else " ".join(f"{type(e).__name__}: {e}".split())[:300]
            cls = f"not classified: the float64 re-evaluation of the source failed ({why})"
    if by_default:
        res["inputs_rounded_by_default"] = by_default
        res["default_input_types"] = dict(graph.meta.get("default_input_types") or {})
    res.update({"checked": True, "source": src, "mode": mode, "inputs_rounded": rounded, "classification": cls,
                "time_s": time.perf_counter() - t0})
    if not res["ok"]:
        res["note"] = res.pop("error", None) or _failure_note(res)
    return res


def _failure_note(res: dict) -> str:
    """Why a fidelity result fails: real mismatches, or differences that could not be classified;
    with the input type the artifact guessed when it rounded golden inputs."""
    if res.get("unclassified"):
        s = f"{res['unclassified']} differing value(s) {res['classification']}, so every difference fails"
    else:
        s = (f"{res['real_mismatches']} value(s) in {res['real_mismatch_samples']} sample(s) differ from the source "
             f"and its float64 re-evaluation too (real mismatches, not float32 rounding)")
    if res.get("inputs_rounded_by_default"):
        types = ", ".join(f"{k}: {v}" for k, v in res.get("default_input_types", {}).items())
        s += (f"; the artifact rounds {res['inputs_rounded_by_default']} golden input value(s) to a default input type "
              f"({types}; the model has no input quantizer and no input_type was given): set input_type in the config "
              f"(or --input-type) to the precision your inputs have, or accept with --allow-inexact")
    return s


def tie_sentence(fid: dict) -> str:
    """How the differing values were explained, e.g. ``"244 differing value(s): 244 float32 rounding in
    the source (the float64 source agrees with ours), 0 real mismatch(es)"``; "" when none differs."""
    d = fid.get("differing_values")
    if not d:
        return ""
    s = f"{d} differing value(s): {fid['float32_rounding']} float32 rounding in the source (the float64 source " \
        f"agrees with ours), {fid['real_mismatches']} real mismatch(es)"
    if fid.get("unclassified"):
        s += f", {fid['unclassified']} not classified"
    return s


def fidelity_sentence(fid: dict) -> str:
    """One line about a ``fidelity`` dict from :func:`check_source`."""
    if not fid.get("checked"):
        return f"NOT checked: {fid.get('reason', 'no source model')}"
    s = (f"{fid['samples']} golden samples, {fid['exact_matches']} matching, max abs error {fid['max_abs_error']:.3g}")
    if fid.get("max_lsb_error") is not None:
        s += f" ({fid['max_lsb_error']:.3g} LSB)"
    if fid.get("argmax_agreement") is not None:
        s += f", argmax agreement {fid['argmax_agreement']:.2%}"
    s += f" [{fid['source']}, {fid['time_s']:.2f} s]"
    if fid.get("inputs_rounded"):
        s += f"; {fid['inputs_rounded']} golden input value(s) rounded to the artifact's input type first"
    if fid.get("inputs_rounded_by_default") and fid["ok"]:  # (a failure note says it, with the remedy)
        s += (f"; the artifact rounds {fid['inputs_rounded_by_default']} golden input value(s) to its default input "
              f"type (the source sees them unrounded)")
    ties = tie_sentence(fid)
    if fid["ok"] and not ties:
        return s + ": matches the source"
    if fid["ok"]:
        return s + f"; {ties}: only float32 ties, accepted"
    inexact = "; INEXACT, accepted by --allow-inexact" if fid.get("accepted_inexact") else ""
    return s + f": DIFFERS from the source; {fid['note']}" + (f" [{ties}]" if ties else "") + inexact


def fidelity_markdown(fid: dict) -> list[str]:
    """The ``report.md`` lines of a ``fidelity`` dict: a heading, :func:`fidelity_sentence` and a
    per-output table."""
    L = ["## Fidelity to the source model", "", fidelity_sentence(fid)]
    if fid.get("checked") and fid.get("per_output"):
        L += ["", f"Differences: {fid.get('classification', '')}.", "",
              "| output | type | mismatching samples | differing values | float32 rounding | real mismatches "
              "| max abs error | max LSB error | argmax agreement |", "|---|---|---|---|---|---|---|---|---|"]
        for o, r in fid["per_output"].items():
            lsb = "-" if r["max_lsb_error"] is None else f"{r['max_lsb_error']:.3g}"
            am = "-" if r["argmax_agreement"] is None else f"{r['argmax_agreement']:.2%}"
            L.append(f"| {o} | {r['type']} | {r['mismatches']} | {r.get('differing_values', '-')} | "
                     f"{r.get('float32_rounding', '-')} | {r.get('real_mismatches', '-')} | {r['max_abs_error']:.3g} | "
                     f"{lsb} | {am} |")
    return L
