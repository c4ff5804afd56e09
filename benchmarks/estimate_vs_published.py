"""Our hls4ml FPGA estimate beside published Vivado HLS (post-HLS) results, with every ratio.

Run by hand (not part of the default tests):  ``python benchmarks/estimate_vs_published.py``

Reference table: ``benchmarks/refs/hls4ml_published.csv`` (one row per published figure, each
with its part, clock, io type, strategy, reuse factor, precision, tool and citation):

* family ``jet_tagger_mlp`` (3 rows, io_parallel): arXiv 2103.05579 Table 1 (hls4ml 0.5.0, Vivado
  HLS 2019.2, xcvu9p, 200 MHz, Latency, reuse factor 1); the same rows as
  ``../shared/refs/fpga_jet_tagger_vu9p.csv``.
* family ``svhn_cnn_stream`` (14 rows, io_stream): the hls4ml tutorial's SVHN CNN
  (``fastmachinelearning/hls4ml-tutorial`` commit 3069ac8, ``archived/pruned_cnn`` and
  ``archived/quantized_pruned_cnn``, ``myproject_prj/solution1/syn/report/myproject_csynth.rpt``:
  Vivado HLS 2020.1, xcu250, 5 ns, Latency, reuse factor 1): each design's total and, from the
  report's per-instance table, its three conv layers, the first ReLU (30x30x16) and the first
  max pool, and its FIFO summary row (all FIFOs between layers).  Graphs: :mod:`hls4ml_svhn` (stand-in weights: the trained ones were not published).
  A layer row is compared without the FIFO after it (the report lists FIFOs at the top level).
* family ``pynq_cnn_resource`` (8 rows, io_stream, **Resource** strategy, reuse factors 15-20):
  a public hls4ml project for a PYNQ-Z2 (GitHub ``kendermag/hls4ml-tutorial`` commit 07807f8,
  ``TUDATALLAPOT_QUANTIZED_VER0_312_FULL``; Vivado HLS 2019.1, xc7z020, 5 ns; a student project,
  not a paper): the design total, its four convs, the first dense layer (384 -> 5, weights in
  BRAM), the first pool and its FIFO summary row.  Graph: :mod:`hls4ml_pynq_cnn` (published shapes, types, reuse
  factors and zero counts; stand-in values).  A conv row is compared without the zero-padding
  layer in front of it (its own instance in the report).

Calibration, at most one row per family: ``jet16`` (``HLS_LUT_FACTORS[rule]``, ``HLS_FF_FACTOR``)
and ``svhn16`` (``STREAM_LUT_SCALE``, LUT only; estimate.py A20); nothing on ``pynq_cnn_resource``
(it uses both constants as they are).  Every other row is a
prediction; the script prints every ratio, misses included, and how many rows are within 25% on
both LUT and FF.

Jet tagger graphs (the published weights of the PTQ rows are not available):
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

Also printed: the io_stream vs io_parallel estimate of the SVHN designs, the jet tagger's DSP count
under each DSP rule, the time of one estimate and the per-layer tables.
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
REFS = HERE / "refs" / "hls4ml_published.csv"  # the jet rows copy ../shared/refs/fpga_jet_tagger_vu9p.csv
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


def _ours_for(est: dict, layers: dict | None, scope: str) -> dict:
    """Our figures for one reference row: the design total, or the sum of the IR rows of one
    hls4ml layer without the FIFO after it (the reports list FIFOs at the top level, not in the
    layer's instance)."""
    if scope == "design":
        T = est["total"]
        return {"lut": T["lut"], "ff": T["ff"], "dsp": T["dsp"], "bram_18k": T["bram_18k"],
                "latency_cycles": T["latency_cycles"]}
    if scope == "fifo":  # every FIFO between layers, the zero-padding layers' included
        out = {k: 0 for k in ("lut", "ff", "dsp", "bram_18k")}
        for r in est["layers"]:
            d = r.get("detail") or {}
            for f in (d.get("fifo"), (d.get("zero_pad") or {}).get("fifo")):
                for k in ("lut", "ff", "bram_18k"):
                    out[k] += (f or {}).get(k, 0)
        out["latency_cycles"] = None
        return out
    rows = {r["name"]: r for r in est["layers"]}
    names = layers[scope]
    out = {k: 0 for k in ("lut", "ff", "dsp", "bram_18k")}
    for n in names:
        r = rows[n]
        d = r.get("detail") or {}
        f, zp = d.get("fifo") or {}, d.get("zero_pad") or {}  # the zero-padding layer is an instance of its own
        for k in out:
            out[k] += r[k] - f.get(k, 0) - zp.get(k, 0)
    out["latency_cycles"] = max(rows[n]["latency_cycles"] for n in names)
    return out


def _ratio(a, b):
    return float("nan") if not b else a / float(b)


def main() -> int:
    """Print ours vs published for every row of ``refs/hls4ml_published.csv`` with the ratios, how
    many rows are within 25% on LUT and FF, the DSP count under each rule for the jet tagger, the
    time of one estimate and the per-layer tables; returns 0."""
    from qdeploy.backends.hls4ml.estimate import estimate, format_table
    from qdeploy.backends.hls4ml.resources import DSP_RULES
    from hls4ml_pynq_cnn import pynq_cnn_graph
    from hls4ml_svhn import svhn_graph

    rows = list(csv.DictReader(open(REFS)))
    jet_base = {"part": "xcvu9p", "clock_period": 5.0, "strategy": "Latency", "io_type": "io_parallel",
                "reuse_factor": 1, "softmax_on_device": True}
    svhn_base = {"part": "xcu250", "clock_period": 5.0, "strategy": "Latency", "io_type": "io_stream",
                 "reuse_factor": 1, "softmax_on_device": True, "accum_type": "fixed<16,6>", "casts": "result_type"}
    jet = {"16-bit PTQ": (ptq_graph(16), "fixed<16,6>"), "14-bit PTQ": (ptq_graph(14), "fixed<14,6>"),
           "6-bit QAT (QKeras)": (qat_graph(), "fixed<16,6>")}
    svhn = {v: svhn_graph(v) for v in ("pruned", "qkeras6")}
    pynq = pynq_cnn_graph()
    pynq_base = {"part": "pynq-z2", "clock_period": 5.0, "strategy": "Resource", "io_type": "io_stream",
                 "softmax_on_device": True, "accum_type": "fixed<14,6>", "casts": "result_type"}
    ests, cache = {}, {}
    print(f"hls4ml estimate vs published post-HLS results ({REFS.name}); ratio = ours / published")
    print("calibrated rows (one per family): jet16 (HLS_LUT_FACTORS, HLS_FF_FACTOR), svhn16 (STREAM_LUT_SCALE, LUT only),\n"
          "none in pynq_cnn_resource.")
    print("Every other row is a prediction.  jet: xcvu9p, io_parallel; svhn: xcu250, io_stream, Latency, RF 1;\n"
          "pynq: xc7z020, io_stream, Resource, RF 15-20.")
    hdr = (f"{'id':<14}{'scope':<8}{'LUT ours':>10}{'pub':>9}{'ratio':>7}{'FF ours':>9}{'pub':>8}{'ratio':>7}"
           f"{'DSP ours':>9}{'pub':>6}{'ratio':>7}{'BRAM':>6}{'pub':>5}{'lat':>8}{'pub':>8}  within 25%")
    print(hdr)
    print("-" * len(hdr))
    hits = 0
    for r in rows:
        if r["family"] == "jet_tagger_mlp":
            g, acc = jet[r["design"]]
            key = ("jet", r["design"])
            if key not in cache:
                cache[key] = estimate(g, {**jet_base, "accum_type": acc})
            est, layers = cache[key], None
        elif r["family"] == "svhn_cnn_stream":
            g, layers = svhn[r["design"]]
            key = ("svhn", r["design"])
            if key not in cache:
                cache[key] = estimate(g, svhn_base)
            est = cache[key]
        else:
            g, layers, rfs = pynq
            key = ("pynq", r["design"])
            if key not in cache:
                cache[key] = estimate(g, {**pynq_base, "reuse_factor": rfs})
            est = cache[key]
        ests[key] = est
        o = _ours_for(est, layers, r["scope"])
        pub = {k: (float(r[k]) if r[k] else None) for k in ("lut", "ff", "dsp", "bram_18k", "latency_cycles")}
        rl, rf, rd = _ratio(o["lut"], pub["lut"]), _ratio(o["ff"], pub["ff"]), _ratio(o["dsp"], pub["dsp"])
        ok = abs(rl - 1) <= 0.25 and abs(rf - 1) <= 0.25
        hits += ok
        fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
        print(f"{r['id']:<14}{r['scope']:<8}{o['lut']:>10}{fmt(pub['lut']):>9}{rl:>7.2f}{o['ff']:>9}{fmt(pub['ff']):>8}"
              f"{rf:>7.2f}{o['dsp']:>9}{fmt(pub['dsp']):>6}{rd:>7.2f}{o['bram_18k']:>6}{fmt(pub['bram_18k']):>5}"
              f"{fmt(o['latency_cycles']):>8}{fmt(pub['latency_cycles']):>8}  {'yes' if ok else 'NO'}")
    print(f"\nwithin 25% on both LUT and FF: {hits} of {len(rows)} rows")
    print("Known differences (not fitted away):\n"
          "  * SVHN pools: we model hls4ml 1.3's LineBuffer pooling (a line buffer of in_width x C words, counted as FF);\n"
          "    the 2021 report's pool FF (2,008 at 30x30x16, 16 b) has no room for the 7,680-bit line buffer, so that\n"
          "    design was most likely built with another pooling implementation (hls4ml also has an 'Encoded' one): the\n"
          "    pool rows and the pruned total's FF are not like-for-like (the PYNQ report's pools are LineBuffer ones\n"
          "    per its parameters.h, and there our pool FF is 0.84 of the report).\n"
          "  * SVHN weights are stand-ins (lecun_uniform, 50% pruned; hls4ml_svhn.py): the DSP/LUT split of each\n"
          "    conv/dense layer depends on the weight values.\n"
          "  * pynq total: its hls4ml (2021) put a repack_stream layer after the flatten (6,831 LUT, 6,065 FF) that\n"
          "    hls4ml 1.3 does not have, and its 27,173 FIFO LUTs (deep BRAM FIFOs) are far above our 3 x addr-bit\n"
          "    control model; its Resource dense (384 -> 5, RF 16) has twice our LUT and FF: the RF:1 input muxes and\n"
          "    lane registers are modelled, whatever else Vivado HLS 2019.1 built there is not.\n"
          "  * FIFOs: block RAM (depth = pixels, one FIFO per channel, BRAM when deeper than 32) matches the reports'\n"
          "    FIFO rows (96/96, 234 of 248); their LUTs are 0.21-0.64 of the reports' (our control model is 3 LUT per\n"
          "    address bit per FIFO, not fitted).")
    for v, (g, _) in svhn.items():
        par = estimate(g, {**svhn_base, "io_type": "io_parallel"})["total"]
        st_ = cache[("svhn", v)]["total"]
        print(f"SVHN {v}: io_stream LUT {st_['lut']} FF {st_['ff']} BRAM {st_['bram_18k']} vs io_parallel "
              f"LUT {par['lut']} FF {par['ff']} BRAM {par['bram_18k']} (same DSP rule and weights)")
    alts = {}
    for m, (g, acc) in jet.items():
        pub = next(float(r["dsp"]) for r in rows if r["design"] == m)
        alts[m] = (pub, {rule: estimate(g, {**jet_base, "accum_type": acc, "dsp_rule": rule})["total"]["dsp"]
                         for rule in DSP_RULES})
    print("\njet tagger DSP under each rule (ratio to published); the first, 'csd_wider', is the estimator's default:")
    print(f"{'model':<20}" + "".join(f"{rule:>22}" for rule in DSP_RULES) + f"{'published':>11}")
    for m, (pub, by) in alts.items():
        print(f"{m:<20}" + "".join(f"{by[rule]:>13} ({by[rule] / pub:>5.2f})" for rule in DSP_RULES) + f"{pub:>11.0f}")
    print("  vivado: non-free product on DSP iff data and narrowed constant are both >= 9 bits (hls4ml 9-bit threshold;")
    print("          Vivado HLS narrows constants, hls4ml #49/#893).  hls4ml_weight: declared weight type >= 9 bits")
    print("          (hls4ml VivadoDSPEstimator).  csd_wider (default): >= 3 CSD digits and the wider operand >= 9 bits;")
    print("          the only rule within 30% on all jet rows -- selected on this reference, so a fit, not a prediction.")
    g = jet["6-bit QAT (QKeras)"][0]
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        estimate(g, {**jet_base, "accum_type": "fixed<16,6>"})
    dt = (time.perf_counter() - t0) / n
    print(f"\none jet-tagger estimate: {dt * 1e3:.2f} ms (mean of {n}; target < 10 ms)")
    for (fam, name), est in ests.items():
        print(f"\n{fam} {name}: per layer")
        print(format_table(est))
    return 0


if __name__ == "__main__":
    sys.exit(main())
