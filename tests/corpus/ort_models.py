"""onnxruntime ``quantize_static`` family of the corpus: float PyTorch models trained briefly on
the corpus data, exported with ``torch.onnx.export`` and quantized to the QDQ format with int8
per-channel weights, calibrated on training data through a ``CalibrationDataReader``.

Source: onnxruntime ``onnxruntime.quantization.quantize_static`` (docs: "Quantize ONNX models",
static quantization, QDQ format); the quantized file (run by onnxruntime) is the source model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from .train import atomic_save, cache_dir, cache_key, fit


def float_mlp() -> nn.Module:
    """Flatten -> Linear(64, 32) -> ReLU -> Linear(32, 10) (digits)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def float_cnn2d() -> nn.Module:
    """Conv3x3(1->8) -> ReLU -> MaxPool2 -> Conv3x3(8->16) -> ReLU -> MaxPool2 -> Linear(64, 10) (digits)."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10))


def float_cnn2d_bn_gap() -> nn.Module:
    """Conv -> BatchNorm -> ReLU -> Conv -> ReLU -> GlobalAvgPool -> Linear (digits; BN folded at export)."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def float_chw_trap() -> nn.Module:
    """C == H == W == 8: Conv3x3(1->8, pad 1) -> ReLU -> Flatten -> Linear(512, 10) (digits)."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10))


def float_cnn1d() -> nn.Module:
    """Conv1d(1->8, k5, s2) -> ReLU -> Conv1d(8->16, k3, s2) -> ReLU -> MaxPool1d(2) -> Linear(80, 10) (signals)."""
    return nn.Sequential(nn.Conv1d(1, 8, 5, stride=2, padding=2), nn.ReLU(), nn.Conv1d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.MaxPool1d(2), nn.Flatten(), nn.Linear(80, 10))


class _Reader:
    """A ``CalibrationDataReader``: one calibration sample per call, then None."""

    def __init__(self, name: str, x: np.ndarray):
        self._it = iter([{name: x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self._it, None)


def quantized(name: str, make, x: np.ndarray, y: np.ndarray, activation: str = "QUInt8",
              steps: int = 80, calib: int = 128) -> Path:
    """Train ``make()`` (float) on ``(x, y)``, export it to ONNX (opset 17, batch 1) and quantize
    it with onnxruntime ``quantize_static`` (QDQ, ``per_channel=True``, int8 weights, ``activation``
    ``QUInt8`` or ``QInt8`` activations, MinMax calibration on ``x[:calib]``).

    Returns:
        the path of the quantized ``.onnx`` file in the corpus cache (reused when present).
    """
    import torch
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    path = cache_dir() / f"{name}-{cache_key(name, activation, steps, calib)}.onnx"
    if path.is_file():
        return path
    model = fit(make(), x, y, steps)
    fp = path.with_name(path.stem + ".float.onnx")
    with torch.no_grad():
        torch.onnx.export(model, (torch.from_numpy(x[:1]),), str(fp), input_names=["x"], output_names=["y"],
                          opset_version=17, dynamo=False)

    def write(p):
        quantize_static(str(fp), str(p), _Reader("x", x[:calib]), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=getattr(QuantType, activation),
                        calibrate_method=CalibrationMethod.MinMax)
    atomic_save(write, path)
    fp.unlink(missing_ok=True)
    return path


def run_ort(path, x: np.ndarray) -> list[np.ndarray]:
    """Run the ONNX file at ``path`` with onnxruntime on ``x`` one sample at a time (the
    export has batch 1); returns the outputs, each ``(n, ...)``."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i:i + 1]}) for i in range(len(x))]
    return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]
