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
import hashlib
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
#: Layers hls4ml may drop on its own without changing any value (identical-type linear cast,
#: no-op reshape in io_parallel, final reshape, unit BatchNormalization).
_DROPPABLE = ("Reshape", "Activation", "BatchNormalization")
#: Layers hls4ml may insert on its own (exact: data movement only).
_INSERTABLE = ("ZeroPadding1D", "ZeroPadding2D", "Clone", "Repack", "Broadcast")
CXXFLAGS = ["-O3", "-fPIC", "-std=c++17", "-fno-gnu-unique", "-w"]
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
    ``Trace`` layer option and ``trace_output``, read back by :func:`_traced_run`)."""
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


def _check_reuse_factors(model, tr: Translation, rfs: dict) -> None:
    """hls4ml must build every Dense/Conv layer with the reuse factor qdeploy computed
    (:func:`.settings.closest_reuse_factor`); a layer it changed means the two legalizations
    disagree, and the estimate would describe another design.

    Raises:
        CompileError: naming the node, both values.
    """
    layers = {lay.name: lay for lay in model.get_layers()}
    for node, r in rfs.items():
        for name in tr.node_layers.get(node, []):
            lay = layers.get(name)
            if lay is None or lay.get_attr("reuse_factor") is None:
                continue
            if int(lay.get_attr("reuse_factor")) != r["used"]:
                raise CompileError(f"hls4ml built layer {name!r} with reuse factor {lay.get_attr('reuse_factor')}, "
                                   f"qdeploy computed {r['used']} (asked: {r['requested']}): the legalizations "
                                   f"disagree", node)


def _traced_run(model, so: Path, xs: list[np.ndarray]) -> dict:
    """Run a traced C simulation (built from ``model`` written with ``trace_output``) on each
    sample and collect every traced layer's output, as hls4ml 1.3's ``ModelGraph.trace`` does
    (``allocate_trace_storage`` / ``collect_trace_output`` / ``free_trace_storage`` of
    ``<project>_bridge.cpp``), but with our own g++ build.

    Args:
        xs: one ``(n, size)`` float64 array per model input.
    Returns:
        ``{layer name: (n, size) float64}``.
    """
    import numpy.ctypeslib as npc

    class TraceData(ctypes.Structure):
        _fields_ = [("name", ctypes.c_char_p), ("data", ctypes.c_void_p)]

    lib = ctypes.CDLL(str(so.resolve()))
    _set_weights_dir(lib, so)
    top = getattr(lib, f"{model.config.get_project_name()}_double")
    outs = [int(np.prod(v.shape)) for v in model.get_output_variables()]
    top.restype = None
    top.argtypes = [npc.ndpointer(ctypes.c_double, flags="C_CONTIGUOUS")] * (len(xs) + len(outs))
    sizes = {lay.name: int(np.prod(lay.get_output_variable().shape)) for lay in model.get_layers()
             if lay.get_attr("function_cpp", None) and lay.get_attr("trace", False)}
    n_traced = sum(len(lay.get_variables()) for lay in model.get_layers() if lay.name in sizes)
    lib.collect_trace_output.argtypes = [ctypes.POINTER(TraceData)]
    lib.allocate_trace_storage.argtypes = [ctypes.c_size_t]
    data = (TraceData * n_traced)()
    n = xs[0].shape[0]
    res = {k: np.zeros((n, v)) for k, v in sizes.items()}
    lib.allocate_trace_storage(ctypes.sizeof(ctypes.c_double))
    try:
        for i in range(n):
            top(*[np.ascontiguousarray(x[i]) for x in xs], *[np.zeros(k) for k in outs])
            lib.collect_trace_output(data)
            for d in data:
                name = d.name.decode()
                if name in res:
                    res[name][i] = np.ctypeslib.as_array(ctypes.cast(d.data, ctypes.POINTER(ctypes.c_double)),
                                                         shape=(sizes[name],))
    finally:
        lib.free_trace_storage()
    return res


def _check_model(model, tr: Translation) -> list[dict]:
    """Verify hls4ml kept our layers and types; returns a per-layer summary.

    Raises:
        CompileError: when hls4ml replaced a layer, changed a precision, or dropped a layer
            that is not a value-preserving no-op.
    """
    ours = {d["name"]: d for d in tr.layers}
    seen, summary = set(), []
    for lay in model.get_layers():
        name = lay.name
        types = {k: str(v.precision) for k, v in lay.types.items()}
        summary.append({"name": name, "class": lay.class_name, "types": types,
                        "reuse_factor": lay.get_attr("reuse_factor"), "strategy": lay.get_attr("strategy"),
                        **({"da_kernel_cost": float(lay.get_attr("da_kernel_cost"))}
                           if lay.get_attr("da_kernel_cost") is not None else {})})
        if name not in ours:
            if lay.class_name not in _INSERTABLE:
                raise CompileError(f"hls4ml inserted an unexpected layer {name!r} ({lay.class_name})")
            continue
        seen.add(name)
        want_cls = {"InputLayer": "Input"}.get(ours[name]["class_name"], ours[name]["class_name"])
        if _cls(lay.class_name) != _cls(want_cls) and lay.class_name != _hls4ml_class(want_cls):
            raise CompileError(f"hls4ml replaced layer {name!r} ({want_cls}) by {lay.class_name}")
        for var, want in tr.precisions[name].items():
            attr = f"{var}_t"
            t = lay.get_attr(attr)
            if t is None:
                continue
            got = str(t.precision)
            if _norm(got) != _norm(want) and not (var == "accum" and _max_pool(lay) and _holds(t.precision, want)):
                raise CompileError(f"hls4ml changed precision {var} of layer {name!r}: {want} -> {got}")
    for name, d in ours.items():
        if name not in seen and d["class_name"] not in _DROPPABLE + ("InputLayer",):
            raise CompileError(f"hls4ml dropped layer {name!r} ({d['class_name']})")
    return summary


def _max_pool(lay) -> bool:
    """A max-pooling layer (its accumulator only holds one of the input values)."""
    return "Pooling" in lay.class_name and str(lay.get_attr("pool_op", "")).lower() == "max"


def _holds(prec, want: str) -> bool:
    """hls4ml precision ``prec`` represents every value of our fixed type ``want``
    (``ap_[u]fixed<W,I,...>``): at least as many integer and fraction bits, and signed if ``want`` is.
    (Catapult's optimizers widen a max-pool accumulator; the maximum of exactly held values is the same.)"""
    import re
    m = re.match(r"\s*ap_(u?)fixed<\s*(\d+)\s*,\s*(-?\d+)", want)
    if m is None or not all(hasattr(prec, a) for a in ("width", "integer", "signed")):
        return False
    w_signed, w_width, w_int = m.group(1) != "u", int(m.group(2)), int(m.group(3))
    p_int_mag = prec.integer - (1 if prec.signed else 0)
    w_int_mag = w_int - (1 if w_signed else 0)
    return (prec.signed or not w_signed) and p_int_mag >= w_int_mag and \
        prec.width - prec.integer >= w_width - w_int


def _hls4ml_class(c: str) -> str | None:
    """Name of the Python class hls4ml instantiates for layer dict class ``c`` (its
    ``hls4ml.model.layers.layer_map``: e.g. ``LeakyReLU`` -> ``ParametrizedActivation``)."""
    from hls4ml.model.layers import layer_map
    cls = layer_map.get(c)
    return cls.__name__ if cls is not None else None


def _cls(c: str) -> str:
    """Layer class modulo hls4ml's renames (MaxPooling2D -> Pooling2D, Conv2D -> PointwiseConv2D...)."""
    for tok in ("Max", "Average", "Pointwise", "DepthwiseConv", "Merge"):
        c = c.replace(tok, "")
    return c


def _norm(t: str) -> str:
    """Canonical text of an ap_* / hls4ml precision string (hls4ml prints ``fixed<8,3,RND_CONV,SAT,0>``)."""
    from ...compiler.ir.types import parse_type

    t = t.replace(" ", "")
    parts = t[:-1].split(",")
    if len(parts) == 5 and parts[-1] == "0":  # saturation bits N=0
        t = ",".join(parts[:-1]) + ">"
    try:
        return str(parse_type(t))
    except ValueError:
        return t


#: The C simulation reads the weights from ``firmware/weights/*.txt`` at its first call (hls4ml's
#: ``write_weights_txt``: g++ then compiles no weight values, 4-21x faster on real models) from a
#: folder set at load time (:data:`WEIGHTS_DIR_SRC`), so the library stays relocatable and one build
#: serves every model with the same layers and types (the build cache key leaves the values out).
WEIGHTS_DIR_H = "qdeploy_weights_dir.h"
WEIGHTS_DIR_CPP = "qdeploy_weights_dir.cpp"
WEIGHTS_DIR_SRC = {
    WEIGHTS_DIR_H: "#ifndef QDEPLOY_WEIGHTS_DIR_H_\n#define QDEPLOY_WEIGHTS_DIR_H_\n"
                   "// qdeploy: where the C simulation library reads firmware/weights/*.txt (set when it is loaded)\n"
                   "extern \"C\" const char *qdeploy_weights_dir(void);\n#endif\n",
    WEIGHTS_DIR_CPP: "#include <string>\nstatic std::string qdeploy_dir = \"firmware/weights\";\n"
                     "extern \"C\" const char *qdeploy_weights_dir(void) { return qdeploy_dir.c_str(); }\n"
                     "extern \"C\" void qdeploy_set_weights_dir(const char *d) { qdeploy_dir = d; }\n",
}
WEIGHTS_FLAGS = ["-DWEIGHTS_DIR=qdeploy_weights_dir()", "-include", WEIGHTS_DIR_H]


def _src_hash(prj: Path, project: str) -> str:
    """Build cache key of the C simulation: hls4ml version, flags and every source g++ reads,
    with the weight *values* left out (the library loads them from the ``.txt`` files: in each
    weight header only the declaration before ``#else`` is compiled)."""
    import re

    import hls4ml

    h = hashlib.sha256(f"hls4ml {hls4ml.__version__} {' '.join(CXXFLAGS + WEIGHTS_FLAGS)} txt".encode())
    files = [prj / f"{project}_bridge.cpp", prj / WEIGHTS_DIR_H, prj / WEIGHTS_DIR_CPP] + sorted((prj / "firmware").rglob("*"))
    for f in files:
        if f.is_file() and f.suffix in (".cpp", ".h", ".hpp") and "ap_types" not in f.parts:
            h.update(str(f.relative_to(prj)).encode())
            data = f.read_bytes()
            if f.parent.name == "weights" and b"#ifndef __SYNTHESIS__" in data:
                data = re.sub(rb"#else\n.*?#endif", b"", data, count=1, flags=re.S)
            h.update(data)
    return h.hexdigest()[:20]


def _set_weights_dir(lib, so: Path) -> None:
    """Point the loaded C simulation ``lib`` (built from ``<prj>/firmware``) at ``<prj>/firmware/weights``
    (a library built by an older qdeploy has no such function: its weights are compiled in)."""
    try:
        fn = lib.qdeploy_set_weights_dir
    except AttributeError:
        return
    fn.argtypes = [ctypes.c_char_p]
    fn.restype = None
    fn(str((so.parent / "weights").resolve()).encode())


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
        _check_model(model, tr)
        model.write()
        summary = _check_model(model, tr)  # writing applies the remaining flows: check again
        _check_reuse_factors(model, tr, rfs)
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
        digest = _src_hash(prj, project)
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
            traced = _traced_run(model, so, xs)
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
        _set_weights_dir(self.lib, so)
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
