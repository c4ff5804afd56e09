"""Digits example, training half: Brevitas QAT models on scikit-learn's bundled digits.

This file is an *example*, not part of the ``qdeploy`` package: load it by path
(``importlib.util.spec_from_file_location``) or run it directly::

    python examples/digits/models.py --out /tmp/digits      # trains MLP + CNN, exports QONNX

Every quantizer uses a power-of-two scale, so that the exported QONNX graphs map
onto fixed-point arithmetic exactly (hls4ml ``ap_fixed`` / integer TVM kernels):

* input:       ``DigitsInputQuant`` -- unsigned 5-bit, constant scale 2**-4.  The
  pixels are ``k/16`` with ``k`` in ``0..16``, so quantizing them is the identity.
* weights:     ``brevitas.quant.Int8WeightPerTensorFixedPoint`` with
  ``weight_bit_width`` (default 6): narrow signed, per-tensor PoT scale.
* activations: ``brevitas.quant.Uint8ActPerTensorFixedPoint`` with ``bit_width``
  (default 6) inside ``QuantReLU``: learned PoT scale (``CeilSte`` on log2).
* biases:      ``brevitas.quant.Int16Bias``: scale = input_scale * weight_scale
  (a power of two since both factors are).  This needs the layer input to be a
  QuantTensor, hence ``return_quant_tensor=True`` on every quantizer feeding a
  layer with a bias.

The final ``QuantLinear`` has no output quantizer: its logits are exact
multiples of ``input_scale * weight_scale`` (a power of two).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from brevitas.core.scaling import ScalingImplType
from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU
from brevitas.quant import Int16Bias, Int8WeightPerTensorFixedPoint, Uint8ActPerTensorFixedPoint

__all__ = [
    "DigitsInputQuant",
    "load_data",
    "to_images",
    "make_mlp",
    "make_cnn",
    "train",
    "accuracy",
    "predict",
    "export",
    "quant_scales",
    "qonnx_forward",
    "is_power_of_two",
]

INPUT_SCALE = 2.0 ** -4  # pixels are k/16, k in 0..16


class DigitsInputQuant(Uint8ActPerTensorFixedPoint):
    """Unsigned 5-bit input quantizer with a *constant* scale 2**-4 (range 0..31/16).

    Fixed-point quantizers use power-of-two integer scaling, so scale =
    scaling_init / 2**bit_width = 2.0 / 32 = 1/16.
    """

    bit_width = 5
    scaling_impl_type = ScalingImplType.CONST
    scaling_init = 2.0


# --------------------------------------------------------------------------- data


def load_data(seed: int = 0, test_size: float = 0.25, images: bool = False):
    """Digits, pixels scaled to k/16 in [0, 1], stratified fixed split.

    Returns ``(x_train, y_train, x_test, y_test)``: x float32 of shape (N, 64)
    (or (N, 1, 8, 8) NCHW if ``images``), y int64 labels 0..9.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data.astype(np.float32) / np.float32(16.0)).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    if images:
        x_tr, x_te = to_images(x_tr), to_images(x_te)
    return (
        np.ascontiguousarray(x_tr),
        np.ascontiguousarray(y_tr),
        np.ascontiguousarray(x_te),
        np.ascontiguousarray(y_te),
    )


def to_images(x: np.ndarray) -> np.ndarray:
    """(N, 64) -> (N, 1, 8, 8) NCHW float32."""
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1, 1, 8, 8))


# --------------------------------------------------------------------------- models


def _act(bit_width: int) -> QuantReLU:
    return QuantReLU(
        act_quant=Uint8ActPerTensorFixedPoint, bit_width=bit_width, return_quant_tensor=True
    )


def _wkw(weight_bit_width: int) -> dict:
    return dict(
        weight_quant=Int8WeightPerTensorFixedPoint,
        weight_bit_width=weight_bit_width,
        bias=True,
        bias_quant=Int16Bias,
        return_quant_tensor=False,
    )


def make_mlp(
    hidden: int = 32, weight_bit_width: int = 6, act_bit_width: int = 6, seed: int = 0
) -> nn.Module:
    """64 -> hidden -> hidden -> 10 QAT MLP; input (N, 64)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        QuantIdentity(act_quant=DigitsInputQuant, return_quant_tensor=True),
        QuantLinear(64, hidden, **_wkw(weight_bit_width)),
        _act(act_bit_width),
        QuantLinear(hidden, hidden, **_wkw(weight_bit_width)),
        _act(act_bit_width),
        QuantLinear(hidden, 10, **_wkw(weight_bit_width)),
    )


def make_cnn(
    channels: tuple[int, int] = (8, 16),
    weight_bit_width: int = 6,
    act_bit_width: int = 6,
    seed: int = 0,
) -> nn.Module:
    """Conv(1->c1,3x3,pad1)-ReLU-MaxPool2 -> Conv(c1->c2,3x3,pad1)-ReLU-MaxPool2 -> Flatten -> Linear(4*c2, 10).

    Input (N, 1, 8, 8) NCHW.  Flatten is in NCHW order (c, h, w).
    """
    c1, c2 = channels
    torch.manual_seed(seed)
    return nn.Sequential(
        QuantIdentity(act_quant=DigitsInputQuant, return_quant_tensor=True),
        QuantConv2d(1, c1, 3, padding=1, **_wkw(weight_bit_width)),
        _act(act_bit_width),
        nn.MaxPool2d(2),
        QuantConv2d(c1, c2, 3, padding=1, **_wkw(weight_bit_width)),
        _act(act_bit_width),
        nn.MaxPool2d(2),
        nn.Flatten(),
        QuantLinear(c2 * 2 * 2, 10, **_wkw(weight_bit_width)),
    )


# --------------------------------------------------------------------------- training


def _logits(out) -> torch.Tensor:
    # A QuantTensor exposes .value; a plain tensor is returned as is.
    return getattr(out, "value", out)


def train(
    model: nn.Module,
    data,
    epochs: int = 30,
    seed: int = 0,
    lr: float = 1e-2,
    batch_size: int = 64,
    verbose: bool = True,
    num_threads: int = 1,
) -> nn.Module:
    """Adam + cross-entropy, seeded and deterministic.  ``data`` = (x_train, y_train, ...)
    (extra entries, e.g. the test split, are used only for the per-epoch print).

    ``num_threads`` defaults to 1: these models are tiny, and on a shared 2-core
    machine 2 intra-op threads were measured 5-20x *slower* under contention
    (30 epochs CNN: 4 s with 1 thread, up to 120 s with 2), never faster when idle.
    Global torch settings (threads, deterministic mode) are restored on return."""
    from qdeploy.compiler.quantization.qat import fine_tune

    def report(epoch, mean_loss):
        if verbose:
            msg = f"epoch {epoch + 1:3d}/{epochs}  loss {mean_loss:.4f}"
            msg += f"  train acc {accuracy(model, data[0], data[1]):.4f}"
            if len(data) >= 4:
                msg += f"  test acc {accuracy(model, data[2], data[3]):.4f}"
            print(msg, flush=True)

    # qdeploy's one training loop (Adam + cosine, seeded, deterministic, threads restored)
    return fine_tune(model, data[0], data[1], epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                     num_threads=num_threads, on_epoch=report)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Float logits (eval mode) as a float32 numpy array."""
    was_training = model.training
    model.eval()
    out = _logits(model(torch.from_numpy(np.asarray(x, dtype=np.float32)))).numpy()
    model.train(was_training)
    return out.astype(np.float32)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict(model, x).argmax(axis=1) == np.asarray(y)).mean())


# --------------------------------------------------------------------------- export / checks


def export(model: nn.Module, example_input, path, clean: bool = True) -> Path:
    """Export to QONNX (eval mode) at ``path``; returns the path.

    ``brevitas.export.export_qonnx`` goes through torch's dynamo exporter here
    (torch >= 2.9): it writes the weights to a side file ``<path>.data``
    (external data) and lists every initializer as a graph input as well.  We
    re-save the model self-contained (no ``.data`` file) and, with ``clean``
    (default), run ``qonnx.util.cleanup.cleanup_model`` first (shape inference,
    static graph inputs removed, readable unique names; Quant nodes preserved).
    """
    from qdeploy.compiler.frontends.brevitas import export_brevitas_qonnx

    return export_brevitas_qonnx(model, example_input, path, clean=clean)


def is_power_of_two(v) -> bool:
    v = np.asarray(v, dtype=np.float64).ravel()
    if v.size == 0 or np.any(v <= 0) or not np.all(np.isfinite(v)):
        return False
    m, _ = np.frexp(v)
    return bool(np.all(m == 0.5))


def quant_scales(model_or_path) -> list[dict]:
    """One dict per Quant node: name, input (what it quantizes), scale, zeropt,
    bitwidth, signed, narrow, and whether the quantized tensor is an initializer."""
    import onnx
    from onnx import numpy_helper

    m = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(str(model_or_path))
    g = m.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:  # Constant nodes, in case the exporter used them
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    producers = {o: n for n in g.node for o in n.output}
    out = []
    for n in g.node:
        if n.op_type not in ("Quant", "BipolarQuant", "Trunc"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        src = n.input[0]
        src_is_const = src in consts or (
            src in producers and producers[src].op_type in ("Constant", "Identity")
        )
        out.append(
            dict(
                name=n.name,
                op=n.op_type,
                input=src,
                const_input=src_is_const,
                consumers=[c.op_type for c in g.node if n.output[0] in c.input],
                scale=consts.get(n.input[1]) if len(n.input) > 1 else None,
                zeropt=consts.get(n.input[2]) if len(n.input) > 2 else None,
                bitwidth=consts.get(n.input[3]) if len(n.input) > 3 else None,
                signed=attrs.get("signed"),
                narrow=attrs.get("narrow"),
            )
        )
    return out


def qonnx_forward(path, x: np.ndarray) -> np.ndarray:
    """Run an exported QONNX file with qonnx's ``execute_onnx`` (after cleanup)."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.util.cleanup import cleanup_model

    mw = cleanup_model(ModelWrapper(str(path)))
    iname = mw.graph.input[0].name
    oname = mw.graph.output[0].name
    x = np.asarray(x, dtype=np.float32)
    # The exported graph has a fixed batch dimension: run one image at a time.
    bs = mw.get_tensor_shape(iname)[0]
    outs = []
    for i in range(0, x.shape[0], bs):
        outs.append(execute_onnx(mw, {iname: x[i : i + bs]})[oname])
    return np.concatenate(outs, axis=0).astype(np.float32)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="build/digits", help="directory for the .onnx files")
    ap.add_argument("--mlp-epochs", type=int, default=30)
    ap.add_argument("--cnn-epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    results = {}
    for name, make, images, epochs in (
        ("mlp", make_mlp, False, args.mlp_epochs),
        ("cnn", make_cnn, True, args.cnn_epochs),
    ):
        data = load_data(args.seed, images=images)
        model = make(seed=args.seed)
        t0 = time.perf_counter()
        train(model, data, epochs=epochs, seed=args.seed)
        dt = time.perf_counter() - t0
        acc = accuracy(model, data[2], data[3])
        path = export(model, data[2][:1], out / f"digits_{name}.onnx")
        scales = quant_scales(path)
        pot = all(is_power_of_two(q["scale"]) for q in scales)
        results[name] = (dt, acc)
        print(f"[{name}] train {dt:.1f}s  test acc {acc:.4f}  -> {path}  "
              f"({len(scales)} Quant nodes, all scales power of two: {pot})")
    print("total training time: %.1fs" % sum(r[0] for r in results.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
