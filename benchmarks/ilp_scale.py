"""ILP scale: a 60-layer x 7-width bit allocation (weights 2..8 bits) under a BOPs budget, solved with
HiGHS (scipy.optimize.milp), zero MIP gap, with a second (weight-size) budget at the same time.
Target: under 1 s per solve (worst over repeats and budgets).

    python benchmarks/ilp_scale.py [--layers 60] [--repeats 5]
"""
import argparse
import time

import numpy as np

from qdeploy.compiler.quantization import ilp


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    widths = tuple(range(2, 9))
    specs = []
    for i in range(args.layers):
        n_in, n_out = int(rng.choice([64, 128, 256, 576])), int(rng.choice([32, 64, 128, 256]))
        specs.append(ilp.LayerSpec(f"l{i}", n_in, n_out, positions=int(rng.choice([1, 16, 64])),
                                   n_weights=n_in * n_out, w_bits=widths, fixed_a_bits=8))
    tr = rng.lognormal(0, 1.5, size=len(specs))
    sens = {s.name: {o: float(tr[i]) * s.n_weights * 4.0 ** -o[0] for o in s.options()} for i, s in enumerate(specs)}
    lo = sum(ilp.layer_cost("bops", s, 2, 8) for s in specs)
    hi = sum(ilp.layer_cost("bops", s, 8, 8) for s in specs)
    worst = 0.0
    for frac in (0.2, 0.5, 0.8):
        b = {"bops": lo + frac * (hi - lo), "size": sum(s.n_weights * 6 for s in specs)}
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            a = ilp.allocate(specs, sens, b)
            times.append(time.perf_counter() - t0)
        worst = max(worst, max(times))
        hist = np.bincount([w for w, _ in a.bits.values()], minlength=9)[2:]
        print(f"{args.layers} layers x {len(widths)} widths, budget {frac:.0%} of BOPs range + size cap: "
              f"median {np.median(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms; "
              f"objective {a.objective:.4g}; bits histogram 2..8 {hist.tolist()}")
    print(f"worst solve {worst:.3f} s: {'PASS' if worst < 1.0 else 'FAIL'} (target < 1 s)")
    return 0 if worst < 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
