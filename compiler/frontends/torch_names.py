"""PyTorch module names of ONNX nodes, read from the metadata the torch exporter writes.

torch's ONNX exporter (the dynamo exporter that Brevitas' ``export_qonnx`` uses with torch >= 2.9)
records on every node the module scopes it was traced in: ``pkg.torch.onnx.name_scopes``
(e.g. ``['', 'fc1', 'fc1.weight_quant', ...]``) and the class of each scope,
``pkg.torch.onnx.class_hierarchy`` (``['...Sequential', 'brevitas.nn.quant_linear.QuantLinear',
'brevitas.proxy...', ...]``); see https://pytorch.org/docs/stable/onnx_dynamo.html (node
metadata).  The *module name* of a node is the deepest scope that is still a user-visible module:
the descent stops at Brevitas' internals (``brevitas.proxy``, ``brevitas.core``,
``brevitas.export``, ``brevitas.inject``), so a QuantLinear's weight quantizer, its matmul and
its bias add all belong to ``fc1``, and a QuantReLU's relu to the QuantReLU.  Files without the
metadata (other exporters, hand-built ONNX) give no names.
"""
from __future__ import annotations

import ast

__all__ = ["module_names"]

_INTERNAL = ("brevitas.proxy", "brevitas.core", "brevitas.export", "brevitas.inject", "onnx_symbolic",
             "aten.", "prims.")


def _node_module(scopes: list, classes: list) -> str | None:
    name = None
    for i, s in enumerate(scopes):
        if i == 0:
            continue  # the root module ('')
        cls = classes[i] if i < len(classes) else ""
        if i == len(scopes) - 1 and (not cls or cls.startswith(_INTERNAL)):
            break  # the op itself
        if cls.startswith(_INTERNAL):
            break
        name = s
    return name or None


def module_names(proto) -> dict[str, str]:
    """``{onnx node name: module name}`` for the nodes of ``proto`` (an ``onnx.ModelProto``) that
    carry torch's scope metadata (module docstring); nodes without it are left out."""
    out = {}
    for n in proto.graph.node:
        meta = {p.key: p.value for p in n.metadata_props}
        raw = meta.get("pkg.torch.onnx.name_scopes")
        if not raw or not n.name:
            continue
        try:
            scopes = ast.literal_eval(raw)
            classes = ast.literal_eval(meta.get("pkg.torch.onnx.class_hierarchy", "[]"))
        except (ValueError, SyntaxError):
            continue
        if not isinstance(scopes, list) or not isinstance(classes, list):
            continue
        m = _node_module([str(s) for s in scopes], [str(c) for c in classes])
        if m:
            out[n.name] = m
    return out
