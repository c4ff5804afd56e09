"""tvm-llvm target selection (backends/tvm/target.py): the portable x86-64 default, ``mcpu: native``,
cross-compilation to aarch64 and what the manifest records.

Oracles: LLVM's own answers (``llvm_get_system_cpu``), the compiled library's machine code read
back with binutils' ``objdump`` (independent of TVM), the ELF header of the cross-compiled library,
and the reference interpreter for the values.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import qdeploy  # noqa: E402
from qdeploy.backends import get_backend  # noqa: E402
from qdeploy.backends.tvm.target import host_arch, resolve_target  # noqa: E402
from qdeploy.compiler import reference as ref  # noqa: E402
from qdeploy.compiler.errors import CompileError  # noqa: E402
from qdeploy.compiler.ir import Const, GraphBuilder, parse_type as T  # noqa: E402
from qdeploy.runtime import CompiledModel  # noqa: E402

X86 = host_arch() == "x86_64"


def _graph(rng):
    """Dense (wide enough for LLVM to vectorize) -> Relu -> requantize."""
    b = GraphBuilder("tgt")
    x = b.input("x", (32,), T("fixed<8,2>"))
    h = b.add("fc", "Dense", [x], params={"weight": Const(rng.integers(-8, 8, (32, 16)), T("int<4>"))})
    h = b.add("relu", "Relu", [h])
    b.output(b.add("q", "Quantize", [h], attrs={"to": T("ufixed<6,4,RND_INF,SAT>")}))
    return b.build()


def _build(g, d, cfg):
    be = get_backend("tvm-llvm")
    info = be.emit(g, cfg, d)
    be.build(d, info)
    return be, info


def _vex_or_evex(so) -> list[str]:
    """AVX/AVX-512 instructions in the library's code (objdump -d): ymm/zmm registers or
    VEX/EVEX-only mnemonics ('v'-prefixed on x86-64).  Baseline x86-64 (SSE2) has none."""
    txt = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(so)], capture_output=True, text=True,
                         check=True).stdout
    bad = []
    for line in txt.splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        ins = parts[-1].strip()
        if re.search(r"%[yz]mm\d", ins) or re.match(r"v[a-z]", ins) and not ins.startswith("verw"):
            bad.append(ins)
    return bad


def test_default_target_is_portable_x86_64(tmp_path, rng):
    """The default artifact says generic x86-64 in its manifest and in the library's LLVM target
    attributes, and its machine code holds no AVX instruction; it runs bit-exact."""
    g = _graph(rng)
    res = qdeploy.compile(g, "tvm-llvm", tmp_path / "a", source_check=False)
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    tgt, lib = man["backend"]["target"], man["backend"]["library_target"]
    want_cpu = "x86-64" if X86 else "generic"
    assert tgt["kind"] == "llvm" and tgt["mcpu"] == want_cpu, tgt
    assert lib["cpu"] == want_cpu and lib["triple"] == tgt["mtriple"], lib
    assert tgt["mcpu"] != tvm.target.codegen.llvm_get_system_cpu()  # not the build machine's CPU
    assert man["exactness"]["bit_exact"] is True and res.report["exactness"]["mismatches"] == 0
    if X86:
        so = tmp_path / "a" / man["backend"]["library"]
        assert _vex_or_evex(so) == [], "AVX code in a library built for baseline x86-64"
    m = CompiledModel.load(tmp_path / "a")
    x = rng.integers(-128, 128, (6, 32))
    np.testing.assert_array_equal(m.run_codes({"x": x})["q"], ref.execute(g, {"x": x}, codes=True)["q"])


def test_native_is_the_host_cpu_name(tmp_path, rng):
    """``mcpu: native`` -- top level or inside a target dict, where TVM alone would build generic
    code -- becomes LLVM's name for this CPU, and the library is compiled for it."""
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    assert resolve_target({"target": {"kind": "llvm", "mcpu": "native"}})["mcpu"] == cpu
    assert resolve_target({"mcpu": "auto"})["mcpu"] == cpu
    g = _graph(rng)
    _, info = _build(g, tmp_path, {"tvm": {"mcpu": "native"}})
    assert info["target"]["mcpu"] == cpu and info["library_target"]["cpu"] == cpu
    flags = open("/proc/cpuinfo").read().split()
    if X86 and "avx" in flags:  # the objdump check of the default test does see AVX code when it is there
        assert _vex_or_evex(tmp_path / info["library"]), f"no AVX code in a library built for {cpu}"
    run = get_backend("tvm-llvm").load(tmp_path, info, g)
    x = rng.integers(-128, 128, (3, 32))
    np.testing.assert_array_equal(run({"x": x})["q"], ref.execute(g, {"x": x}, codes=True)["q"])


@pytest.mark.parametrize("opts,match", [
    ({"mcpu": "no-such-cpu"}, "LLVM does not know CPU 'no-such-cpu'"),
    ({"target": {"kind": "cuda"}}, "use target tvm-cuda"),
    ({"target": "llvm -mcpu=x86-64"}, "not supported"),
    ({"mcpu": "x86-64", "target": {"kind": "llvm", "mcpu": "znver4"}}, "conflicts"),
    ({"mtriple": "aarch64-linux-gnu", "mcpu": "native"}, "cannot be used when cross-compiling"),
    ({"mtriple": "aarch64-linux-gnu", "mcpu": "x86-64"}, "LLVM does not know CPU 'x86-64' for aarch64"),
])
def test_bad_target_options_are_one_line_errors(opts, match):
    with pytest.raises(CompileError, match=match) as e:
        resolve_target(opts)
    assert "\n" not in str(e.value)


def test_missing_cross_compiler_names_it(tmp_path, rng, monkeypatch):
    """Without the cross g++ on PATH: one line naming the compiler and its Debian package, raised
    by emit before anything is written (it used to fail later with a bare g++ command line)."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(CompileError, match=r"'aarch64-linux-gnu-g\+\+'.*apt-get install g\+\+-aarch64-linux-gnu") as e:
        get_backend("tvm-llvm").emit(_graph(rng), {"tvm": {"target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}}},
                                     tmp_path)
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == []
    with pytest.raises(CompileError, match="'my-cross-g\\+\\+'"):
        resolve_target({"mtriple": "aarch64-linux-gnu", "cc": "my-cross-g++"})


def test_cross_compiled_aarch64_artifact(tmp_path, rng):
    """mtriple aarch64-linux-gnu: an aarch64 ELF library linked by Debian's cross g++ (needs
    g++-aarch64-linux-gnu: ``QDEPLOY_CROSS=aarch64 scripts/setup.sh``); the manifest records the
    target and says the artifact was not run here; loading works, running raises one clear line."""
    assert shutil.which("aarch64-linux-gnu-g++"), \
        "aarch64-linux-gnu-g++ missing: install g++-aarch64-linux-gnu (QDEPLOY_CROSS=aarch64 scripts/setup.sh)"
    g = _graph(rng)
    cfg = {"tvm": {"mtriple": "aarch64-linux-gnu"}}
    res = qdeploy.compile(g, "tvm-llvm", tmp_path / "a", config=cfg, source_check=False)
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert man["backend"]["target"] == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "generic"}
    assert man["backend"]["library_target"]["triple"] == "aarch64-linux-gnu"
    assert man["backend"]["cross_compiler"] == "aarch64-linux-gnu-g++"
    assert man["exactness"]["bit_exact"] is None and "aarch64" in man["exactness"]["not_run"]
    assert "NOT CHECKED" in (tmp_path / "a" / "report.md").read_text()
    assert res.report["inexact"] is False
    elf = (tmp_path / "a" / man["backend"]["library"]).read_bytes()
    assert elf[:4] == b"\x7fELF" and int.from_bytes(elf[18:20], "little") == 183  # EM_AARCH64
    m = CompiledModel.load(tmp_path / "a")
    with pytest.raises(CompileError, match="cross-compiled.*aarch64"):
        m.run_codes({"x": rng.integers(-128, 128, (2, 32))})


def test_cli_target_flags(tmp_path, rng):
    """``qdeploy compile --mtriple/--mcpu`` reach the manifest; a missing cross compiler is one
    error line naming it (exit 2, nothing written)."""
    from tests.bad_inputs.builders import model as onnx_model, qmlp, save

    nodes, inits = qmlp()
    model = save(onnx_model(nodes, (1, 4), inits), tmp_path / "m.onnx")
    cli = [sys.executable, "-m", "qdeploy.cli", "compile", str(model), "-t", "tvm-llvm", "--no-source-check"]
    r = subprocess.run([*cli, "-o", str(tmp_path / "n"), "--mcpu", "native"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    man = json.loads((tmp_path / "n" / "manifest.json").read_text())
    assert man["backend"]["target"]["mcpu"] == tvm.target.codegen.llvm_get_system_cpu()
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{tmp_path / 'empty'}"}
    r = subprocess.run([*cli, "-o", str(tmp_path / "x"), "--mtriple", "aarch64-linux-gnu"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2 and "aarch64-linux-gnu-g++" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
