import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

# reproducible property tests: the same examples on every run (CI and local)
settings.register_profile("qdeploy", derandomize=True)
settings.load_profile("qdeploy")

REPO = Path(__file__).resolve().parents[1]

# tvm-llvm artifacts hold the portable x86-64 library plus one per faster CPU level (default
# "auto": this machine's level), each built and checked by every compile.  The suite builds the
# portable one only, unless the caller chose (QDEPLOY_TVM_CPU_VARIANTS=auto runs it with the
# variants); tests/backends/test_tvm_variants.py covers the default.
os.environ.setdefault("QDEPLOY_TVM_CPU_VARIANTS", "none")

# `qdeploy search` runs its QAT jobs on one worker process per CPU by default ("auto"); worker start-up
# (a fresh interpreter importing torch and Brevitas) costs more than the suite's tiny searches, so the
# suite runs them in-process unless the caller chose; tests/quantization/test_fanout.py sets the
# engines it checks explicitly.
os.environ.setdefault("QDEPLOY_QAT_WORKERS", "1")


def _find_shared() -> Path:
    """The team's shared/ folder: see benchmarks/_shared.py (one finder for tests and benchmarks)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_qdeploy_bench_shared", REPO / "benchmarks" / "_shared.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.find_shared()


SHARED = _find_shared()
REALCASES = SHARED / "realcases"
#: for tests that read ../shared/realcases (skipped, with this reason, when it cannot be found)
needs_realcases = pytest.mark.skipif(not REALCASES.is_dir(),
                                     reason=f"{REALCASES} not found: set QDEPLOY_SHARED to the shared/ folder")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def small_mlp(rng):
    """A float-input Dense -> Relu -> Quantize graph (16 inputs, 8 outputs) with random
    ``fixed<6,1>`` weights: the smallest model that exercises the default pipeline."""
    from qdeploy.compiler.ir import FLOAT32, Const, GraphBuilder, parse_type
    b = GraphBuilder("mlp")
    x = b.input("x", (16,), FLOAT32)
    w = Const(rng.integers(-32, 32, (16, 8)), parse_type("fixed<6,1>"))
    h = b.add("fc1", "Dense", [x], params={"weight": w})
    h = b.add("relu1", "Relu", [h])
    h = b.add("q1", "Quantize", [h], attrs={"to": parse_type("ufixed<6,0,RND_CONV,SAT>")})
    b.output(h)
    return b.build()
