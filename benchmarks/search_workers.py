"""QAT fan-out speed: `qdeploy search` on the digits MLP recipe with the (allocation x seed) fine-tunes
run serially in one process (``workers=1``, the reference) vs on 2 local worker processes
(``workers=2``), measured in the same run, interleaved, best of ``--rounds``, with the machine load
(``uptime``) printed before each run.  Also checks that both give identical per-seed accuracies and
allocations.  Team target: 2 workers >= 1.6x faster than serial on a 2-core machine.

    python benchmarks/search_workers.py [--rounds 2] [--seeds 2] [--epochs 20] [--model mlp|cnn]

Printed per run: the whole search's wall time and the QAT part's (``qat_fanout.seconds``); then the
best of each and the ratios serial / 2 workers.
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "uptime not available"


def summary(rep):
    return [(b["hessian"]["bits"], b["hessian"].get("test_accs"), (b["uniform"] or {}).get("test_accs"),
             (b["uniform_above"] or {}).get("test_accs")) for b in rep["budgets"]]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=2, help="QAT seeds per allocation")
    ap.add_argument("--epochs", type=int, default=20, help="QAT epochs per job")
    ap.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    ap.add_argument("--budgets", default="bops=uniform:3,bops=uniform:4",
                    help="comma-separated budget points (each kind=value)")
    args = ap.parse_args(argv)
    from qdeploy.compiler.quantization.search import run_search
    from qdeploy.compiler.quantization.search_budget import parse_search_budget

    recipe = f"{ROOT / 'examples/digits/search_recipe.py'}:recipe_{args.model}"
    budgets = [parse_search_budget(b) for b in args.budgets.split(",")]
    times = {1: [], 2: []}
    qat = {1: [], 2: []}
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for rnd in range(args.rounds):
            for w in (1, 2) if rnd % 2 == 0 else (2, 1):  # interleaved, alternating order
                print(f"round {rnd} workers={w}: load {load()}", flush=True)
                t0 = time.perf_counter()
                rep = run_search(recipe, Path(d) / f"r{rnd}w{w}", budgets=budgets, w_bits=(2, 3, 4, 5, 6, 8),
                                 qat_seeds=args.seeds, qat_epochs=args.epochs, progress=False, workers=w)
                dt = time.perf_counter() - t0
                fo = rep["qat_fanout"]
                times[w].append(dt)
                qat[w].append(fo["seconds"])
                results.setdefault(w, summary(rep))
                print(f"  search {dt:.1f} s, QAT {fo['seconds']:.1f} s ({fo['jobs']} jobs, engine {fo['engine']}, "
                      f"{fo['workers']} worker(s))", flush=True)
    same = results[1] == results[2]
    print(f"digits {args.model}, {len(budgets)} budgets, {args.seeds} seeds, {args.epochs} epochs, best of "
          f"{args.rounds}: serial search {min(times[1]):.1f} s (QAT {min(qat[1]):.1f} s), 2 workers "
          f"{min(times[2]):.1f} s (QAT {min(qat[2]):.1f} s)")
    print(f"  ratio serial / 2 workers: whole search {min(times[1]) / min(times[2]):.2f}x, QAT part "
          f"{min(qat[1]) / min(qat[2]):.2f}x (target >= 1.6x); identical accuracies and allocations: {same}")
    print(f"  load after: {load()}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
