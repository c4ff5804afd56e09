"""Compile one corpus model for one target and classify the outcome.

Outcomes (:class:`Outcome.kind`):

* ``exact``: ``qdeploy.api.compile`` succeeded, the report says the target equals the reference
  interpreter bit for bit (``exactness.bit_exact``), the report's ``fidelity`` section (when it
  could run the source) has 0 mismatches, AND the compiled artifact's outputs
  (``CompiledModel.predict`` on the golden inputs, source layout) equal the source model's
  outputs (the Brevitas module itself / onnxruntime on the quantized file) bit for bit as
  float32 on every golden sample (an unquantized float output: within the report's float
  tolerance): an oracle independent of qdeploy's own fidelity check.  The compile runs with
  ``allow_inexact=True`` so that a difference from the source is judged here, not raised.
* ``ties``: as ``exact`` except that some values differ from the float32 source, and the source
  evaluated in float64 (a ``.double()`` copy of the module; for onnxruntime sources the report's
  own float64 re-evaluation) gives exactly our value at every one of them: float32 rounding in
  the source at a quantizer's rounding boundary, our integer arithmetic being exact.
* ``error``: a clear error: a one-line ``QDeployError`` naming a model node, not a wrapped
  library exception; the message is recorded.
* ``FAIL``: anything else: a library traceback, an error naming no node, a difference from the
  reference or from the source.
"""
from __future__ import annotations

import contextlib
import functools
import io
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qdeploy.compiler.errors import CompileError, QDeployError
from qdeploy.compiler.ir.types import FixedType

TARGETS = ("reference", "tvm-llvm", "hls4ml")

EXACT, TIES, ERROR, FAIL = "exact", "ties", "error", "FAIL"


@dataclass
class Outcome:
    """``kind`` (exact / error / FAIL), ``detail`` (one line: the error message, or what differs),
    ``seconds`` (compile + checks), ``fidelity`` (how the source was compared)."""

    kind: str
    detail: str = ""
    seconds: float = 0.0
    fidelity: str = ""


def _one_line(s: str, n: int = 300) -> str:
    return " ".join(str(s).split())[:n]


def classify_error(e: BaseException) -> Outcome:
    """``error`` for a one-line QDeployError naming a node and not wrapping a library exception;
    ``FAIL`` (with the first line of the exception) otherwise."""
    if isinstance(e, QDeployError):
        msg = e.one_line() if hasattr(e, "one_line") else str(e)
        cause = e.__cause__ or getattr(e, "cause", None)
        wrapped = cause is not None and not isinstance(cause, QDeployError)
        if isinstance(e, CompileError) and wrapped:
            return Outcome(FAIL, f"wrapped library error: {_one_line(msg)}")
        if "\n" in str(e):
            return Outcome(FAIL, f"multi-line error: {_one_line(msg)}")
        if not (e.node or "node" in msg.lower()):
            return Outcome(FAIL, f"error names no node: {_one_line(msg)}")
        return Outcome(ERROR, _one_line(msg))
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return Outcome(FAIL, f"{type(e).__name__}: {_one_line(e, 240)}{where}")


def compare_to_source(got: list[np.ndarray], want: list[np.ndarray], floats=None,
                      want64: list[np.ndarray] | None = None) -> dict:
    """Compare artifact outputs with source outputs, value by value.

    A fixed-point output is compared as float32 bit for bit (the source computes in float32; an
    exact fixed-point value the source also produces is the same float32).  An output flagged in
    ``floats`` (an unquantized float32 tail) may differ by ``qdeploy.fidelity.FLOAT_RTOL`` times
    ``max(1, max |source|)``: the rule of the report's fidelity check (float32 sums in another order).
    ``want64``: the source evaluated in float64; a differing value it reproduces (exactly; float
    outputs within the tolerance) is a float32 tie of the source, not an error of ours.

    Returns:
        ``{samples, differing_samples, differing_values, ties (values want64 explains),
        max_abs_error, note (shape/count problem, else "")}``.
    """
    from qdeploy.fidelity import FLOAT_RTOL
    n = len(want[0])
    res = {"samples": n, "differing_samples": 0, "differing_values": 0, "ties": 0, "max_abs_error": 0.0, "note": ""}
    if len(got) != len(want):
        return {**res, "differing_samples": n, "max_abs_error": float("inf"),
                "note": f"{len(got)} outputs, source has {len(want)}"}
    floats = list(floats) if floats is not None else [False] * len(want)
    bad = np.zeros(n, bool)
    for k, (g, w, is_float) in enumerate(zip(got, want, floats)):
        g, w = np.asarray(g, np.float64), np.asarray(w)
        if g.shape != w.shape:
            return {**res, "differing_samples": n, "max_abs_error": float("inf"),
                    "note": f"output shape {g.shape} != source {w.shape}"}
        tol = FLOAT_RTOL * max(1.0, float(np.max(np.abs(w), initial=0.0)))
        if is_float:
            d = np.abs(g - w.astype(np.float64)) > tol
        else:
            d = g.astype(np.float32) != w.astype(np.float32)
        bad |= d.reshape(n, -1).any(axis=1)
        res["differing_values"] += int(d.sum())
        res["max_abs_error"] = max(res["max_abs_error"], float(np.max(np.abs(g - w.astype(np.float64)), initial=0.0)))
        if want64 is not None and d.any():
            w64 = np.asarray(want64[k], np.float64).reshape(g.shape)
            agree = np.abs(w64 - g) <= tol if is_float else w64 == g
            res["ties"] += int((d & agree).sum())
    res["differing_samples"] = int(bad.sum())
    return res


@functools.lru_cache(maxsize=None)
def imported(name: str):
    """``qdeploy.api.load`` of corpus entry ``name``'s Brevitas module (the IR graph), once per
    process; an import error is returned, not raised."""
    import qdeploy.api as api
    from .registry import built
    b = built(name)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return api.load(b.model, b.example)
    except Exception as e:  # classified by the caller, like a compile error
        return e


def run_one(name: str, target: str, work: Path | None = None) -> Outcome:
    """Build corpus entry ``name`` (cached), compile it for ``target`` into ``work`` (a temporary
    folder by default) and classify the outcome (see the module docstring).  Never raises for a
    model or compiler problem: that is the outcome.

    The ``reference`` target compiles the source itself (the Brevitas module or the ONNX file),
    as a user does; other targets compile a Brevitas module's graph imported once per process
    by the same ``qdeploy.api.load`` (a torch export costs seconds), and are then judged
    against the module itself all the same.  A module whose import fails is not exported again:
    that error is every target's outcome."""
    import qdeploy.api as api
    from .registry import built
    t0 = time.perf_counter()
    b = built(name)
    model = b.model
    if b.example is not None:  # a module: an import error is the outcome of every target
        g = imported(name)
        if isinstance(g, Exception):
            out = classify_error(g)
            out.seconds = time.perf_counter() - t0
            return out
        model = b.model if target == "reference" else g
    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qdeploy-corpus-")))
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                res = api.compile(model, target, Path(work) / f"{name}-{target}", golden=b.golden,
                                  example_input=b.example, force=True, allow_inexact=True)
                got = res.load().predict(b.golden)
        except Exception as e:  # the outcome under test: every exception is classified
            out = classify_error(e)
            out.seconds = time.perf_counter() - t0
            return out
        got = got if isinstance(got, list) else [got]
        want = b.run_source(b.golden)
        floats = [not isinstance(res.graph.value(o).dtype, FixedType) for o in res.graph.outputs]
        run64 = None if b.run_source64 is None else (lambda: b.run_source64(b.golden))
        out = _judge(res.report, got, want, floats, run64)
        out.seconds = time.perf_counter() - t0
        return out


def _judge(report: dict, got, want, floats, run64) -> Outcome:
    ex = report.get("exactness", {})
    if not ex.get("bit_exact"):
        return Outcome(FAIL, f"target differs from reference: {ex.get('mismatches')}/{ex.get('samples')} samples, "
                             f"max abs error {ex.get('max_abs_error')}")
    fid = report.get("fidelity") or {}
    if fid.get("checked") and not fid.get("ok"):
        return Outcome(FAIL, f"report fidelity: {fid.get('mismatches')}/{fid.get('samples')} samples differ from "
                             f"the source, max abs error {fid.get('max_abs_error'):.3g} "
                             f"({fid.get('max_lsb_error')} LSB)")
    c = compare_to_source(got, want, floats)
    how = "report fidelity + artifact vs source" if fid.get("checked") else "artifact vs source (report: not checked)"
    if c["note"]:
        return Outcome(FAIL, f"artifact vs source: {c['note']}")
    if not c["differing_values"]:
        return Outcome(EXACT, "", fidelity=how)
    if run64 is not None:  # our own float64 evaluation of the source explains the differences?
        c = compare_to_source(got, want, floats, run64())
        explained = c["ties"] == c["differing_values"]
    else:  # onnxruntime source: the report's float64 re-evaluation classified them
        explained = (fid.get("checked") and fid.get("ok") and fid.get("float32_rounding", 0) >= c["differing_values"])
        c["ties"] = c["differing_values"] if explained else 0
    msg = (f"{c['differing_values']} value(s) in {c['differing_samples']}/{c['samples']} samples differ from the "
           f"float32 source (max abs error {c['max_abs_error']:.3g}), {c['ties']} of them reproduced by the source "
           f"in float64")
    if explained:
        return Outcome(TIES, msg + ": float32 rounding in the source", fidelity=how)
    return Outcome(FAIL, "artifact vs source: " + msg)
