"""A tvm-llvm library cross-compiled for aarch64 is bit-exact: run under qemu-user.

The shipped ``lib_<hash>.so`` is ``dlopen``ed by a small C driver (:mod:`tests.backends.tvm_c_driver`)
that calls its kernels in the order of the Relax plan, with no TVM runtime (none exists for aarch64
here).  The driver itself is first checked on this machine's own library (a small conv model) against
both the reference and TVM's VM (so a driver bug cannot pass for an aarch64 result); the aarch64 run
(``@slow``: qemu takes ~10-30 s) then compares every op's conformance case, merged into one wide
model (default schedule), and a conv model with ``schedule: auto``, with the reference interpreter.

Needs: ``gcc``; for the slow test ``aarch64-linux-gnu-gcc`` (Debian ``gcc-aarch64-linux-gnu``,
pulled in by ``g++-aarch64-linux-gnu``) and ``qemu-aarch64`` (Debian ``qemu-user``):
``QDEPLOY_CROSS=aarch64 scripts/setup.sh`` installs both.  A missing tool FAILS naming it.
"""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from qdeploy.backends import get_backend  # noqa: E402
from qdeploy.compiler import reference as ref  # noqa: E402
from qdeploy.compiler.ir.graph import Graph  # noqa: E402

from ..conformance.conftest import compare, merge_cases, random_feeds  # noqa: E402
from ..conformance.test_ops import CASES  # noqa: E402
from . import tvm_c_driver as drv  # noqa: E402

EM_AARCH64 = 183
SYSROOT = "/usr/aarch64-linux-gnu"


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} not found: install {package} (QDEPLOY_CROSS=aarch64 scripts/setup.sh)"
    return path


def _wide_graph():
    """Every conformance case tvm-llvm compiles (test_ops.CASES), side by side in one graph."""
    g, _ = merge_cases("qemu_wide", [c for c in CASES if "tvm-llvm" not in c.rejects])
    return g


def _graph(schedule, wide):
    """The wide graph (~50 s to build and run here), or the float-input conv -> requantize -> dense
    model of the tvm-cuda tests; always the small one for ``auto`` (fusing and scheduling the wide
    graph takes minutes on a loaded 2-core machine)."""
    if wide and schedule == "none":
        return _wide_graph()
    from .test_tvm_cuda import _graph as small
    return small(np.random.default_rng(3))


def _run_driver(art, info, feeds, work, cc, prefix=()):
    work.mkdir()
    layout = drv.write_driver(art, info, feeds, work)
    exe = work / "driver"
    r = subprocess.run([cc, "-O1", "-rdynamic", *drv.include_flags(), "-o", str(exe), str(work / "driver.c"), "-ldl"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([*prefix, str(exe), str(art / info["library"]), str(work / "data.bin"), str(work / "out.bin")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"driver exit {r.returncode}: {r.stderr[-3000:]}"
    return exe, drv.read_outputs(work / "out.bin", layout)


@pytest.mark.parametrize("schedule", ["none", "auto"])
def test_c_driver_equals_tvm_vm_on_host_library(tmp_path, schedule):
    """The driver, run on this machine's own library, gives exactly what TVM's VM gives and what
    the reference gives: it calls the right kernels on the right buffers."""
    _need("gcc", "gcc")
    g = _graph(schedule, wide=False)
    be = get_backend("tvm-llvm")
    art = tmp_path / "a"
    art.mkdir()
    # the C driver stands in for TVM's VM interpreter: it runs a bytecode-mode library's kernels
    # (a compiled-mode library carries its VM functions as C code that needs the TVM runtime)
    info = be.emit(g, {"tvm": {"schedule": schedule, "exec_mode": "bytecode"}}, art)
    be.build(art, info)
    assert drv.library_slots(art / info["library"]) <= set(drv.SLOTS)
    core = Graph.load(str(art / "model"))
    feeds = random_feeds(core, np.random.default_rng(21), batch=3)
    _, got = _run_driver(art, info, feeds, tmp_path / "w", "gcc")
    vm = be.load(art, info, core)(feeds)
    for o in core.outputs:
        np.testing.assert_array_equal(got[o], vm[o], err_msg=o)
    bad = compare("qemu", f"host-driver-{schedule}", "tvm-llvm", core, got, ref.execute(core, feeds, codes=True))
    assert not bad, "\n".join(bad[:20])


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["none", "auto"])
def test_aarch64_library_bit_exact_under_qemu(tmp_path, schedule):
    """Every op's conformance case (a conv model for ``auto``), compiled for aarch64-linux-gnu and run
    under qemu-aarch64:
    fixed-point codes equal the reference bit for bit (float values within float32 rounding)."""
    _need("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu")
    gcc = _need("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu")
    qemu = _need("qemu-aarch64", "qemu-user")
    g = _graph(schedule, wide=True)
    be = get_backend("tvm-llvm")
    art = tmp_path / "a"
    art.mkdir()
    info = be.emit(g, {"tvm": {"mtriple": "aarch64-linux-gnu", "schedule": schedule, "exec_mode": "bytecode"}}, art)
    be.build(art, info)
    lib = (art / info["library"]).read_bytes()
    assert int.from_bytes(lib[18:20], "little") == EM_AARCH64
    assert info["library_target"]["triple"] == "aarch64-linux-gnu"
    assert drv.library_slots(art / info["library"], "aarch64-linux-gnu-nm") <= set(drv.SLOTS)
    core = Graph.load(str(art / "model"))
    feeds = random_feeds(core, np.random.default_rng(22), batch=5)
    exe, got = _run_driver(art, info, feeds, tmp_path / "w", gcc, prefix=(qemu, "-L", SYSROOT))
    assert int.from_bytes(exe.read_bytes()[18:20], "little") == EM_AARCH64  # really an aarch64 program
    bad = compare("qemu", f"aarch64-{schedule}", "tvm-llvm", core, got, ref.execute(core, feeds, codes=True))
    assert not bad, "\n".join(bad[:20])
