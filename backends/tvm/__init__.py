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

import hashlib
import json
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from ...compiler.errors import CompileError
from ...compiler.ir.graph import Graph
from ...compiler.ir.types import FixedType
from ...compiler.reference import execute
from .fastcall import FastCall
from .schedule import DEFAULT_SCHEDULE, MIN_PARALLEL_WORK, SCHEDULES, schedule_cpu
from .target import cross_compiler, library_target, not_run_reason, resolve_target
from ..progress import report
from .tune import TUNE_DIR, apply_records, ensure_records, static_batches, tune_options

BATCH1_ENTRY = "main_b1"  # == lower.BATCH1_ENTRY (lower imports tvm, this module must not)

__all__ = ["TvmBackend", "resolve_target", "default_threads"]

GRAPH_STEM = "model"
EPILOGUE_STEM = "host_epilogue"
FULL_STEM = "full_model"
SCRIPT_FILE = "model.relax.txt"
BUILD_FILE = "tvm_build.json"


def _scheduled(mod, tgt, info: dict, fused: bool = False):
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


def _parallel_opts(opts: dict) -> dict:
    """The validated ``parallel`` / ``min_parallel_work`` options of config ``tvm:``."""
    par = opts.get("parallel", True)
    if not isinstance(par, bool):
        raise CompileError(f"tvm.parallel must be true or false, got {par!r}")
    mpw = opts.get("min_parallel_work", MIN_PARALLEL_WORK)
    if isinstance(mpw, bool) or not isinstance(mpw, int) or mpw < 0:
        raise CompileError(f"tvm.min_parallel_work must be an integer >= 0 (element operations), got {mpw!r}")
    return {"parallel": par, "min_parallel_work": mpw}


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


def _aligned(a: np.ndarray) -> np.ndarray:
    """``a`` (C-contiguous) or a copy of it whose data is 64-byte aligned (DLPack import needs it)."""
    if a.ctypes.data % 64 == 0:
        return a
    buf = np.empty(a.nbytes + 64, dtype=np.uint8)
    off = (-buf.ctypes.data) % 64
    b = buf[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
    b[...] = a
    return b


def _to_tvm(a):
    """A TVM tensor for a C-contiguous numpy array or torch CPU tensor ``a`` (right dtype):
    zero-copy through DLPack when the data is 64-byte aligned, one aligned copy otherwise.
    (torch is used when importable: its allocations are 64-byte aligned and its pointer check
    is cheaper than numpy's ``ctypes``.)"""
    torch, from_dlpack = _fast_imports()
    if torch is not None:
        t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
        if not t.is_contiguous():
            t = t.contiguous()
        if t.numel() == 0:
            import tvm

            return tvm.runtime.tensor(t.numpy())
        if t.data_ptr() % 64:
            t = t.clone()
        return from_dlpack(t)
    import tvm

    if a.size == 0 or not a.flags.c_contiguous:
        return tvm.runtime.tensor(np.ascontiguousarray(a))
    return from_dlpack(_aligned(a))


_FAST: list = []


def _fast_imports():
    """(torch or None, tvm.runtime.from_dlpack), imported once."""
    if not _FAST:
        import tvm

        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a project dependency
            torch = None
        _FAST.extend([torch, tvm.runtime.from_dlpack])
    return _FAST[0], _FAST[1]


def _from_tvm(t) -> np.ndarray:
    """A numpy view of a TVM CPU tensor (zero-copy DLPack; a copy when that is refused)."""
    try:
        return np.from_dlpack(t)
    except Exception:  # pragma: no cover
        return np.asarray(t.numpy())


def feed_array(feeds: dict, name: str, v, dt, quantized: bool) -> np.ndarray:
    """Input ``name`` (IR value ``v``) of ``feeds`` as the C-contiguous ``dt`` array a library takes.

    Raises:
        KeyError: the input is missing.
        ValueError: a shape other than ``(N, *v.shape)``; NaN in an input the library quantizes
            (compiled code cannot raise; the reference does); integer codes outside a fixed-point
            input's type (the library narrows by that type, :mod:`.intplan`, so it would compute
            them differently from the reference).
    """
    if name not in feeds:
        raise KeyError(f"missing input {name!r}")
    a = np.ascontiguousarray(np.asarray(feeds[name]), dtype=dt)
    if a.shape[1:] != tuple(v.shape):
        raise ValueError(f"input {name!r} has shape {a.shape}, expected (N, {', '.join(map(str, v.shape))})")
    if quantized and np.isnan(a).any():
        raise ValueError(f"NaN cannot be quantized to a fixed-point type (input {name!r})")
    if isinstance(v.dtype, FixedType) and a.size:
        lo, hi = v.dtype.min_code, v.dtype.max_code
        if a.min() < lo or a.max() > hi:
            raise ValueError(f"input {name!r} has codes outside its type {v.dtype} [{lo}, {hi}]: [{a.min()}, {a.max()}]")
    return a


class TvmBackend:
    """Compile an IR graph with TVM (Relax, LLVM CPU target).

    Runtime arrays follow the backend contract: int64 codes for fixed-point values, float32 for
    float values, batch first; one library serves every batch size.

    Config (``config["tvm"]``, all optional): ``target``, ``mcpu``, ``mtriple``, ``mattr``, ``cc``
    (see :mod:`.target`: portable x86-64 by default, ``mcpu: native`` for this machine's CPU, an
    ``mtriple`` of another architecture cross-compiles), ``opt_level`` (0..3, default 3),
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
        par = _parallel_opts(opts) if schedule != "none" else {}
        # Quantized graphs: trailing float ops (output scale, softmax) run on the host in NumPy
        # exactly as in the reference, so the whole artifact stays bit-exact; the library holds
        # the rest.  (TVM's float kernels round differently, e.g. with fused multiply-adds.)
        target = resolve_target(opts)  # raises CompileError (e.g. a missing cross compiler) first
        tune = tune_options(opts, target, cross=bool(cross_compiler(target, opts)))
        core, epilogue = split_epilogue(graph)
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
        if tune:
            info["tune"] = tune
        cc = cross_compiler(target, opts)
        if cc:
            info["cross_compiler"] = cc
            info["not_run_here"] = not_run_reason(target)
        return info

    # ------------------------------------------------------------------ build
    def build(self, out_dir, info: dict) -> None:
        """Compile the graph saved by :meth:`emit` into ``lib_<hash>.so``.

        Adds ``library`` (file name) and ``build_seconds`` to ``info`` (and to ``files``) and
        writes them to ``tvm_build.json`` too, so :meth:`load` works from the directory alone.

        Raises:
            CompileError: when TVM fails to compile or export.
        """
        import time

        import tvm

        from .lower import lower

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
            tune = info["tune"] = ensure_records(out, graph, target, tune, default_threads(), say=report)
        par = _parallel_opts(info) if schedule != "none" else {}
        # unchanged names for existing "none" builds; "auto2": the parallel schedule
        sched_key = ("" if schedule == "none" else f"|{schedule}2|{par['parallel']}|{par['min_parallel_work']}") + \
            ("|b1" if b1 else "") + (f"|tune{tune['batch']}|{tune['records_digest']}" if tune else "")
        key = hashlib.sha256(f"{graph.digest()}|{json.dumps(target, sort_keys=True)}|{opt_level}|{tvm.__version__}{sched_key}".encode()).hexdigest()[:16]
        lib_name = f"lib_{key}.so"
        t0 = time.perf_counter()
        try:
            mod = lower(graph, batch1_entry=b1, static_batches=static_batches(tune))
            tgt = tvm.target.Target(target)
            with tvm.transform.PassContext(opt_level=opt_level):
                if tune:  # fused, with the recorded schedules applied to the tuned kernels
                    mod, applied, tune["kernels_digest"] = apply_records(mod, tgt, out / TUNE_DIR)
                    if not applied:
                        raise CompileError(f"tvm.tune: none of the tuning records in {tune.get('log') or TUNE_DIR} "
                                           f"matches a kernel of this model at batch {tune['batch']} (records of "
                                           f"another model?)")
                    tune["kernels_applied"] = len(applied)
                ex = tvm.compile(_scheduled(mod, tgt, {"schedule": schedule, **par}, fused=bool(tune)), target=tgt)
            cc = cross_compiler(target, {"cc": info.get("cross_compiler")})
            if cc:
                from tvm.support.cc import cross_compiler as _fcompile

                ex.export_library(str(out / lib_name), fcompile=_fcompile(cc))
            else:
                ex.export_library(str(out / lib_name))
            info["library_target"] = library_target(ex)
        except CompileError:
            raise
        except Exception as e:
            raise CompileError(f"TVM build failed: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}") from e
        info["library"] = lib_name
        info["build_seconds"] = round(time.perf_counter() - t0, 3)
        files = list(info.get("files", []))
        for f in (lib_name, BUILD_FILE):
            if f not in files:
                files.append(f)
        info["files"] = files
        (out / BUILD_FILE).write_text(json.dumps({"library": lib_name, "target": target,
                                                  "library_target": info["library_target"],
                                                  "not_run_here": info.get("not_run_here"),
                                                  "opt_level": opt_level, "schedule": schedule, **par,
                                                  "batch1_entry": b1, "tune": tune}, indent=1))

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

        core, _ = split_epilogue(graph)
        inner = [v for n in core.nodes for v in n.outputs]
        debug = core.with_(outputs=inner)
        tgt = tvm.target.Target(info.get("target") or resolve_target({}))
        with tvm.transform.PassContext(opt_level=int(info.get("opt_level", 3))):
            ex = tvm.compile(_scheduled(lower(debug), tgt, info), target=tgt)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        args = [_to_tvm(np.ascontiguousarray(feeds[i], dtype=np.int64 if isinstance(core.value(i).dtype, FixedType)
                                             else np.float32)) for i in core.inputs]
        res = vm["main"](*args)
        got = {}
        for k, v in enumerate(inner):
            a = _from_tvm(res[k])
            t = core.value(v).dtype
            got[v] = t.to_real(np.asarray(a)) if isinstance(t, FixedType) else np.asarray(a)
        div = first_divergence(core, ref_all, got)
        div["how"] = f"a TVM debug build returning all {len(inner)} intermediate values"
        return div

    # ------------------------------------------------------------------ load
    def load(self, out_dir, info: dict | None = None, graph: Graph | None = None) -> Callable[[dict], dict]:
        """A callable running the compiled library.

        Args:
            out_dir: the artifact directory.
            info: the dict from :meth:`emit`/:meth:`build` (``tvm_build.json`` is used when it
                has no ``library``).
            graph: the IR graph (defaults to the saved ``model.json``); gives input/output
                names, shapes and types.
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
            CompileError: when no library has been built or it cannot be loaded.
        """
        import tvm
        from tvm import relax

        out = Path(out_dir)
        lib_name = (info or {}).get("library")
        if not lib_name and (out / BUILD_FILE).exists():
            lib_name = json.loads((out / BUILD_FILE).read_text())["library"]
        if not lib_name or not (out / lib_name).exists():
            raise CompileError(f"no TVM library in {out} (run build first)")
        why_not = (info or {}).get("not_run_here")
        if why_not is None and (out / BUILD_FILE).exists():
            why_not = json.loads((out / BUILD_FILE).read_text()).get("not_run_here")
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
        b1 = (info or {}).get("batch1_entry")
        if b1 is None and (out / BUILD_FILE).exists():
            b1 = json.loads((out / BUILD_FILE).read_text()).get("batch1_entry", False)
        # a TVM VirtualMachine is not re-entrant: two threads calling it at once corrupt its
        # register file (wrong outputs or a crash), so every entry takes the same lock
        vm_lock = threading.Lock()

        def _locked(f):
            def call(*args):
                with vm_lock:
                    return f(*args)
            return call
        tune = (info or {}).get("tune")
        if tune is None and (out / BUILD_FILE).exists():
            tune = json.loads((out / BUILD_FILE).read_text()).get("tune")
        fn = _locked(vm["main"])
        fn1 = _locked(vm[BATCH1_ENTRY]) if b1 else None
        # a tuned library: its static entries by batch size (main_b<B>, and main_b1)
        static = {int(tune["batch"]): _locked(vm[f"main_b{int(tune['batch'])}"])} if tune else {}
        if static and fn1 is not None:
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
        to_tvm = _to_tvm
        tensor_type = tvm.runtime.Tensor

        def call_tensors(arrays):
            """Run the library on positional inputs (``g.inputs`` order, of the right dtype and
            shape; not checked), each a TVM tensor (passed as is, e.g. an earlier call's output),
            a numpy array or a torch CPU tensor (shared zero-copy when 64-byte aligned); returns
            the output TVM tensors (fresh per call).  A batch size with a static entry (the tuned
            batch) runs that entry."""
            f = static.get(arrays[0].shape[0], fn) if static and arrays else fn
            res = f(*[a if isinstance(a, tensor_type) else to_tvm(a) for a in arrays])
            return [res[0]] if n_out == 1 else [res[i] for i in range(n_out)]

        def call_tensors1(arrays):
            """:func:`call_tensors` for batch-1 inputs through the static ``main_b1`` entry."""
            res = fn1(*[a if isinstance(a, tensor_type) else to_tvm(a) for a in arrays])
            return [res[0]] if n_out == 1 else [res[i] for i in range(n_out)]

        def call_raw(arrays):
            """:func:`call_tensors` with the outputs as numpy arrays sharing memory with TVM's
            (zero-copy DLPack views)."""
            return [_from_tvm(r) for r in call_tensors(arrays)]

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
                            to_tensor=to_tvm, from_tensor=_from_tvm, tensor_type=tensor_type,
                            empty=lambda shape, dtype: tvm.runtime.empty(shape, dtype, tvm.cpu()),
                            static={b: f for b, f in static.items() if b != 1})
        run.fast_nan_check = [name in quantized_in for name, _ in ins]
        return run
