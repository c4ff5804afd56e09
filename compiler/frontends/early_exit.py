"""Early-exit models on the PyTorch/Brevitas side (the model side).

* :class:`EarlyExitNet` -- a backbone cut into segments with one exit head after each cut; its
  ``forward`` returns a **list** of logits, one per exit, the last one being the backbone's own
  output (BranchyNet, Teerapittayanon et al., ICPR 2016, arXiv 1709.01686).
* :func:`attach_exits` -- build one from an ``nn.Sequential`` backbone and heads at named points.
* :func:`export_early_exit` -- one QONNX file with one graph output per exit (``exit0``,
  ``exit1``, ...), which :func:`qdeploy.compiler.frontends.import_onnx` reads as a
  multi-output IR graph; :func:`qdeploy.passes.early_exit.split_exits` then cuts it into stages.

Training (BranchyNet's joint training, :func:`~qdeploy.compiler.quantization.branchy.train_joint`)
and float per-exit predictions are in :mod:`qdeploy.compiler.quantization.branchy`.

Quantization-aware: the heads are ordinary (Brevitas) modules chosen by the caller, so they are
quantized like the rest when built from ``QuantLinear``/``QuantConv2d`` with power-of-two
quantizers (see ``examples/early_exit/model.py``).  Exits that return a Brevitas ``QuantTensor``
are unwrapped to plain tensors (:func:`plain_tensor`) for the export and the loss.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ModelImportError

__all__ = ["EarlyExitNet", "attach_exits", "plain_tensor", "export_early_exit"]


def plain_tensor(t):
    """The plain tensor of an exit's output: a Brevitas ``QuantTensor``'s ``value``, any other
    value unchanged."""
    return getattr(t, "value", t)


class EarlyExitNet(nn.Module):
    """``segments[k]`` then ``heads[k]`` gives exit k; the last segment's output is the final exit
    (its head may be ``nn.Identity``).  ``forward(x) -> list`` of per-exit logits (tensors or
    Brevitas QuantTensors); ``return_quant`` False (default in training helpers) unwraps them."""

    def __init__(self, segments, heads, exit_names=None):
        super().__init__()
        if len(segments) != len(heads) or not segments:
            raise ValueError(f"need one head per segment, got {len(segments)} segments and {len(heads)} heads")
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList(heads)
        self.exit_names = list(exit_names or [f"exit{k}" for k in range(len(heads))])

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    def forward(self, x):
        outs = []
        h = x
        for seg, head in zip(self.segments, self.heads):
            h = seg(h)
            outs.append(head(h))
        return outs


def attach_exits(backbone: nn.Sequential, heads: dict) -> EarlyExitNet:
    """Attach exit heads after named children of ``backbone``.

    Args:
        backbone: an ``nn.Sequential`` whose output is the final exit's logits.
        heads: ``{child name (or index as str/int): head module}``; each head reads the output
            of that child.  The final exit (the backbone output) is added automatically.
    Raises:
        ValueError: a point that is not a child of the backbone, or the last child.
    """
    names = [n for n, _ in backbone.named_children()]
    children = list(backbone.children())
    cuts = []
    for point, head in heads.items():
        key = str(point)
        if key not in names:
            raise ValueError(f"exit point {point!r} is not a child of the backbone; children: {', '.join(names)}")
        i = names.index(key)
        if i == len(names) - 1:
            raise ValueError(f"exit point {point!r} is the backbone's last layer: that exit is the final output")
        cuts.append((i, key, head))
    cuts.sort(key=lambda c: c[0])
    segments, hs, exit_names, start = [], [], [], 0
    for i, key, head in cuts:
        segments.append(nn.Sequential(*children[start:i + 1]))
        hs.append(head)
        exit_names.append(f"exit_{key}")
        start = i + 1
    segments.append(nn.Sequential(*children[start:]))
    hs.append(nn.Identity())
    exit_names.append("exit_final")
    return EarlyExitNet(segments, hs, exit_names)


class _Unwrap(nn.Module):
    """Export wrapper: returns a tuple of plain tensors (one ONNX output per exit)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return tuple(plain_tensor(o) for o in self.model(x))


def export_early_exit(model: nn.Module, example_input, path, exit_names=None) -> Path:
    """Export a list-returning early-exit model to ONE self-contained, cleaned QONNX file whose
    graph outputs are the exits in order, renamed ``exit_names`` (default
    ``model.exit_names`` or ``exit0..``).

    Raises:
        ModelImportError: the Brevitas export failed or the exported graph has a different number of
            outputs than the model has exits.
    """
    from .brevitas import export_brevitas_qonnx

    if isinstance(example_input, np.ndarray):
        example_input = torch.from_numpy(example_input.astype(np.float32))
    model.eval()
    with torch.no_grad():
        n_exits = len(model(example_input))

    def name_exits(proto):
        outs = list(proto.graph.output)
        if len(outs) != n_exits:
            raise ModelImportError(f"exported graph has {len(outs)} outputs but the model has {n_exits} exits")
        names = list(exit_names or getattr(model, "exit_names", None) or [f"exit{k}" for k in range(n_exits)])
        rename = {o.name: nm for o, nm in zip(outs, names)}
        for node in proto.graph.node:
            node.output[:] = [rename.get(o, o) for o in node.output]
            node.input[:] = [rename.get(i, i) for i in node.input]
        for o in proto.graph.output:
            o.name = rename[o.name]
        for vi in proto.graph.value_info:
            if vi.name in rename:
                vi.name = rename[vi.name]
        return proto

    return export_brevitas_qonnx(_Unwrap(model), example_input, path, postprocess=name_exits)
