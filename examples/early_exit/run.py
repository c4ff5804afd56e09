"""Early exits end to end: a BranchyNet-style quantized CNN on the bundled digits data.

Trains the 3-exit CNN of ``model.py`` jointly (weighted per-exit losses), exports ONE QONNX graph
with an output per exit, splits it into 3 stages and compiles every stage for each target (each
stage its own artifact; for hls4ml its own project).  Then, on the whole test split:

* every target's MultiStageModel gives exactly the reference multi-stage model's predictions and
  exit indices, for every gate setting below, and equals the unsplit model (compiled as one
  artifact) when every gate forbids early exits;
* gates are calibrated on a held-out validation split for target accuracy drops and for compute
  budgets, and a threshold sweep is reported: exit distribution, accuracy per exit and overall,
  mean/worst BOPs per input, speedup vs the final exit alone, estimated mean latency;
* the measured mean compute under each budget is checked against the budget (within 5%).

    python examples/early_exit/run.py --out runs/early_exit [--targets reference,tvm-llvm,hls4ml]

Writes ``<out>/report.md`` and ``<out>/report.json``.  Exit status 1 on any mismatch.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import model as M  # noqa: E402  (examples/early_exit/model.py)

import qdeploy  # noqa: E402
from qdeploy.compiler.frontends.early_exit import export_early_exit  # noqa: E402
from qdeploy.compiler.quantization.branchy import predict_exits, train_joint  # noqa: E402
from qdeploy.early_exit import calibrate_gates, compile_early_exit, evaluate, exit_codes, render_report  # noqa: E402
from qdeploy.runtime.multistage import make_gate  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/early_exit", type=Path)
    ap.add_argument("--targets", default="reference,tvm-llvm,hls4ml")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--weights", default="1,1,1", help="per-exit loss weights (BranchyNet joint training)")
    ap.add_argument("--val-frac", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    targets = [t for t in args.targets.split(",") if t]
    if targets[0] != "reference":
        targets = ["reference"] + [t for t in targets if t != "reference"]

    x_tr, y_tr, x_te, y_te = M.load_data(seed=args.seed, images=True)
    xa, xv, ya, yv = M.split_validation(x_tr, y_tr, args.val_frac, args.seed)
    net = M.make_branchy_cnn(seed=args.seed)
    t0 = time.perf_counter()
    train_joint(net, (xa, ya), weights=[float(w) for w in args.weights.split(",")], epochs=args.epochs, seed=args.seed)
    print(f"trained in {time.perf_counter() - t0:.1f} s on {len(ya)} images; Brevitas test accuracy per exit: "
          + ", ".join(f"{np.mean(o.argmax(1) == y_te):.4f}" for o in predict_exits(net, x_te)))
    onnx_path = export_early_exit(net, x_te[:1], args.out / "branchy.onnx")

    progs, ok = {}, True
    for t in targets:
        t1 = time.perf_counter()
        progs[t] = compile_early_exit(str(onnx_path), t, args.out / f"branchy-{t}", golden=xv, force=True)
        st = progs[t].plan["stages"]
        ex = all(s["exactness"]["bit_exact"] for s in st)
        ok &= ex
        print(f"[{t}] {len(st)} stages compiled in {time.perf_counter() - t1:.1f} s; per-stage golden check "
              f"({st[0]['exactness']['samples']} validation images): {'bit-exact' if ex else 'MISMATCH'}")
    ref = progs["reference"]
    stages = ref.plan["stages"]
    final_only = ref.plan["meta"]["final_only_bops"]
    print("stage BOPs: " + ", ".join(f"{s['name']} {s['cost']['bops']:.4g}" for s in stages)
          + f"; final exit alone {final_only:.4g}")

    # gate settings: calibrated (accuracy, budget) + a threshold sweep
    settings = []
    for drop, z in ((0.5, 0.0), (1.0, 0.0), (0.5, 2.0), (1.0, 2.0)):
        cal = calibrate_gates(ref, xv, yv, "max_softmax", max_drop=drop, z=z)
        settings.append((f"calibrated: max_softmax, drop <= {drop} pt, z={z} (val acc {cal['accuracy']:.4f} vs final "
                         f"{cal['final_accuracy']:.4f})", cal["gates"], None))
    for frac in (0.3, 0.45, 0.6):
        B = frac * final_only
        for rule in ("max_softmax", "entropy"):
            cal = calibrate_gates(ref, xv, yv, rule, budget=B)
            settings.append((f"calibrated: {rule}, budget {frac:.2f} x final ({B:.4g} BOPs)", cal["gates"], B))
    dts = [ref.program.value(v).dtype for v in ref.exit_values()]
    for t in (0.9, 0.99, 0.999):
        settings.append((f"sweep: max_softmax >= {t}", [make_gate("max_softmax", d, t) for d in dts[:-1]]
                         + [{"rule": "always"}], None))
    for tau in (0.05, 0.2):
        settings.append((f"sweep: entropy <= {tau}", [make_gate("entropy", d, tau) for d in dts[:-1]]
                         + [{"rule": "always"}], None))
    settings.append(("no early exits", [{"rule": "never"}] * (len(dts) - 1) + [{"rule": "always"}], None))

    rows, budget_ok = [], True
    codes = exit_codes(ref, x_te)
    for label, gates, B in settings:
        want_p, want_e = ref.with_gates(gates).decide(codes)  # whole network + host gating
        r = None
        for t in targets:
            m = progs[t].with_gates(gates)
            p, e = m.predict(x_te)
            same = np.array_equal(p, want_p) and np.array_equal(e, want_e)
            if not same:
                print(f"MISMATCH [{t}] {label}: {int(np.sum(p != want_p))} predictions, "
                      f"{int(np.sum(e != want_e))} exits differ from the reference")
            ok &= same
            if r is None:
                r = evaluate(m, x_te, y_te, p, e)
        r["label"] = label
        if B is not None:
            r["budget"] = B
            r["budget_error"] = r["mean_bops"] / B - 1
            budget_ok &= abs(r["budget_error"]) <= 0.05
        rows.append(r)
    # unsplit model: one artifact per target, compared with the never-exit program
    never = settings[-1][1]
    for t in targets:
        un = qdeploy.compile(str(onnx_path), target=t, out_dir=args.out / f"unsplit-{t}", golden=xv, force=True)
        final = np.asarray(un.load().predict(x_te)[-1]).argmax(1)
        p, e = progs[t].with_gates(never).predict(x_te)
        same = np.array_equal(p, final) and bool((e == len(dts) - 1).all())
        ok &= same
        print(f"[{t}] no-early-exit program == unsplit model on {len(x_te)} test images: {same}")

    final_acc = rows[-1]["accuracy"]
    md = render_report(rows, f"Early-exit report: BranchyNet-style digits CNN ({len(x_te)} test images)")
    stage_bops = ", ".join(f"{s['cost']['bops']:.4g}" for s in stages)
    md += (f"\nStage BOPs: {stage_bops}; final exit alone "
           f"{final_only:.4g} BOPs; final-exit test accuracy {final_acc:.4f}.  Targets: {', '.join(targets)} -- "
           f"identical predictions and exit indices on every row: {ok}.\n")
    best = [r for r in rows if r["accuracy"] >= final_acc - 0.01 and r["speedup_vs_final"] >= 1.5]
    md += (f"Team target (>= 1.5x lower mean compute at <= 1 point loss): "
           f"{'met by ' + str(len(best)) + ' row(s)' if best else 'NOT met'}.\n")
    for r in rows:
        if "budget" in r:
            md += f"- {r['label']}: measured mean {r['mean_bops']:.4g} BOPs, {r['budget_error']:+.1%} vs budget\n"
    (args.out / "report.md").write_text(md)
    (args.out / "report.json").write_text(json.dumps(rows, indent=1, default=str))
    print()
    print(md)
    print("budgets: measured mean compute within 5% of every budget" if budget_ok else "budget missed by > 5%")
    print("ALL TARGETS IDENTICAL to the reference multi-stage model" if ok else "MISMATCH: see above")
    return 0 if ok and budget_ok else 1


if __name__ == "__main__":
    sys.exit(main())
