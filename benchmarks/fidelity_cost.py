"""What the source-fidelity check adds to compile time, on the digits MLP and CNN (examples/digits).

Trains both Brevitas QAT models briefly (``--epochs``; timing does not depend on accuracy),
exports them to QONNX, then compiles each model for each target with the check
(``source_check=True``, the default) and without it (``--no-source-check``), interleaved, and keeps
the best of ``--repeats`` runs of each.  The golden set is the digits test split (450 images), as
in ``scripts/demo.sh``.  One warm-up compile per (model, target) first (it fills the hls4ml build
cache, so both variants then measure the same cached build; ``--fresh-cache`` gives every compile an
empty cache instead, i.e. first-compile times with the g++ C-simulation build).  The reference is the compile without
the check, measured in the same run; the team target is an overhead under 20%.

    .venv/bin/python benchmarks/fidelity_cost.py [--targets reference,tvm-llvm,hls4ml] [--repeats 3]
        [--epochs 2] [--source onnx,module] [--fresh-cache]

``--source module`` also times compiles of the Brevitas module itself (the module is the source).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "digits"))

import numpy as np  # noqa: E402


def _cpu() -> float:
    """CPU seconds used so far by this process (all threads) and its finished children (g++)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _time(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its children) of ``fn()``; CPU time is the
    steadier figure on a shared machine (other users' load stretches wall time, not CPU time)."""
    t, c = time.perf_counter(), _cpu()
    fn()
    return time.perf_counter() - t, _cpu() - c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="reference,tvm-llvm,hls4ml")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--source", default="onnx,module")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--fresh-cache", action="store_true",
                    help="an empty hls4ml build cache for every compile (first-compile times: g++ runs each time)")
    args = ap.parse_args(argv)

    import models  # examples/digits/models.py
    import torch

    import qdeploy

    x_tr, y_tr, x_te, y_te = models.load_data(seed=0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qdeploy_fidcost_") as tmp:
        tmp = Path(tmp)
        for name in args.models.split(","):
            shape = (64,) if name == "mlp" else (1, 8, 8)
            xtr, xte = x_tr.reshape(-1, *shape), x_te.reshape(-1, *shape)
            m = {"mlp": models.make_mlp, "cnn": models.make_cnn}[name]()
            models.train(m, (xtr, y_tr), epochs=args.epochs, verbose=False)
            onnx_path = models.export(m, xte[:1], str(tmp / f"{name}.onnx"))
            sources = {"onnx": (str(onnx_path), None), "module": (m, torch.from_numpy(xte[:1]))}
            for src in args.source.split(","):
                model, example = sources[src]
                for target in args.targets.split(","):
                    def run(check, k=[0]):
                        k[0] += 1
                        if args.fresh_cache:
                            os.environ["QDEPLOY_CACHE"] = str(tmp / f"cache{k[0]}")
                        return qdeploy.compile(model, target, tmp / f"{name}-{src}-{target}-{k[0]}", golden=xte,
                                               example_input=example, source_check=check)
                    fid = run(True).report["fidelity"]  # warm-up (fills the hls4ml build cache)
                    with_c, without = [], []
                    for _ in range(args.repeats):  # interleaved
                        with_c.append(_time(lambda: run(True)))
                        without.append(_time(lambda: run(False)))
                    w, wo = min(t[0] for t in with_c), min(t[0] for t in without)
                    cw, cwo = min(t[1] for t in with_c), min(t[1] for t in without)
                    rows.append((name, src, target, wo, w, 100.0 * (w - wo) / wo, cwo, cw, 100.0 * (cw - cwo) / cwo,
                                 fid["time_s"], fid["mode"], fid["ok"]))
                    print(f"[{name} {src} {target}] without {wo:.3f} s (cpu {cwo:.3f}), with {w:.3f} s (cpu {cw:.3f})",
                          flush=True)
    print()
    print(f"{'model':6} {'source':7} {'target':10} {'no check s':>10} {'check s':>9} {'overhead':>9} "
          f"{'cpu no chk':>10} {'cpu check':>9} {'cpu ovh':>8} {'check alone s':>13}  mode / ok")
    worst = worst_cpu = 0.0
    for name, src, target, wo, w, pct, cwo, cw, cpct, t_fid, mode, ok in rows:
        worst, worst_cpu = max(worst, pct), max(worst_cpu, cpct)
        print(f"{name:6} {src:7} {target:10} {wo:10.3f} {w:9.3f} {pct:8.1f}% {cwo:10.3f} {cw:9.3f} {cpct:7.1f}% "
              f"{t_fid:13.3f}  {mode} / {ok}")
    print(f"\nworst overhead: wall {worst:.1f}%, cpu {worst_cpu:.1f}% (target: under 20%); best of {args.repeats}, "
          f"interleaved, {len(x_te)} golden samples, cpu count {os.cpu_count()}, load average "
          f"{os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
