"""Narrow integer lowering on TVM (issue #15, item 1): the jet tagger (real QONNX, 16-64-32-32-5,
6-bit) compiled by this checkout and by a baseline git ref (default: the merge-base of
``HEAD`` and ``main``, the int64-everywhere lowering), for ``tvm: {schedule: none}`` (default) and ``{schedule: auto}``,
timed interleaved (best of ``--reps`` rounds, each round ``--iters`` calls per library in turn) at
batch 1 and 256, through ``CompiledModel.predict`` and the raw VM call of the library; every
library's outputs are checked equal to the reference first.

    .venv/bin/python benchmarks/tvm_narrow_int.py [--base main] [--reps 7] [--iters 200]

Prints the load (``uptime``) before and after, microseconds per call, and new/base ratios.  The
baseline is built in a subprocess from ``git archive <base>`` (its own ``qdeploy`` package), so the
two lowerings never share a process; both libraries follow the same int64-codes-in/out contract
and are loaded by this checkout's runtime.
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
MODEL = ROOT.parent / "shared" / "realcases" / "jsc-qkeras-3layer" / "qkeras_jettagging.onnx"
GOLDEN = MODEL.parent / "synthetic_input_uniform_pm1_64x16.npy"
SCHEDULES = ("none", "auto")


def _build_all(out: Path) -> None:
    """Compile the jet tagger for every schedule into ``out/<schedule>`` with the importable qdeploy."""
    import numpy as np

    import qdeploy

    x = np.load(GOLDEN)
    for s in SCHEDULES:
        qdeploy.compile(str(MODEL), target="tvm-llvm", out_dir=out / s, golden=x, force=True,
                        config={"tvm": {"schedule": s}})


def _build_base(ref: str, out: Path) -> None:
    """Build the baseline artifacts from ``git archive ref`` in a subprocess whose editable
    ``qdeploy`` mapping points at the extracted tree."""
    src = out / "src"
    src.mkdir(parents=True)
    arch = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=arch, check=True)
    code = (
        "import sys, __editable___qdeploy_0_1_0_finder as f\n"
        f"f.MAPPING.update({{k: v.replace({str(ROOT)!r}, {str(src)!r}) for k, v in f.MAPPING.items()}})\n"
        f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "import qdeploy, tvm_narrow_int as b\n"
        f"assert qdeploy.__file__.startswith({str(src)!r}), qdeploy.__file__\n"
        f"b._build_all(__import__('pathlib').Path({str(out)!r}))\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default=None, help="git ref of the baseline lowering (default: merge-base of HEAD and main)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--iters", type=int, default=200)
    a = ap.parse_args()
    if a.base is None:
        a.base = subprocess.run(["git", "-C", str(ROOT), "merge-base", "HEAD", "main"], check=True,
                                capture_output=True, text=True).stdout.strip()
    import numpy as np
    import tvm
    from tvm import relax

    from qdeploy.runtime import CompiledModel
    from qdeploy.runtime.compiled import user_feeds

    print("load before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(f"baseline: {a.base}")
    print(f"threads: TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', '(unset)')}; model {MODEL.name}")
    tmp = Path(tempfile.mkdtemp(prefix="qd_narrow_"))
    _build_base(a.base, tmp / "base")
    _build_all(tmp / "new")
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
        x = rng.uniform(-1, 1, (batch, 16)).astype(np.float32)
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
