"""The harness of benchmarks/tvm_vs_onnxruntime.py on one tiny QONNX model, one round (its
correctness, not its timings): the float-equivalent ONNX that onnxruntime runs equals qonnx's
executor, qdeploy's output equals onnxruntime's, every timing is measured and printed."""
from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.runtime.test_layout import conv_model, run_qonnx

pytest.importorskip("tvm")
ort = pytest.importorskip("onnxruntime")
warnings.filterwarnings("ignore", category=UserWarning)

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "tvm_vs_onnxruntime.py"


def _load(path=BENCH, name="bench_tvm_vs_ort"):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_float_equivalent_equals_qonnx(tmp_path):
    float_equivalent = _load(BENCH.parent / "float_onnx.py", "bench_float_onnx").float_equivalent

    path = tmp_path / "m.onnx"
    model = conv_model((1, 4, 4, 4), two_outputs=True)
    path.write_bytes(model.SerializeToString())
    x = (np.random.default_rng(3).integers(-80, 80, (5, 4, 4, 4)) / 16).astype(np.float32)
    s = ort.InferenceSession(float_equivalent(path).SerializeToString(), providers=["CPUExecutionProvider"])
    got = s.run(None, {s.get_inputs()[0].name: x})  # batch 5 although the QONNX model's batch is 1
    want = run_qonnx(model, x)
    assert len(got) == 2 and all(np.array_equal(g, w) for g, w in zip(got, want))


def test_harness_one_round(tmp_path):
    bench = _load()
    path = tmp_path / "m.onnx"
    path.write_bytes(conv_model((1, 4, 4, 4)).SerializeToString())
    rng = np.random.default_rng(0)
    pool = (rng.integers(-64, 64, (6, 4, 4, 4)) / 16).astype(np.float32)
    case = bench.Case("tiny conv", path, {1: pool[:1], 6: pool}, pool)
    lines = []
    b = bench.Bench([case], tmp_path / "work", [1], {}, min_time=0.001, out=lines.append)
    rows = b.measure(rounds=1)
    bench.report(rows, [1], out=lines.append)
    assert [(r.batch, r.check) for r in rows] == [(1, "outputs equal (bit for bit)"), (6, "outputs equal (bit for bit)")]
    for r in rows:
        assert all(0 < d[1] < 1e6 for d in (r.ort, r.predict, r.raw))
        assert 0 < r.cpu["raw"] < 1e6 and 0 < r.cpu["predict"] < 1e6
    table = [ln for ln in lines if ln.startswith("tiny conv")]
    assert len(table) == 2
    for ln, r in zip(table, rows):  # the printed ratios are the measured ones
        assert f"{r.predict[1] / r.ort[1]:.2f}x" in ln and f"{r.raw[1] / r.ort[1]:.2f}x" in ln
    assert any("thin predict True" in ln for ln in lines)
    assert sum("overhead" in ln and "tiny conv" in ln for ln in lines) == 2  # the CPU-time overhead lines


def test_harness_baseline_rows(tmp_path):
    """--baseline-config: every model is built a second time, measured in the same rounds, and the
    summary gives this build against the [base] one."""
    bench = _load()
    path = tmp_path / "m.onnx"
    path.write_bytes(conv_model((1, 4, 4, 4)).SerializeToString())
    pool = (np.random.default_rng(1).integers(-64, 64, (3, 4, 4, 4)) / 16).astype(np.float32)
    case = bench.Case("tiny conv", path, {3: pool}, pool)
    lines = []
    b = bench.Bench([case], tmp_path / "work", [1], {"schedule": "none"}, min_time=0.001, out=lines.append,
                    baseline={})
    rows = b.measure(rounds=1)
    bench.report(rows, [1], out=lines.append)
    assert [r.case for r in rows] == ["tiny conv", "tiny conv [base]"]
    assert all(r.check == "outputs equal (bit for bit)" for r in rows)
    assert (tmp_path / "work" / "m0").is_dir() and (tmp_path / "work" / "m0_base").is_dir()
    assert any(ln.startswith("#   tiny conv") and "predict" in ln and "x raw" in ln for ln in lines)
