"""Building and choosing the ``tvm-llvm`` libraries of an artifact: one compiled library per LLVM
target (:func:`build_library`: lowering, the schedule, tuning records, ``export_library``), what a
build recorded (:func:`build_meta`) and which CPU variant to load here (:func:`choose_library`)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ...compiler.errors import CompileError
from ...compiler.ir.graph import Graph
from . import target as _target
from .schedule import MIN_PARALLEL_WORK, schedule_cpu
from .target import library_target, variant_runs_here
from .tune import TUNE_DIR, apply_records, record_count, static_batches

__all__ = ["BUILD_FILE", "scheduled", "parallel_opts", "build_library", "build_meta", "choose_library"]

BUILD_FILE = "tvm_build.json"


def scheduled(mod, tgt, info: dict, fused: bool = False):
    """``mod`` ready for ``tvm.compile`` under the schedule options of ``info`` (call inside
    the build's ``PassContext``): unchanged for ``schedule: "none"``; for ``"auto"`` fused by
    ``relax.get_pipeline("zero")`` (legalize, FuseOps, FuseTIR; skipped when ``fused``, e.g. by
    :func:`.tune.apply_records`) and scheduled by :func:`.schedule.schedule_cpu` with
    ``parallel`` / ``min_parallel_work`` (kernels already scheduled are left alone)."""
    if str(info.get("schedule", "none")) == "none":
        return mod
    from tvm import relax

    if not fused:
        with tgt:
            mod = relax.get_pipeline("zero")(mod)
    return schedule_cpu(mod, parallel=bool(info.get("parallel", True)),
                        min_parallel_work=int(info.get("min_parallel_work", MIN_PARALLEL_WORK)))


def parallel_opts(opts: dict) -> dict:
    """The validated ``parallel`` / ``min_parallel_work`` options of config ``tvm:``."""
    par = opts.get("parallel", True)
    if not isinstance(par, bool):
        raise CompileError(f"tvm.parallel must be true or false, got {par!r}")
    mpw = opts.get("min_parallel_work", MIN_PARALLEL_WORK)
    if isinstance(mpw, bool) or not isinstance(mpw, int) or mpw < 0:
        raise CompileError(f"tvm.min_parallel_work must be an integer >= 0 (element operations), got {mpw!r}")
    return {"parallel": par, "min_parallel_work": mpw}


def build_library(out: Path, graph: Graph, target: dict, opt_level: int, schedule: str, par: dict, b1: bool,
                   exec_mode: str, cc: str | None, tune: dict | None = None) -> tuple[str, dict]:
    """Compile ``graph`` for one LLVM ``target`` into ``out/lib_<hash>.so``.

    ``tune``: the tuning dict (:mod:`.tune`, records in ``out/tune/``) when this library is the
    tuned one: it gets the static entry ``main_b<batch>`` and the recorded schedules
    (``kernels_applied`` and ``kernels_digest`` are set in ``tune``).

    ``exec_mode``: Relax VM ``"bytecode"`` (interpreted) or ``"compiled"`` (the VM functions are
    generated as C code and linked into the library: less per-call dispatch; ``relax.build``'s
    ``exec_mode``).  Returns ``(file name, library_target(...))``.

    Raises:
        CompileError: when TVM fails to compile or export.
    """
    import tvm
    from tvm import relax

    from .lower import lower

    # unchanged names for existing "none"/bytecode builds; "auto2": the parallel schedule
    sched_key = ("" if schedule == "none" else f"|{schedule}2|{par['parallel']}|{par['min_parallel_work']}") + \
        ("|b1" if b1 else "") + ("" if exec_mode == "bytecode" else f"|{exec_mode}") + \
        (f"|tune{tune['batch']}|{tune['records_digest']}" if tune else "")
    key = hashlib.sha256(f"{graph.digest()}|{json.dumps(target, sort_keys=True)}|{opt_level}|{tvm.__version__}"
                         f"{sched_key}".encode()).hexdigest()[:16]
    lib_name = f"lib_{key}.so"
    try:
        mod = lower(graph, batch1_entry=b1, static_batches=static_batches(tune))
        tgt = tvm.target.Target(target)
        with tvm.transform.PassContext(opt_level=opt_level):
            if tune:  # fused, with the recorded schedules applied to the tuned kernels
                mod, applied, tune["kernels_digest"] = apply_records(mod, tgt, out / TUNE_DIR)
                if not applied and record_count(out / TUNE_DIR):
                    raise CompileError(f"tvm.tune: none of the tuning records in {tune.get('log') or TUNE_DIR} "
                                       f"matches a kernel of this model at batch {tune['batch']} (records of "
                                       f"another model?)")
                tune["kernels_applied"] = len(applied)
            ex = relax.build(scheduled(mod, tgt, {"schedule": schedule, **par}, fused=bool(tune)), target=tgt,
                             exec_mode=exec_mode)
        if cc:
            from tvm.support.cc import cross_compiler as _fcompile

            ex.export_library(str(out / lib_name), fcompile=_fcompile(cc))
        else:
            ex.export_library(str(out / lib_name))
        return lib_name, library_target(ex)
    except CompileError:
        raise
    except Exception as e:
        raise CompileError(f"TVM build failed ({target.get('mcpu')}): {type(e).__name__}: "
                           f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}") from e


def build_meta(out: Path, info: dict | None) -> dict:
    """What :meth:`TvmBackend.build` recorded: ``tvm_build.json`` overlaid with ``info``."""
    meta = json.loads((out / BUILD_FILE).read_text()) if (out / BUILD_FILE).exists() else {}
    meta.update({k: v for k, v in (info or {}).items() if v is not None})
    return meta


def choose_library(meta: dict, variant: str | None) -> tuple[str | None, str]:
    """``(library file, mcpu)`` to load: ``variant`` (or ``$QDEPLOY_TVM_VARIANT``) when given,
    else the highest CPU variant that runs here, else the portable library.

    Raises:
        CompileError: a forced variant that the artifact does not have or this CPU cannot run.
    """
    import os

    base = str((meta.get("target") or {}).get("mcpu", ""))
    variants = list(meta.get("cpu_variants") or ())
    want = variant or os.environ.get("QDEPLOY_TVM_VARIANT") or None
    if want:
        if want == base:
            return meta.get("library"), base
        for v in variants:
            if v["mcpu"] == want:
                if not variant_runs_here(v):
                    missing = sorted(set(v.get("requires", ())) - set(_target.host_cpu_flags() or ()))
                    raise CompileError(f"TVM library variant {want} cannot run on this CPU (missing CPU flags: "
                                       f"{', '.join(missing) or 'not an x86-64 Linux host'})")
                return v["library"], want
        raise CompileError(f"this artifact has no TVM library for CPU {want!r} (it has: "
                           f"{', '.join([base] + [v['mcpu'] for v in variants])}; QDEPLOY_TVM_VARIANT / variant)")
    for v in reversed(variants):
        if variant_runs_here(v):
            return v["library"], v["mcpu"]
    return meta.get("library"), base
