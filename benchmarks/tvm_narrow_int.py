"""Narrow integer lowering on TVM (issue #15, item 1): the jet tagger (real QONNX, 16-64-32-32-5,
6-bit; ``--model tfc``: the binarized TFC_1W1A MNIST MLP) compiled by this checkout and by a
baseline that differs only in the lowering's files (taken from ``--base``, default
:data:`INT64_LOWERING`, the int64-everywhere lowering), for ``tvm: {schedule: none}`` (default)
and ``{schedule: auto}``, timed interleaved (best of ``--reps`` rounds, each round ``--iters``
calls per library in turn) at batch 1 and 256, through ``CompiledModel.predict`` and the raw VM
call of the library; every library's outputs are checked equal to each other and the reference.

    .venv/bin/python benchmarks/tvm_narrow_int.py [--model jet|tfc] [--base REF] [--reps 7] [--iters 200]

Prints the load (``uptime``) before and after, microseconds per call, and new/base ratios.  The
baseline is built in a subprocess with its own ``qdeploy`` tree, so the two lowerings never share
a process; both libraries follow the same int64-codes-in/out contract and are loaded by this
checkout's runtime.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "realcases"
#: model name -> (QONNX file, golden inputs: the benchmark's inputs are rows of it)
MODELS = {
    "jet": (REAL / "jsc-qkeras-3layer" / "qkeras_jettagging.onnx",
            REAL / "jsc-qkeras-3layer" / "synthetic_input_uniform_pm1_64x16.npy"),
    "tfc": (REAL / "qonnx-zoo-tfc-mnist" / "TFC_1W1A.onnx",
            REAL / "qonnx-zoo-tfc-mnist" / "mnist_test_digits_7210_0to255.npy"),
}
SCHEDULES = ("none", "auto")


def _build_all(out: Path, model: str = "jet") -> None:
    """Compile ``model`` for every schedule into ``out/<schedule>`` with the importable qdeploy."""
    import numpy as np

    import qdeploy

    onnx, golden = MODELS[model]
    x = np.load(golden).astype(np.float32)
    for s in SCHEDULES:
        qdeploy.compile(str(onnx), target="tvm-llvm", out_dir=out / s, golden=x, force=True,
                        config={"tvm": {"schedule": s}})


#: the lowering's files: the baseline takes these from ``--base`` and everything else from HEAD
LOWERING_FILES = ("backends/tvm/lower.py", "backends/tvm/ops.py", "backends/tvm/ops_batch_a.py",
                  "backends/tvm/relax_util.py")
#: last main commit whose TVM lowering computed in int64 everywhere
INT64_LOWERING = "f5c166c"


def _build_base(ref: str, out: Path, model: str = "jet") -> None:
    """Build the baseline artifacts in a subprocess whose editable ``qdeploy`` mapping points at
    ``git archive HEAD`` with the lowering's files (:data:`LOWERING_FILES`) taken from ``ref`` and
    ``backends/tvm/intplan.py`` removed: only the lowering differs (target defaults, schedule and
    runtime are HEAD's in both builds)."""
    src = out / "src"
    src.mkdir(parents=True)
    arch = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=arch, check=True)
    for f in LOWERING_FILES:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:{f}"], check=True, capture_output=True).stdout
        (src / f).write_bytes(text)
    (src / "backends" / "tvm" / "intplan.py").unlink(missing_ok=True)
    code = (
        "import sys, __editable___qdeploy_0_1_0_finder as f\n"
        f"f.MAPPING.update({{k: v.replace({str(ROOT)!r}, {str(src)!r}) for k, v in f.MAPPING.items()}})\n"
        f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "import qdeploy, tvm_narrow_int as b\n"
        f"assert qdeploy.__file__.startswith({str(src)!r}), qdeploy.__file__\n"
        f"b._build_all(__import__('pathlib').Path({str(out)!r}), {model!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default=INT64_LOWERING, help="git ref whose lowering files the baseline uses")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--model", choices=sorted(MODELS), default="jet")
    a = ap.parse_args()
    import numpy as np
    import tvm
    from tvm import relax

    from qdeploy.runtime import CompiledModel
    from qdeploy.runtime.compiled import user_feeds

    print("load before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(f"baseline: {a.base}")
    print(f"threads: TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', '(unset)')}; model {MODELS[a.model][0].name}")
    tmp = Path(tempfile.mkdtemp(prefix="qd_narrow_"))
    _build_base(a.base, tmp / "base", a.model)
    _build_all(tmp / "new", a.model)
    golden = np.load(MODELS[a.model][1]).astype(np.float32)
    rng = np.random.default_rng(0)
    libs = {}
    for ver in ("base", "new"):
        for s in SCHEDULES:
            m = CompiledModel.load(tmp / ver / s)
            lib = json.loads((tmp / ver / s / "tvm_build.json").read_text())["library"]
            vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp / ver / s / lib)), tvm.cpu())
            libs[(ver, s)] = (m, vm["main"])
    results = {}
    for batch in (1, 256):
        x = golden[rng.integers(0, len(golden), batch)]
        m0 = libs[("new", "none")][0]
        feeds = user_feeds(m0.graph, x)
        args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[i])) for i in m0.graph.inputs]
        want = None
        for key, (m, raw) in libs.items():
            y = m.predict(x)
            y = y[0] if isinstance(y, list) else y
            want = y if want is None else want
            assert np.array_equal(y, want), f"{key} batch {batch}: outputs differ"
        assert np.array_equal(libs[("new", "none")][0].run_codes(feeds)[m0.graph.outputs[0]],
                              __import__("qdeploy.compiler.reference", fromlist=["execute"]).execute(
                                  m0.graph, feeds, codes=True)[m0.graph.outputs[0]])
        best = {}
        for _ in range(a.reps):
            for key, (m, raw) in libs.items():
                for what, f in (("predict", lambda: m.predict(x)), ("raw", lambda: raw(*args))):
                    f()
                    t0 = time.perf_counter()
                    for _ in range(a.iters if batch == 1 else max(a.iters // 10, 5)):
                        f()
                    dt = (time.perf_counter() - t0) / (a.iters if batch == 1 else max(a.iters // 10, 5))
                    k = (*key, what)
                    best[k] = min(best.get(k, 1e9), dt)
        results[batch] = best
        print(f"\nbatch {batch} (best of {a.reps}, us per call)")
        print(f"{'schedule':9} {'call':8} {'base int64':>11} {'new narrow':>11} {'new/base':>9}")
        for s in SCHEDULES:
            for what in ("predict", "raw"):
                b0, n0 = best[("base", s, what)] * 1e6, best[("new", s, what)] * 1e6
                print(f"{s:9} {what:8} {b0:11.1f} {n0:11.1f} {n0 / b0:9.2f}x")
    print("\nload after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
