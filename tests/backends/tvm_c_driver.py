"""A tiny C driver that runs a TVM ``tvm-llvm`` library WITHOUT the TVM runtime, so that a library
cross-compiled for another CPU (aarch64) can be run under ``qemu-user`` and checked bit for bit.

Why: the artifact's ``lib_<hash>.so`` holds the compiled kernels (one exported symbol
``__tvm_ffi_<name>`` per PrimFunc, tvm-ffi's packed calling convention
``int f(void*, const TVMFFIAny* args, int32_t n, TVMFFIAny* ret)``) plus the Relax VM bytecode that
calls them.  Running the bytecode needs ``libtvm_runtime`` built for aarch64, which pip does not
ship for an x86 machine.  The driver replaces the VM: :func:`call_plan` re-derives the Relax main
function the build compiled, up to just before ``CallTIRRewrite`` (TVM 0.27
``relax.pipeline.default_build_pipeline``, which ``tvm.compile`` runs for a CPU target) -- a straight list of ``R.call_tir(kernel, args)``,
reshapes and constants -- and :func:`write_driver` turns it, for one batch size, into C that
``dlopen``s the *shipped* library, calls its kernels in that order on 64-byte aligned buffers and
writes the outputs.  The few runtime symbols a kernel may call (workspace allocation, parallel
launch -- run serially as one task --, error reporting) are defined by the driver itself.

A kernel name the library does not export, or any binding the plan does not know, fails loudly.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

ALIGN = 64
#: runtime functions a kernel reaches through a ``__<name>`` pointer slot of the library (TVM's
#: LLVM codegen), all defined by the driver; :func:`library_slots` lists what a library has
SLOTS = ("TVMBackendAllocWorkspace", "TVMBackendFreeWorkspace", "TVMBackendParallelLaunch",
         "TVMBackendParallelBarrier")


def library_slots(so, nm: str = "nm") -> set[str]:
    """The ``__TVM*`` pointer slots (data symbols) of a compiled library, read with binutils' nm."""
    import subprocess

    txt = subprocess.run([nm, "-D", "--defined-only", str(so)], capture_output=True, text=True, check=True).stdout
    return {ln.split()[-1][2:] for ln in txt.splitlines()
            if len(ln.split()) == 3 and ln.split()[1] in "VDBvdb" and ln.split()[-1].startswith("__TVM")}


def call_plan(out_dir, info: dict):
    """The Relax ``main`` of the artifact in ``out_dir`` after ``tvm.compile``'s CPU pipeline up to
    (not including) ``CallTIRRewrite``, following the same module transformations as
    :meth:`qdeploy.backends.tvm.TvmBackend.build`."""
    import tvm
    from tvm import relax

    from qdeploy.backends.tvm.lower import lower
    from qdeploy.backends.tvm.schedule import schedule_cpu
    from qdeploy.compiler.ir.graph import Graph

    graph = Graph.load(str(Path(out_dir) / "model"))
    mod = lower(graph, batch1_entry=bool(info.get("batch1_entry")))
    tgt = tvm.target.Target(info["target"])
    with tvm.transform.PassContext(opt_level=int(info.get("opt_level", 3))):
        if info.get("schedule", "none") == "auto":
            with tgt:
                mod = relax.get_pipeline("zero")(mod)
            mod = schedule_cpu(mod)
        with tgt:  # relax.pipeline.default_build_pipeline (what tvm.compile runs for a CPU target)
            mod = tvm.transform.Sequential([  # ... up to CallTIRRewrite
                relax.backend.DispatchSampling(), relax.backend.DispatchSortScan(), relax.transform.LegalizeOps(),
                relax.transform.RewriteDataflowReshape(), relax.transform.ToNonDataflow(),
                relax.transform.RemovePurityChecking()])(mod)
    return graph, mod["main"]


def _dtype(dt: str):
    """(DLPack type code, bits, numpy dtype) of a TVM dtype string."""
    table = {"int64": (0, 64, np.int64), "int32": (0, 32, np.int32), "int16": (0, 16, np.int16),
             "int8": (0, 8, np.int8), "uint8": (1, 8, np.uint8), "uint16": (1, 16, np.uint16),
             "uint32": (1, 32, np.uint32), "float32": (2, 32, np.float32), "float64": (2, 64, np.float64),
             "bool": (6, 8, np.bool_)}
    dt = str(dt)
    if dt not in table:
        raise NotImplementedError(f"C driver: dtype {dt} not handled")
    return table[dt]


def write_driver(out_dir, info: dict, feeds: dict, work: Path):
    """Write ``driver.c`` and ``data.bin`` (inputs and constants, 64-byte aligned) into ``work``
    for a run on ``feeds`` (the library graph's inputs, batch first).  Returns the ordered list
    of ``(output name, shape, numpy dtype)`` the driver writes to its output file."""
    import tvm
    from tvm import relax, tirx

    graph, main = call_plan(out_dir, info)
    batch = int(next(iter(feeds.values())).shape[0])
    env = {}
    for p in main.params:
        for d in p.ty.shape.values:
            if isinstance(d, tirx.Var):
                env[d.name] = batch

    def ev(e) -> int:
        """A shape expression's value with the batch variable bound."""
        if isinstance(e, (int, tirx.IntImm)):
            return int(e.value if isinstance(e, tirx.IntImm) else e)
        if isinstance(e, tirx.Var):
            return env[e.name]
        if isinstance(e, tirx.Cast):
            return ev(e.value)
        ops = {tirx.Add: lambda a, b: a + b, tirx.Sub: lambda a, b: a - b, tirx.Mul: lambda a, b: a * b,
               tirx.FloorDiv: lambda a, b: a // b, tirx.FloorMod: lambda a, b: a % b, tirx.Max: max, tirx.Min: min}
        for k, f in ops.items():
            if isinstance(e, k):
                return f(ev(e.a), ev(e.b))
        raise NotImplementedError(f"C driver: shape expression {e} not handled")

    def shape_of(sinfo):
        return [ev(d) for d in sinfo.shape.values]

    bufs = []  # dicts: shape, dtype, kind (input/const/scratch/alias), src
    blob = bytearray()
    by_var = {}

    def add_blob(arr):
        arr = np.ascontiguousarray(arr)
        blob.extend(b"\0" * ((-len(blob)) % ALIGN))
        off = len(blob)
        blob.extend(arr.tobytes())
        return off

    def new_buf(shape, dt, kind, src=None):
        bufs.append({"shape": shape, "dtype": dt, "kind": kind, "src": src})
        return len(bufs) - 1

    for p, name in zip(main.params, graph.inputs):
        dt = p.ty.dtype
        a = np.asarray(feeds[name], dtype=_dtype(dt)[2])
        assert list(a.shape) == shape_of(p.ty), (name, a.shape)
        by_var[p] = new_buf(list(a.shape), dt, "blob", add_blob(a))

    def arg(e):
        if isinstance(e, relax.Var):
            return by_var[e]
        if isinstance(e, tvm.ir.expr.Constant):
            a = e.value.numpy()
            return new_buf(list(a.shape), e.ty.dtype, "blob", add_blob(a))
        raise NotImplementedError(f"C driver: argument {type(e).__name__} not handled")

    steps = []  # (kernel name, [buffer ids], [int args])
    call_tir, reshape = tvm.ir.Op.get("relax.call_tir"), tvm.ir.Op.get("relax.reshape")
    out_expr = None
    for block in main.body.blocks:
        for bnd in block.bindings:
            v = bnd.value
            if isinstance(v, relax.Call) and v.op.same_as(call_tir):
                args = [arg(a) for a in v.args[1].fields]
                ints = [ev(d) for d in v.args[2].values] if len(v.args) > 2 else []
                so = v.ty_args[0]
                if not isinstance(so, relax.TensorType):
                    raise NotImplementedError("C driver: call_tir with several outputs")
                o = new_buf(shape_of(so), so.dtype, "scratch")
                steps.append((v.args[0].name_hint, args + [o], ints))
                by_var[bnd.var] = o
            elif isinstance(v, relax.Call) and v.op.same_as(reshape):
                src = arg(v.args[0])
                by_var[bnd.var] = new_buf(shape_of(bnd.var.ty), bufs[src]["dtype"], "alias", src)
            elif isinstance(v, relax.Tuple):
                by_var[bnd.var] = [arg(f) for f in v.fields]
            elif isinstance(v, relax.Var):
                by_var[bnd.var] = by_var[v]
            else:
                raise NotImplementedError(f"C driver: binding {bnd.var.name} = {type(v).__name__} not handled")
    out_expr = main.body.body
    outs = by_var[out_expr] if isinstance(out_expr, relax.Var) else [arg(f) for f in out_expr.fields]
    outs = outs if isinstance(outs, list) else [outs]
    (work / "data.bin").write_bytes(bytes(blob))
    (work / "driver.c").write_text(_c_source(bufs, steps, outs))
    return [(name, bufs[b]["shape"], _dtype(bufs[b]["dtype"])[2]) for name, b in zip(graph.outputs, outs)]


def _c_source(bufs, steps, outs) -> str:
    L = ["#include <stdio.h>", "#include <stdlib.h>", "#include <string.h>", "#include <stdint.h>",
         "#include <dlfcn.h>", "#include <tvm/ffi/c_api.h>", "#include <tvm/runtime/c_backend_api.h>", "",
         "/* the runtime symbols a kernel may call, defined here instead of libtvm_runtime */",
         "void* TVMBackendAllocWorkspace(int dt, int di, uint64_t n, int c, int b) {",
         "  void* p = NULL; if (posix_memalign(&p, 64, n ? n : 1)) return NULL; return p; }",
         "int TVMBackendFreeWorkspace(int dt, int di, void* p) { free(p); return 0; }",
         "int TVMBackendParallelLaunch(FTVMParallelLambda f, void* cdata, int num_task) {",
         "  TVMParallelGroupEnv env; env.sync_handle = NULL; env.num_task = 1; return f(0, &env, cdata); }",
         "int TVMBackendParallelBarrier(int task_id, TVMParallelGroupEnv* penv) { return 0; }",
         "void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* msg) { fprintf(stderr, \"%s: %s\\n\", kind, msg); }",
         "void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t n) {",
         "  fprintf(stderr, \"%s: \", kind); for (int i = 0; i < n; ++i) fputs(parts[i], stderr); fputc('\\n', stderr); }",
         "",
         f"static DLTensor T[{len(bufs)}];"]
    for i, b in enumerate(bufs):
        L.append(f"static int64_t S{i}[] = {{{', '.join(map(str, b['shape'])) or '0'}}};")
    L += ["", "int main(int argc, char** argv) {",
          "  if (argc != 4) { fprintf(stderr, \"usage: driver lib.so data.bin out.bin\\n\"); return 2; }",
          "  void* h = dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL);",
          "  if (!h) { fprintf(stderr, \"dlopen: %s\\n\", dlerror()); return 2; }",
          "  FILE* f = fopen(argv[2], \"rb\"); fseek(f, 0, SEEK_END); long nb = ftell(f); fseek(f, 0, SEEK_SET);",
          "  char* blob = NULL; if (posix_memalign((void**)&blob, 64, nb + 64)) return 2;",
          "  if (fread(blob, 1, nb, f) != (size_t)nb) return 2; fclose(f);"]
    L.append("  /* the library's function-pointer slots, which libtvm_runtime fills when it loads a library */")
    for name in SLOTS:
        L.append(f"  {{ void** s = (void**)dlsym(h, \"__{name}\"); if (s) *s = (void*)&{name}; }}")
    for i, b in enumerate(bufs):
        code, bits, npdt = _dtype(b["dtype"])
        n = int(np.prod(b["shape"])) if b["shape"] else 1
        if b["kind"] == "blob":
            data = f"blob + {b['src']}"
        elif b["kind"] == "alias":
            data = f"T[{b['src']}].data"
        else:
            L.append(f"  void* d{i} = NULL; if (posix_memalign(&d{i}, 64, {max(n * bits // 8, 1)})) return 2;")
            data = f"d{i}"
        L.append(f"  T[{i}].data = {data}; T[{i}].device.device_type = kDLCPU; T[{i}].device.device_id = 0; "
                 f"T[{i}].ndim = {len(b['shape'])}; T[{i}].dtype.code = {code}; T[{i}].dtype.bits = {bits}; "
                 f"T[{i}].dtype.lanes = 1; T[{i}].shape = S{i}; T[{i}].strides = NULL; T[{i}].byte_offset = 0;")
    L.append("  TVMFFIAny a[64]; TVMFFIAny r; TVMFFISafeCallType fn;")
    for k, (name, ids, ints) in enumerate(steps):
        L.append(f"  fn = (TVMFFISafeCallType)dlsym(h, \"__tvm_ffi_{name}\");")
        L.append(f"  if (!fn) {{ fprintf(stderr, \"kernel {name} not in the library\\n\"); return 3; }}")
        for j, b in enumerate(ids):
            L.append(f"  memset(&a[{j}], 0, sizeof(TVMFFIAny)); a[{j}].type_index = kTVMFFIDLTensorPtr; a[{j}].v_ptr = &T[{b}];")
        for j, v in enumerate(ints, start=len(ids)):
            L.append(f"  memset(&a[{j}], 0, sizeof(TVMFFIAny)); a[{j}].type_index = kTVMFFIInt; a[{j}].v_int64 = {v};")
        L.append("  memset(&r, 0, sizeof(r)); r.type_index = kTVMFFINone;")
        L.append(f"  if (fn(NULL, a, {len(ids) + len(ints)}, &r) != 0) {{ fprintf(stderr, \"kernel {name} failed\\n\"); return 4; }}")
    L.append("  FILE* o = fopen(argv[3], \"wb\");")
    for b in outs:
        bits = _dtype(bufs[b]["dtype"])[1]
        n = int(np.prod(bufs[b]["shape"])) if bufs[b]["shape"] else 1
        L.append(f"  fwrite(T[{b}].data, 1, {n * bits // 8}, o);")
    L += ["  fclose(o);", "  return 0;", "}"]
    return "\n".join(L) + "\n"


def include_flags() -> list[str]:
    """``-I`` flags for tvm-ffi's ``c_api.h``, DLPack and TVM's ``c_backend_api.h``."""
    import tvm
    import tvm_ffi

    base = Path(tvm_ffi.__file__).parent
    return [f"-I{base / 'include'}", f"-I{Path(tvm.__file__).parent / 'include'}"]


def read_outputs(path: Path, layout) -> dict:
    """The driver's output file split into arrays (``layout`` from :func:`write_driver`)."""
    raw, off, out = path.read_bytes(), 0, {}
    for name, shape, dt in layout:
        n = int(np.prod(shape)) * np.dtype(dt).itemsize
        out[name] = np.frombuffer(raw[off:off + n], dtype=dt).reshape(shape)
        off += n
    assert off == len(raw), f"driver wrote {len(raw)} bytes, expected {off}"
    return out
