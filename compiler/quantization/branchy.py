"""BranchyNet joint training of early-exit models (Teerapittayanon et al., ICPR 2016,
arXiv 1709.01686) and their float per-exit predictions.

The model side (:class:`~qdeploy.compiler.frontends.early_exit.EarlyExitNet`,
:func:`~qdeploy.compiler.frontends.early_exit.attach_exits`) and the QONNX export live in
:mod:`qdeploy.compiler.frontends.early_exit`; training reuses :func:`.qat.fine_tune` with a
weighted sum of per-exit cross-entropy losses.  Exits that return a Brevitas ``QuantTensor``
are unwrapped to plain tensors for the loss.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..frontends.early_exit import plain_tensor
from .qat import fine_tune

__all__ = ["train_joint", "predict_exits"]


def train_joint(model: nn.Module, data, weights=None, epochs: int = 30, seed: int = 0, lr: float = 1e-2,
                batch_size: int = 64, verbose: bool = False, num_threads: int = 1) -> nn.Module:
    """BranchyNet joint training: Adam + cosine schedule on ``sum_k weights[k] * CE(exit_k, y)``.

    ``model(x)`` must return a list/tuple of logits (one per exit).  ``data = (x_train, y_train,
    ...)``; ``weights`` default to all ones.  Seeded and deterministic (single thread by default,
    global torch settings restored on return).  Returns ``model`` (trained in place, left in eval
    mode).

    Raises:
        ValueError: the model does not return a list/tuple of per-exit logits.
    """
    ce = nn.CrossEntropyLoss()

    def joint_loss(outs, yb):
        if not isinstance(outs, (list, tuple)):
            raise ValueError("train_joint needs a model returning a list of per-exit logits")
        w = weights if weights is not None else [1.0] * len(outs)
        return sum(float(wk) * ce(plain_tensor(o), yb) for wk, o in zip(w, outs))

    def report(epoch, mean_loss):
        if verbose:
            print(f"epoch {epoch + 1:3d}/{epochs}  joint loss {mean_loss:.4f}", flush=True)

    fine_tune(model, data[0], data[1], epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
              num_threads=num_threads, loss_fn=joint_loss, on_epoch=report)
    model.eval()
    return model


@torch.no_grad()
def predict_exits(model: nn.Module, x) -> list[np.ndarray]:
    """Float logits of every exit (eval mode), float32 arrays of shape (N, classes), one per exit."""
    was = model.training
    model.eval()
    outs = model(torch.from_numpy(np.asarray(x, dtype=np.float32)))
    model.train(was)
    return [plain_tensor(o).numpy().astype(np.float32) for o in outs]
