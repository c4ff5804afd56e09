"""Digits mixed-precision search: Hessian-guided bit allocation vs uniform precision (issue 4).

Recipes (``module:function`` for ``qdeploy search``) returning a trained *float* model and its data:

    qdeploy search examples/digits/search_recipe.py:recipe_mlp -o runs/search/mlp \\
        --budget bops=uniform:3 --budget bops=uniform:4 --budget bops=uniform:5

Run as a script to search both the MLP and the CNN and print the Hessian-vs-uniform table::

    python examples/digits/search_recipe.py --out runs/search
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402  (examples/digits/models.py: data loading)

from qdeploy.compiler.quantization import qat  # noqa: E402

INPUT = {"bits": 5, "scale": 2.0 ** -4, "signed": False}  # pixels k/16, k in 0..16 (models.DigitsInputQuant)


def float_mlp(hidden: int = 32, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def float_cnn(channels=(8, 16), seed: int = 0) -> nn.Sequential:
    c1, c2 = channels
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * c2, 10))


def _recipe(kind: str, seed: int = 0, epochs: int = 30) -> dict:
    images = kind == "cnn"
    x_tr, y_tr, x_te, y_te = models.load_data(seed=seed, images=images)
    n_val = 300  # last 300 training samples: validation; the fixed test split stays untouched
    x_fit, y_fit, x_val, y_val = x_tr[:-n_val], y_tr[:-n_val], x_tr[-n_val:], y_tr[-n_val:]
    model = float_mlp(seed=seed) if kind == "mlp" else float_cnn(seed=seed)
    qat.fine_tune(model, x_fit, y_fit, epochs=epochs, lr=1e-2, seed=seed)
    return {"name": f"digits_{kind}", "model": model, "train": (x_fit, y_fit), "val": (x_val, y_val),
            "test": (x_te, y_te), "input": INPUT, "qat": {"epochs": 20, "lr": 5e-3, "batch_size": 64}}


def recipe_mlp() -> dict:
    """Float 64-32-32-10 MLP trained 30 epochs on digits."""
    return _recipe("mlp")


def recipe_cnn() -> dict:
    """Float two-conv CNN (8, 16 channels) trained 30 epochs on digits."""
    return _recipe("cnn")


recipe = recipe_mlp


def main(argv=None) -> int:
    from qdeploy.compiler.quantization.search import run_search

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/search", type=Path)
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--budgets", default="3,4,5", help="uniform bit widths whose BOPs are the budgets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--act-bits", default="2,3,4,5,6,7,8",
                    help="candidate activation bits, or 'fixed' for 8-bit activations (weight-only search, HAWQ-V3 W-mixed/A8)")
    ap.add_argument("--qat-seeds", type=int, default=3, help="QAT runs per allocation (mean accuracy reported)")
    args = ap.parse_args(argv)
    budgets = [{"bops": f"uniform:{b}"} for b in args.budgets.split(",")]
    wins = 0
    total = 0
    for kind in args.models.split(","):
        rep = run_search({"mlp": recipe_mlp, "cnn": recipe_cnn}[kind], args.out / kind, budgets=budgets,
                         seed=args.seed, qat_seeds=args.qat_seeds,
                         a_bits=() if args.act_bits == "fixed" else [int(b) for b in args.act_bits.split(",")])
        print(f"\n[{rep['model']}] float test acc {rep['float_accuracy']['test']:.4f}; traces: "
              f"{rep['trace']['probes']} probes in {rep['trace']['seconds']:.2f} s; total {rep['seconds']:.1f} s")
        for l in rep["layers"]:
            print(f"  layer {l['name']:>3}: Tr(H) {l['trace']:.4g} ± {l['stderr']:.2g}  (n={l['n_weights']}), "
                  f"act Tr {l.get('act_trace', float('nan')):.4g} ± {l.get('act_stderr', float('nan')):.2g}; "
                  f"chosen w/a: {', '.join(f'{c[0]}/{c[1]}' for c in l['chosen'])}")
        print(f"  {'budget':<16} {'Hessian BOPs':>12} {'acc':>7} | {'uniform':>8} {'BOPs':>10} {'acc':>7} | H>=U")
        for b in rep["budgets"]:
            h, u = b["hessian"], b["uniform"]
            ok = h["test_acc"] >= u["test_acc"] and u["allocation"]["costs"]["bops"] >= h["costs"]["bops"]
            wins += ok
            total += 1
            print(f"  {str(b['budget']['bops']):<16} {h['costs']['bops']:>12.4g} {h['test_acc']:>7.4f} | "
                  f"{u['bits']:>6}-b {u['allocation']['costs']['bops']:>10.4g} {u['test_acc']:>7.4f} | {ok}")
        print(f"  report: {args.out / kind / 'search_report.md'}")
    print(f"\nHessian >= uniform (at <= its BOPs) at {wins}/{total} budgets")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
