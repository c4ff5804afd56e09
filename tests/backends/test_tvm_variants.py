"""CPU variants of a tvm-llvm artifact (backends/tvm/target.py ``resolve_cpu_variants``): the
portable x86-64 library plus a faster one per x86-64 psABI level, chosen at load time from the CPU
flags; and the Relax VM's compiled exec mode.

Oracles: the reference interpreter (every library must equal it), ``/proc/cpuinfo`` read here
independently of the loader, binutils' ``objdump`` for the instructions a library really holds, and
a simulated older CPU (the loader's flag reader patched to report only the x86-64-v2 flags).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import qdeploy  # noqa: E402
from qdeploy.backends.tvm import target as tgt_mod  # noqa: E402
from qdeploy.backends.tvm.target import X86_LEVELS, host_arch, resolve_cpu_variants, resolve_target  # noqa: E402
from qdeploy.compiler import reference as ref  # noqa: E402
from qdeploy.compiler.errors import CompileError  # noqa: E402
from qdeploy.compiler.ir import Const, GraphBuilder, parse_type as T  # noqa: E402
from qdeploy.runtime import CompiledModel  # noqa: E402

from .test_tvm_target import _vex_or_evex  # noqa: E402

X86 = host_arch() == "x86_64"


def _cpuinfo_flags() -> set:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _host_level():
    """The highest psABI level whose flags /proc/cpuinfo lists (computed here, not by qdeploy)."""
    have = _cpuinfo_flags()
    best = None
    for lvl in ("x86-64-v2", "x86-64-v3", "x86-64-v4"):
        if set(X86_LEVELS[lvl]) <= have:
            best = lvl
    return best


def _graph(rng):
    b = GraphBuilder("var")
    x = b.input("x", (64,), T("fixed<8,2>"))
    h = b.add("fc", "Dense", [x], params={"weight": Const(rng.integers(-8, 8, (64, 32)), T("int<4>"))})
    h = b.add("relu", "Relu", [h])
    b.output(b.add("q", "Quantize", [h], attrs={"to": T("ufixed<6,4,RND_INF,SAT>")}))
    return b.build()


def test_level_table_is_nested():
    """Each psABI level needs every flag of the level below it (psABI 3.1.1)."""
    assert set(X86_LEVELS["x86-64-v2"]) < set(X86_LEVELS["x86-64-v3"]) < set(X86_LEVELS["x86-64-v4"])


@pytest.mark.parametrize("opts,match", [
    ({"cpu_variants": ["skylake"]}, "'skylake' is not an x86-64 psABI level"),
    ({"cpu_variants": 3}, "must be 'auto', 'none' or a list"),
])
def test_bad_variant_options(opts, match):
    with pytest.raises(CompileError, match=match) as e:
        resolve_cpu_variants(opts, resolve_target({}))
    assert "\n" not in str(e.value)


def test_variant_resolution(monkeypatch):
    monkeypatch.delenv("QDEPLOY_TVM_CPU_VARIANTS", raising=False)
    base = resolve_target({})
    assert resolve_cpu_variants({"cpu_variants": "none"}, base) == []
    assert resolve_cpu_variants({"cpu_variants": []}, base) == []
    # an explicit CPU builds one library: auto adds nothing
    assert resolve_cpu_variants({}, resolve_target({"mcpu": "x86-64-v2"})) == []
    if X86:
        lvl = _host_level()
        assert resolve_cpu_variants({}, base) == ([lvl] if lvl else [])
        assert resolve_cpu_variants({"cpu_variants": ["x86-64-v4", "x86-64-v3"]}, base) == ["x86-64-v3", "x86-64-v4"]
        monkeypatch.setenv("QDEPLOY_TVM_CPU_VARIANTS", "x86-64-v3")
        assert resolve_cpu_variants({}, base) == ["x86-64-v3"]
        monkeypatch.setenv("QDEPLOY_TVM_CPU_VARIANTS", "none")
        assert resolve_cpu_variants({}, base) == []


@pytest.mark.skipif(not X86, reason="CPU variants are x86-64 psABI levels")
def test_default_artifact_is_portable_and_fast(tmp_path, rng, monkeypatch):
    """With the default (``auto``) an x86-64 artifact holds the portable library and one for this
    machine's level; the compile checks both against the reference; loading picks the variant on
    this CPU and the portable library on a CPU with only the x86-64-v2 flags (a simulated older
    host); a forced variant the CPU lacks is one clear error."""
    monkeypatch.delenv("QDEPLOY_TVM_CPU_VARIANTS", raising=False)
    monkeypatch.delenv("QDEPLOY_TVM_VARIANT", raising=False)
    lvl = _host_level()
    assert lvl is not None, "this x86-64 host lists no psABI level above the baseline in /proc/cpuinfo"
    g = _graph(rng)
    qdeploy.compile(g, "tvm-llvm", tmp_path / "a", source_check=False)
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    be = man["backend"]
    assert be["target"]["mcpu"] == "x86-64" and be["library_target"]["cpu"] == "x86-64"
    assert [v["mcpu"] for v in be["cpu_variants"]] == [lvl]
    v = be["cpu_variants"][0]
    assert v["library_target"]["cpu"] == lvl and v["library"] != be["library"]
    assert set(v["requires"]) == set(X86_LEVELS[lvl])
    assert man["exactness"]["variants"] == {"x86-64": True, lvl: True}
    assert _vex_or_evex(tmp_path / "a" / be["library"]) == []  # the portable one: SSE2 only
    if lvl in ("x86-64-v3", "x86-64-v4"):
        assert _vex_or_evex(tmp_path / "a" / v["library"]), f"no AVX code in the {lvl} library"
    x = rng.integers(-128, 128, (7, 64))
    want = ref.execute(g, {"x": x}, codes=True)["q"]
    m = CompiledModel.load(tmp_path / "a")
    assert m.library_variant == lvl
    np.testing.assert_array_equal(m.run_codes({"x": x})["q"], want)
    # an older CPU: only the v2 flags
    monkeypatch.setattr(tgt_mod, "host_cpu_flags", lambda: frozenset(X86_LEVELS["x86-64-v2"]))
    old = CompiledModel.load(tmp_path / "a")
    assert old.library_variant == "x86-64"
    np.testing.assert_array_equal(old.run_codes({"x": x})["q"], want)
    monkeypatch.setenv("QDEPLOY_TVM_VARIANT", lvl)
    with pytest.raises(CompileError, match=f"variant {lvl} cannot run on this CPU.*missing CPU flags: .*avx2"):
        CompiledModel.load(tmp_path / "a")
    monkeypatch.undo()
    monkeypatch.setenv("QDEPLOY_TVM_VARIANT", "x86-64")
    forced = CompiledModel.load(tmp_path / "a")
    assert forced.library_variant == "x86-64"
    np.testing.assert_array_equal(forced.predict(x / 64.0), m.predict(x / 64.0))
    monkeypatch.setenv("QDEPLOY_TVM_VARIANT", "znver4")
    with pytest.raises(CompileError, match="has no TVM library for CPU 'znver4'"):
        CompiledModel.load(tmp_path / "a")


def test_bytecode_and_compiled_exec_modes_agree(tmp_path, rng, monkeypatch):
    """The Relax VM compiled exec mode (default) and the bytecode interpreter give the same codes,
    equal to the reference, on the symbolic-batch entry and the batch-1 entry."""
    monkeypatch.setenv("QDEPLOY_TVM_CPU_VARIANTS", "none")
    g = _graph(rng)
    for mode in ("compiled", "bytecode"):
        qdeploy.compile(g, "tvm-llvm", tmp_path / mode, config={"tvm": {"exec_mode": mode}}, source_check=False)
        assert json.loads((tmp_path / mode / "manifest.json").read_text())["backend"]["exec_mode"] == mode
    x = rng.integers(-128, 128, (5, 64))
    want = ref.execute(g, {"x": x}, codes=True)["q"]
    for mode in ("compiled", "bytecode"):
        m = CompiledModel.load(tmp_path / mode)
        np.testing.assert_array_equal(m.run_codes({"x": x})["q"], want)
        np.testing.assert_array_equal(m.run_codes({"x": x[:1]})["q"], want[:1])
        np.testing.assert_array_equal(m.predict(x[2] / 64.0), m.predict(x[2:3] / 64.0))
    with pytest.raises(CompileError, match="tvm.exec_mode must be"):
        qdeploy.compile(g, "tvm-llvm", tmp_path / "bad", config={"tvm": {"exec_mode": "jit"}}, source_check=False)
