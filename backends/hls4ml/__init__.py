"""The ``hls4ml`` target: an hls4ml (Vitis/Vivado HLS) project for the fixed-point core, run
bit-exactly through its g++ C simulation.

Pipeline (see :class:`Hls4mlBackend`):

1. :func:`qdeploy.passes.partition` splits the graph; the float prologue (input ``Quantize`` /
   ``Sign`` of float inputs) and epilogue (float output scale, ``Softmax``) run on the host with
   the reference interpreter, only the fixed-point core becomes firmware.
2. :mod:`.translate` maps each device node to hls4ml layer dicts (the translator of its op in
   :data:`.ops.TRANSLATE`) with every precision taken from our IR types; ``hls4ml.model.graph.ModelGraph.from_layer_list`` builds the model and
   ``write()`` writes ``out_dir/hls4ml_prj`` (weights embedded in the headers,
   ``WriteWeightsTxt=False``, so the directory is relocatable and is what a user hands to
   ``vitis_hls -f build_prj.tcl``).
3. ``build`` compiles the C simulation (``firmware/<project>.cpp`` + ``<project>_bridge.cpp``)
   into ``firmware/<project>-<hash>.so``, cached in ``~/.cache/qdeploy/hls4ml/<hash>.so`` by a
   content hash of the generated sources.
4. ``load`` opens that library with ctypes and calls ``<project>_double`` once per sample
   (flat channels-last float64 arrays; hls4ml ``myproject_bridge.cpp``).
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import io
import os
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ...compiler.errors import CompileError, UnsupportedError
from ...compiler.ir.graph import Graph
from ...compiler.ir.types import FixedType
from ...passes.partition import partition, run_partitioned
from . import ops_layout  # noqa: F401 - registers its ops in the .ops tables
from . import ops_threshold  # noqa: F401 - registers MultiThreshold in the .ops tables
from .da import DA, check_da, is_da
from .ops import TRANSLATE
from .mac_cost import layer_reuse_factors
from .csim import CXXFLAGS, WEIGHTS_DIR_CPP, WEIGHTS_DIR_SRC, WEIGHTS_FLAGS, set_weights_dir, src_hash, traced_run
from .model_check import check_model, check_reuse_factors
from .settings import adjusted_sentence, full_part, requested_reuse_factor
from .translate import MAX_IO_WIDTH, Translation, translate

__all__ = ["Hls4mlBackend", "DEFAULTS"]

#: Defaults of the ``hls4ml`` config section.
DEFAULTS = {"backend": "Vitis", "part": "xcvu9p-flga2104-2L-e", "clock_period": 5, "io_type": "io_parallel",
            "strategy": "Latency", "reuse_factor": 1, "project_name": "myproject"}
PRJ_DIR = "hls4ml_prj"
#: hls4ml backends qdeploy writes projects for: Vitis / Vivado HLS (FPGA, ap_fixed types) and Catapult
#: (Siemens Catapult HLS, ASIC firmware with Algorithmic C ac_fixed types, hls4ml's ``tech='asic'``).
#: hls4ml 1.3's ``CatapultBackend.create_initial_config`` takes no ``write_weights_txt`` (the
#: TypeError an earlier probe saw, from ``hls4ml.utils.config.create_config``): the writer options
#: are set in the config dict instead.  Its C simulation builds with g++ (the AC headers ship with
#: hls4ml) and is checked against the reference like the others.
BACKENDS = ("Vitis", "Vivado", "Catapult")
#: hls4ml optimizers that change values of models built with explicit types; disabled (and
#: restored) while we build:
#: * ``vivado:merge_batch_norm_quantized_tanh`` replaces BatchNormalization -> binary_tanh by a
#:   threshold layer with 0/1 outputs, wrong for negative scales (``MergeBatchNormAndQuantizedTanh``
#:   in hls4ml 1.3.0 ``backends/vivado/passes/bn_quant.py``; its ``nnet::normalize_binary_tanh``,
#:   ``templates/vivado/nnet_utils/nnet_batchnorm.h``, writes ``ap_uint<1>`` results of
#:   ``x >= threshold[channel]`` whatever the sign of the scale);
#: * ``remove_transpose_before_flatten`` drops a Transpose -> Flatten -> Dense transpose assuming it
#:   is a channels-first conversion (wrong for other perms, and breaks a Transpose output);
#: * ``remove_single_channel_transpose`` drops an input Transpose whenever the first axis is 1,
#:   whatever the permutation.
_BAD_OPTIMIZERS = {"vivado:quantization": ("vivado:merge_batch_norm_quantized_tanh",),
                   "convert": ("remove_transpose_before_flatten", "remove_single_channel_transpose")}
_lock = threading.Lock()


def _cache_dir() -> Path:
    return Path(os.environ.get("QDEPLOY_CACHE", Path.home() / ".cache" / "qdeploy")) / "hls4ml"


def _options(config: dict | None) -> dict:
    user = dict((config or {}).get("hls4ml") or {})
    unknown = set(user) - set(DEFAULTS)
    if unknown:
        raise CompileError(f"unknown hls4ml option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **user}
    if opts["backend"] not in BACKENDS:
        raise CompileError(f"hls4ml backend must be one of {', '.join(map(repr, BACKENDS))}, got {opts['backend']!r}")
    if opts["io_type"] not in ("io_parallel", "io_stream"):
        raise CompileError(f"hls4ml io_type must be 'io_parallel' or 'io_stream', got {opts['io_type']!r}")
    if is_da(opts["strategy"]):
        opts["strategy"] = DA
    if opts["strategy"] not in ("Latency", "Resource", DA):
        raise CompileError(f"hls4ml strategy must be 'Latency', 'Resource' or {DA!r}, got {opts['strategy']!r}")
    if isinstance(opts["reuse_factor"], dict):
        opts["reuse_factor"] = dict(opts["reuse_factor"])
        for k in opts["reuse_factor"]:
            requested_reuse_factor(opts["reuse_factor"], k)
    else:
        opts["reuse_factor"] = requested_reuse_factor(opts["reuse_factor"], "model")
    try:
        opts["clock_period"] = float(opts["clock_period"])
    except (TypeError, ValueError):
        raise CompileError(f"hls4ml clock_period must be a number of ns, got {opts['clock_period']!r}") from None
    if not opts["clock_period"] > 0:
        raise CompileError(f"hls4ml clock_period must be a positive number of ns, got {opts['clock_period']}")
    if opts["backend"] != "Catapult":  # Catapult builds ASIC firmware (tech asic): no FPGA part
        opts["part"] = full_part(opts["part"])
    return opts


@contextlib.contextmanager
def _without_bad_optimizers():
    from hls4ml.model.flow import get_flow

    removed = []
    with _lock:
        try:
            for fname, opts in _BAD_OPTIMIZERS.items():
                flow = get_flow(fname)
                for opt in opts:
                    if opt in flow.optimizers:
                        idx = flow.optimizers.index(opt)
                        flow.optimizers.remove(opt)
                        removed.append((flow, idx, opt))
            yield
        finally:
            for flow, idx, opt in reversed(removed):
                flow.optimizers.insert(idx, opt)


def _build_model(tr: Translation, opts: dict, prj: Path, trace: bool = False, layer_rf: dict | None = None):
    """The hls4ml ModelGraph of ``tr``; ``trace``: every layer saves its output (hls4ml's
    ``Trace`` layer option and ``trace_output``, read back by :func:`traced_run`)."""
    import hls4ml
    from hls4ml.model.graph import ModelGraph

    extra = {"write_weights_txt": True}
    if opts["backend"] == "Catapult":  # CatapultBackend.create_initial_config takes no writer options
        extra = {"tech": "asic"}
    cfg = hls4ml.utils.config.create_config(output_dir=str(prj), project_name=opts["project_name"],
                                            backend=opts["backend"], part=opts["part"],
                                            clock_period=opts["clock_period"], io_type=opts["io_type"], **extra)
    if opts["backend"] == "Catapult":
        cfg["WriterConfig"] = {"Namespace": None, "WriteWeightsTxt": True, "WriteTar": False}
    rf = opts["reuse_factor"]
    default_rf = rf.get("default", 1) if isinstance(rf, dict) else rf
    layer_rf = layer_rf or {}
    cfg["HLSConfig"] = {
        # 'Model' must exist; its precision is never used because every layer var is set below.
        "Model": {"Precision": "ap_fixed<16,6>", "ReuseFactor": default_rf, "Strategy": opts["strategy"]},
        "LayerName": {name: {"Precision": dict(p), **({"Trace": True} if trace else {}),
                             **({"ReuseFactor": layer_rf[name]} if name in layer_rf else {})}
                      for name, p in tr.precisions.items()},
    }
    with _without_bad_optimizers():
        model = ModelGraph.from_layer_list(cfg, copy.deepcopy(tr.layers), inputs=list(tr.inputs),
                                           outputs=list(tr.outputs))
    if trace:
        model.config.trace_output = True
    return model



class Hls4mlBackend:
    """hls4ml backend (see the module docstring).

    Config (all optional), section ``hls4ml``: ``backend`` ("Vitis" | "Vivado"), ``part``,
    ``clock_period`` (ns), ``io_type`` ("io_parallel" | "io_stream"), ``strategy``
    ("Latency" | "Resource" | "distributed_arithmetic", :mod:`.da`), ``reuse_factor`` (int), ``project_name``; defaults in
    :data:`DEFAULTS`.
    """

    def __init__(self, name: str = "hls4ml"):
        self.name = name

    def supports(self, graph: Graph) -> bool:
        """True when every node of ``graph``'s fixed-point device partition has a translator in
        :data:`.ops.TRANSLATE` (float prologue/epilogue nodes run on the host and need none).
        False when the graph cannot be partitioned (a float op inside the fixed-point core, or
        no fixed-point core).  Attribute-level limits (a 3-D kernel, broadcasting, a padded
        unsigned MaxPool) are only found by :meth:`emit`."""
        try:
            device = partition(graph).device
        except UnsupportedError:
            return False
        return TRANSLATE.supports(device)

    # ------------------------------------------------------------------ emit
    def emit(self, graph: Graph, config: dict, out_dir) -> dict:
        """Write ``out_dir/hls4ml_prj`` and return the manifest facts.

        Returns:
            dict with ``project_dir``, options used, ``hls4ml_version``, ``host_nodes``
            (prologue/epilogue node names run by the host interpreter), ``device_nodes``,
            ``device_inputs``/``device_outputs`` (IR value names, their hls4ml layers and types),
            ``layers`` (hls4ml layers with the precisions hls4ml kept), ``notes``.
        Raises:
            UnsupportedError: naming the node for anything without an exact mapping
                (from :func:`~qdeploy.passes.partition` or :mod:`.translate`).
            CompileError: bad options, or hls4ml altered the model behind our back.
        """
        import hls4ml

        opts = _options(config)
        part = partition(graph)
        rfs = layer_reuse_factors(part.device, opts["strategy"], opts["reuse_factor"])
        if opts["strategy"] == DA:  # before translating: a refused layer is named, nothing is written
            check_da(part.device, opts["backend"], opts["io_type"], rfs)
        tr = translate(part.device, opts["io_type"], opts["strategy"])
        layer_rf = {lay: r["used"] for node, r in rfs.items() for lay in tr.node_layers.get(node, [])}
        prj = Path(out_dir) / PRJ_DIR
        model = _build_model(tr, opts, prj, layer_rf=layer_rf)
        check_model(model, tr)
        model.write()
        summary = check_model(model, tr)  # writing applies the remaining flows: check again
        check_reuse_factors(model, tr, rfs)
        for name, text in WEIGHTS_DIR_SRC.items():
            (prj / name).write_text(text)
        missing = [f"{w.name}.txt" for lay in model.get_layers() for w in lay.get_weights()
                   if not (prj / "firmware" / "weights" / f"{w.name}.txt").is_file()]
        if missing:
            raise CompileError(f"hls4ml wrote no weight file(s) {missing[:4]} for the C simulation to load")
        adjusted = adjusted_sentence(rfs)
        weight_files = {lay.name: [f for f in (f"firmware/weights/{w.name}.h" for w in lay.get_weights())
                                   if (prj / f).is_file()] for lay in model.get_layers()}
        by_name = {lay.name: lay for lay in model.get_layers()}

        def port(layer):  # the top function's argument: the layer's output variable
            var = by_name[layer].get_output_variable() if layer in by_name else None
            return var.name if var is not None else layer
        dev = part.device
        return {
            "hls4ml_version": hls4ml.__version__,
            "project_dir": PRJ_DIR,
            **opts,
            "host_nodes": {"prologue": [n.name for n in part.prologue.nodes] if part.prologue else [],
                           "epilogue": [n.name for n in part.epilogue.nodes] if part.epilogue else []},
            "device_nodes": [n.name for n in dev.nodes],
            "device_inputs": [{"value": v.name, "layer": tr.value_layer[v.name], "port": port(tr.value_layer[v.name]),
                               "shape": list(v.shape), "type": str(v.dtype)} for v in dev.input_values()],
            "device_outputs": [{"value": v.name, "layer": tr.value_layer[v.name], "port": port(tr.value_layer[v.name]),
                                "shape": list(v.shape), "type": str(v.dtype)} for v in dev.output_values()],
            "hls_outputs": list(tr.outputs),
            "node_layers": tr.node_layers,
            "layers": summary,
            "layer_strategy": {d["name"]: d["strategy"] for d in summary if d.get("strategy")},
            "notes": tr.notes + ([adjusted] if adjusted else []),
            "reuse_factors": rfs,
            "weight_files": {k: v for k, v in weight_files.items() if v},
            "so": None,
        }

    def finalize(self, out_dir, info: dict, graph: Graph, feeds: dict, final_dir, golden: str) -> None:
        """Make the staged project (``out_dir``, published later as ``final_dir``) ready to take to
        Vitis HLS (:mod:`.project`): ``tb_data/`` from the golden ``feeds`` (IR feeds, codes),
        ``OutputDir`` = the final project folder, ``README.md``; sets ``info['tb_data']``.
        ``golden``: where the golden inputs came from, in words."""
        from ...compiler.reference import execute
        from .project import exact_results_log, point_output_dir, write_readme, write_tb_data
        prj = Path(out_dir) / info["project_dir"]
        tb = write_tb_data(prj, info, graph, execute(graph, feeds, codes=True, keep=True))
        tb["golden"] = golden
        tb["exact_log"] = exact_results_log(prj, info["project_name"])
        point_output_dir(prj, Path(final_dir) / info["project_dir"])
        write_readme(prj, info, tb, golden)
        info["tb_data"] = tb

    # ------------------------------------------------------------------ build
    def build(self, out_dir, info: dict) -> None:
        """Compile the C simulation; sets ``info['so']`` (path relative to ``out_dir``) and
        ``info['build_cached']``.

        Raises:
            CompileError: g++ failed (message holds the tail of its output).
        """
        prj = Path(out_dir) / info["project_dir"]
        project = info["project_name"]
        digest = src_hash(prj, project)
        so = prj / "firmware" / f"{project}-{digest[:12]}.so"
        cached = _cache_dir() / f"{digest}.so"
        hit = cached.is_file()
        if hit:
            shutil.copyfile(cached, so)
        else:
            self._compile(prj, project, so)
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(f".{os.getpid()}.tmp")
                shutil.copyfile(so, tmp)
                os.replace(tmp, cached)
            except OSError:
                pass
        info["so"] = str(so.relative_to(Path(out_dir)))
        info["build_cached"] = hit
        info["source_hash"] = digest

    @staticmethod
    def _compile(prj: Path, project: str, so: Path) -> None:
        cxx = os.environ.get("CXX", "g++")
        inc = ["-Ifirmware/ap_types/", "-Ifirmware/", "-I."]
        if (prj / "firmware" / "ac_types").is_dir():  # Catapult: Algorithmic C types (its build_lib.sh flags)
            inc = ["-Ifirmware/ac_types/include", "-Ifirmware/ac_math/include", "-Ifirmware/ac_simutils/include",
                   "-Ifirmware/nnet_utils", "-Ifirmware/", "-I."]
        for name, text in WEIGHTS_DIR_SRC.items():
            if not (prj / name).is_file():
                (prj / name).write_text(text)
        objs = [f"{project}.o", f"{project}_bridge.o", "qdeploy_weights_dir.o"]
        jobs = [[cxx, *CXXFLAGS, *WEIGHTS_FLAGS, *inc, "-c", src, "-o", o]
                for src, o in zip([f"firmware/{project}.cpp", f"{project}_bridge.cpp", WEIGHTS_DIR_CPP], objs)]

        def run(cmd):
            return subprocess.run(cmd, cwd=prj, capture_output=True, text=True)

        with ThreadPoolExecutor(max(1, min(3, os.cpu_count() or 1))) as ex:
            res = list(ex.map(run, jobs))
        res.append(run([cxx, *CXXFLAGS, "-shared", *objs, "-o", str(so.relative_to(prj))])
                   if all(r.returncode == 0 for r in res) else res[-1])
        for f in objs:
            (prj / f).unlink(missing_ok=True)
        bad = [r for r in res if r.returncode != 0]
        if bad:
            raise CompileError(f"g++ failed building the hls4ml C simulation in {prj}: {bad[0].stderr[-3000:]}")

    # ------------------------------------------------------------------ localize
    def localize(self, graph: Graph, config: dict, out_dir, info: dict, feeds: dict, ref_all: dict) -> dict:
        """First device layer whose C-simulation outputs differ from the reference (called only
        when the artifact differs): the same translation is rebuilt in a temporary directory with
        every layer traced (hls4ml ``Trace: True``), compiled with the artifact's g++ flags and run
        on the device inputs the reference computed; each traced layer is compared, through
        ``value_layer`` (IR value -> hls4ml layer), with :func:`qdeploy.backends.divergence.first_divergence`.

        Returns:
            its dict plus ``how``.  Values whose layer hls4ml dropped (a no-op reshape) are
            listed in ``not_observed``.
        """
        import tempfile

        from ..divergence import first_divergence

        opts = _options(config)
        dev = partition(graph).device
        tr = translate(dev, opts["io_type"], opts["strategy"])  # the same translation as emit
        rfs = layer_reuse_factors(dev, opts["strategy"], opts["reuse_factor"])
        layer_rf = {lay: r["used"] for node, r in rfs.items() for lay in tr.node_layers.get(node, [])}
        with tempfile.TemporaryDirectory(prefix="qdeploy_trace_") as tmp:
            prj = Path(tmp) / PRJ_DIR
            with contextlib.redirect_stdout(io.StringIO()):
                model = _build_model(tr, opts, prj, trace=True, layer_rf=layer_rf)
                model.write()
            so = prj / "firmware" / f"{opts['project_name']}-trace.so"
            self._compile(prj, opts["project_name"], so)
            xs = [v.dtype.to_real(np.asarray(ref_all[v.name])).reshape(-1, v.size) for v in dev.input_values()]
            traced = traced_run(model, so, xs)
        got = {v: traced[lay] for v, lay in tr.value_layer.items() if lay in traced and v not in dev.inputs}
        div = first_divergence(dev, ref_all, got, tr.node_layers, getattr(tr, "perms", None))
        div["how"] = f"a traced hls4ml C simulation ({len(traced)} layers)"
        return div

    # ------------------------------------------------------------------ load
    def load(self, out_dir, info: dict, graph: Graph):
        """A callable ``feeds -> outputs`` on runtime arrays of ``graph`` (int64 codes for fixed
        types, float32 for float ones), batch first.

        Raises:
            CompileError: the library is missing (``build`` not run) or does not match ``graph``.
            UnsupportedError: a device input/output wider than 53 bits (not exact in float64).
        """
        if not info.get("so"):
            raise CompileError("hls4ml artifact has no compiled library: run build() first")
        part = partition(graph)
        dev = part.device
        if [d["value"] for d in info["device_inputs"]] != list(dev.inputs) or \
                [d["value"] for d in info["device_outputs"]] != list(dev.outputs):
            raise CompileError("hls4ml artifact does not match this graph's device partition")
        sim = _CSim(Path(out_dir) / info["so"], info["project_name"], dev, info)
        return lambda feeds: run_partitioned(part, graph, feeds, sim)


class _CSim:
    """ctypes wrapper of ``<project>_double(in..., out...)`` for the device graph."""

    def __init__(self, so: Path, project: str, dev: Graph, info: dict):
        import numpy.ctypeslib as npc

        if not so.is_file():
            raise CompileError(f"compiled C simulation {so} not found (was the directory moved without it?)")
        self.lib = ctypes.CDLL(str(so.resolve()))
        set_weights_dir(self.lib, so)
        self.fn = getattr(self.lib, f"{project}_double")
        self.fn.restype = None
        hls_out = info["hls_outputs"]
        self.fn.argtypes = [npc.ndpointer(ctypes.c_double, flags="C_CONTIGUOUS")] * (len(dev.inputs) + len(hls_out))
        self.ins = dev.input_values()
        for v in self.ins + dev.output_values():
            if not isinstance(v.dtype, FixedType) or v.dtype.width > MAX_IO_WIDTH:
                raise UnsupportedError(f"device value of type {v.dtype} is not exact through float64", v.name)
        layer_of = {d["value"]: d["layer"] for d in info["device_outputs"]}
        self.outs = [(v, hls_out.index(layer_of[v.name])) for v in dev.output_values()]
        self.out_sizes = []
        size_of = {}
        for v, k in self.outs:
            size_of[k] = v.size
        self.out_sizes = [size_of[k] for k in range(len(hls_out))]

    def __call__(self, feeds: dict) -> dict:
        xs = [v.dtype.to_real(np.asarray(feeds[v.name], dtype=np.int64)).reshape(-1, v.size) for v in self.ins]
        n = xs[0].shape[0]
        raw = [np.zeros((n, s)) for s in self.out_sizes]
        for i in range(n):
            args = [np.ascontiguousarray(x[i]) for x in xs]
            outs = [np.zeros(s) for s in self.out_sizes]
            self.fn(*args, *outs)
            for k, o in enumerate(outs):
                raw[k][i] = o
        res = {}
        for v, k in self.outs:
            q = np.ldexp(raw[k], v.dtype.frac_bits)
            codes = q.astype(np.int64)
            if not np.array_equal(codes, q):
                raise CompileError(f"C simulation returned a value off the grid of {v.dtype}", v.name)
            res[v.name] = codes.reshape((n, *v.shape))
        return res
