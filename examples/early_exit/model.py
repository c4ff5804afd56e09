"""BranchyNet-style quantized CNN on the bundled digits data (example, model half).

Backbone (Brevitas, power-of-two quantizers from ``examples/digits/models.py``)::

    in(1x8x8) -> Conv3x3(c1)-ReLU-MaxPool2 -[exit 0: Flatten-Linear(16*c1 -> 10)]
              -> Conv3x3(c2)-ReLU-MaxPool2 -[exit 1: Flatten-Linear(4*c2 -> 10)]
              -> Conv3x3(c3)-ReLU -> Flatten -> Linear(4*c3 -> 10)   (final exit)

The heads are quantized like the backbone (6-bit PoT weights, Int16 biases, reading 6-bit PoT
activations), so every exit's logits are exact fixed-point values.  Load this file by path.
"""
from __future__ import annotations

import importlib.util
from collections import OrderedDict
from pathlib import Path

from torch import nn

from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear

from qdeploy.compiler.frontends.early_exit import attach_exits

_spec = importlib.util.spec_from_file_location(
    "digits_models", Path(__file__).resolve().parent.parent / "digits" / "models.py")
digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(digits)

load_data = digits.load_data


def make_branchy_cnn(channels=(8, 16, 32), weight_bit_width: int = 6, act_bit_width: int = 6, seed: int = 0):
    """The early-exit CNN: an :class:`~qdeploy.compiler.frontends.early_exit.EarlyExitNet` with
    exits after ``pool1``, ``pool2`` and the final layer (exit names ``exit_pool1``,
    ``exit_pool2``, ``exit_final``)."""
    import torch
    c1, c2, c3 = channels
    torch.manual_seed(seed)
    wkw = digits._wkw(weight_bit_width)
    backbone = nn.Sequential(OrderedDict([
        ("inq", QuantIdentity(act_quant=digits.DigitsInputQuant, return_quant_tensor=True)),
        ("conv1", QuantConv2d(1, c1, 3, padding=1, **wkw)),
        ("relu1", digits._act(act_bit_width)),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", QuantConv2d(c1, c2, 3, padding=1, **wkw)),
        ("relu2", digits._act(act_bit_width)),
        ("pool2", nn.MaxPool2d(2)),
        ("conv3", QuantConv2d(c2, c3, 3, padding=1, **wkw)),
        ("relu3", digits._act(act_bit_width)),
        ("flatten", nn.Flatten()),
        ("fc", QuantLinear(4 * c3, 10, **wkw)),
    ]))
    heads = {
        "pool1": nn.Sequential(nn.Flatten(), QuantLinear(16 * c1, 10, **wkw)),
        "pool2": nn.Sequential(nn.Flatten(), QuantLinear(4 * c2, 10, **wkw)),
    }
    return attach_exits(backbone, heads)


def split_validation(x_tr, y_tr, frac: float = 0.2, seed: int = 0):
    """Hold out a stratified ``frac`` of the training split for threshold calibration."""
    from sklearn.model_selection import train_test_split
    return train_test_split(x_tr, y_tr, test_size=frac, random_state=seed, stratify=y_tr)
