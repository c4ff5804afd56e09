"""MNIST-1D: does the Hessian allocation beat uniform precision?  Hessian vs uniform (equal or more
BOPs) vs random (same budget) vs trace-only (HAWQ-V3's Omega without the measured term), each
fine-tuned with several QAT seeds, test accuracy with 2 paired standard errors
(:func:`qdeploy.compiler.quantization.search_compare.compare_allocations`).

    python examples/mnist1d/search.py --models mlp,cnn,rescnn --budgets 2.5,3,3.5,4 --qat-seeds 5 \\
        --modes w,wa --out runs/mnist1d_compare

``--modes``: ``w`` = weights-only search with 8-bit activations, ``wa`` = weights and activations
searched.  Budgets are BOPs of uniform B-bit models (fractional: between two uniform points).
Settings (float training, QAT epochs/lr) are those of ``search_recipe.py``, chosen on the validation
split; the test split is only reported.  Writes ``<out>/comparison.md``, ``<out>/comparison.json`` and
one accuracy-vs-BOPs plot per model and mode (``<out>/<model>_<mode>.png``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_recipe  # noqa: E402  (examples/mnist1d/search_recipe.py)

from qdeploy.compiler.quantization.search_compare import (compare_allocations, plot_comparison,  # noqa: E402
                                                          render_comparison)
from qdeploy.compiler.quantization.search_report import accuracy_noise, json_default  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/mnist1d_compare", type=Path)
    ap.add_argument("--models", default="mlp,cnn,rescnn")
    ap.add_argument("--budgets", default="2.5,3,3.5,4")
    ap.add_argument("--modes", default="w,wa")
    ap.add_argument("--bits", default="2,3,4,5,6,7,8")
    ap.add_argument("--qat-seeds", type=int, default=5)
    ap.add_argument("--qat-epochs", type=int, default=None, help="override the recipe's QAT epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", default="1", help="processes for the QAT jobs: N or 'auto' (one per CPU); "
                    "results do not depend on it")
    args = ap.parse_args(argv)
    workers = args.workers if args.workers == "auto" else int(args.workers)
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    bits = [int(b) for b in args.bits.split(",")]
    budgets = [{"bops": f"uniform:{b}"} for b in args.budgets.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    reports, md = [], ["# MNIST-1D: Hessian vs uniform vs random vs trace-only allocation", ""]
    wins = {}
    for kind in args.models.split(","):
        for mode in args.modes.split(","):
            fn = getattr(search_recipe, f"recipe_{kind}")
            rfn = (lambda fn=fn: fn(seed=args.seed, **({"qat_epochs": args.qat_epochs} if args.qat_epochs else {})))
            t0 = time.time()
            rep = compare_allocations(rfn, budgets, w_bits=bits, a_bits=() if mode == "w" else bits,
                                      qat_seeds=args.qat_seeds, seed=args.seed, workers=workers,
                                      log=lambda s: print("  " + s, flush=True))
            rep["mode"] = mode
            reports.append(rep)
            table = render_comparison(rep)
            print(f"\n[{kind} / {mode}] {time.time() - t0:.0f} s\n{table}", flush=True)
            png = plot_comparison(rep, args.out / f"{kind}_{mode}.png")
            md += [f"## {kind}, {'weights only (8-bit activations)' if mode == 'w' else 'weights + activations'}",
                   "", table, f"![{kind} {mode}]({png.name})", ""]
            w = sum(1 for b in rep["budgets"]
                    if b["rows"]["hessian"]["test_acc"] - b["rows"]["uniform"]["test_acc"]
                    > 2 * accuracy_noise(b["rows"]["hessian"], b["rows"]["uniform"], "test_acc"))
            worse = sum(1 for b in rep["budgets"]
                        if b["rows"]["uniform"]["test_acc"] - b["rows"]["hessian"]["test_acc"]
                        > 2 * accuracy_noise(b["rows"]["hessian"], b["rows"]["uniform"], "test_acc"))
            wins[f"{kind}/{mode}"] = (w, worse, len(rep["budgets"]))
            (args.out / "comparison.json").write_text(json.dumps(reports, indent=1, default=json_default))
            (args.out / "comparison.md").write_text("\n".join(md))
    print("\nHessian beats uniform (equal or more BOPs) by more than 2 paired se / is worse by more than "
          "2 paired se, per model and mode:")
    for k, (w, worse, n) in wins.items():
        print(f"  {k}: better at {w} of {n} budgets, worse at {worse}")
    md += ["## Summary", ""] + [f"- {k}: Hessian better than uniform beyond 2 paired se at {w} of {n} budgets, "
                                 f"worse beyond 2 se at {worse}" for k, (w, worse, n) in wins.items()]
    (args.out / "comparison.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
