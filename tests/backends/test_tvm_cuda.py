"""tvm-cuda (backends/tvm/cuda.py): builds without a GPU, its CUDA source compiles with a real
nvcc, and the artifact says whether it ran.

The nvcc check is honest in both directions: it needs nvcc (PATH, ``$CUDA_HOME/bin``, or pip's
``nvidia-cuda-nvcc``, ``QDEPLOY_CUDA=1 scripts/setup.sh``) and FAILS naming what to install when there is none -- never a skip; on a
machine that deliberately has no CUDA toolkit deselect it with ``-m "not nvcc"``.  A stand-in
``nvcc`` that exits 0 does not pass: the output must be a CUDA ELF (``e_machine`` 190) for the
requested SM, holding every ``__global__`` kernel of the source.

Bit-exactness on a GPU cannot be checked without one: on a machine where ``tvm.cuda(0)`` exists
:func:`test_cuda_artifact_runs_or_says_why_not` compares with the reference (``scripts/gpu_check.sh``
also runs the conformance suite there); here it asserts the clear error instead.
"""
from __future__ import annotations

import glob
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
from qdeploy.backends.tvm.cuda import CUDA_SOURCE, cuda_device_reason  # noqa: E402
from qdeploy.compiler import reference as ref  # noqa: E402
from qdeploy.compiler.errors import CompileError  # noqa: E402
from qdeploy.compiler.ir import FLOAT32, Const, GraphBuilder, parse_type as T  # noqa: E402
from qdeploy.runtime import CompiledModel  # noqa: E402

EM_CUDA = 190


def _graph(rng):
    """float input -> quantize -> conv -> relu -> requantize -> reshape -> dense:
    a matmul, a reduction and elementwise kernels, all scheduled by DLight."""
    b = GraphBuilder("gpu")
    x = b.input("x", (6, 6, 3), FLOAT32)
    q = b.add("qin", "Quantize", [x], attrs={"to": T("fixed<8,3,RND_CONV,SAT>")})
    c = b.add("conv", "Conv", [q], attrs={"kernel": (3, 3)},
              params={"weight": Const(rng.integers(-8, 8, (3, 3, 3, 4)), T("int<4>"))})
    c = b.add("relu", "Relu", [c])
    c = b.add("rq", "Quantize", [c], attrs={"to": T("ufixed<6,4,RND_INF,SAT>")})
    f = b.add("flat", "Reshape", [c], attrs={"shape": (64,)})
    d = b.add("fc", "Dense", [f], params={"weight": Const(rng.integers(-16, 16, (64, 5)), T("fixed<5,1>"))})
    b.output(d)
    return b.build()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    rng = np.random.default_rng(11)
    g = _graph(rng)
    d = tmp_path_factory.mktemp("cuda")
    x = rng.standard_normal((4, 6, 6, 3)).astype(np.float32)
    res = qdeploy.compile(g, "tvm-cuda", d / "a", config={"tvm": {"arch": "sm_90"}}, golden=x, source_check=False)
    return g, d / "a", res


def find_nvcc() -> str | None:
    """nvcc from PATH, ``$CUDA_HOME``/``$CUDA_PATH``, or the pip wheel ``nvidia-cuda-nvcc-cu1x``."""
    cands = [shutil.which("nvcc")]
    cands += [os.path.join(os.environ[k], "bin", "nvcc") for k in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(k)]
    for sp in sys.path:  # CUDA 12 wheels: nvidia/cuda_nvcc/bin; CUDA 13: nvidia/cu13/bin
        cands += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "bin", "nvcc")))
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


def test_cuda_build_without_gpu_records_target(artifact):
    g, d, res = artifact
    man = json.loads((d / "manifest.json").read_text())
    be = man["backend"]
    assert be["target"] == {"kind": "cuda", "arch": "sm_90"} and be["schedule"] == "dlight"
    assert be["target_host"]["mcpu"] == "x86-64" or be["target_host"]["mcpu"] == "generic"
    assert be["not_run_here"] == cuda_device_reason()
    if be["not_run_here"]:  # the manifest says it was not run, and why
        assert man["exactness"]["bit_exact"] is None and "no CUDA device" in man["exactness"]["not_run"]
        assert "NOT CHECKED" in (d / "report.md").read_text()
    else:
        assert man["exactness"]["bit_exact"] is True
    src = (d / CUDA_SOURCE).read_text()
    assert re.search(r'extern "C" __global__', src) and "__launch_bounds__" in src  # DLight bound threads


def test_cuda_artifact_runs_or_says_why_not(artifact):
    """With a GPU: bit-exact against the reference; without one: loading works (the manifest can
    be read) and running raises one clear line."""
    g, d, _ = artifact
    m = CompiledModel.load(d)
    x = np.random.default_rng(5).standard_normal((7, 6, 6, 3)).astype(np.float32)
    feeds = ref.prepare_feeds(g, [x])
    if cuda_device_reason() is None:
        got, want = m.run_codes(feeds), ref.execute(g, feeds, codes=True)
        for o in g.outputs:
            np.testing.assert_array_equal(got[o], want[o])
    else:
        with pytest.raises(CompileError, match="tvm-cuda: no CUDA device"):
            m.run_codes(feeds)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_arch_option(tmp_path, rng, arch):
    g = _graph(rng)
    be = get_backend("tvm-cuda")
    info = be.emit(g, {"tvm": {"arch": arch}}, tmp_path)
    assert info["target"] == {"kind": "cuda", "arch": arch}
    with pytest.raises(CompileError, match="sm_80 or sm_90"):
        be.emit(g, {"tvm": {"arch": "ampere"}}, tmp_path / "x")
    with pytest.raises(CompileError, match="schedule must be 'dlight'"):
        be.emit(g, {"tvm": {"schedule": "auto"}}, tmp_path / "y")


@pytest.mark.nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_embedded_cuda_source_compiles_with_nvcc(artifact, tmp_path, arch):
    """The CUDA source the library embeds compiles with nvcc for sm_80 and sm_90 into a CUDA ELF
    for that SM holding every kernel."""
    nvcc = find_nvcc()
    assert nvcc, ("no nvcc found (PATH, CUDA_HOME, pip nvidia-cuda-nvcc): the tvm-cuda source check cannot run; "
                  "install the CUDA toolkit or run QDEPLOY_CUDA=1 scripts/setup.sh, or deselect with -m 'not nvcc'")
    ver = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    assert ver.returncode == 0 and "Cuda compilation tools" in ver.stdout, f"{nvcc} is not NVIDIA's nvcc: {ver.stdout}"
    _, d, _ = artifact
    src = (d / CUDA_SOURCE).read_text()
    kernels = re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', src)
    assert kernels
    out = tmp_path / f"model_{arch}.cubin"
    r = subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-w", "-o", str(out), str(d / CUDA_SOURCE)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    elf = out.read_bytes()
    assert elf[:4] == b"\x7fELF" and int.from_bytes(elf[18:20], "little") == EM_CUDA
    flags = int.from_bytes(elf[48:52], "little")  # e_flags: the SM number in bits 8..15 (CUDA >= 12)
    sm = int(arch[3:])
    assert (flags >> 8) & 0xFF == sm or flags & 0xFF == sm, hex(flags)
    for k in set(kernels):
        assert k.encode() in elf, f"kernel {k} missing from the cubin"
