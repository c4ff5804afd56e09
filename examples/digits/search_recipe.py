"""Digits mixed-precision search: Hessian-guided bit allocation vs uniform precision.

Recipes (``module:function`` for ``qdeploy search``) returning a trained *float* model and its data:

    qdeploy search examples/digits/search_recipe.py:recipe_mlp -o runs/search/mlp \\
        --budget bops=uniform:3 --budget bops=uniform:4 --budget bops=uniform:5

Run as a script to search both the MLP and the CNN and print the Hessian-vs-uniform table
(weights-only search with 8-bit activations, BOPs budgets of uniform 2.5, 3, ..., 5 bits, 5 QAT seeds;
about 5 minutes on one core)::

    python examples/digits/search_recipe.py --out runs/search
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
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


def recipe_mlp(seed: int = 0) -> dict:
    """Float 64-32-32-10 MLP trained 30 epochs on digits (``seed``: data split and initialization)."""
    return _recipe("mlp", seed=seed)


def recipe_cnn(seed: int = 0) -> dict:
    """Float two-conv CNN (8, 16 channels) trained 30 epochs on digits (``seed``: split and init)."""
    return _recipe("cnn", seed=seed)


recipe = recipe_mlp


def _row(r):
    if not r:
        return f"{'-':>6} {'':>10} {'':>7} {'':>7} {'':>6}"
    c = r["allocation"]["costs"]["bops"] if "allocation" in r else r["costs"]["bops"]
    tag = f"{r['bits']}-b" if "bits" in r and isinstance(r["bits"], int) else "ILP"
    return f"{tag:>6} {c:>10.4g} {r['val_acc']:>7.4f} {r['test_acc']:>7.4f} {np.std(r['test_accs']):>6.4f}"


def main(argv=None) -> int:
    from qdeploy.compiler.quantization.search import run_search
    from qdeploy.compiler.quantization.search_report import accuracy_noise

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/search", type=Path)
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--budgets", default="2.5,3,3.5,4,4.5,5",
                    help="uniform bit widths whose BOPs are the budgets; fractional = between two uniform points")
    ap.add_argument("--seed", type=int, default=0, help="seeds the probes and QAT runs")
    ap.add_argument("--data-seed", type=int, default=0,
                    help="seeds the recipe: train/test split and float-model initialization")
    ap.add_argument("--act-bits", default="fixed:8",
                    help="candidate activation bits (e.g. 2,3,4,5,6,7,8), or 'fixed:B' for B-bit activations "
                         "(weight-only search, HAWQ-V3 W-mixed/A8; the default)")
    ap.add_argument("--qat-seeds", type=int, default=5, help="QAT runs per allocation (mean accuracy reported)")
    ap.add_argument("--sensitivity", default="hessian+measured",
                    help="hessian+measured (default: max of the Hessian estimate and the measured loss increase), "
                         "hessian (HAWQ-V3 Omega only) or measured")
    ap.add_argument("--distill-alpha", type=float, default=0.0,
                    help="QAT knowledge distillation from the float model (0: off, the default)")
    args = ap.parse_args(argv)
    budgets = [{"bops": f"uniform:{b}"} for b in args.budgets.split(",")]
    fixed = args.act_bits.startswith("fixed")
    abf = int(args.act_bits.split(":", 1)[1]) if args.act_bits.startswith("fixed:") else 8
    score = {"below": [0, 0], "above": [0, 0]}
    noise = {"within": 0, "n": 0}
    per_model = {}
    for kind in args.models.split(","):
        rfn = (lambda f: lambda: f(seed=args.data_seed))({"mlp": recipe_mlp, "cnn": recipe_cnn}[kind])
        if args.distill_alpha:
            rfn = (lambda f: lambda: (lambda r: {**r, "qat": {**r["qat"], "distill_alpha": args.distill_alpha}})(f()))(rfn)
        rep = run_search(rfn, args.out / kind, budgets=budgets,
                         seed=args.seed, qat_seeds=args.qat_seeds, act_bits_fixed=abf,
                         sensitivity_mode=args.sensitivity, force=True,  # this script owns its output folders
                         a_bits=() if fixed else [int(b) for b in args.act_bits.split(",")], progress=False)
        print(f"\n[{rep['model']}] float val/test acc {rep['float_accuracy']['val']:.4f}/"
              f"{rep['float_accuracy']['test']:.4f}; activations "
              f"{'fixed %d-bit' % abf if fixed else 'searched'}; traces: {rep['trace']['probes']} probes in "
              f"{rep['trace']['seconds']:.2f} s; QAT seeds {rep['settings']['qat_seeds']}; total {rep['seconds']:.1f} s")
        for l in rep["layers"]:
            print(f"  layer {l['name']:>3}: Tr(H) {l['trace']:.4g} ± {l['stderr']:.2g}  (n={l['n_weights']}), "
                  f"act Tr {l.get('act_trace', float('nan')):.4g}; chosen w/a: "
                  f"{', '.join(f'{c[0]}/{c[1]}' for c in l['chosen'])}")
        print(f"  {'budget':<12} | {'Hessian ILP: BOPs':>17} {'val':>7} {'test':>7} {'sd':>6} | "
              f"{'uniform below: bits':>19} {'BOPs':>10} {'val':>7} {'test':>7} {'sd':>6} | "
              f"{'uniform above: bits':>19} {'BOPs':>10} {'val':>7} {'test':>7} {'sd':>6} | H>=below H>=above  "
              f"H-above (2 se)")
        for b in rep["budgets"]:
            h, u, a = b["hessian"], b["uniform"], b.get("uniform_above")
            if u is None and a is None:
                continue
            # "above": the uniform with equal or larger BOPs (the comparison criterion): the budget's own
            # uniform when the budget is an integer uniform:B, else the next width up
            up = a or u
            if up is not None and h["bits"] == up["allocation"]["bits"]:
                print(f"  {str(b['budget']['bops']):<12} | Hessian allocation = uniform {up['bits']}-bit "
                      f"(trivial: not counted) test {h['test_acc']:.4f}")
                per_model.setdefault(rep["model"], [0, 0, 0])[2] += 1
                continue
            ok_b = u is not None and h["test_acc"] >= u["test_acc"]
            ok_a = h["test_acc"] >= up["test_acc"]
            if u is not None and a is not None:
                score["below"][0] += ok_b
                score["below"][1] += 1
            score["above"][0] += ok_a
            score["above"][1] += 1
            pm = per_model.setdefault(rep["model"], [0, 0, 0])
            pm[0] += ok_a
            pm[1] += 1
            print(f"  {str(b['budget']['bops']):<12} | {h['costs']['bops']:>17.4g} {h['val_acc']:>7.4f} "
                  f"{h['test_acc']:>7.4f} {np.std(h['test_accs']):>6.4f} | {'':>13}{_row(u)} | {'':>13}{_row(a)} | "
                  f"{str(ok_b) if a is not None else '':>8} {str(ok_a):>9}  "
                  f"{(h['test_acc'] - up['test_acc']) * 100:+.2f} ({2 * accuracy_noise(h, up, 'test_acc') * 100:.2f})")
            noise["within"] += abs(h["test_acc"] - up["test_acc"]) <= 2 * accuracy_noise(h, up, "test_acc")
            noise["n"] += 1
        print(f"  report: {args.out / kind / 'search_report.md'}")
    for m, (w, n, t) in per_model.items():
        print(f"{m}: Hessian >= uniform with equal or larger BOPs at {w} of {n} budgets where the ILP mixed "
              f"widths ({t} budget(s) where it chose the uniform allocation itself are not counted)")
    print(f"\nHessian >= uniform with equal or larger BOPs (test acc, mean of QAT seeds): "
          f"{score['above'][0]}/{score['above'][1]} budgets; Hessian >= the uniform below a fractional budget: "
          f"{score['below'][0]}/{score['below'][1]}; Hessian vs that uniform within 2 paired standard errors "
          f"(points, over the test samples): {noise['within']}/{noise['n']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
