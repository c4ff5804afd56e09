"""The ``tvm-llvm`` target: the IR graph lowered to one TVM Relax function, compiled for the CPU.

Artifact directory (written by :class:`TvmBackend`):

* ``model.json`` / ``model.npz`` -- the IR graph (``build`` re-lowers from it);
* ``model.relax.txt`` -- the Relax module as TVMScript (for reading only);
* ``lib_<hash>.so`` -- the compiled library (``build``); the content hash in the name keeps
  two different libraries from sharing a path (dlopen caches by path within a process).

See :mod:`.lower` for the exactness guarantees and what is not supported.  ``tvm`` is imported
only when a method is called, so importing this package is cheap.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from ...compiler.errors import CompileError
from ...compiler.ir.graph import Graph
from ...compiler.ir.types import FixedType
from ...compiler.reference import execute
from .arrays import feed_array, from_tvm, to_tvm
from .fastcall import FastCall
from .library import BUILD_FILE, build_library, build_meta, choose_library, parallel_opts, scheduled
from .softmax_lut import library_softmax
from .schedule import DEFAULT_SCHEDULE, SCHEDULES
from ..progress import report
from .target import (X86_LEVELS, cross_compiler, not_run_reason, resolve_cpu_variants, resolve_target,
                     variant_runs_here)
from .tune import ensure_records, tune_options

BATCH1_ENTRY = "main_b1"  # == lower.BATCH1_ENTRY (lower imports tvm, this module must not)

__all__ = ["TvmBackend", "resolve_target", "default_threads"]

GRAPH_STEM = "model"
EPILOGUE_STEM = "host_epilogue"
FULL_STEM = "full_model"
SCRIPT_FILE = "model.relax.txt"


def default_threads() -> int:
    """Size TVM's runtime thread pool (the ``T.parallel`` loops of the default schedule) to the
    CPUs this process may run on, unless the user chose: ``TVM_NUM_THREADS`` (or
    ``OMP_NUM_THREADS``, which TVM also reads) set in the environment is left alone.  TVM's own
    default is half the hardware threads on x86 (it assumes hyper-threading), i.e. one thread
    on a 2-vCPU machine.  Sets ``TVM_NUM_THREADS`` in ``os.environ``; TVM reads it when its
    pool is created (the first parallel call in the process), so a pool that already exists
    keeps its size.

    Returns:
        the thread count TVM will use (``runtime.NumThreads``).
    """
    import os

    import tvm

    if not os.environ.get("TVM_NUM_THREADS") and not os.environ.get("OMP_NUM_THREADS"):
        try:
            n = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            n = os.cpu_count() or 1
        os.environ["TVM_NUM_THREADS"] = str(max(1, n))
    return int(tvm.get_global_func("runtime.NumThreads")())


class TvmBackend:
    """Compile an IR graph with TVM (Relax, LLVM CPU target).

    Runtime arrays follow the backend contract: int64 codes for fixed-point values, float32 for
    float values, batch first; one library serves every batch size.

    Config (``config["tvm"]``, all optional): ``target``, ``mcpu``, ``mtriple``, ``mattr``, ``cc``
    (see :mod:`.target`: portable x86-64 by default, ``mcpu: native`` for this machine's CPU, an
    ``mtriple`` of another architecture cross-compiles), ``cpu_variants`` (``auto`` default: one
    more library for this machine's x86-64 psABI level beside the portable one, picked at load
    time from the CPU flags; ``none``; or a list of levels --
    :func:`.target.resolve_cpu_variants`), ``exec_mode`` (``compiled`` default: the Relax VM
    functions compiled to C; ``bytecode``: TVM's VM interpreter), ``opt_level`` (0..3, default 3),
    ``schedule`` (``"auto"`` (default): fuse first (``relax.get_pipeline("zero")``) and apply
    the fixed loop schedule of :func:`.schedule.schedule_cpu` -- reductions reordered and
    vectorized over the contiguous output axis, epilogues fused into the reduction's loop,
    leading spatial loops run on TVM's thread pool (``TVM_NUM_THREADS`` at run time) when a
    call has enough work; same accumulation order per output element, so int64 codes stay
    bit-exact; ``"none"``: TVM's default CPU pipeline, naive single-threaded loop nests),
    ``parallel`` (default true: use the thread pool in ``"auto"``), ``min_parallel_work``
    (default :data:`.schedule.MIN_PARALLEL_WORK`: element operations a call needs before a
    loop nest runs in parallel; 0 = always),
    ``batch1_entry`` (default true: also compile a static batch-1 entry ``main_b1``, which
    ``CompiledModel.predict`` and ``run.tensors1`` call for a batch of one -- no symbolic-shape
    dispatch in the VM; the dynamic runtime calls it for single samples; false builds ``main``
    only), ``tune`` (optional meta-schedule tuning of a static entry at one batch size, default
    256, with its records stored in the artifact: see :mod:`.tune`).
    """

    def __init__(self, name: str = "tvm-llvm"):
        self.name = name

    def supports(self, graph: Graph) -> bool:
        """True when every op of ``graph`` has a lowering in :data:`.ops.LOWERING` (attribute-level
        limits, e.g. a 3-D kernel or a shift wider than 62 bits, are still refused by :meth:`emit`).
        Imports tvm."""
        from .ops import LOWERING

        return LOWERING.supports(graph)

    # ------------------------------------------------------------------ emit
    def emit(self, graph: Graph, config: dict, out_dir) -> dict:
        """Lower ``graph`` and write ``model.json``/``model.npz`` and ``model.relax.txt``.

        Returns:
            info dict: ``tvm_version``, ``target`` (TVM target dict, e.g. ``{"kind": "llvm",
            "mtriple": "x86_64-pc-linux-gnu", "mcpu": "x86-64"}``), ``opt_level``, ``files``,
            ``graph_digest``; for a cross-compiled target also ``cross_compiler`` and
            ``not_run_here`` (why the library cannot run on this machine).
        Raises:
            UnsupportedError: naming the node for anything without an exact lowering.
        """
        import tvm

        from .lower import lower

        from ...passes.partition import split_epilogue

        out = Path(out_dir)
        opts = dict((config or {}).get("tvm") or {})
        schedule = str(opts.get("schedule", DEFAULT_SCHEDULE))
        if schedule not in SCHEDULES:
            raise CompileError(f"tvm.schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        par = parallel_opts(opts) if schedule != "none" else {}
        # Quantized graphs: trailing float ops (output scale, softmax) run on the host in NumPy
        # exactly as in the reference, so the whole artifact stays bit-exact; the library holds
        # the rest, and a Softmax of fixed-point codes, computed exactly from an exp table
        # (softmax_lut.py).  (TVM's float kernels round differently, e.g. with fused multiply-adds.)
        target = resolve_target(opts)  # raises CompileError (e.g. a missing cross compiler) first
        levels = resolve_cpu_variants(opts, target)
        # a tuning is for the library this machine runs: its highest CPU variant, else the portable one
        here = [lv for lv in levels if variant_runs_here({"mcpu": lv, "requires": list(X86_LEVELS[lv])})]
        tune = tune_options(opts, {**target, "mcpu": here[-1]} if here else target,
                            cross=bool(cross_compiler(target, opts)))
        core, epilogue = split_epilogue(graph, device_ok=library_softmax)
        mod = lower(core)  # raises UnsupportedError before anything is written
        core.save(str(out / GRAPH_STEM))
        files = [f"{GRAPH_STEM}.json", f"{GRAPH_STEM}.npz"]
        host_nodes = []
        if epilogue is not None:
            epilogue.save(str(out / EPILOGUE_STEM))
            graph.save(str(out / FULL_STEM))
            files += [f"{EPILOGUE_STEM}.json", f"{EPILOGUE_STEM}.npz", f"{FULL_STEM}.json", f"{FULL_STEM}.npz"]
            host_nodes = [n.name for n in epilogue.nodes]
        try:
            (out / SCRIPT_FILE).write_text(mod.script())
            files.append(SCRIPT_FILE)
        except Exception:  # pragma: no cover - printing is best effort
            pass
        info = {
            "tvm_version": tvm.__version__,
            "target": target,
            "opt_level": int(opts.get("opt_level", 3)),
            "schedule": schedule,
            **par,
            "graph_digest": graph.digest(),
            "files": files,
            "host_nodes": host_nodes,
        }
        if opts.get("batch1_entry", True):
            info["batch1_entry"] = True
        exec_mode = opts.get("exec_mode", "compiled")
        if exec_mode not in ("compiled", "bytecode"):
            raise CompileError(f"tvm.exec_mode must be 'compiled' or 'bytecode', got {exec_mode!r}")
        info["exec_mode"] = exec_mode
        if levels:
            info["cpu_variant_levels"] = levels
        if tune:
            info["tune"] = tune
        cc = cross_compiler(target, opts)
        if cc:
            info["cross_compiler"] = cc
            info["not_run_here"] = not_run_reason(target)
        return info

    # ------------------------------------------------------------------ build
    def build(self, out_dir, info: dict) -> None:
        """Compile the graph saved by :meth:`emit` into ``lib_<hash>.so`` (the portable library for
        ``info["target"]``) and one more library per CPU variant (``info["cpu_variant_levels"]``,
        x86-64 psABI levels, :func:`.target.resolve_cpu_variants`).

        Adds ``library`` (file name), ``library_target``, ``cpu_variants`` (``[{"mcpu", "library",
        "requires" (cpuinfo flags), "library_target"}]``, when any) and ``build_seconds`` to
        ``info`` (and the files to ``files``) and writes them to ``tvm_build.json`` too, so
        :meth:`load` works from the directory alone.

        Raises:
            CompileError: when TVM fails to compile or export.
        """
        import time

        out = Path(out_dir)
        graph = Graph.load(str(out / GRAPH_STEM))
        target = info.get("target") or resolve_target({})
        opt_level = int(info.get("opt_level", 3))
        schedule = str(info.get("schedule", "none"))
        if schedule not in SCHEDULES:
            raise CompileError(f"tvm.schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        b1 = bool(info.get("batch1_entry"))
        tune = info.get("tune")
        if tune:  # tune now, or take the artifact's / a log's records (no trial)
            tune = info["tune"] = ensure_records(out, graph, tune["target"], tune, default_threads(), say=report)
        par = parallel_opts(info) if schedule != "none" else {}
        exec_mode = str(info.get("exec_mode", "bytecode"))
        cc = cross_compiler(target, {"cc": info.get("cross_compiler")})
        t0 = time.perf_counter()

        def lib_tune(t: dict):  # the records go into the one library built for the tuned target
            return tune if tune and tune["target"] == t else None
        lib_name, lib_target = build_library(out, graph, target, opt_level, schedule, par, b1, exec_mode, cc,
                                              lib_tune(target))
        variants = []
        for level in info.get("cpu_variant_levels", []):
            vt = {**target, "mcpu": level}
            v_lib, v_target = build_library(out, graph, vt, opt_level, schedule, par, b1, exec_mode, cc, lib_tune(vt))
            variants.append({"mcpu": level, "library": v_lib, "requires": list(X86_LEVELS[level]),
                             "library_target": v_target})
        info["library"] = lib_name
        info["library_target"] = lib_target
        if variants:
            info["cpu_variants"] = variants
        info["build_seconds"] = round(time.perf_counter() - t0, 3)
        files = list(info.get("files", []))
        for f in [lib_name] + [v["library"] for v in variants] + [BUILD_FILE]:
            if f not in files:
                files.append(f)
        info["files"] = files
        (out / BUILD_FILE).write_text(json.dumps({"library": lib_name, "target": target,
                                                  "library_target": lib_target, "cpu_variants": variants,
                                                  "not_run_here": info.get("not_run_here"),
                                                  "opt_level": opt_level, "schedule": schedule, **par,
                                                  "batch1_entry": b1, "exec_mode": exec_mode, "tune": tune}, indent=1))

    # ------------------------------------------------------------------ localize
    def localize(self, graph: Graph, config: dict, out_dir, info: dict, feeds: dict, ref_all: dict) -> dict:
        """First node whose TVM outputs differ from the reference (called only when the artifact
        differs): a debug variant of the library's graph whose outputs are *every* intermediate
        value is lowered and compiled with the artifact's target, opt level and schedule, run on
        the same inputs and compared in topological order
        (:func:`qdeploy.backends.divergence.first_divergence`).  The debug build fuses less (each
        value must be materialized), so a fault that exists only in a fused kernel shows as "every
        intermediate value equals the reference"; the dict then says so.  The host epilogue runs the
        reference itself and is not compared.
        """
        import tvm
        from tvm import relax

        from ...passes.partition import split_epilogue
        from ..divergence import first_divergence
        from .lower import lower

        core, _ = split_epilogue(graph, device_ok=library_softmax)
        inner = [v for n in core.nodes for v in n.outputs]
        debug = core.with_(outputs=inner)
        tgt = tvm.target.Target(info.get("target") or resolve_target({}))
        with tvm.transform.PassContext(opt_level=int(info.get("opt_level", 3))):
            ex = tvm.compile(scheduled(lower(debug), tgt, info), target=tgt)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        args = [to_tvm(np.ascontiguousarray(feeds[i], dtype=np.int64 if isinstance(core.value(i).dtype, FixedType)
                                             else np.float32)) for i in core.inputs]
        res = vm["main"](*args)
        got = {}
        for k, v in enumerate(inner):
            a = from_tvm(res[k])
            t = core.value(v).dtype
            got[v] = t.to_real(np.asarray(a)) if isinstance(t, FixedType) else np.asarray(a)
        div = first_divergence(core, ref_all, got)
        div["how"] = f"a TVM debug build returning all {len(inner)} intermediate values"
        return div

    # ------------------------------------------------------------------ load
    def load_all(self, out_dir, info: dict | None = None, graph: Graph | None = None) -> list:
        """``[(mcpu, f)]``: :meth:`load` of the portable library and of every CPU variant that runs
        on this machine (the compile checks each against the reference)."""
        meta = build_meta(Path(out_dir), info)
        names = [str((meta.get("target") or {}).get("mcpu", ""))]
        names += [v["mcpu"] for v in meta.get("cpu_variants") or () if variant_runs_here(v)]
        return [(n, self.load(out_dir, info, graph, variant=n)) for n in names]

    def load(self, out_dir, info: dict | None = None, graph: Graph | None = None,
             variant: str | None = None) -> Callable[[dict], dict]:
        """A callable running the compiled library.

        Args:
            out_dir: the artifact directory.
            info: the dict from :meth:`emit`/:meth:`build` (``tvm_build.json`` is used when it
                has no ``library``).
            graph: the IR graph (defaults to the saved ``model.json``); gives input/output
                names, shapes and types.
            variant: the CPU (``mcpu``) whose library to run: the portable one's or a CPU
                variant's.  Default: the environment variable ``QDEPLOY_TVM_VARIANT`` if set,
                else the highest variant whose required CPU flags this machine has
                (:func:`.target.variant_runs_here`), else the portable library.  The returned
                callable's ``variant`` attribute names the one loaded.
        The process's TVM thread pool is sized by :func:`default_threads` (all available CPUs
        unless ``TVM_NUM_THREADS`` is set).

        Returns:
            ``f(feeds) -> outputs``: ``feeds`` maps every graph input name to a batch-first
            array ``(N, *shape)`` (codes for fixed-point inputs, reals for float ones);
            ``outputs`` maps every graph output name to an ``(N, *shape)`` numpy array, int64
            codes or float32.  ``f`` raises ``KeyError`` for a missing input and ``ValueError``
            for a wrong shape or for codes outside a fixed-point input's type (the library
            computes in dtypes proved from the types; the raw entries do not check).
        Raises:
            CompileError: when no library has been built or it cannot be loaded, or a forced
                variant is unknown or cannot run on this CPU.
        """
        import tvm
        from tvm import relax

        out = Path(out_dir)
        meta = build_meta(out, info)
        lib_name, chosen = choose_library(meta, variant)
        if not lib_name or not (out / lib_name).exists():
            raise CompileError(f"no TVM library in {out} (run build first)")
        why_not = meta.get("not_run_here")
        if why_not:
            def not_here(feeds):
                raise CompileError(f"{lib_name} was cross-compiled ({why_not}); copy the artifact to such a "
                                   f"machine to run it")
            return not_here
        g = Graph.load(str(out / GRAPH_STEM))  # the library's graph (the core when split)
        epilogue = Graph.load(str(out / EPILOGUE_STEM)) if (out / f"{EPILOGUE_STEM}.json").exists() else None
        full = graph if graph is not None else (Graph.load(str(out / FULL_STEM)) if epilogue is not None else g)
        default_threads()
        try:
            vm = relax.VirtualMachine(tvm.runtime.load_module(str((out / lib_name).resolve())), tvm.cpu())
        except Exception as e:
            raise CompileError(f"cannot load TVM library {lib_name}: {e}") from e
        b1 = meta.get("batch1_entry", False)
        # a TVM VirtualMachine is not re-entrant: two threads calling it at once corrupt its
        # register file (wrong outputs or a crash), so every entry takes the same lock
        vm_lock = threading.Lock()

        def _locked(f):
            def call(*args):
                with vm_lock:
                    return f(*args)
            return call
        tune = meta.get("tune")
        if tune and (tune.get("target") or meta.get("target") or {}).get("mcpu") != chosen:
            tune = None  # the records went into another of the artifact's libraries
        fn = _locked(vm["main"])
        fn1 = _locked(vm[BATCH1_ENTRY]) if b1 else None
        # static entries by batch size: main_b1 (what predict calls for one sample, so a batch of
        # one here runs it too and the compile's check covers it) and a tuned library's main_b<B>
        static = {int(tune["batch"]): _locked(vm[f"main_b{int(tune['batch'])}"])} if tune else {}
        if fn1 is not None:
            static.setdefault(1, fn1)
        ins = [(name, g.values[name]) for name in g.inputs]
        # float inputs cast to fixed point inside the library: NaN has no code (the reference
        # raises); compiled code cannot raise, so check here
        quantized_in = {i for i in g.inputs if any(c.op == "Quantize" for c in g.consumers(i))}
        outs = list(g.outputs)

        dts = [np.int64 if isinstance(v.dtype, FixedType) else np.float32 for _, v in ins]
        # feed_array refuses codes outside an input's type: the library narrows codes to dtypes
        # proved from the IR types (intplan.py) and would not compute them like the reference

        n_out = len(outs)
        to_tensor = to_tvm  # a local name: the closures below look it up once
        tensor_type = tvm.runtime.Tensor

        def call_tensors(arrays):
            """Run the library on positional inputs (``g.inputs`` order, of the right dtype and
            shape; not checked), each a TVM tensor (passed as is, e.g. an earlier call's output),
            a numpy array or a torch CPU tensor (shared zero-copy when 64-byte aligned); returns
            the output TVM tensors (fresh per call).  A batch size with a static entry (the tuned
            batch) runs that entry."""
            f = static.get(arrays[0].shape[0], fn) if static and arrays else fn
            res = f(*[a if isinstance(a, tensor_type) else to_tensor(a) for a in arrays])
            return [res[0]] if n_out == 1 else [res[i] for i in range(n_out)]

        def call_tensors1(arrays):
            """:func:`call_tensors` for batch-1 inputs through the static ``main_b1`` entry."""
            res = fn1(*[a if isinstance(a, tensor_type) else to_tensor(a) for a in arrays])
            return [res[0]] if n_out == 1 else [res[i] for i in range(n_out)]

        def call_raw(arrays):
            """:func:`call_tensors` with the outputs as numpy arrays sharing memory with TVM's
            (zero-copy DLPack views)."""
            return [from_tvm(r) for r in call_tensors(arrays)]

        def run(feeds: dict) -> dict:
            arrays = []
            for (name, v), dt in zip(ins, dts):
                arrays.append(feed_array(feeds, name, v, dt, name in quantized_in))
            env = dict(zip(outs, call_raw(arrays)))
            if epilogue is not None:
                env.update(execute(epilogue, {i: env[i] for i in epilogue.inputs}, codes=True))
            return {o: env[o] for o in full.outputs}

        # fast path for hosts that call the library in a loop (the dynamic runtime): no dict,
        # no checks, valid only when there is no host epilogue
        run.raw = call_raw if epilogue is None else None
        run.tensors = call_tensors if epilogue is None else None
        run.tensors1 = call_tensors1 if (epilogue is None and fn1 is not None) else None
        # for hosts that generate code around the library (runtime/dynamic/): the raw VM
        # entries, the backend tensor type and the converter of numpy/torch inputs
        run.entry = fn if epilogue is None else None
        run.entry1 = fn1 if epilogue is None else None
        run.tensor_type = tensor_type
        run.to_tensor = to_tvm
        run.input_names = [name for name, _ in ins]
        run.output_names = outs
        # the thin positional path of CompiledModel.predict (runtime/predictor.py)
        run.fast = FastCall(fn, fn1, [v.shape for _, v in ins], dts, outs, list(full.outputs), epilogue,
                            to_tensor=to_tvm, from_tensor=from_tvm, tensor_type=tensor_type,
                            empty=lambda shape, dtype: tvm.runtime.empty(shape, dtype, tvm.cpu()),
                            static={b: f for b, f in static.items() if b != 1})
        run.fast_nan_check = [name in quantized_in for name, _ in ins]
        run.variant = chosen
        return run
