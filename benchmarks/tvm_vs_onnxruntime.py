"""qdeploy's TVM artifacts against onnxruntime, side by side (issue #15's table).

    .venv/bin/python benchmarks/tvm_vs_onnxruntime.py [--rounds 4] [--quick] [--threads 1,2]
        [--batches 1,256] [--models jet,tfc,digits,mnist] [--tvm-config '{"schedule": "auto"}']
        [--baseline-config '{"mcpu": "native"}'] [--tune-logs ARTIFACT,ARTIFACT]

Tuned builds (issue #15): ``--tvm-config '{"tune": {"trials": 64, "batch": 256}, "mcpu": "native"}'
--baseline-config '{"mcpu": "native"}'`` measures the tuned and the untuned library of every model
in the same interleaved rounds; ``--tune-logs`` reuses the records of earlier tuned artifacts (the
``artifact ...`` path each tuned model's line prints) instead of tuning again.

Models (each at batch 1 and 256): the hls4ml jet tagger (QONNX, ``../shared/realcases``), TFC
1W1A MNIST (QONNX model zoo), the digits QAT CNN (``examples/digits``: Brevitas QAT, trained here
for a few epochs and exported to QONNX) and the ONNX-model-zoo MNIST CNN (float).  Each is compiled
with ``qdeploy.compile(..., target="tvm-llvm")`` (``--tvm-config`` adds ``tvm:`` options; by
default none: the artifact's defaults), and onnxruntime runs a float-equivalent plain-ONNX copy of
the same model (:mod:`benchmarks.float_onnx`; the float model as it is).  Outputs are compared
once per row and the printout says whether they are equal bit for bit (else the largest
difference and whether the argmax agrees).

Measured per row and thread count, interleaved (round r measures every row before round r+1
starts), best of ``--rounds``: onnxruntime ``InferenceSession.run`` (``intra_op_num_threads`` =
threads, one inter-op thread), qdeploy ``CompiledModel.predict`` on the same float32 array in the
source layout, and the bare library call that ``predict`` makes (``predictor.raw_call``: the VM
entry on prepared tensors).  TVM's thread pool is sized by ``TVM_NUM_THREADS`` (set here to the
largest ``--threads`` before tvm is imported, unless set already) and switched per measurement
with TVM's ``runtime.config_threadpool``; the thread count TVM reports is printed.  The load
(``uptime``) is printed before and after: the machine is shared, timings are noisy.

Printed ratios: ``predict/ORT`` and ``raw/ORT`` (below 1: qdeploy faster), and the thin path's
overhead ``predict - raw`` in microseconds of wall time; then the same overhead in CPU time
(``time.process_time``, 1 thread), which other processes' load disturbs far less.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402

from _shared import SHARED  # noqa: E402  ($QDEPLOY_SHARED, ../shared, or next to the clone's origin)

REALCASES = SHARED / "realcases"


@dataclass
class Case:
    """One benchmark model: its source file, the inputs per batch size (float32, source layout)
    and the golden inputs it is compiled with (they also fix the input type)."""

    name: str
    path: Path
    inputs: dict[int, np.ndarray]
    golden: np.ndarray
    ort_path: Path | None = None  # a plain ONNX file onnxruntime runs (default: float_equivalent(path))


@dataclass
class Row:
    """Results of one (case, batch): best microseconds per call by thread count."""

    case: str
    batch: int
    check: str = ""
    ort: dict[int, float] = field(default_factory=dict)
    predict: dict[int, float] = field(default_factory=dict)
    raw: dict[int, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU microseconds per call at 1 thread


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load: " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def _batch_of(x: np.ndarray, n: int, rng) -> np.ndarray:
    """``n`` samples: ``x``'s rows, cycled, in a shuffled order."""
    idx = rng.permutation(np.arange(n) % len(x))
    return np.ascontiguousarray(x[idx], dtype=np.float32)


def jet_case(batches, rng) -> Case:
    """The jet tagger: inputs on the 2**-16 grid of the case's synthetic inputs."""
    d = REALCASES / "jsc-qkeras-3layer"
    x = np.load(d / "synthetic_input_uniform_pm1_64x16.npy").astype(np.float32)
    more = (rng.integers(-(1 << 16), 1 << 16, size=(256, 16)) / float(1 << 16)).astype(np.float32)
    pool = np.concatenate([x, more])
    return Case("jet tagger (QONNX)", d / "qkeras_jettagging.onnx", {b: _batch_of(pool, b, rng) for b in batches}, pool)


def tfc_case(batches, rng) -> Case:
    """TFC 1W1A: the case's four MNIST digits and random 8-bit images, pixels k/255."""
    d = REALCASES / "qonnx-zoo-tfc-mnist"
    x = (np.load(d / "mnist_test_digits_7210_0to255.npy").astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    more = (rng.integers(0, 256, size=(252, 1, 28, 28)) / np.float32(255.0)).astype(np.float32)
    pool = np.concatenate([x, more])
    return Case("TFC 1W1A MNIST", d / "TFC_1W1A.onnx", {b: _batch_of(pool, b, rng) for b in batches}, pool)


def digits_case(batches, rng, work: Path, epochs: int) -> Case:
    """The digits QAT CNN of ``examples/digits`` trained for ``epochs`` and exported to QONNX."""
    spec = importlib.util.spec_from_file_location("digits_models_example", REPO / "examples" / "digits" / "models.py")
    dm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dm)
    x_tr, y_tr, x_te, _ = dm.load_data(seed=0, images=True)
    model = dm.make_cnn(seed=0)
    dm.train(model, (x_tr, y_tr), epochs=epochs, seed=0, verbose=False)
    path = dm.export(model, x_te[:1], work / "digits_cnn.onnx")
    pool = np.ascontiguousarray(x_te[:256], dtype=np.float32)
    return Case("digits QAT CNN", Path(path), {b: _batch_of(pool, b, rng) for b in batches}, pool)


def mnist_case(batches, rng) -> Case:
    """The ONNX-model-zoo MNIST CNN (float): the upstream test input and random 8-bit images."""
    import onnx
    from onnx import numpy_helper

    d = REALCASES / "onnx-mnist-cnn"
    x = numpy_helper.to_array(onnx.load_tensor(str(d / "test_data_set_0" / "input_0.pb"))).astype(np.float32)
    more = rng.integers(0, 256, size=(255, 1, 28, 28)).astype(np.float32)
    pool = np.concatenate([x, more])
    return Case("ONNX-zoo MNIST CNN (float)", d / "model.onnx", {b: _batch_of(pool, b, rng) for b in batches}, pool)


def _per_call(f, min_time: float, clock=time.perf_counter) -> float:
    """Mean seconds per call of ``f`` over a loop of at least ``min_time`` seconds of ``clock``."""
    f()
    reps, t = 1, 0.0
    while True:
        t0 = clock()
        for _ in range(reps):
            f()
        t = clock() - t0
        if t >= min_time:
            return t / reps
        reps = max(reps * 2, int(reps * min_time / max(t, 1e-9) * 1.2))


def _compare(ours, theirs) -> str:
    """How qdeploy's output compares with onnxruntime's."""
    a = np.asarray(ours, dtype=np.float64)
    b = np.asarray(theirs, dtype=np.float64)
    if a.shape != b.shape:
        return f"SHAPES DIFFER {a.shape} vs {b.shape}"
    if np.array_equal(a, b):
        return "outputs equal (bit for bit)"
    arg = "argmax equal" if np.array_equal(a.argmax(-1), b.argmax(-1)) else "ARGMAX DIFFERS"
    return f"outputs differ: max |diff| {np.abs(a - b).max():.3g}, {arg}"


class Bench:
    """Compiled models, onnxruntime sessions and the interleaved timing loop.

    Args:
        cases: the models.  work: a directory for the artifacts.  threads: thread counts.
        tvm_config: ``tvm:`` options for ``qdeploy.compile`` (may be empty).
        min_time: seconds each timing loop runs at least.
        out: the print function.
        baseline: ``tvm:`` options of a second build of every model, measured in the same
            interleaved rounds (rows marked ``[base]``), e.g. the untuned build beside a tuned one.
        tune_logs: per case (in order), a tuned artifact whose records ``tvm.tune.log`` applies
            instead of the config's ``tune`` (no tuning in the benchmark run).
    """

    def __init__(self, cases, work: Path, threads, tvm_config: dict, min_time: float, out=print,
                 baseline: dict | None = None, tune_logs=()):
        import onnxruntime as ort

        import qdeploy
        from qdeploy.runtime import CompiledModel

        from float_onnx import float_equivalent

        self.out, self.min_time, self.threads = out, min_time, list(threads)
        self.items = []
        builds = [(i, c, "", tvm_config) for i, c in enumerate(cases)]
        if baseline is not None:
            builds += [(i, c, " [base]", baseline) for i, c in enumerate(cases)]
        for i, c, tag, tcfg in sorted(builds, key=lambda b: b[0]):
            d = work / f"m{i}{'_base' if tag else ''}"
            tcfg = dict(tcfg)
            if not tag and i < len(tune_logs) and tune_logs[i]:
                tcfg["tune"] = {"log": tune_logs[i]}
            config = {"tvm": tcfg} if tcfg else None
            t0 = time.perf_counter()
            qdeploy.compile(str(c.path), target="tvm-llvm", out_dir=d, golden=c.golden, config=config, force=True)
            m = CompiledModel.load(d)
            info = m.manifest.get("backend", {})
            tune = info.get("tune")
            if tune:
                out(f"# {c.name}{tag}: tuned for batch {tune['batch']} ({tune['source']}: {tune['trials_run']} trials "
                    f"run now, {tune.get('kernels_applied')} kernels from the records, library {tune['target'].get('mcpu')}), "
                    f"artifact {d}")
            proto = float_equivalent(c.path)
            sessions = {}
            for t in self.threads:
                so = ort.SessionOptions()
                so.intra_op_num_threads, so.inter_op_num_threads = t, 1
                so.log_severity_level = 3
                sessions[t] = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
            in_name = sessions[self.threads[0]].get_inputs()[0].name
            out(f"# {c.name}{tag}: {c.path.name}, compiled in {time.perf_counter() - t0:.1f} s, target "
                f"{json.dumps(info.get('target'))}, library run: {m.library_variant}, exec mode {info.get('exec_mode', 'bytecode')}, "
                f"schedule {info.get('schedule')}, batch-1 entry "
                f"{bool(info.get('batch1_entry'))}, host ops {info.get('host_nodes') or 'none'}, thin predict "
                f"{m.predictor.thin}")
            for b, x in c.inputs.items():
                row = Row(c.name + tag, b, _compare(m.predict(x), sessions[self.threads[0]].run(None, {in_name: x})[0]))
                raw = m.predictor.raw_call(x)
                self.items.append((row, m, x, raw, sessions, in_name))

    def measure(self, rounds: int) -> list[Row]:
        """``rounds`` interleaved rounds; returns the rows with the best time of each."""
        import tvm

        config = tvm.get_global_func("runtime.config_threadpool")
        num = tvm.get_global_func("runtime.NumThreads")
        seen = {}
        for r in range(rounds):
            for t in self.threads:
                config(1, t)
                seen[t] = int(num())
                for row, m, x, raw, sessions, in_name in self.items:
                    s = sessions[t]
                    feed = {in_name: x}
                    for key, f in (("ort", lambda: s.run(None, feed)), ("predict", lambda: m.predict(x)),
                                   ("raw", raw)):
                        us = _per_call(f, self.min_time) * 1e6
                        d = getattr(row, key)
                        d[t] = min(d.get(t, float("inf")), us)
                    if t == 1:  # the thin path's cost in CPU time: robust to other processes' load
                        for key, f in (("predict", lambda: m.predict(x)), ("raw", raw)):
                            us = _per_call(f, self.min_time, time.process_time) * 1e6
                            row.cpu[key] = min(row.cpu.get(key, float("inf")), us)
        self.out(f"# TVM threads (runtime.NumThreads) per setting: {seen}")
        return [it[0] for it in self.items]


def report(rows: list[Row], threads, out=print) -> None:
    """Print the table: one line per row and thread count."""
    out(f"{'model':<28} {'batch':>5} {'thr':>3} {'ORT us':>9} {'predict us':>10} {'raw us':>9} "
        f"{'predict/ORT':>11} {'raw/ORT':>8} {'overhead us':>11}")
    for row in rows:
        for t in threads:
            o, p, r = row.ort[t], row.predict[t], row.raw[t]
            out(f"{row.case:<28} {row.batch:>5} {t:>3} {o:>9.1f} {p:>10.1f} {r:>9.1f} {p / o:>10.2f}x "
                f"{r / o:>7.2f}x {p - r:>11.1f}")
    if any(r.cpu for r in rows):
        out("# predict's overhead over the bare library call in CPU time (time.process_time, 1 thread, best of rounds):")
        for row in rows:
            if row.cpu:
                p, r = row.cpu["predict"], row.cpu["raw"]
                out(f"#   {row.case:<28} batch {row.batch:>4}: predict {p:8.1f} us, raw {r:8.1f} us, overhead {p - r:7.1f} us")
    by = {(r.case, r.batch): r for r in rows}
    pairs = [(r, by[(r.case + " [base]", r.batch)]) for r in rows if (r.case + " [base]", r.batch) in by]
    if pairs:
        out("# this build against the [base] build, same rounds (below 1: this build faster):")
        for r, b in pairs:
            out(f"#   {r.case:<28} batch {r.batch:>4}: " + ", ".join(
                f"{t} thr predict {r.predict[t] / b.predict[t]:.2f}x raw {r.raw[t] / b.raw[t]:.2f}x" for t in threads))
    out("# output check (qdeploy predict vs onnxruntime on the float-equivalent model):")
    for row in rows:
        out(f"#   {row.case}, batch {row.batch}: {row.check}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds; the best is kept")
    ap.add_argument("--quick", action="store_true", help="2 rounds, short loops, 1 training epoch")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--batches", default="1,256", help="comma-separated batch sizes")
    ap.add_argument("--models", default="jet,tfc,digits,mnist", help="subset of jet,tfc,digits,mnist")
    ap.add_argument("--tvm-config", default="{}", help="JSON of tvm: options, e.g. '{\"schedule\": \"auto\"}'")
    ap.add_argument("--min-time", type=float, default=None, help="seconds per timing loop (0.2; --quick 0.03)")
    ap.add_argument("--baseline-config", default=None,
                    help="JSON of tvm: options of a second build per model measured in the same rounds ([base] rows), "
                         "e.g. '{\"mcpu\": \"native\"}' beside a tuned --tvm-config")
    ap.add_argument("--tune-logs", default="", help="comma-separated tuned artifacts, one per --models entry (empty: "
                    "none), whose records tvm.tune.log applies instead of tuning again")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")  # brevitas/qonnx/torch chatter; the checks are printed below
    threads = [int(t) for t in a.threads.split(",")]
    batches = [int(b) for b in a.batches.split(",")]
    os.environ.setdefault("TVM_NUM_THREADS", str(max(threads)))
    rounds = 2 if a.quick and a.rounds == 4 else a.rounds
    min_time = a.min_time if a.min_time is not None else (0.03 if a.quick else 0.2)
    print(f"# {_uptime()}")
    print(f"# rounds {rounds}, loops >= {min_time * 1e3:.0f} ms, threads {threads}, batches {batches}, "
          f"TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, tvm config {a.tvm_config}, baseline config "
          f"{a.baseline_config}, tune logs {a.tune_logs or 'none'}; onnxruntime: default "
          f"graph optimizations, float-equivalent model with folded weights")
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="qd_tvm_ort_"))
    makers = {"jet": lambda: jet_case(batches, rng), "tfc": lambda: tfc_case(batches, rng),
              "digits": lambda: digits_case(batches, rng, work, 1 if a.quick else 5),
              "mnist": lambda: mnist_case(batches, rng)}
    cases = [makers[k]() for k in a.models.split(",")]
    bench = Bench(cases, work, threads, json.loads(a.tvm_config), min_time,
                  baseline=None if a.baseline_config is None else json.loads(a.baseline_config),
                  tune_logs=a.tune_logs.split(",") if a.tune_logs else ())
    rows = bench.measure(rounds)
    report(rows, threads)
    print(f"# {_uptime()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
