"""Cold hls4ml compile time: ``qdeploy compile -t hls4ml`` against bare hls4ml converting and
compiling the same QONNX model, on the jet tagger and TFC (``../shared/realcases``).

Both sides start cold: qdeploy with an empty C-simulation build cache (``QDEPLOY_CACHE`` set to a
new folder each time), bare hls4ml with a new output folder.  Bare hls4ml follows its QONNX docs
(https://fastmachinelearning.org/hls4ml/frontend/qonnx.html: ``cleanup_model``,
``ConvertToChannelsLastAndClean``, ``GemmToMatMul``, ``cleanup_model``, ``config_from_onnx_model``
with ``granularity='name'``, ``convert_from_onnx_model``, ``compile``), Vitis backend,
io_parallel, its defaults otherwise (``write_weights_txt`` True).  qdeploy runs its whole compile:
import, passes, fidelity check against the source, emit, g++ build, reference check.  Runs are
interleaved, best of ``--repeats``; the load average is printed.  Target: qdeploy / bare <= 1.1x.

    .venv/bin/python benchmarks/hls4ml_compile_time.py [--repeats 2] [--models jet,tfc]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import SHARED  # noqa: E402

import numpy as np  # noqa: E402

MODELS = {
    "jet": (SHARED / "realcases/jsc-qkeras-3layer/qkeras_jettagging.onnx",
            lambda: np.load(SHARED / "realcases/jsc-qkeras-3layer/synthetic_input_uniform_pm1_64x16.npy").astype(np.float32)),
    "tfc": (SHARED / "realcases/qonnx-zoo-tfc-mnist/TFC_1W1A.onnx",
            lambda: (np.load(SHARED / "realcases/qonnx-zoo-tfc-mnist/mnist_test_digits_7210_0to255.npy")
                     .reshape(4, 1, 28, 28).astype(np.float32) / 255.0)),
}


def bare_hls4ml(path: Path, out: Path) -> None:
    import hls4ml
    import qonnx.util.cleanup
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
    from qonnx.transformation.gemm_to_matmul import GemmToMatMul
    m = ModelWrapper(str(path))
    m = qonnx.util.cleanup.cleanup_model(m)
    m = m.transform(ConvertToChannelsLastAndClean())
    m = m.transform(GemmToMatMul())
    m = qonnx.util.cleanup.cleanup_model(m)
    cfg = hls4ml.utils.config.config_from_onnx_model(m, granularity="name", backend="Vitis",
                                                     default_precision="fixed<16,6>")
    hm = hls4ml.converters.convert_from_onnx_model(m, output_dir=str(out), io_type="io_parallel",
                                                   backend="Vitis", hls_config=cfg)
    hm.compile()


def qdeploy_compile(path: Path, out: Path, golden) -> None:
    import qdeploy
    os.environ["QDEPLOY_CACHE"] = str(out.parent / (out.name + "_cache"))
    qdeploy.compile(str(path), "hls4ml", out, golden=golden)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="jet,tfc")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    rows = []
    with tempfile.TemporaryDirectory(prefix="qdeploy_hlstime_") as tmp:
        k = 0
        for name in a.models.split(","):
            path, golden = MODELS[name]
            x = golden()
            best = {"qdeploy": float("inf"), "bare": float("inf")}
            for _ in range(a.repeats):
                for who in ("qdeploy", "bare"):  # interleaved
                    k += 1
                    out = Path(tmp) / f"{who}{k}"
                    t = time.perf_counter()
                    with contextlib.redirect_stdout(io.StringIO()):
                        (qdeploy_compile(path, out, x) if who == "qdeploy" else bare_hls4ml(path, out))
                    best[who] = min(best[who], time.perf_counter() - t)
                    print(f"[{name} {who}] {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
            rows.append((name, best["qdeploy"], best["bare"]))
    print(f"{'model':6} {'qdeploy s':>10} {'bare hls4ml s':>14} {'ratio':>7}")
    for name, q, b in rows:
        print(f"{name:6} {q:10.1f} {b:14.1f} {q / b:6.2f}x")
    print(f"best of {a.repeats}, interleaved, cold (empty build cache / new output folder); cpu count {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}; target: <= 1.1x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
