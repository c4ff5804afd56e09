"""Compile the dynamic test networks and print, per model: blocks, conditions,
compile time, consistency with eager PyTorch (ours vs plain torch.jit.trace) and latency.

    .venv/bin/python examples/dynamic/run.py [--target tvm-llvm] [--n 200]

Latency: eager = the model called per sample (batch 1, as its ``if tensor:`` requires) under
``torch.no_grad()``; compiled batch-1 = DynamicModel.run per sample; compiled batched = one run
over all samples (the host routes samples per condition).  One thread each: torch
``set_num_threads(1)``, TVM ``TVM_NUM_THREADS=1`` (the generated loops are not parallel anyway).
The three are timed in interleaved rounds (``--reps``, best round each) so that load from other
processes hits them alike; ratios are eager / compiled (> 1: compiled is faster).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("TVM_NUM_THREADS", "1")  # before tvm is imported
sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402

from qdeploy.dynamic import compile_dynamic, render_report  # noqa: E402


def per_sample(fn, X):
    return np.concatenate([np.asarray(fn(X[i:i + 1])) for i in range(len(X))])


def timed_rounds(fns, reps=5):
    """Best wall time (s) of each callable over ``reps`` interleaved rounds (one warm-up)."""
    for f in fns:
        f()
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for j, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            best[j] = min(best[j], time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="tvm-llvm")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--models", nargs="*", default=list(models.MODELS))
    ap.add_argument("--reps", type=int, default=5, help="interleaved timing rounds (best of)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in a.models:
        m, ex, gen = models.build(name)
        dm = compile_dynamic(m, ex, target=a.target)
        print(render_report(dm.report))
        X = gen(a.n, 7)
        with torch.no_grad():
            eager = lambda x: m(x).numpy()  # noqa: E731
            ref = per_sample(eager, X)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    tr = torch.jit.trace(m, ex)
                    yt = per_sample(lambda x: tr(x).numpy(), X)
                    trace_ok = float((np.abs(yt - ref).max(1) < 1e-4).mean())
                    trace_pred = float((yt.argmax(1) == ref.argmax(1)).mean())
                except Exception as e:  # e.g. torch.cond models: jit.trace cannot trace them at all
                    trace_ok = trace_pred = None
                    trace_err = f"{type(e).__name__}"
            y = dm.run(X)
            taken = {k: list(v) for k, v in dm.last_stats["taken"].items()}  # before other runs overwrite it
            ok = float((np.abs(y - ref).max(1) < 1e-4).mean())
            pred = float((y.argmax(1) == ref.argmax(1)).mean())
            t_eager, t_b1, t_batch = (t / a.n for t in timed_rounds(
                [lambda: per_sample(eager, X), lambda: per_sample(dm.run, X), lambda: dm.run(X)], a.reps))
        extra = ""
        if name == "shallow_deep":
            _, (Xte, yte) = models.train_shallow_deep(0)
            with torch.no_grad():
                r2 = per_sample(eager, Xte)
            y2 = dm.run(Xte)
            extra = (f"; digits test split ({len(Xte)} images): agree {float((y2.argmax(1) == r2.argmax(1)).mean()):.3f}, "
                     f"max|diff| {np.abs(y2 - r2).max():.2e}, accuracy {float((y2.argmax(1) == yte.numpy()).mean()):.3f}, "
                     f"exits {dm.last_stats['returns']}")
        print(f"  consistency on {a.n} random inputs: ours outputs {ok:.3f} / predictions {pred:.3f} "
              f"(max|diff| {np.abs(y - ref).max():.2e}); plain jit.trace "
              + (f"outputs {trace_ok:.3f} / predictions {trace_pred:.3f}" if trace_ok is not None
                 else f"fails ({trace_err})")
              + f"; branches taken on the {a.n} random inputs {taken}{extra}")
        rows.append((name, dm.report["blocks"], dm.report["conditions"], dm.report["compile_seconds"], ok, trace_ok,
                     t_eager * 1e6, t_b1 * 1e6, t_batch * 1e6))
    print(f"\nlatency per sample over {a.n} inputs, {a.target}, threads: torch {torch.get_num_threads()}, "
          f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')}; best of {a.reps} interleaved rounds; "
          f"x = eager / compiled")
    print(f"{'model':<13}{'blocks':>7}{'conds':>6}{'compile s':>10}{'ours ok':>8}{'trace ok':>9}"
          f"{'eager us':>10}{'b1 us':>9}{'b1 x':>7}{'batch us':>10}{'batch x':>8}")
    for r in rows:
        tr_cell = f"{r[5]:>9.3f}" if r[5] is not None else f"{'fails':>9}"
        print(f"{r[0]:<13}{r[1]:>7}{r[2]:>6}{r[3]:>10.2f}{r[4]:>8.3f}{tr_cell}{r[6]:>10.1f}{r[7]:>9.1f}"
              f"{r[6] / r[7]:>7.2f}{r[8]:>10.1f}{r[6] / r[8]:>8.2f}")
    for label, col in (("batch-1", 7), ("batched", 8)):
        miss = [r[0] for r in rows if r[6] / r[col] < 1.12]
        print(f"target >= 1.12x ({label}): " + ("met on every model" if not miss else "missed on " + ", ".join(miss)))


if __name__ == "__main__":
    main()
