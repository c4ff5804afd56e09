"""Threshold requantizer on TVM: ``MultiThreshold`` (T compares and a count per element) vs its
proved multiply-and-shift form (``requant_shift`` pass: Affine + Quantize), measured in the same
run on the same inputs; both checked bit for bit against the reference interpreter.

    .venv/bin/python benchmarks/requant_tvm.py [--batch 256] [--channels 32] [--reps 5]

Prints milliseconds per batch (best of ``--reps``) and the ratio threshold / shift for TVM's
default schedule and ``schedule: auto``.  The model: a 16-bit integer accumulator ``[8, 8, C]``
requantized to int8 (T = 255 thresholds per channel) with non-dyadic multipliers.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from qdeploy.backends import get_backend  # noqa: E402
from qdeploy.compiler import reference as ref  # noqa: E402
from qdeploy.compiler.ir import GraphBuilder, parse_type  # noqa: E402
from qdeploy.passes.requant_shift import requant_shift  # noqa: E402
from tests.requant_oracle import requant_params  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    xt, to = parse_type("fixed<16,16>"), parse_type("int<8>")
    b = GraphBuilder("requant_bench")
    x = b.input("x", (8, 8, a.channels), xt)
    chans = [(Fraction(int(rng.integers(1, 50)), int(rng.integers(3000, 9000))), Fraction(1, 3), 0)
             for _ in range(a.channels)]
    y = b.add("mt", "MultiThreshold", [x], attrs={"to": to},
              params=requant_params(xt.min_code, xt.max_code, chans, to, 0))
    b.output(y)
    g = b.build()
    g2 = requant_shift(g)
    feeds = {"x": rng.integers(xt.min_code, xt.max_code + 1, (a.batch, 8, 8, a.channels))}
    want = ref.execute(g, feeds, codes=True)[y]
    be = get_backend("tvm-llvm")
    for sched in ("none", "auto"):
        ms = {}
        for name, gg in (("threshold", g), ("shift", g2)):
            d = Path(tempfile.mkdtemp(prefix="qd_rq_"))
            info = be.emit(gg, {"tvm": {"schedule": sched}}, d)
            be.build(d, info)
            fn = be.load(d, info, gg)
            assert np.array_equal(fn(feeds)[y], want), f"{name}/{sched} not exact"
            ts = []
            for _ in range(a.reps):
                t0 = time.perf_counter()
                fn(feeds)
                ts.append(time.perf_counter() - t0)
            ms[name] = min(ts) * 1e3
        print(f"schedule={sched:<5} batch={a.batch} T=255: threshold {ms['threshold']:.1f} ms, "
              f"multiply-and-shift {ms['shift']:.1f} ms, ratio {ms['threshold'] / ms['shift']:.2f}x")


if __name__ == "__main__":
    main()
