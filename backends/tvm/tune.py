"""Optional meta-schedule tuning of a ``tvm-llvm`` library at one static batch size.

Config ``tvm: {tune: {...}}`` (CLI ``--tune N``, ``--tune-batch B``, ``--tune-log PATH``):

* ``trials`` -- measured candidates in all (meta-schedule's ``max_trials_global``), >= 1;
* ``batch`` -- the batch size tuned for (default :data:`DEFAULT_BATCH` = 256, recorded in the
  manifest as ``tune.batch`` with ``batch_default: true``).  Meta-schedule tunes static shapes
  only, so the library gets a static entry ``main_b<batch>`` (:func:`.lower.static_entry`) beside
  the symbolic ``main``; ``predict`` calls it when a call's batch equals ``batch`` (other batch
  sizes run ``main`` with the fixed schedule of :mod:`.schedule`, untuned);
* ``seed`` -- the search's random seed (default 0).  Measurements are timings, so two tunings
  with the same seed may still pick different schedules: the *records* are what make a build
  reproducible;
* ``trials_per_iter`` -- candidates measured per search iteration (default 16, at most
  ``trials``);
* ``vs_default`` -- (default true) after the search, measure each tuned kernel's fixed default
  schedule (:func:`.schedule.schedule_cpu`) with the same runner and keep a kernel's tuned record
  only when it ran faster (64 trials on a loaded 2-core machine gave a digits-CNN library 1.3-1.4x
  slower than the default schedule without this check); false keeps every best record;
* ``log`` -- instead of ``trials``: the tuning records of an earlier tuned compile (its artifact
  directory, or that artifact's ``tune/`` directory), applied without tuning again; refused when
  they were tuned for another batch or CPU target.

An artifact with CPU variants (``tvm.cpu_variants``) is tuned for the library this machine loads
(the highest variant it can run, else the portable one): measurements only mean something for
the code that runs them.  Only that library gets the static entry and the recorded schedules
(``tune.target`` in the manifest); the others are built untuned, as without ``tune``.

The records (meta-schedule's JSON database: ``database_workload.json`` -- the tuned kernels --
and ``database_tuning_record.json`` -- the measured schedules) and ``tune.json`` (batch, seed,
target, trials run) are stored in the artifact's ``tune/`` directory and covered by the
manifest's hashes.  A rebuild of the artifact (:meth:`TvmBackend.build` on its directory) or a
compile with ``tune: {log: ...}`` applies them and runs no trial; the same records give the same
schedules, hence the same library.

Exactness: a schedule reorders, splits, vectorizes and parallelizes loops; integer (code)
arithmetic is exact in any order (addition modulo 2**k is associative and the proved result
range fits), float kernels may round differently.  The compile checks the tuned entry itself:
the golden inputs, cycled to ``batch`` rows, go through ``main_b<batch>`` and are compared
with the reference (``exactness.static_batches`` in the report).

Method (TVM 0.27 docs, "Optimize a model with meta-schedule": ``relax.get_pipeline("zero")``,
``meta_schedule.relax_integration`` task extraction and ``tune_tasks``, then
``relax.transform.MetaScheduleApplyDatabase``), with the workarounds of ``../shared/TOOLCHAIN.md``:
apache-tvm-ffi 0.1.14.post1 (0.1.15.post2 segfaults writing TIR to JSON), and the builder and
task contexts kept from importing ``tvm.s_tir.tensor_intrin`` (68-129 s of TVMScript; only its
x86 intrinsics are registered here, for the VNNI / AVX-512 rules of x86 targets).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

from ...compiler.errors import CompileError
from .tune_keep import RECORD_FILE, WORKLOAD_FILE, keep_faster

__all__ = ["DEFAULT_BATCH", "TUNE_DIR", "tune_options", "ensure_records", "apply_records", "records_digest",
           "static_batches"]

#: Batch size tuned for when ``tvm.tune.batch`` is not given (recorded as ``batch_default``).
DEFAULT_BATCH = 256
#: Default candidates measured per search iteration (``num_trials_per_iter``).
DEFAULT_TRIALS_PER_ITER = 16
#: Artifact subdirectory holding the tuning records.
TUNE_DIR = "tune"
META_FILE = "tune.json"
TUNE_KEYS = ("trials", "batch", "seed", "trials_per_iter", "log", "vs_default")


def _int_opt(t: dict, key: str, default, lo: int):
    v = t.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise CompileError(f"tvm.tune.{key} must be an integer >= {lo}, got {v!r}")
    return v


def _log_dir(path) -> Path:
    """The directory holding the records for ``tvm.tune.log`` (an artifact or its ``tune/``)."""
    p = Path(str(path)).expanduser()
    for d in (p / TUNE_DIR, p):
        if (d / WORKLOAD_FILE).is_file() and (d / RECORD_FILE).is_file():
            return d.resolve()
    raise CompileError(f"tvm.tune.log: {p} holds no tuning records ({WORKLOAD_FILE} and {RECORD_FILE}, directly or "
                       f"in {TUNE_DIR}/ of a tuned artifact)")


def tune_options(opts: dict, target: dict, cross: bool = False) -> dict | None:
    """The validated ``tune`` options of config ``tvm:``, or None when there are none.

    Args:
        opts: the ``tvm:`` section.  target: the TVM target dict of the library to tune (of an
            artifact with CPU variants: the one this machine runs).
        cross: the library is cross-compiled (cannot run here, so cannot be measured).
    Returns:
        ``{"trials", "batch", "batch_default", "seed", "trials_per_iter", "target"}`` for a
        tuning, or ``{"log", "batch", "batch_default", "seed", "target"}`` to apply stored records
        (``log``: the resolved records directory; ``batch`` from its ``tune.json`` unless given).
    Raises:
        CompileError: naming the option: not a mapping, an unknown key, a count that is not a
            positive integer, both or neither of ``trials`` and ``log``, records that are missing
            or were tuned for another batch or target, a target other than an LLVM CPU that runs
            here, missing tuning dependencies (:func:`check_tuning_deps`).
    """
    t = opts.get("tune")
    if t is None:
        return None
    if not isinstance(t, dict):
        raise CompileError(f"tvm.tune must be a mapping such as {{trials: 64, batch: 256}}, got {t!r}")
    unknown = sorted(set(t) - set(TUNE_KEYS))
    if unknown:
        raise CompileError(f"tvm.tune: unknown key(s) {', '.join(map(str, unknown))} (known: {', '.join(TUNE_KEYS)})")
    if target.get("kind") != "llvm":
        raise CompileError(f"tvm.tune: meta-schedule tuning is available for the tvm-llvm CPU target only, not "
                           f"{target.get('kind')!r}")
    if cross:
        raise CompileError("tvm.tune: a cross-compiled library cannot be measured on this machine; tune on the "
                           "target machine, then compile here with tvm.tune.log")
    if ("trials" in t) == ("log" in t):
        raise CompileError("tvm.tune: give either trials (tune now) or log (apply stored records), "
                           + ("not both" if "trials" in t else "got neither"))
    seed = _int_opt(t, "seed", 0, 0)
    batch = _int_opt(t, "batch", DEFAULT_BATCH, 1)
    if "log" in t:
        d = _log_dir(t["log"])
        meta = read_meta(d)
        if "batch" in t and meta.get("batch") not in (None, batch):
            raise CompileError(f"tvm.tune.batch: {batch}, but the records in {d} were tuned for batch {meta['batch']}")
        if "batch" not in t and meta.get("batch") is None:
            raise CompileError(f"tvm.tune.log: {d} has no {META_FILE} saying which batch it was tuned for; give "
                               f"tvm.tune.batch")
        if meta.get("target") is not None and meta["target"] != target:
            raise CompileError(f"tvm.tune.log: the records in {d} were tuned for target {json.dumps(meta['target'])}, "
                               f"this compile builds for {json.dumps(target)} (tune again, or build for that target)")
        if "trials_per_iter" in t:
            raise CompileError("tvm.tune.trials_per_iter: only with trials (log applies stored records)")
        return {"log": str(d), "batch": int(t.get("batch", meta.get("batch"))), "batch_default": False, "seed": seed,
                "target": target}
    trials = _int_opt(t, "trials", None, 1)
    vs_default = t.get("vs_default", True)
    if not isinstance(vs_default, bool):
        raise CompileError(f"tvm.tune.vs_default must be true or false, got {vs_default!r}")
    check_tuning_deps()
    per = _int_opt(t, "trials_per_iter", min(DEFAULT_TRIALS_PER_ITER, trials), 1)
    return {"trials": trials, "batch": batch, "batch_default": "batch" not in t, "seed": seed,
            "trials_per_iter": min(per, trials), "vs_default": vs_default, "target": target}


#: apache-tvm-ffi releases whose JSON writer segfaults on TIR (the tuning records): 0.1.15.post2,
#: measured (TOOLCHAIN.md); the 0.1.15 series is refused as a whole.  0.1.14.post1 works.
BAD_FFI_PREFIX = "0.1.15"


def check_tuning_deps() -> None:
    """Refuse, in one line, what would make meta-schedule crash or fail late: an apache-tvm-ffi
    of the series that segfaults writing the records, or a missing xgboost (the cost model),
    psutil or cloudpickle (meta-schedule's process pools).  ``pip install 'qdeploy[tune]'``
    installs what is needed.

    Raises:
        CompileError: naming the package and the fix.
    """
    import importlib.metadata as md
    import importlib.util

    fix = "pip install 'qdeploy[tune]' (apache-tvm-ffi==0.1.14.post1 psutil cloudpickle xgboost-cpu)"
    try:
        ffi = md.version("apache-tvm-ffi")
    except md.PackageNotFoundError:
        ffi = None
    if ffi and ffi.startswith(BAD_FFI_PREFIX):
        raise CompileError(f"tvm.tune: apache-tvm-ffi {ffi} crashes (segfault) writing tuning records to JSON; "
                           f"{fix}")
    missing = [m for m in ("xgboost", "psutil", "cloudpickle") if importlib.util.find_spec(m) is None]
    if missing:
        raise CompileError(f"tvm.tune: meta-schedule needs {', '.join(missing)}, not installed; {fix}")


def static_batches(tinfo: dict | None) -> tuple:
    """The static batch sizes a library needs for the tuning dict ``tinfo`` (``()`` untuned)."""
    return (int(tinfo["batch"]),) if tinfo else ()


def read_meta(d) -> dict:
    """``tune.json`` of a records directory (``{}`` when absent)."""
    p = Path(d) / META_FILE
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except (OSError, ValueError) as e:
        raise CompileError(f"tvm.tune.log: {p} is not readable JSON: {e}") from None


def records_digest(d) -> str:
    """sha256 (16 hex digits) of a records directory's two database files."""
    h = hashlib.sha256()
    for f in (WORKLOAD_FILE, RECORD_FILE):
        h.update((Path(d) / f).read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- the slow-import workaround
@contextlib.contextmanager
def _light_tensor_intrin():
    """While active, ``import tvm.s_tir.tensor_intrin`` (done by every ``TuneContext``) yields a
    package without the eager imports of its ``__init__`` (68-129 s of TVMScript for CUDA, Metal,
    ...); its x86 intrinsics (VNNI / AVX-512 dot products, 0.8 s) are registered so the x86
    schedule rules find them.  A package imported for real before stays.  On exit the stub
    package is removed so later code (e.g. CUDA's dlight rules) imports the real one; its
    submodules stay imported (an intrinsic registers once per process: importing ``x86`` again
    would fail), and the real package's ``__init__`` then reuses them."""
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    import importlib

    import tvm.s_tir

    stub = types.ModuleType(name)
    stub.__path__ = [os.path.join(os.path.dirname(tvm.s_tir.__file__), "tensor_intrin")]
    stub.__qdeploy_stub__ = True
    sys.modules[name] = stub
    try:
        importlib.import_module(name + ".x86")
        yield
    finally:
        if getattr(sys.modules.get(name), "__qdeploy_stub__", False):
            del sys.modules[name]
            if getattr(tvm.s_tir, "tensor_intrin", None) is stub:
                delattr(tvm.s_tir, "tensor_intrin")


def build_candidate(mod, target, _params=None):
    """meta-schedule's ``default_build`` without its ``import tvm.s_tir.tensor_intrin`` (68-129 s;
    TOOLCHAIN.md): the candidate kernel compiled for ``target``."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.tirx.build(mod, target)  # what the deprecated tvm.driver.build that default_build uses calls


def _in_process_builder():
    """A meta-schedule builder compiling candidates in this process (:func:`build_candidate`,
    exported like meta-schedule's ``default_export``: a tar in a fresh temporary directory).

    meta-schedule's ``LocalBuilder`` starts a new pool of worker processes for every batch of
    candidates, and each worker imports TVM (seconds each, a third of a 64-trial tuning on 2
    cores, measured); a candidate kernel compiles in well under a second.  A candidate that fails
    to build is reported as a build error (meta-schedule skips it), as LocalBuilder does."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.support.tar import tar

    @derived_object
    class _Builder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for bi in build_inputs:
                try:
                    path = os.path.join(tempfile.mkdtemp(prefix="qdeploy_ms_"), "tvm_tmp_mod." + tar.output_format)
                    build_candidate(bi.mod, bi.target).export_library(path, fcompile=tar)
                    results.append(BuilderResult(path, None))
                except Exception as e:  # noqa: BLE001 - a candidate that does not build is skipped
                    results.append(BuilderResult(None, f"qdeploy in-process builder: {type(e).__name__}: {e}"))
            return results

    return _Builder()


def _trial_counter(total: int, say):
    """A measure callback counting measured candidates and reporting progress through ``say``."""
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.ir.utils import derived_object

    t0 = time.perf_counter()

    @derived_object
    class _Count(PyMeasureCallback):
        def __init__(self):
            super().__init__()
            self.done = 0

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            self.done += len(runner_results)
            say(f"tuning (meta-schedule): {self.done}/{total} trials, {time.perf_counter() - t0:.0f} s")

    return _Count()


# ---------------------------------------------------------------- tuning
def _tune(graph, target: dict, tinfo: dict, dest: Path, say, threads: int) -> dict:
    """Tune the static entry of ``graph`` at ``tinfo['batch']`` with ``threads`` TVM threads and
    write the records to ``dest``."""
    import logging

    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from .lower import RelaxLowering, static_entry

    batch = int(tinfo["batch"])
    tune_target = tvm.target.Target({**target, "num-cores": threads})
    mod = RelaxLowering(graph, batch=batch).run(static_entry(batch))
    with tvm.target.Target(target):
        mod = relax.get_pipeline("zero")(mod)
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="qdeploy_tune_"))
    ms_log = logging.getLogger("tvm.s_tir.meta_schedule")
    try:
        with _light_tensor_intrin():
            tasks = [t for t in ms.relax_integration.extract_tasks(mod, tune_target)
                     if not relax.analysis.has_reshape_pattern(t.dispatched[0]["main"])]
            if not tasks:
                raise CompileError(f"tvm.tune: the model has no kernel to tune at batch {batch}")
            ms_log.setLevel(logging.WARNING)  # the task tables go to work/logs, not the console
            ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                tasks, str(work), num_threads=threads, seed=int(tinfo["seed"]))
            counter = _trial_counter(int(tinfo["trials"]), say)
            say(f"tuning (meta-schedule): {len(ctxs)} kernels at batch {batch}, {tinfo['trials']} trials")
            ms_log.setLevel(logging.WARNING)
            builder, runner = _in_process_builder(), ms.runner.LocalRunner()
            ms.tune.tune_tasks(
                tasks=ctxs, task_weights=weights, work_dir=str(work), max_trials_global=int(tinfo["trials"]),
                num_trials_per_iter=int(tinfo["trials_per_iter"]), builder=builder, runner=runner,
                cost_model=ms.cost_model.XGBModel(num_tuning_cores=threads),
                measure_callbacks=[*ms.MeasureCallback.create("default"), counter])
            if tinfo.get("vs_default", True):
                say("tuning (meta-schedule): measuring the default schedule of each tuned kernel")
            kept, dropped = keep_faster(work, dest, [c.mod for c in ctxs], tune_target, builder, runner,
                                         bool(tinfo.get("vs_default", True)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"kernels": len(ctxs), "trials_run": counter.done, "threads": threads, "kernels_tuned": kept,
            "kernels_default_faster": dropped, "tune_seconds": round(time.perf_counter() - t0, 1)}


def ensure_records(out_dir, graph, target: dict, tinfo: dict, threads: int, say=None) -> dict:
    """Make ``out_dir/tune/`` hold the records of ``tinfo`` and return ``tinfo`` completed.

    Records already in the artifact (a rebuild) are used as they are: no trial runs.  Otherwise
    a ``log`` directory's records are copied in, or the static entry is tuned now
    (``trials``) with ``threads`` TVM threads (the build passes
    :func:`qdeploy.backends.tvm.default_threads`, which honours ``TVM_NUM_THREADS``): the
    measuring runner and the builder workers use that many, and it is the target's
    ``num-cores`` during the search.  ``say(message)`` is told the progress.  The returned dict adds ``source`` (``"tuned"``, ``"artifact"`` or ``"log"``),
    ``trials_run`` (0 unless tuned now), ``records`` (the directory, relative), ``records_digest``
    and, when tuned, ``kernels``, ``threads`` (TVM threads measured with) and ``tune_seconds``.

    Raises:
        CompileError: when tuning fails (TVM's error, one line).
    """
    out = Path(out_dir)
    dest = out / TUNE_DIR
    say = say or (lambda msg: None)
    info = {k: v for k, v in tinfo.items() if k not in ("applied", "kernels_in_library")}
    if (dest / WORKLOAD_FILE).is_file() and (dest / RECORD_FILE).is_file():
        info.update(source="artifact", trials_run=0)
    elif tinfo.get("log"):
        dest.mkdir(parents=True, exist_ok=True)
        for f in (WORKLOAD_FILE, RECORD_FILE):
            shutil.copyfile(Path(tinfo["log"]) / f, dest / f)
        info.update(source="log", trials_run=0)
    else:
        check_tuning_deps()
        try:
            info.update(source="tuned", **_tune(graph, target, tinfo, dest, say, int(threads)))
        except CompileError:
            raise
        except Exception as e:
            last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            raise CompileError(f"tvm.tune: meta-schedule tuning failed: {type(e).__name__}: {last}") from e
        (dest / META_FILE).write_text(json.dumps({k: info[k] for k in ("batch", "seed", "trials", "trials_run",
                                                                        "trials_per_iter", "threads")} |
                                                 {"target": target}, indent=1))
    if not (dest / META_FILE).is_file():
        (dest / META_FILE).write_text(json.dumps({"batch": info["batch"], "target": target}, indent=1))
    info["records"] = TUNE_DIR
    info["records_digest"] = records_digest(dest)
    return info


def apply_records(mod, target, records_dir):
    """``mod`` legalized and fused (``relax.get_pipeline("zero")``) with every kernel found in
    the records of ``records_dir`` replaced by its best measured schedule
    (``MetaScheduleApplyDatabase``, which marks them ``tirx.is_scheduled`` so
    :func:`.schedule.schedule_cpu` leaves them alone).  Call inside the build's
    ``PassContext``.

    Returns:
        ``(module, names of the kernels scheduled from the records, digest)``; ``digest`` is a
        sha256 (16 hex digits) of those kernels' TVMScript: the same records give the same
        kernels, hence the same digest (the library file itself is not byte-stable across TVM
        builds even untuned: its VM shape functions vary, measured).
    """
    import tvm
    from tvm import relax, tirx
    from tvm.s_tir import meta_schedule as ms

    d = Path(records_dir)
    db = ms.database.JSONDatabase(path_workload=str(d / WORKLOAD_FILE), path_tuning_record=str(d / RECORD_FILE),
                                  allow_missing=False)
    tgt = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    with db, tgt:
        mod = relax.get_pipeline("zero")(mod)
    funcs = sorted((gv.name_hint, f) for gv, f in mod.functions_items()
                   if isinstance(f, tirx.PrimFunc) and f.attrs is not None and "tirx.is_scheduled" in f.attrs)
    h = hashlib.sha256()
    for name, f in funcs:
        h.update(f"{name}\n{f.script()}\n".encode())
    return mod, [name for name, _ in funcs], h.hexdigest()[:16]


def record_count(records_dir) -> int:
    """Number of tuning records in a records directory (0: every tuned kernel kept the default
    schedule, :func:`.tune_keep.keep_faster`)."""
    p = Path(records_dir) / RECORD_FILE
    return sum(1 for line in p.read_text().splitlines() if line.strip()) if p.is_file() else 0
