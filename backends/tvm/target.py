"""Target selection for the TVM backends: which CPU (or GPU) a library is compiled for, the cross
compiler that links it, and whether it can run on the machine that builds it.

CPU (``tvm-llvm``), config ``tvm:`` keys:

* ``mcpu``: ``"x86-64"`` by default on an x86-64 build machine -- LLVM's baseline x86-64 (SSE2, no
  AVX), so an artifact runs on any x86-64 CPU -- and ``"generic"`` on other machines; ``"native"``
  (alias ``"auto"``) asks LLVM for the build machine's CPU
  (``tvm.target.codegen.llvm_get_system_cpu``, e.g. ``"znver4"``): faster code that may not run on
  an older CPU.  Any other name must be a CPU LLVM knows for the triple
  (``llvm_is_valid_cpu``).  TVM itself would turn ``mcpu: native`` into generic code with only a
  log line (TOOLCHAIN.md), so ``native`` is resolved here and never passed on.
* ``mtriple``: the LLVM target triple (default: the build machine's, ``llvm_get_system_triple``).
  A triple for another architecture (e.g. ``aarch64-linux-gnu``) cross-compiles: the library is
  linked with the C++ cross compiler ``cc`` (default ``<arch>-linux-gnu-g++``, Debian's
  ``g++-aarch64-linux-gnu`` for aarch64), which must be on ``PATH``.
* ``mattr``: LLVM feature list (e.g. ``["+neon"]``), passed on unchanged.
* ``target``: ``"llvm"`` (default) or a TVM target dict (``{kind: llvm, mtriple: ..., mcpu: ...}``);
  its keys are resolved the same way, and a key given both there and at top level must agree.

The resolved target is recorded in the manifest (``backend.target``) with the attributes LLVM
actually compiled for (``backend.library_target``: triple, CPU, features, read from the compiled
module's LLVM IR).

GPU (``tvm-cuda``): :func:`resolve_cuda_target` -- ``arch`` (``sm_80`` default, ``sm_90``, any
``sm_XY``) and a host CPU target resolved as above.

Sources: TVM 0.27 target JSON form and ``tvm.support.cc.cross_compiler``
(https://tvm.apache.org/docs/reference/api/python/target.html); LLVM CPU names
(``llc -mtriple=x86_64 -mcpu=help``).
"""
from __future__ import annotations

import shutil

from ...compiler.errors import CompileError

__all__ = ["resolve_target", "resolve_cuda_target", "triple_arch", "host_arch", "cross_compiler",
           "not_run_reason", "library_target", "X86_LEVELS", "host_cpu_flags", "host_x86_level",
           "resolve_cpu_variants", "variant_runs_here"]

#: Debian cross compiler (package g++-<arch>-linux-gnu) per triple architecture
CROSS_CXX = {"aarch64": "aarch64-linux-gnu-g++", "arm": "arm-linux-gnueabihf-g++",
             "riscv64": "riscv64-linux-gnu-g++"}
_ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x86-64": "x86_64"}
_NATIVE = ("native", "auto")
_TARGET_KEYS = ("mcpu", "mtriple", "mattr")


def triple_arch(triple: str) -> str:
    """The architecture field of an LLVM triple, normalized: ``"aarch64-linux-gnu"`` ->
    ``"aarch64"``, ``"arm64-apple-darwin"`` -> ``"aarch64"``, ``"armv7a-linux-gnueabihf"`` ->
    ``"arm"``."""
    a = str(triple).split("-")[0].lower()
    a = _ARCH_ALIASES.get(a, a)
    return "arm" if a.startswith("arm") and a != "aarch64" else a


def host_arch() -> str:
    """The build machine's architecture as LLVM names it (``llvm_get_system_triple``)."""
    import tvm

    return triple_arch(tvm.target.codegen.llvm_get_system_triple())


def _baseline_cpu(arch: str) -> str:
    """LLVM's portable CPU for ``arch``: ``x86-64`` (SSE2 only) on x86-64, else ``generic``."""
    return "x86-64" if arch == "x86_64" else "generic"


#: The x86-64 psABI micro-architecture levels (System V AMD64 psABI, section 3.1.1 "Processor
#: Architecture", table "Micro-Architecture Levels"; the same levels glibc's ``glibc-hwcaps``
#: library directories select at load time) as the CPU flags Linux prints in ``/proc/cpuinfo``
#: that a CPU must have to run code compiled with LLVM ``-mcpu=<level>`` (``pni`` is SSE3,
#: ``abm`` LZCNT, ``lahf_lm`` LAHF/SAHF in 64-bit mode).
_V2 = ("cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3")
_V3 = _V2 + ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")
_V4 = _V3 + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
X86_LEVELS = {"x86-64-v2": _V2, "x86-64-v3": _V3, "x86-64-v4": _V4}
#: environment variable: the CPU variants built beside the portable library when the config
#: does not say (``tvm.cpu_variants``): ``none``, ``auto`` or a comma-separated list of levels
VARIANTS_ENV = "QDEPLOY_TVM_CPU_VARIANTS"


def host_cpu_flags() -> frozenset | None:
    """The CPU flags of this machine as ``/proc/cpuinfo`` lists them (the first processor's
    ``flags`` line: what the CPU has *and* the kernel / hypervisor lets programs use), or None
    where there is no such file (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def host_x86_level() -> str | None:
    """The highest x86-64 psABI level (:data:`X86_LEVELS`) this machine runs, or None (not x86-64,
    no ``/proc/cpuinfo``, or only the baseline)."""
    if host_arch() != "x86_64":
        return None
    flags = host_cpu_flags()
    if flags is None:
        return None
    best = None
    for level, need in X86_LEVELS.items():
        if set(need) <= flags:
            best = level
    return best


def variant_runs_here(variant: dict) -> bool:
    """Whether a CPU variant of a library (``{"mcpu": level, "requires": [flags], ...}``) can run on
    this machine: an x86-64 host whose ``/proc/cpuinfo`` flags include every required flag."""
    if host_arch() != "x86_64":
        return False
    flags = host_cpu_flags()
    return flags is not None and set(variant.get("requires", ())) <= flags


def resolve_cpu_variants(opts: dict, target: dict) -> list[str]:
    """The x86-64 levels built as faster variants beside the portable library ``target``.

    ``tvm.cpu_variants`` (else the environment variable ``QDEPLOY_TVM_CPU_VARIANTS``, else
    ``auto``): ``auto`` -- the build machine's own level (:func:`host_x86_level`) when it is above
    the baseline, and only when ``target`` is the portable x86-64 default (an explicit ``mcpu``,
    a cross-compile or a non-x86 host build one library); ``none`` or ``[]`` -- no variant; a
    list of levels (``x86-64-v2`` / ``-v3`` / ``-v4``) -- those.  At load time the artifact runs
    the highest variant the machine's CPU flags allow, else the portable library
    (``runtime/``; ``QDEPLOY_TVM_VARIANT`` forces one).

    Returns:
        level names, lowest first (no duplicates).
    Raises:
        CompileError: a name that is not an x86-64 psABI level, or variants for a target that is
            not x86-64.
    """
    v = opts.get("cpu_variants")
    src = "tvm.cpu_variants"
    if v is None:
        import os

        v = os.environ.get(VARIANTS_ENV, "auto").strip() or "auto"
        src = VARIANTS_ENV
        if "," in v:
            v = [x.strip() for x in v.split(",") if x.strip()]
    if v in ("none", "", None) or v == []:
        return []
    x86 = triple_arch(str(target.get("mtriple", ""))) == "x86_64"
    if v == "auto":
        if not x86 or target.get("mcpu") != "x86-64" or not_run_reason(target):
            return []
        lvl = host_x86_level()
        return [lvl] if lvl else []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise CompileError(f"{src} must be 'auto', 'none' or a list of x86-64 levels, got {v!r}")
    bad = [x for x in v if x not in X86_LEVELS]
    if bad:
        raise CompileError(f"{src}: {bad[0]!r} is not an x86-64 psABI level (one of {', '.join(X86_LEVELS)}; "
                           f"'auto' or 'none')")
    if not x86:
        raise CompileError(f"{src}: CPU variants are x86-64 levels, but the target is {target.get('mtriple')}")
    return [lvl for lvl in X86_LEVELS if lvl in v and lvl != target.get("mcpu")]


def resolve_target(opts: dict) -> dict:
    """The TVM LLVM target dict for config ``tvm:`` options ``opts`` (keys in the module docstring).

    Args:
        opts: the ``tvm`` config mapping (``target``, ``mcpu``, ``mtriple``, ``mattr``, ``cc``).
    Returns:
        a JSON-able dict with ``kind``, ``mtriple`` and ``mcpu`` always set, e.g.
        ``{"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu", "mcpu": "x86-64"}`` (default on
        x86-64), ``{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "generic"}``.
    Raises:
        CompileError: a target kind other than llvm, conflicting keys, ``native`` when
            cross-compiling or when LLVM cannot name the host CPU, a CPU LLVM does not know for
            the triple, or a cross compiler that is not installed (:func:`cross_compiler`).
    """
    import tvm

    target = opts.get("target", "llvm")
    if isinstance(target, dict):
        t = dict(target)
        if t.get("kind", "llvm") != "llvm":
            raise CompileError(f"tvm.target kind {t.get('kind')!r} is not a CPU target (use target tvm-cuda "
                               f"for CUDA); tvm-llvm takes kind 'llvm'")
        t["kind"] = "llvm"
    elif str(target).strip() == "llvm":
        t = {"kind": "llvm"}
    else:
        raise CompileError(f"tvm target {target!r} is not supported (only 'llvm' or a target dict)")
    for k in _TARGET_KEYS:
        if opts.get(k) is not None:
            if t.get(k) is not None and t[k] != opts[k]:
                raise CompileError(f"tvm.{k} = {opts[k]!r} conflicts with tvm.target.{k} = {t[k]!r}")
            t[k] = opts[k]
    cg = tvm.target.codegen
    host_triple = cg.llvm_get_system_triple()
    triple = str(t.get("mtriple") or host_triple)
    arch = triple_arch(triple)
    cross = arch != triple_arch(host_triple)
    mcpu = t.get("mcpu")
    if mcpu in (None, ""):
        mcpu = _baseline_cpu(arch)
    elif str(mcpu) in _NATIVE:
        if cross:
            raise CompileError(f"tvm.mcpu {mcpu!r} names this build machine's CPU; it cannot be used when "
                               f"cross-compiling for {triple}: give a CPU name for {arch} or leave mcpu out")
        mcpu = cg.llvm_get_system_cpu()
        if not mcpu or mcpu == "generic" or not cg.llvm_is_valid_cpu(mcpu, triple):
            raise CompileError(f"tvm.mcpu 'native': LLVM cannot name this machine's CPU (got {mcpu!r}); "
                               f"give a CPU name or leave mcpu out for the portable {_baseline_cpu(arch)}")
    mcpu = str(mcpu)
    if not cg.llvm_is_valid_cpu(mcpu, triple):
        raise CompileError(f"LLVM does not know CPU {mcpu!r} for {triple} (config tvm.mcpu)")
    t["mtriple"] = triple
    t["mcpu"] = mcpu
    if cross:
        cross_compiler(t, opts)  # fail now, before anything is written, when it is missing
    return t


def cross_compiler(target: dict, opts: dict | None = None) -> str | None:
    """The C++ compiler that links a library for ``target`` on this machine: None for the build
    machine's architecture (TVM's default, ``g++``), else ``opts["cc"]`` or Debian's
    ``<arch>-linux-gnu-g++`` (:data:`CROSS_CXX`).

    Raises:
        CompileError: the compiler is not on ``PATH`` (the message names it and its package).
    """
    triple = str(target.get("mtriple") or "")
    arch = triple_arch(triple) if triple else host_arch()
    if arch == host_arch():
        return None
    cc = (opts or {}).get("cc") or CROSS_CXX.get(arch) or f"{triple}-g++"
    if shutil.which(cc) is None:
        pkg = f"g++-{cc[:-len('-g++')]}" if cc.endswith("-g++") else cc
        raise CompileError(f"cross-compiling for {triple} needs the C++ cross compiler {cc!r}, which is not on "
                           f"PATH: install it (Debian: apt-get install {pkg}; or QDEPLOY_CROSS={arch} "
                           f"scripts/setup.sh), or name another one with tvm.cc")
    return cc


def not_run_reason(target: dict) -> str | None:
    """Why a library for LLVM ``target`` cannot run on this machine (another architecture), or
    None when it can."""
    triple = str(target.get("mtriple") or "")
    if triple and triple_arch(triple) != host_arch():
        return f"a library for {triple} cannot run on this {host_arch()} machine"
    return None


def find_module(module, kind: str):
    """The first runtime module of ``kind`` (``"llvm"``, ``"cuda"``) in a compiled module (an
    executable's ``mod``, or a module) and its imports, depth first; None when there is none."""
    def find(m):
        if m.kind == kind:
            return m
        for i in m.imports:
            r = find(i)
            if r is not None:
                return r
        return None
    return find(getattr(module, "mod", module))


def library_target(module) -> dict:
    """What LLVM compiled the host code of ``module`` (a ``tvm.compile`` result) for, read from its
    LLVM IR: ``{"triple", "cpu", "features"}`` (``cpu`` and ``features`` as the function attributes
    ``"target-cpu"`` / ``"target-features"`` say; one value each, ``""`` when absent, or a sorted
    list when functions differ).  Empty when no LLVM module is found."""
    import re

    llvm = find_module(module, "llvm")
    if llvm is None:
        return {}
    ll = llvm.inspect_source("ll")

    def one(vals):
        vals = sorted(set(vals))
        return "" if not vals else vals[0] if len(vals) == 1 else vals

    triple = re.findall(r'^target triple = "([^"]*)"', ll, re.M)
    return {"triple": triple[0] if triple else "",
            "cpu": one(re.findall(r'"target-cpu"="([^"]*)"', ll)),
            "features": one(re.findall(r'"target-features"="([^"]*)"', ll))}


def resolve_cuda_target(opts: dict) -> tuple[dict, dict]:
    """The CUDA target and its host target for config ``tvm:`` options of the ``tvm-cuda`` target.

    Args:
        opts: ``arch`` (``"sm_80"`` default; ``"sm_XY"``), plus the host CPU keys of
            :func:`resolve_target` (``mcpu``, ...; default portable x86-64).  A ``target`` dict, if
            given, must have kind ``cuda``; its ``arch`` counts as ``opts["arch"]``.
    Returns:
        ``({"kind": "cuda", "arch": "sm_80"}, host_target_dict)``.
    Raises:
        CompileError: a malformed arch, a non-cuda target dict, or a host target that is not this
            machine's architecture (the host code must run where the GPU is driven).
    """
    t = opts.get("target")
    arch = opts.get("arch")
    if t is not None and t != "cuda":
        if not isinstance(t, dict) or t.get("kind") != "cuda":
            raise CompileError(f"tvm-cuda: tvm.target must be 'cuda' or a dict with kind 'cuda', got {t!r}")
        if arch is not None and t.get("arch") not in (None, arch):
            raise CompileError(f"tvm.arch = {arch!r} conflicts with tvm.target.arch = {t['arch']!r}")
        arch = arch or t.get("arch")
    arch = str(arch or "sm_80")
    if not (arch.startswith("sm_") and arch[3:].rstrip("a").isdigit() and len(arch) >= 5):
        raise CompileError(f"tvm-cuda: tvm.arch must look like sm_80 or sm_90, got {arch!r}")
    host = resolve_target({k: v for k, v in opts.items() if k in ("mcpu", "mattr", "mtriple")})
    if not_run_reason(host):
        raise CompileError(f"tvm-cuda: the host target {host['mtriple']} must be this machine's architecture "
                           f"({host_arch()})")
    return {"kind": "cuda", "arch": arch}, host
