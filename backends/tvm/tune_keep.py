"""Keep a tuned kernel only when it is faster than the default schedule, measured now.

Meta-schedule records carry the run time each candidate had *during the search*; on a shared
machine that figure and one measured later are not comparable.  :func:`keep_faster` therefore
measures, for every tuned kernel, the fixed default schedule (:func:`.schedule.schedule_cpu`) and
the best record's trace side by side (:func:`measure_now`: one local runner, interleaved rounds,
best of each) and keeps the record only when the tuned kernel wins (TVM docs: ``meta_schedule``
``LocalRunner``, ``Trace.apply_to_schedule``).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"


KEEP_ROUNDS = 3  # interleaved rounds of the keep-if-faster measurement (best of each)


def mean_secs(secs) -> float | None:
    """Mean of a runner result's ``run_secs`` (seconds per run), None when it has none."""
    vals = [float(s) for s in (secs or [])]
    return sum(vals) / len(vals) if vals else None


def measure_now(mod, trace, target, builder, runner, rounds: int = KEEP_ROUNDS) -> tuple[float | None, float | None]:
    """Seconds per run of ``mod`` (one kernel) under the fixed default schedule and under the tuned
    ``trace``, both measured now by ``runner`` (one local worker: one at a time), interleaved over
    ``rounds`` rounds in alternating order, best round of each: a tuned kernel's figure from the
    search was measured at another moment, under another load, so comparing it with a default
    measured now was unfair (on a loaded 2-core machine tuned jet/digits libraries ended 1.1-1.3x
    slower than the default).  ``None`` for a variant that fails to build or run."""
    import tvm
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    from .schedule import schedule_cpu

    fresh = tvm.IRModule({gv: f for gv, f in mod.functions_items()})  # schedule_cpu assigns into it
    sch = Schedule(tvm.IRModule({gv: f for gv, f in mod.functions_items()}))
    try:
        trace.apply_to_schedule(sch, remove_postproc=False)
        variants = [schedule_cpu(fresh), sch.mod]
    except Exception:  # noqa: BLE001 - a trace that no longer applies: only the default is measured
        variants = [schedule_cpu(fresh)]
    built = builder.build([ms.builder.BuilderInput(v, target) for v in variants])
    args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    best: list[float | None] = [None, None]
    try:
        for r in range(rounds):
            order = [0, 1] if r % 2 == 0 else [1, 0]
            order = [i for i in order if i < len(built) and built[i].error_msg is None]
            futs = runner.run([ms.runner.RunnerInput(built[i].artifact_path, "cpu", args) for i in order])
            for i, f in zip(order, futs):
                res = f.result()
                t = mean_secs(res.run_secs) if res.error_msg is None else None
                if t is not None:
                    best[i] = t if best[i] is None else min(best[i], t)
    finally:
        for b in built:
            if b.error_msg is None:
                shutil.rmtree(os.path.dirname(b.artifact_path), ignore_errors=True)
    return best[0], best[1]


def keep_faster(work: Path, dest: Path, mods, target, builder, runner, compare: bool = True) -> tuple[int, int]:
    """Write to ``dest`` the records of ``work`` for the kernels whose best tuned schedule ran
    faster than the fixed default schedule (:func:`.schedule.schedule_cpu`), both measured now by
    the same builder and runner, interleaved (:func:`measure_now`); a kernel whose default schedule is as fast gets no record, so the
    build schedules it the default way.  (With few trials, on a loaded machine, the search may
    find nothing better: measured on the digits CNN, 64 trials gave a library 1.3-1.4x slower
    than the default schedule before this check.)  ``compare`` False keeps every kernel's best
    record without measuring.  Returns ``(kept, dropped)`` kernel counts."""
    from tvm.s_tir import meta_schedule as ms

    src = ms.database.JSONDatabase(path_workload=str(work / WORKLOAD_FILE),
                                   path_tuning_record=str(work / RECORD_FILE), allow_missing=False)
    dest.mkdir(parents=True, exist_ok=True)
    for f in (WORKLOAD_FILE, RECORD_FILE):
        (dest / f).unlink(missing_ok=True)
    out = ms.database.JSONDatabase(path_workload=str(dest / WORKLOAD_FILE),
                                   path_tuning_record=str(dest / RECORD_FILE), allow_missing=True)
    kept = dropped = 0
    for mod in mods:
        if not src.has_workload(mod):
            continue
        top = src.get_top_k(src.commit_workload(mod), 1)
        tuned = mean_secs(top[0].run_secs) if top else None
        if tuned is None:
            continue
        default = None
        if compare:
            default, tuned_now = measure_now(mod, top[0].trace, target, builder, runner)
            tuned = tuned if tuned_now is None else tuned_now
        if default is not None and default <= tuned:
            dropped += 1
            continue
        wl = out.commit_workload(mod)
        r = top[0]
        out.commit_tuning_record(ms.database.TuningRecord(r.trace, wl, r.run_secs, r.target, r.args_info))
        kept += 1
    for f in (WORKLOAD_FILE, RECORD_FILE):
        (dest / f).touch()
    return kept, dropped
