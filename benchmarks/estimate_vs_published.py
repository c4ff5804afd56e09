"""Our hls4ml FPGA estimate beside published Vivado HLS results for the jet tagger.

Run by hand (not part of the default tests):  ``python benchmarks/estimate_vs_published.py``

Reference: ``../shared/refs/fpga_jet_tagger_vu9p.csv`` (arXiv 2103.05579 Table 1: hls4ml 0.5.0,
Vivado HLS 2019.2, xcvu9p, 200 MHz, Latency strategy, io_parallel, reuse factor 1).

What we build (the published weights of the PTQ rows are not available):
* 16-bit / 14-bit PTQ: the 16-64-32-32-5 MLP with the *float kernels and biases of the QKeras
  jet tagger* (``../shared/realcases/jsc-qkeras-3layer/qkeras_3layer_weights.h5``, the real
  trained model, but trained with 6-bit QAT -- not the float baseline the paper quantized)
  rounded to ``ap_fixed<16,6>`` / ``ap_fixed<14,6>``; input, every Dense result and every ReLU
  result in that same type (hls4ml 0.5.0's single ``Model`` precision), accumulators
  ``ap_fixed<16,6>`` / ``ap_fixed<14,6>``.
* 6-bit QAT: ``qkeras_jettagging.onnx`` through ``qdeploy.load`` and the default passes (input
  ``ap_fixed<16,6>``), accumulators forced to hls4ml 0.5.0's default ``ap_fixed<16,6>``.
* All rows include the softmax in firmware (hls4ml's ``softmax_latency``), as the published design.

DSP rule (estimate.py A3): the default ``csd_wider`` (a constant product of >= 3 CSD digits goes
to a DSP when the wider operand is >= 9 bits) has no fitted constant but was selected by comparing
rules on this reference, so its agreement is a fit, not a blind prediction.  The documented
alternative ``vivado`` (Vivado HLS narrows a constant to the bits its value needs; hls4ml's 9-bit
threshold on both operands) depends on the weight values, and the published PTQ weights are not
available: with our surrogate weights (from a 6-bit QAT model, |w| < 1) few 14-bit constants reach
9 bits and it predicts far fewer DSPs than the published 14-bit row.  All three rules are printed.

The two calibrated constants of the estimator (``HLS_LUT_FACTORS[rule]``, ``HLS_FF_FACTOR``) were
fitted to the 16-bit row; the 14-bit and 6-bit rows are predictions.  Prints one row per model plus per-layer tables
and the time of one estimate.
"""
from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _shared import SHARED  # noqa: E402  ($QDEPLOY_SHARED, ../shared, or next to the clone's origin)
REFS = SHARED / "refs" / "fpga_jet_tagger_vu9p.csv"
JSC = SHARED / "realcases" / "jsc-qkeras-3layer"


def ptq_graph(bits: int, int_bits: int = 6):
    """The jet tagger with the h5 float weights rounded to ap_fixed<bits, int_bits>."""
    import h5py
    from qdeploy.compiler.ir import Const, GraphBuilder, parse_type

    t = parse_type(f"fixed<{bits},{int_bits}>")
    b = GraphBuilder(f"jet_tagger_{bits}b")
    h = b.input("x", (16,), t)
    with h5py.File(JSC / "qkeras_3layer_weights.h5", "r") as f:
        names = ["fc1", "fc2", "fc3", "output"]
        for i, n in enumerate(names):
            k = f[f"/{n}/{n}/kernel:0"][()]
            bias = f[f"/{n}/{n}/bias:0"][()]
            h = b.add(n, "Dense", [h], params={"weight": Const(t.quantize_real(k), t),
                                               "bias": Const(t.quantize_real(bias), t)})
            h = b.add(f"{n}_res", "Quantize", [h], attrs={"to": t})
            if i < len(names) - 1:
                h = b.add(f"relu{i + 1}", "Relu", [h])
                h = b.add(f"relu{i + 1}_res", "Quantize", [h], attrs={"to": t})
        h = b.add("softmax", "Softmax", [h])
    b.output(h)
    return b.build()


def _real_weights(g):
    """Real-valued Dense/Conv weights of ``g`` (code x 2**-frac)."""
    return [n.params["weight"].data * 2.0 ** -n.params["weight"].dtype.frac_bits
            for n in g.nodes if n.op in ("Dense", "Conv")]


def qat_graph():
    """The 6-bit QKeras jet tagger (``qkeras_jettagging.onnx``) after the default passes, input ``fixed<16,6>``."""
    import qdeploy
    from qdeploy.passes import PassManager, default_pipeline
    g = qdeploy.load(str(JSC / "qkeras_jettagging.onnx"))
    return PassManager(default_pipeline("fixed<16,6>")).run(g)


def main() -> int:
    """Print ours vs published per row, the DSP count under each rule, the time of one estimate and
    the per-layer tables; returns 0."""
    from qdeploy.backends.hls4ml.estimate import estimate, format_table
    from qdeploy.backends.hls4ml.resources import DSP_RULES

    rows = list(csv.DictReader(open(REFS)))
    base = {"part": "xcvu9p", "clock_period": 5.0, "strategy": "Latency", "io_type": "io_parallel",
            "reuse_factor": 1, "softmax_on_device": True}
    models = {"16-bit PTQ": (ptq_graph(16), "fixed<16,6>"), "14-bit PTQ": (ptq_graph(14), "fixed<14,6>"),
              "6-bit QAT (QKeras)": (qat_graph(), "fixed<16,6>")}
    print(f"hls4ml jet tagger 16-64-32-32-5, xcvu9p @ 200 MHz, Latency, io_parallel, RF=1 -- ours vs {REFS.name}")
    print("(calibrated on the 16-bit PTQ row only: HLS_LUT_FACTORS[rule], HLS_FF_FACTOR; the other rows are predictions;")
    print(" DSP: rule 'csd_wider' (A3): no fitted constant, but selected among the three rules below on this reference)")
    hdr = f"{'model':<20}{'':>6}{'LUT':>9}{'FF':>9}{'DSP':>7}{'lat[cyc]':>10}{'lat[ns]':>9}"
    print(hdr)
    print("-" * len(hdr))
    ests = {}
    alts = {}
    for r in rows:
        g, acc = models[r["model"]]
        est = estimate(g, {**base, "accum_type": acc})
        ests[r["model"]] = est
        T = est["total"]
        pub = {"lut": float(r["lut"]), "ff": float(r["ff"]), "dsp": float(r["dsp"]),
               "lat": float(r["latency_ns"]) / (1000.0 / float(r["clock_mhz"]))}
        ours = {"lut": T["lut"], "ff": T["ff"], "dsp": T["dsp"], "lat": T["latency_cycles"]}
        print(f"{r['model']:<20}{'ours':>6}{ours['lut']:>9}{ours['ff']:>9}{ours['dsp']:>7}{ours['lat']:>10}"
              f"{T['latency_ns']:>9.0f}")
        print(f"{'':<20}{'pub':>6}{pub['lut']:>9.0f}{pub['ff']:>9.0f}{pub['dsp']:>7.0f}{pub['lat']:>10.0f}"
              f"{float(r['latency_ns']):>9.0f}")
        rat = {k: (ours[k] / pub[k] if pub[k] else float('nan')) for k in ours}
        n_layers = sum(1 for l in est["layers"] if not l["host"] and l["op"] in ("Dense", "Conv", "Relu", "Softmax"))
        print(f"{'':<20}{'ratio':>6}{rat['lut']:>9.2f}{rat['ff']:>9.2f}{rat['dsp']:>7.2f}"
              f"{ours['lat'] - pub['lat']:>+10.0f}{'':>9}  (latency: cycles off over {n_layers} hls4ml layers)")
        dets = [l["detail"] for l in est["layers"] if l.get("detail")]
        n_lut, n_dsp = sum(d["mults_lut"] for d in dets), sum(d["mults_dsp"] for d in dets)
        wmax = max(float(np.abs(l_w).max()) for l_w in _real_weights(g))
        print(f"{'':<26}non-free products {n_lut + n_dsp}: {n_dsp} on DSPs, "
              f"{n_lut} on LUTs; max |w| = {wmax:.2f}")
        alts[r["model"]] = (pub["dsp"], {rule: estimate(g, {**base, "accum_type": acc, "dsp_rule": rule})["total"]["dsp"]
                                         for rule in DSP_RULES})
    print("\nDSP under each rule (ratio to published); the first, 'csd_wider', is the estimator's default:")
    print(f"{'model':<20}" + "".join(f"{rule:>22}" for rule in DSP_RULES) + f"{'published':>11}")
    for m, (pub, by) in alts.items():
        print(f"{m:<20}" + "".join(f"{by[rule]:>13} ({by[rule] / pub:>5.2f})" for rule in DSP_RULES) + f"{pub:>11.0f}")
    print("  vivado: non-free product on DSP iff data and narrowed constant are both >= 9 bits (hls4ml 9-bit threshold;")
    print("          Vivado HLS narrows constants, hls4ml #49/#893).  hls4ml_weight: declared weight type >= 9 bits")
    print("          (hls4ml VivadoDSPEstimator).  csd_wider (default): >= 3 CSD digits and the wider operand >= 9 bits;")
    print("          the only rule within 30% on all rows -- selected on this reference, so a fit, not a prediction.")
    # timing of one estimate (the QAT model, from its IR)
    g = models["6-bit QAT (QKeras)"][0]
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        estimate(g, {**base, "accum_type": "fixed<16,6>"})
    dt = (time.perf_counter() - t0) / n
    print(f"\none jet-tagger estimate: {dt * 1e3:.2f} ms (mean of {n}; target < 10 ms)")
    for name, est in ests.items():
        print(f"\n{name}: per layer")
        print(format_table(est))
        det = [(l["name"], l.get("detail")) for l in est["layers"] if l.get("detail")]
        for nm, d in det:
            print(f"  {nm}: {d['x_bits']}-bit data x {d['w_bits']}-bit weights: {d['mults_zero']} zero, "
                  f"{d['mults_shift']} +-2^k, {d['mults_lut']} on LUTs, {d['mults_dsp']} on DSPs; "
                  f"{d['adders']} adders x {d['accum_bits']} b")
    return 0


if __name__ == "__main__":
    sys.exit(main())
