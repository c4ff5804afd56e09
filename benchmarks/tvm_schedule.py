"""The default TVM schedule (``tvm: {schedule: auto}``) against TVM's unscheduled pipeline
(``schedule: none``), on the jet tagger (QONNX, ../shared/realcases/jsc-qkeras-3layer) and
the digits QAT CNN (examples/digits, trained briefly and exported to QONNX in a temp dir).

    .venv/bin/python benchmarks/tvm_schedule.py [--reps 5] [--threads 1,2] [--batches 1,256]

Both artifacts of a model are compiled through ``qdeploy.compile`` (the report must say
bit-exact); the outputs of the two libraries are checked equal on the timed inputs.  Each
thread count runs in a fresh child process (``TVM_NUM_THREADS`` is read once per process).
Timings are interleaved (none, auto, none, auto, ...), each the mean of enough calls to fill
~20 ms, best of ``--reps`` rounds: the raw VM call (``vm["main"]`` on prepared TVM tensors)
and ``CompiledModel.predict`` (real inputs in, real outputs out).  The load average is
printed before each child: the machine is shared, read ratios, not absolute times.
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
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REALCASES = REPO.parent / "shared" / "realcases"
SCHEDULES = ("none", "auto")


def _digits_cnn(tmp: Path):
    spec = importlib.util.spec_from_file_location("digits_models", REPO / "examples" / "digits" / "models.py")
    dm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dm)
    import torch
    torch.manual_seed(0)
    data = dm.load_data(images=True)
    m = dm.make_cnn()
    dm.train(m, data, epochs=3, seed=0)
    path = tmp / "digits_cnn.onnx"
    dm.export(m, torch.from_numpy(data[0][:1]), path)
    return path, data[2]


def build(tmp: Path) -> list[dict]:
    """Compile every (model, schedule); returns [{model, dirs: {schedule: dir}, x: npy path}]."""
    import qdeploy
    case = REALCASES / "jsc-qkeras-3layer"
    models = [("jet tagger", case / "qkeras_jettagging.onnx", np.load(case / "synthetic_input_uniform_pm1_64x16.npy")),
              ("digits CNN", *_digits_cnn(tmp))]
    out = []
    for name, path, x in models:
        dirs = {}
        for s in SCHEDULES:
            d = tmp / f"{name.replace(' ', '_')}_{s}"
            r = qdeploy.compile(str(path), target="tvm-llvm", out_dir=d, golden=x[:64],
                                config={"tvm": {"schedule": s}})
            assert r.report["exactness"]["bit_exact"], (name, s, r.report["exactness"])
            dirs[s] = str(d)
        xp = tmp / f"{name.replace(' ', '_')}_x.npy"
        np.save(xp, x.astype(np.float32))
        out.append({"model": name, "dirs": dirs, "x": str(xp)})
    return out


def _best(f, reps: int) -> float:
    f()
    t0 = time.perf_counter()
    f()
    k = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-7)))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(k):
            f()
        best = min(best, (time.perf_counter() - t0) / k)
    return best


def child(spec: dict) -> None:
    """Time one thread count (run in a fresh process); prints one JSON line per row."""
    import tvm
    from tvm import relax

    from qdeploy.compiler.ir.graph import Graph
    from qdeploy.compiler.ir.types import FixedType
    from qdeploy.runtime import CompiledModel

    for m in spec["models"]:
        x_all = np.load(m["x"])
        runs = {}
        for s, d in m["dirs"].items():
            lib = json.loads((Path(d) / "tvm_build.json").read_text())["library"]
            vm = relax.VirtualMachine(tvm.runtime.load_module(str(Path(d) / lib)), tvm.cpu())
            g = Graph.load(str(Path(d) / "model"))
            runs[s] = (vm["main"], g, CompiledModel.load(d))
        for batch in spec["batches"]:
            x = np.resize(x_all, (batch, *x_all.shape[1:])).astype(np.float32)
            rng = np.random.default_rng(batch)
            args, preds = {}, {}
            for s, (fn, g, cm) in runs.items():
                args[s] = [tvm.runtime.tensor(rng.integers(v.dtype.min_code, v.dtype.max_code + 1, (batch, *v.shape))
                                              if isinstance(v.dtype, FixedType) else
                                              rng.uniform(-1, 1, (batch, *v.shape)).astype(np.float32))
                           for v in (g.values[i] for i in g.inputs)]
                preds[s] = cm.predict(x)
            assert np.array_equal(preds["none"], preds["auto"]), (m["model"], batch)
            raw = {s: float("inf") for s in runs}
            pred = {s: float("inf") for s in runs}
            for _ in range(spec["reps"]):
                for s, (fn, g, cm) in runs.items():
                    a = args[s]
                    raw[s] = min(raw[s], _best(lambda: fn(*a), 1))
                    pred[s] = min(pred[s], _best(lambda: cm.predict(x), 1))
            print(json.dumps({"model": m["model"], "batch": batch, "threads": spec["threads"],
                              "tvm_threads": int(tvm.get_global_func("runtime.NumThreads")()),
                              "raw": raw, "predict": pred}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", default="1,256")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(json.loads(a.child))
        return
    with tempfile.TemporaryDirectory(prefix="qd_tvm_sched_") as tmp:
        models = build(Path(tmp))
        print(f"{'model':<11} {'batch':>5} {'thr':>3} | {'raw none':>10} {'raw auto':>10} {'speedup':>7} | "
              f"{'predict none':>12} {'predict auto':>12} {'speedup':>7}")
        for t in [int(v) for v in a.threads.split(",")]:
            print(f"# TVM_NUM_THREADS={t}, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
            spec = {"models": models, "batches": [int(b) for b in a.batches.split(",")], "reps": a.reps, "threads": t}
            env = dict(os.environ, TVM_NUM_THREADS=str(t))
            res = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                                 capture_output=True, text=True, check=True)
            for line in res.stdout.splitlines():
                if not line.startswith("{"):
                    continue
                r = json.loads(line)
                assert r["tvm_threads"] == t, r
                rn, ra, pn, pa = r["raw"]["none"], r["raw"]["auto"], r["predict"]["none"], r["predict"]["auto"]
                print(f"{r['model']:<11} {r['batch']:>5} {t:>3} | {rn * 1e6:>8.1f}us {ra * 1e6:>8.1f}us {rn / ra:>6.2f}x | "
                      f"{pn * 1e6:>10.1f}us {pa * 1e6:>10.1f}us {pn / pa:>6.2f}x", flush=True)
        print(f"# done, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
