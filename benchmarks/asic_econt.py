"""Our ASIC estimate of the ECON-T encoder beside the published 65 nm figures.

Run by hand:  ``python benchmarks/asic_econt.py``

Reference: ``../shared/refs/asic_econt.csv`` (arXiv 2105.01683; latency arXiv 2103.05579):
ECON-T encoder, Conv2D 3x3 with 8 filters, stride 2 on an 8x8x1 input ('same' padding -> 4x4x8),
flatten, Dense 16; 2,144 parameters; LP CMOS 65 nm at 40 MHz.

What we build (assumptions -- the exact bit widths of the chip are not in the refs file):
inputs unsigned 8-bit, weights and biases signed 6-bit (programmable: stored in flip-flops,
general multipliers, so their values do not matter -- random codes here), ReLU output requantized
to unsigned 8-bit, Dense accumulator at the IR's exact width.  No calibration: every constant
of the model is from the sources in ``backends/asic/estimate.py``.  Printed with and without
register TMR (``tmr="registers"``, B8 there): the reference chip is radiation tolerant through
triple modular redundancy (arXiv 2103.05579 Sec. 4.3.2), which our base model leaves out.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import SHARED  # noqa: E402  ($QDEPLOY_SHARED, ../shared, or next to the clone's origin)

REFS = SHARED / "refs" / "asic_econt.csv"


def econt_graph(seed: int = 0):
    """The ECON-T encoder (2,144 parameters) with random programmable 6-bit weights (``seed``)."""
    from qdeploy.compiler.ir import Const, GraphBuilder, parse_type
    from qdeploy.passes import infer_precision

    rng = np.random.default_rng(seed)
    w6 = parse_type("fixed<6,1>")
    b = GraphBuilder("econt_encoder")
    h = b.input("x", (8, 8, 1), parse_type("ufixed<8,0>"))
    h = b.add("conv", "Conv", [h], attrs={"kernel": (3, 3), "strides": (2, 2), "pads": (0, 0, 1, 1)},
              params={"weight": Const(rng.integers(-32, 32, (3, 3, 1, 8)), w6),
                      "bias": Const(rng.integers(-32, 32, (8,)), w6)})
    h = b.add("relu", "Relu", [h])
    h = b.add("act", "Quantize", [h], attrs={"to": parse_type("ufixed<8,2,RND_CONV,SAT>")})
    h = b.add("flatten", "Reshape", [h], attrs={"shape": (128,)})
    h = b.add("dense", "Dense", [h], params={"weight": Const(rng.integers(-32, 32, (128, 16)), w6),
                                              "bias": Const(rng.integers(-32, 32, (16,)), w6)})
    b.output(h)
    g = b.build()
    assert g.param_count() == 2144, g.param_count()
    return g


def main() -> int:
    """Print ours (with and without register TMR) vs published at 65 nm, 45/28 nm figures and the
    per-layer tables; returns 0."""
    from qdeploy.backends.asic import estimate
    from qdeploy.backends.hls4ml.estimate import format_table

    ref = next(csv.DictReader(open(REFS)))
    g = econt_graph()
    clock = float(ref["clock_mhz"])
    pub = {k: float(ref[k]) for k in ("area_mm2", "power_mw", "energy_per_inference_nj", "latency_ns")}
    print(f"ECON-T encoder, 65 nm, {clock:.0f} MHz -- ours vs {REFS.name} ({ref['source']})")
    print("(no calibration; programmable 6-bit weights, 8-bit inputs/activations: our assumptions.")
    print(" tmr=registers: the reference design has triple modular redundancy, arXiv 2103.05579 Sec. 4.3.2;")
    print(" we triplicate the registers only, with voters, all clocked: asic/estimate.py B8)")
    hdr = f"{'node':>6}{'tmr':>11}{'':>7}{'area[mm2]':>10}{'power[mW]':>11}{'E/inf[nJ]':>11}{'lat[ns]':>9}"
    print(hdr)
    print("-" * len(hdr))
    for nm in (65, 45, 28):
        for tmr in ("none", "registers"):
            T = estimate(g, {"node_nm": nm, "clock_mhz": clock, "tmr": tmr})["total"]
            print(f"{nm:>4}nm{tmr:>11}{'ours':>7}{T['area_mm2']:>10.3f}{T['power_mw']:>11.1f}{T['energy_nj']:>11.3f}"
                  f"{T['latency_ns']:>9.0f}")
            if nm == 65:
                print(f"{'':>17}{'ratio':>7}{T['area_mm2'] / pub['area_mm2']:>10.2f}"
                      f"{T['power_mw'] / pub['power_mw']:>11.2f}{T['energy_nj'] / pub['energy_per_inference_nj']:>11.2f}"
                      f"{T['latency_ns'] / pub['latency_ns']:>9.2f}")
        if nm == 65:
            print(f"{'':>17}{'pub':>7}{pub['area_mm2']:>10.3f}{pub['power_mw']:>11.1f}"
                  f"{pub['energy_per_inference_nj']:>11.3f}{pub['latency_ns']:>9.0f}")
    for tmr in ("none", "registers"):
        est = estimate(g, {"node_nm": 65, "clock_mhz": clock, "tmr": tmr})
        print(f"\n65 nm, tmr={tmr}, per layer ({est['total']['ge']:.0f} GE, {est['total']['ff']} flip-flops):")
        print(format_table(est))
    print(f"\n{est['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
