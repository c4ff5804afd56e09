"""MNIST-1D mixed-precision search recipes: an MLP, a 1-D CNN and a residual 1-D CNN.

MNIST-1D (Greydanus & Kobak, "Scaling down deep learning with MNIST-1D", ICML 2024; pip package
``mnist1d``, https://github.com/greydanus/mnist1d): ten 1-D digit templates padded, translated,
scaled, sheared and noised into 40-sample signals.  ``mnist1d.data.make_dataset`` with the package's
default arguments (``get_dataset_args()``: 5,000 samples, seed 42, ``train_split`` 0.8) generates
the standard 4,000 / 1,000 train / test split procedurally; nothing is downloaded (the package's
``get_dataset`` download path is not used).  Published float test accuracies (the package README
table): logistic regression 32%, MLP 68%, CNN 94%, GRU 91%, human expert 96%.

The last 500 training samples are the validation split (settings are chosen on it); the 1,000
test samples are only reported.  Inputs (zero mean, unit standard deviation over the set, range
-5.5 .. 4.6) are rounded onto the 8-bit signed fixed-point grid of step 2**-4 (range -8 .. 7.94,
no clipping) that the QAT models' input quantizer uses, so the float and quantized models see the
same inputs.

Recipes for ``qdeploy search`` (``module:function``)::

    qdeploy search examples/mnist1d/search_recipe.py:recipe_rescnn -o runs/m1d/rescnn \\
        --budget bops=uniform:3 --budget bops=uniform:4
"""
from __future__ import annotations

import torch
import numpy as np
from torch import nn

from qdeploy.compiler.quantization import qat

INPUT = {"bits": 8, "scale": 2.0 ** -4, "signed": True}
N_VAL = 500


def load_data(n_train: int | None = None, n_test: int | None = None, channel: bool = False):
    """``(x_fit, y_fit, x_val, y_val, x_test, y_test)``: MNIST-1D's standard split (module docstring),
    inputs float32 on the ``INPUT`` grid, shape (N, 40), or (N, 1, 40) with ``channel``.
    ``n_train`` / ``n_test`` keep the first samples of the fit / test splits (for quick tests)."""
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())  # procedural, seed 42: the standard 4,000 / 1,000 split
    q = 2.0 ** -4

    def grid(x):
        x = np.clip(np.round(np.asarray(x) / q), -128, 127) * q
        x = x.astype(np.float32)
        return x[:, None, :] if channel else x

    x, y = grid(d["x"]), d["y"].astype(np.int64)
    x_te, y_te = grid(d["x_test"]), d["y_test"].astype(np.int64)
    x_fit, y_fit, x_val, y_val = x[:-N_VAL], y[:-N_VAL], x[-N_VAL:], y[-N_VAL:]
    if n_train is not None:
        x_fit, y_fit = x_fit[:n_train], y_fit[:n_train]
    if n_test is not None:
        x_te, y_te = x_te[:n_test], y_te[:n_test]
    return x_fit, y_fit, x_val, y_val, x_te, y_te


def float_mlp(hidden: int = 100, seed: int = 0) -> nn.Sequential:
    """40-100-100-10 ReLU MLP (the MNIST-1D paper's MLP size)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def float_cnn(channels: int = 25, seed: int = 0) -> nn.Sequential:
    """Three stride-2 Conv1d (kernel 5, 3, 3; ``channels`` each) + ReLU, then a Linear: the MNIST-1D
    paper's ConvBase.  Input (N, 1, 40); lengths 40 -> 19 -> 10 -> 5."""
    c = channels
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv1d(1, c, 5, stride=2, padding=1), nn.ReLU(),
                         nn.Conv1d(c, c, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv1d(c, c, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(c * 5, 10))


class ResCNN(nn.Module):
    """Residual 1-D CNN: stem Conv(1->c, k5, stride 2) -> ReLU; block 1 (identity shortcut):
    Conv(c->c) -> ReLU -> Conv(c->c), add, ReLU; block 2 (projection shortcut, stride 2):
    Conv(c->2c, stride 2) -> ReLU -> Conv(2c->2c), plus a 1x1 stride-2 Conv(c->2c) of the block input,
    add, ReLU; Flatten; Linear(2c*10 -> 10).  Input (N, 1, 40); lengths 40 -> 20 -> 20 -> 10."""

    def __init__(self, channels: int = 16, seed: int = 0):
        super().__init__()
        c = channels
        torch.manual_seed(seed)
        self.stem = nn.Conv1d(1, c, 5, stride=2, padding=2)
        self.b1c1 = nn.Conv1d(c, c, 3, padding=1)
        self.b1c2 = nn.Conv1d(c, c, 3, padding=1)
        self.b2c1 = nn.Conv1d(c, 2 * c, 3, stride=2, padding=1)
        self.b2c2 = nn.Conv1d(2 * c, 2 * c, 3, padding=1)
        self.b2proj = nn.Conv1d(c, 2 * c, 1, stride=2)
        self.fc = nn.Linear(2 * c * 10, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.b1c2(torch.relu(self.b1c1(h))))
        h = torch.relu(self.b2proj(h) + self.b2c2(torch.relu(self.b2c1(h))))
        return self.fc(torch.flatten(h, 1))


# float training: Adam + cosine, batch 100; epochs and lr chosen on the validation split among
# {30, 100, 200} x {1e-2, 3e-3} (val/test accuracy at these settings: MLP 0.664/0.656,
# CNN 0.898/0.895, residual CNN 0.940/0.952; published MLP 68%, CNN 94%)
FLOAT_TRAIN = {"mlp": {"epochs": 200, "lr": 1e-2}, "cnn": {"epochs": 200, "lr": 1e-2},
               "rescnn": {"epochs": 200, "lr": 1e-2}}
QAT = {"epochs": 15, "lr": 2e-3, "batch_size": 100}


def _recipe(kind: str, seed: int = 0, epochs: int | None = None, qat_epochs: int | None = None,
            n_train: int | None = None, n_test: int | None = None, width: int | None = None) -> dict:
    x_fit, y_fit, x_val, y_val, x_te, y_te = load_data(n_train, n_test, channel=kind != "mlp")
    if kind == "mlp":
        model = float_mlp(seed=seed, **({"hidden": width} if width else {}))
    elif kind == "cnn":
        model = float_cnn(seed=seed, **({"channels": width} if width else {}))
    else:
        model = ResCNN(seed=seed, **({"channels": width} if width else {}))
    ft = FLOAT_TRAIN[kind]
    qat.fine_tune(model, x_fit, y_fit, epochs=ft["epochs"] if epochs is None else epochs, lr=ft["lr"],
                  batch_size=100, seed=seed)
    return {"name": f"mnist1d_{kind}", "model": model, "train": (x_fit, y_fit), "val": (x_val, y_val),
            "test": (x_te, y_te), "input": INPUT, "trace_samples": min(1000, len(x_fit)),
            "qat": {**QAT, **({"epochs": qat_epochs} if qat_epochs is not None else {})}}


def recipe_mlp(seed: int = 0, **kw) -> dict:
    """Float 40-100-100-10 MLP trained on MNIST-1D (``seed``: initialization and batch order; keyword
    arguments ``epochs``, ``qat_epochs``, ``n_train``, ``n_test``, ``width`` shrink it for tests)."""
    return _recipe("mlp", seed=seed, **kw)


def recipe_cnn(seed: int = 0, **kw) -> dict:
    """Float three-conv 1-D CNN (25 channels) trained on MNIST-1D (arguments as :func:`recipe_mlp`)."""
    return _recipe("cnn", seed=seed, **kw)


def recipe_rescnn(seed: int = 0, **kw) -> dict:
    """Float residual 1-D CNN (:class:`ResCNN`, 16/32 channels) trained on MNIST-1D (arguments as
    :func:`recipe_mlp`)."""
    return _recipe("rescnn", seed=seed, **kw)


recipe = recipe_rescnn
