"""The hls4ml ``distributed_arithmetic`` estimate (da4ml's own adder-graph cost, 0 DSP) beside the
Latency-strategy estimate of the same model, per Dense layer, with the ratio.

Run by hand (not part of the default tests; the da4ml solve takes seconds per layer):
``python benchmarks/hls4ml_da_estimate.py [model.onnx] [--input-type T]`` (default: the hls4ml jet
tagger of ``../shared/realcases/jsc-qkeras-3layer`` with ``fixed<16,6,RND_CONV,SAT>`` inputs).

What it can and cannot say: both columns are our estimates, not synthesis.  The DA column is the
sum of da4ml's adder widths for the CMVM hls4ml writes (``qdeploy.backends.hls4ml.da``); the
published claim it can be held against is qualitative: hls4ml's DA documentation ("up to 30% of
the LUTs and all DSPs" saved against the Latency strategy) and the da4ml paper (arXiv 2507.04535:
"up to a third" of on-chip resources).  No published post-HLS DA report of this exact network
(same weights and types) was found, so no row compares the DA column with synthesis.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT.parent))
JSC = ROOT.parent / "shared" / "realcases" / "jsc-qkeras-3layer" / "qkeras_jettagging.onnx"


def main() -> None:
    import qdeploy
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=str(JSC))
    ap.add_argument("--input-type", default="fixed<16,6,RND_CONV,SAT>")
    a = ap.parse_args()
    print("load:", os.getloadavg())
    t = time.perf_counter()
    lat = qdeploy.estimate(a.model, "hls4ml", {"strategy": "Latency"}, input_type=a.input_type)
    t_lat = time.perf_counter() - t
    t = time.perf_counter()
    da = qdeploy.estimate(a.model, "hls4ml", {"strategy": "distributed_arithmetic"}, input_type=a.input_type)
    t_da = time.perf_counter() - t
    rows_l = {r["name"]: r for r in lat["layers"]}
    print(f"{'node':14s} {'n_in x n_out':>12s} {'LUT Latency':>12s} {'DSP Lat':>8s} {'LUT DA':>8s} {'DSP DA':>7s} "
          f"{'DA/Lat LUT':>10s} {'adder depth':>11s}")
    for r in da["layers"]:
        if r["op"] != "Dense" or r["host"]:
            continue
        l_ = rows_l[r["name"]]
        d = r["detail"]
        print(f"{r['name']:14s} {str(d['n_in']) + ' x ' + str(d['n_out']):>12s} {l_['lut']:12d} {l_['dsp']:8d} "
              f"{r['lut']:8d} {r['dsp']:7d} {r['lut'] / max(1, l_['lut']):10.2f} {d['adder_depth']:11.0f}")
    tl, td = lat["total"], da["total"]
    print(f"{'TOTAL':14s} {'':>12s} {tl['lut']:12d} {tl['dsp']:8d} {td['lut']:8d} {td['dsp']:7d} "
          f"{td['lut'] / max(1, tl['lut']):10.2f}")
    print(f"latency: Latency {tl['latency_cycles']} cycles, DA {td['latency_cycles']} cycles; "
          f"estimate time: Latency {t_lat:.1f} s, DA {t_da:.1f} s (da4ml solve)")
    print("load:", os.getloadavg())


if __name__ == "__main__":
    main()
