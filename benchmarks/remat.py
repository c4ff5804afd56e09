"""Rematerialization benchmark (issue 8): Moccasin CP-SAT vs the Checkmate MILP (HiGHS) vs greedy.

For every graph of :mod:`benchmarks.remat_graphs` and budgets of 90% and 80% of the
no-remat peak (graph order), prints feasibility, compute overhead % and solve time of each
solver, and for CP-SAT the time it first held a schedule at least as good as the MILP's (the
"10x faster" team target is CP time-to-reach vs MILP solve time).  The MILP is skipped above
``--milp-max-vars`` variables (it does not fit in memory/time on this machine).  Every peak is
re-scored by the exact memory model; "LB" is the lower bound no schedule can beat (largest node's
inputs + output), so budgets below it are infeasible for any method.  Then the IR graphs
(tests/remat/graphs.py and the qonnx residual block) are rewritten and run by the reference
interpreter: measured peak vs predicted.

    .venv/bin/python benchmarks/remat.py [--cp-limit 10] [--milp-limit 30] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.remat_graphs import CHECKMATE_COUNTS, all_graphs  # noqa: E402
from qdeploy.passes import remat as R  # noqa: E402


def _fmt(r: R.RematResult | None) -> tuple[str, str, str]:
    if r is None:
        return "skipped", "-", "-"
    if r.feasible:
        st = {"optimal": "opt", "feasible": "feas"}.get(r.status, r.status)
        return st, f"{r.overhead_pct:.2f}", f"{r.solve_s:.2f}"
    return r.status, "-", f"{r.solve_s:.2f}"


def bench_graphs(args):
    print(f"CP-SAT time limit {args.cp_limit:g} s ({R._workers(None)} workers), MILP (HiGHS via SciPy) time limit "
          f"{args.milp_limit:g} s, MILP skipped above {args.milp_max_vars} variables; greedy limit 30 s; "
          f"C = {args.copies} copies per node for CP-SAT and greedy\n")
    hdr = (f"{'graph':24s} {'nodes':>5s} {'edges':>5s} {'budget':>6s} {'LB%':>5s} | {'greedy':>6s} {'ovh%':>6s} | "
           f"{'CP':>6s} {'ovh%':>6s} {'bound%':>6s} {'time':>6s} {'reach':>6s} | {'MILP':>7s} {'ovh%':>6s} {'time':>6s} "
           f"| {'speedup':>7s}")
    print(hdr)
    print("-" * len(hdr))
    rows = []
    graphs = all_graphs((100, 250) if args.quick else (100, 250, 500, 1000))
    if args.quick:
        graphs = [g for g in graphs if g.n <= 260]
    for p in graphs:
        base = R.evaluate(p, R.no_remat(p))
        lb = p.lower_bound()
        for frac in (0.9, 0.8):
            b = int(frac * base.peak)
            g = c = m = None
            if b >= lb:
                g = R.solve_greedy(p, b, args.copies)
                c = R.solve_cp(p, b, args.copies, args.cp_limit, hint=g.schedule if g.feasible else None)
                if R.milp_size(p) <= args.milp_max_vars:
                    m = R.solve_milp(p, b, args.milp_limit)
            if b < lb:
                row = (f"{p.title:24s} {p.n:5d} {p.edges:5d} {int(frac * 100):5d}% {100 * lb / base.peak:5.1f} | "
                       f"infeasible for every method: budget below LB")
                print(row)
                rows.append(dict(graph=p.title, frac=frac, feasible=False, lb=True))
                continue
            gs, go, _ = _fmt(g)
            cs, co, ct = _fmt(c)
            ms, mo, mt = _fmt(m)
            reach = sp = "-"
            if c is not None and c.feasible and m is not None and m.feasible:
                tr = c.time_to_reach(m.cost)
                if tr is not None:
                    reach = f"{tr:.2f}"
                    sp = f"{m.solve_s / max(tr, 1e-3):.0f}x"
            elif c is not None and c.feasible and (m is None or not m.feasible):
                sp = "MILP none"
            bnd = "-" if c is None or c.bound_pct is None else f"{c.bound_pct:.2f}"
            print(f"{p.title:24s} {p.n:5d} {p.edges:5d} {int(frac * 100):5d}% {100 * lb / base.peak:5.1f} | "
                  f"{gs:>6s} {go:>6s} | {cs:>6s} {co:>6s} {bnd:>6s} {ct:>6s} {reach:>6s} | {ms:>7s} {mo:>6s} {mt:>6s} "
                  f"| {sp:>7s}", flush=True)
            rows.append(dict(graph=p.title, frac=frac, feasible=bool(c and c.feasible), cp=c, milp=m, greedy=g))
    print("\nnode/edge counts vs Checkmate:")
    for p in graphs:
        want = CHECKMATE_COUNTS.get(p.title)
        if want:
            print(f"  {p.title:24s} ours {p.n}/{p.edges}  Checkmate {want[0]}/{want[1] if want[1] else '?'}")
    return rows


def bench_ir(args):
    from qdeploy import load
    from qdeploy.compiler.reference import execute
    from qdeploy.passes.memory import memory_profile
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "remat"))
    from graphs import feeds, skip_block, two_skips
    rng = np.random.default_rng(0)
    cases = [("skip_block", skip_block(rng), 0.9), ("two_skips", two_skips(rng), 0.9)]
    rc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "realcases",
                      "qonnx-residual-block", "residual_block_clean.onnx")
    if os.path.exists(rc):
        cases.append(("qonnx-residual-block", load(rc), None))
    print("\nIR graphs: predicted (analysis) vs measured (reference interpreter) peak, bytes per batch of 2")
    print(f"{'graph':22s} {'nodes':>5s} {'before':>8s} {'after':>6s} {'predicted':>9s} {'measured':>9s} {'ovh%':>6s} "
          f"{'outputs':>8s}")
    for name, g, frac in cases:
        f = feeds(g, rng, 2) if name != "qonnx-residual-block" else {
            g.inputs[0]: rng.standard_normal((2, *g.values[g.inputs[0]].shape)).astype(np.float32)}
        codes = name != "qonnx-residual-block"
        base = execute(g, f, codes=codes)
        if frac is None:
            g2, rep = g, {"overhead_pct": 0.0}
            note = "(at LB: no remat possible)"
        else:
            g2, rep = R.rematerialize(g, frac, batch=1)
            note = ""
        pk = {}
        out = execute(g2, f, codes=codes, peak=pk)
        same = all(np.array_equal(base[k], out[k]) for k in base)
        print(f"{name:22s} {len(g2.nodes):5d} {memory_profile(g, batch=2).peak:8d} "
              f"{'yes' if g2 is not g else 'no':>6s} {memory_profile(g2, batch=2).peak:9d} {pk['peak_bytes']:9d} "
              f"{rep['overhead_pct']:6.2f} {'same' if same else 'DIFFER':>8s} {note}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cp-limit", type=float, default=10.0)
    ap.add_argument("--milp-limit", type=float, default=30.0)
    ap.add_argument("--milp-max-vars", type=int, default=400_000)
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="graphs up to 260 nodes only")
    args = ap.parse_args()
    t0 = time.time()
    bench_ir(args)
    print()
    bench_graphs(args)
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
