"""End-to-end example on real data: scikit-learn's handwritten digits (1,797 8x8 images).

Trains a Brevitas QAT MLP and a QAT CNN with power-of-two scales, exports them to QONNX,
compiles each to hls4ml (C simulation) and TVM (llvm), runs the whole test set through every
artifact and prints test accuracy and exactness against the reference interpreter.

    python examples/digits/run.py --out runs/digits [--epochs-mlp 30 --epochs-cnn 15]

Exit status 1 when any backend disagrees with the reference on any test image.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models  # noqa: E402  (examples/digits/models.py)

import qdeploy  # noqa: E402
from qdeploy.compiler import reference  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/digits", type=Path)
    ap.add_argument("--targets", default="hls4ml,tvm-llvm")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--epochs-mlp", type=int, default=None)
    ap.add_argument("--epochs-cnn", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    targets = [t for t in args.targets.split(",") if t]
    x_tr, y_tr, x_te, y_te = models.load_data(seed=args.seed)
    rows = []
    ok = True
    for name in [m for m in args.models.split(",") if m]:
        make = {"mlp": models.make_mlp, "cnn": models.make_cnn}[name]
        shape = models.input_shape(name) if hasattr(models, "input_shape") else ((64,) if name == "mlp" else (1, 8, 8))
        xtr = x_tr.reshape(-1, *shape)
        xte = x_te.reshape(-1, *shape)
        epochs = {"mlp": args.epochs_mlp, "cnn": args.epochs_cnn}[name]
        t0 = time.perf_counter()
        model = make()
        kw = {"epochs": epochs} if epochs else {}
        models.train(model, (xtr, y_tr, xte, y_te), seed=args.seed, **kw)
        t_train = time.perf_counter() - t0
        acc_bv = models.accuracy(model, xte, y_te)
        onnx_path = args.out / f"{name}.onnx"
        models.export(model, xte[:1], str(onnx_path))
        bv_logits = models.predict(model, xte) if hasattr(models, "predict") else None
        print(f"[{name}] trained in {t_train:.1f} s, Brevitas test accuracy {acc_bv:.4f}; exported {onnx_path}")
        ref_acc = None
        for target in targets:
            t1 = time.perf_counter()
            res = qdeploy.compile(str(onnx_path), target=target, out_dir=args.out / f"{name}-{target}",
                                  golden=xte, force=True)
            t_comp = time.perf_counter() - t1
            if ref_acc is None:
                from qdeploy.runtime.compiled import user_feeds, user_outputs
                g = res.graph
                ref_out = user_outputs(g, reference.execute(g, user_feeds(g, xte), codes=True))[0]
                ref_acc = float(np.mean(ref_out.argmax(1) == y_te))
                if bv_logits is not None:
                    d = float(np.max(np.abs(ref_out - bv_logits)))
                    print(f"[{name}] reference interpreter vs Brevitas logits: max abs diff {d:.3g}, "
                          f"argmax agreement {np.mean(ref_out.argmax(1) == bv_logits.argmax(1)):.4f}")
            y = qdeploy.CompiledModel.load(args.out / f"{name}-{target}").predict(xte)
            acc = float(np.mean(y.argmax(1) == y_te))
            ex = res.report["exactness"]
            rows.append((name, target, acc_bv, ref_acc, acc, ex["samples"], ex["mismatches"], ex["max_abs_error"], t_comp))
            ok &= ex["mismatches"] == 0 and acc == ref_acc
            print(f"[{name}] {target}: compiled in {t_comp:.1f} s -> {args.out / f'{name}-{target}'}")
    print()
    hdr = ("model", "target", "Brevitas acc", "reference acc", "target acc", "golden samples", "mismatches",
           "max abs err", "compile s")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.4f} | {r[3]:.4f} | {r[4]:.4f} | {r[5]} | {r[6]} | {r[7]:.3g} | {r[8]:.1f} |")
    print()
    print("ALL BACKENDS BIT-EXACT, accuracy equal to the reference" if ok else "MISMATCH: see the table above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
