"""The hls4ml C simulation library: compiler flags, the weights folder set at load time
(:data:`WEIGHTS_DIR_SRC`, :func:`set_weights_dir`), the build cache key (:func:`src_hash`) and a
traced run that collects every layer's output (:func:`traced_run`, as hls4ml 1.3's
``ModelGraph.trace``)."""
from __future__ import annotations

import ctypes
import hashlib
from pathlib import Path

import numpy as np

__all__ = ["CXXFLAGS", "WEIGHTS_DIR_H", "WEIGHTS_DIR_CPP", "WEIGHTS_DIR_SRC", "WEIGHTS_FLAGS", "src_hash",
           "set_weights_dir", "traced_run"]

CXXFLAGS = ["-O3", "-fPIC", "-std=c++17", "-fno-gnu-unique", "-w"]

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


def src_hash(prj: Path, project: str) -> str:
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


def set_weights_dir(lib, so: Path) -> None:
    """Point the loaded C simulation ``lib`` (built from ``<prj>/firmware``) at ``<prj>/firmware/weights``
    (a library built by an older qdeploy has no such function: its weights are compiled in)."""
    try:
        fn = lib.qdeploy_set_weights_dir
    except AttributeError:
        return
    fn.argtypes = [ctypes.c_char_p]
    fn.restype = None
    fn(str((so.parent / "weights").resolve()).encode())


def traced_run(model, so: Path, xs: list[np.ndarray]) -> dict:
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
    set_weights_dir(lib, so)
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
