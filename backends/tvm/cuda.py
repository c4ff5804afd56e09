"""The ``tvm-cuda`` target: the same Relax lowering as ``tvm-llvm``, compiled for an NVIDIA GPU.

Build: ``tvm.compile`` with target ``{"kind": "cuda", "arch": "sm_80"}`` (config ``tvm.arch``:
``sm_80`` default, ``sm_90``, any ``sm_XY``) and a portable x86-64 host target (:mod:`.target`),
through TVM's default CUDA pipeline (``tvm.relax.backend.cuda.pipeline``: fusion with
``FuseOps``/``FuseTIR``, every kernel scheduled with the DLight GPU rules ``dl.gpu.Matmul``,
``GEMV``, ``Reduction``, ``GeneralReduction``, ``Fallback`` from ``tvm.s_tir.dlight``, no tuning)
-- with the rules applied per kernel so that one rule failing on a kernel falls through to the
next (:func:`cuda_pipeline`).  This needs no GPU and no
CUDA toolkit: the library embeds the generated CUDA C source (also written to ``model.cu``), which
TVM's CUDA runtime compiles for the device when the library is loaded (NVRTC from ``cuda-python``,
or ``nvcc`` with ``TVM_CUDA_COMPILE_MODE=nvcc``; TVM 0.27 ``tvm.support.nvcc``).

Run: :meth:`CudaBackend.load` runs the library on ``tvm.cuda(0)`` when that device exists; without
one it returns a callable that raises :class:`CompileError`, and ``emit`` records
``not_run_here`` so the compile report and manifest say the artifact was not run (exactness not
checked here).  Quantized graphs compute in integers on the device (bit-exact by construction, as
on the CPU); the float host epilogue runs in NumPy on the host exactly as the reference.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ...compiler.errors import CompileError
from ...compiler.ir.graph import Graph
from ...compiler.ir.types import FixedType
from ...compiler.reference import execute
from . import BUILD_FILE, EPILOGUE_STEM, FULL_STEM, GRAPH_STEM, TvmBackend, feed_array
from .target import find_module, library_target, resolve_cuda_target

__all__ = ["CudaBackend", "CUDA_SOURCE", "cuda_device_reason"]

#: the generated CUDA C source, written beside the library by :meth:`CudaBackend.build`
CUDA_SOURCE = "model.cu"
_CUDA_KEYS = ("target", "arch")


def cuda_device_reason() -> str | None:
    """None when ``tvm.cuda(0)`` exists, else why a ``tvm-cuda`` library cannot run here."""
    import tvm

    try:
        if tvm.cuda(0).exist:
            return None
    except Exception as e:  # pragma: no cover - a TVM without the CUDA runtime
        return f"no CUDA runtime in this TVM ({type(e).__name__}: {e})"
    return "no CUDA device on this machine (tvm.cuda(0) does not exist)"


def _cuda_source(module) -> str:
    """The CUDA C source embedded in a compiled module ('' when it has no CUDA module)."""
    c = find_module(module, "cuda")
    return c.inspect_source("cuda") if c is not None else ""


class CudaBackend(TvmBackend):
    """Compile an IR graph with TVM for an NVIDIA GPU (Relax, CUDA target, DLight schedules).

    Same artifact layout and runtime-array contract as :class:`TvmBackend`, plus ``model.cu`` (the
    CUDA source the library embeds).  Config ``tvm:``: ``arch`` (``sm_80`` default), ``mcpu`` of the
    host code (portable ``x86-64`` default), ``opt_level``; ``schedule`` may only be ``dlight``.
    """

    def __init__(self, name: str = "tvm-cuda"):
        super().__init__(name)

    def emit(self, graph: Graph, config: dict, out_dir) -> dict:
        """:meth:`TvmBackend.emit`, with ``target`` the CUDA target, ``target_host`` the host
        target, ``schedule`` ``"dlight"`` and ``not_run_here`` set when no CUDA device exists.

        Raises:
            CompileError: a bad ``arch``/host target, a ``schedule`` other than ``dlight``, or
                ``tune`` (CPU only).
            UnsupportedError: naming the node, as for ``tvm-llvm``.
        """
        opts = dict((config or {}).get("tvm") or {})
        if "tune" in opts:
            raise CompileError("tvm-cuda: tvm.tune (meta-schedule tuning) is implemented for the tvm-llvm CPU target "
                               "only; remove it (the GPU library uses TVM's default DLight schedules)")
        cuda, host = resolve_cuda_target(opts)
        schedule = opts.pop("schedule", "dlight")
        if schedule != "dlight":
            raise CompileError(f"tvm-cuda: tvm.schedule must be 'dlight' (TVM's default GPU schedules), got {schedule!r}")
        cpu_opts = {k: v for k, v in opts.items() if k not in _CUDA_KEYS}
        info = super().emit(graph, {**(config or {}), "tvm": cpu_opts}, out_dir)
        info.update({"target": cuda, "target_host": host, "schedule": "dlight",
                     "not_run_here": cuda_device_reason()})
        for k in ("parallel", "min_parallel_work", "exec_mode", "cpu_variant_levels"):  # tvm-llvm CPU options
            info.pop(k, None)
        return info

    def load_all(self, out_dir, info: dict | None = None, graph: Graph | None = None) -> list:
        """``[(None, load(...))]``: a tvm-cuda artifact holds one library."""
        return [(None, self.load(out_dir, info, graph))]

    def build(self, out_dir, info: dict) -> None:
        """Compile the saved graph into ``lib_<hash>.so`` (host code + embedded CUDA source) and
        write ``model.cu``; adds ``library``, ``library_target`` (host), ``cuda_source``,
        ``build_seconds`` to ``info`` and writes ``tvm_build.json``.

        Raises:
            CompileError: when TVM fails to compile or export.
        """
        import tvm

        from .lower import lower

        out = Path(out_dir)
        graph = Graph.load(str(out / GRAPH_STEM))
        cuda, host = info["target"], info["target_host"]
        opt_level = int(info.get("opt_level", 3))
        key = hashlib.sha256(f"{graph.digest()}|{json.dumps([cuda, host], sort_keys=True)}|{opt_level}|"
                             f"{tvm.__version__}|dlight".encode()).hexdigest()[:16]
        lib_name = f"lib_{key}.so"
        t0 = time.perf_counter()
        try:
            mod = lower(graph)
            tgt = tvm.target.Target(cuda, host=host)
            with tvm.transform.PassContext(opt_level=opt_level):
                ex = tvm.compile(mod, target=tgt, relax_pipeline=cuda_pipeline(tgt))
            ex.export_library(str(out / lib_name))
        except Exception as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            raise CompileError(f"TVM CUDA build failed: {type(e).__name__}: {msg}") from e
        src = _cuda_source(ex)
        if not src:
            raise CompileError("TVM CUDA build produced no CUDA module (nothing to run on the GPU)")
        (out / CUDA_SOURCE).write_text(src)
        info.update({"library": lib_name, "library_target": library_target(ex), "cuda_source": CUDA_SOURCE,
                     "build_seconds": round(time.perf_counter() - t0, 3)})
        info["files"] = list(info.get("files", [])) + [f for f in (lib_name, CUDA_SOURCE, BUILD_FILE)
                                                       if f not in info.get("files", [])]
        (out / BUILD_FILE).write_text(json.dumps({"library": lib_name, "target": cuda, "target_host": host,
                                                  "opt_level": opt_level, "schedule": "dlight",
                                                  "library_target": info["library_target"]}, indent=1))

    def localize(self, graph, config, out_dir, info, feeds, ref_all) -> dict:
        """Not offered for ``tvm-cuda``: returns a dict saying so (the report keeps the mismatch)."""
        return {"sentence": "first-divergence search is not implemented for tvm-cuda; compile the same model "
                            "for tvm-llvm to locate it", "how": "not run"}

    def load(self, out_dir, info: dict | None = None, graph: Graph | None = None) -> Callable[[dict], dict]:
        """A callable running the library on ``tvm.cuda(0)``: ``f(feeds) -> outputs`` with the
        contract of :meth:`TvmBackend.load` (batch-first runtime arrays in and out, numpy on the
        host).  Without a CUDA device the callable raises :class:`CompileError` saying so.

        Raises:
            CompileError: no library built; no way to compile the embedded CUDA source for the
                device (neither NVRTC from ``cuda-python`` nor ``nvcc``); a library that fails to load.
        """
        import tvm
        from tvm import relax

        out = Path(out_dir)
        build = json.loads((out / BUILD_FILE).read_text()) if (out / BUILD_FILE).exists() else {}
        lib_name = (info or {}).get("library") or build.get("library")
        if not lib_name or not (out / lib_name).exists():
            raise CompileError(f"no TVM library in {out} (run build first)")
        why_not = cuda_device_reason()
        if why_not:
            def no_device(feeds):
                raise CompileError(f"tvm-cuda: {why_not}; {lib_name} runs only on a machine with an NVIDIA GPU")
            return no_device
        _select_cuda_compiler()
        g = Graph.load(str(out / GRAPH_STEM))
        epilogue = Graph.load(str(out / EPILOGUE_STEM)) if (out / f"{EPILOGUE_STEM}.json").exists() else None
        full = graph if graph is not None else (Graph.load(str(out / FULL_STEM)) if epilogue is not None else g)
        dev = tvm.cuda(0)
        try:
            vm = relax.VirtualMachine(tvm.runtime.load_module(str((out / lib_name).resolve())), dev)
        except Exception as e:
            raise CompileError(f"cannot load TVM CUDA library {lib_name}: {e}") from e
        fn = vm["main"]
        vm_lock = threading.Lock()
        ins = [(n, g.values[n], np.int64 if isinstance(g.values[n].dtype, FixedType) else np.float32) for n in g.inputs]
        quantized_in = {i for i in g.inputs if any(c.op == "Quantize" for c in g.consumers(i))}
        outs = list(g.outputs)

        def run(feeds: dict) -> dict:
            args = []
            for name, v, dt in ins:
                a = feed_array(feeds, name, v, dt, name in quantized_in)
                args.append(tvm.runtime.tensor(a, device=dev))
            with vm_lock:  # a TVM VirtualMachine is not re-entrant (see TvmBackend.load)
                res = fn(*args)
            res = [res] if isinstance(res, tvm.runtime.Tensor) else [res[i] for i in range(len(outs))]
            env = {o: r.numpy() for o, r in zip(outs, res)}
            if epilogue is not None:
                env.update(execute(epilogue, {i: env[i] for i in epilogue.inputs}, codes=True))
            return {o: env[o] for o in full.outputs}

        run.input_names = [n for n, _, _ in ins]
        run.output_names = outs
        return run


def cuda_pipeline(target):
    """TVM 0.27's default CUDA Relax pipeline (``relax.backend.cuda.pipeline``: library dispatch,
    ``LegalizeOps``, ``FuseOps``/``FuseTIR``, DLight, dataflow lowering, finalization) with one
    change: the DLight rules are tried per kernel in order (``gpu.Matmul``, ``GEMV``, ``Reduction``,
    ``GeneralReduction``, ``Fallback``) and a rule that *raises* on a kernel is skipped like one that
    does not match -- TVM's ``ApplyDefaultSchedule`` stops the whole build there (its GEMV rule
    asserts on a reduction without reduction loops in the Lookup/TopK kernels).  A kernel no rule
    schedules keeps no thread binding and TVM's ``VerifyMemory`` then fails the build."""
    import tvm
    from tvm import s_tir, tirx
    from tvm.relax.backend.cuda import pipeline as cuda
    from tvm.s_tir import dlight as dl

    rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]

    @tvm.transform.module_pass(opt_level=0, name="QdeployDLight")
    def schedule(mod, _ctx):
        updated = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or int(func.attrs.get("tirx.is_scheduled", 0) if func.attrs else 0):
                continue
            for rule in rules:
                try:
                    space = rule.apply(func, target, False)
                except Exception:  # noqa: BLE001 - a rule that cannot handle this kernel
                    continue
                if space is None:
                    continue
                sch = space if isinstance(space, s_tir.Schedule) else space[0]
                updated[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                break
        for gv, func in updated.items():
            mod[gv] = func
        return mod

    legalize = [p for p in cuda.legalize_passes(target) if p.info.name != "ApplyDefaultSchedule"] + [schedule]

    @tvm.transform.module_pass(opt_level=0, name="QdeployCudaPipeline")
    def pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(cuda.library_dispatch_passes(target) + legalize
                                            + cuda.dataflow_lower_passes(target) + cuda.finalize_passes(target))(mod)

    return pipeline


def _select_cuda_compiler() -> None:
    """Make sure TVM can compile the embedded CUDA source when the library is loaded: NVRTC
    (``cuda.bindings.nvrtc``, TVM's default) when importable, else ``nvcc`` on ``PATH`` (sets
    ``TVM_CUDA_COMPILE_MODE=nvcc`` unless the user set it).

    Raises:
        CompileError: neither is available.
    """
    import tvm.support.nvcc  # noqa: F401  (registers tvm_callback_cuda_compile)

    if os.environ.get("TVM_CUDA_COMPILE_MODE"):
        return
    try:
        from cuda.bindings import nvrtc  # noqa: F401
        return
    except ImportError:
        pass
    if shutil.which("nvcc"):
        os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
        return
    raise CompileError("tvm-cuda: the library embeds CUDA source that TVM compiles when it is loaded; install "
                       "NVRTC (pip install cuda-python) or put nvcc on PATH")
