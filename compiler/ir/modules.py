"""The user's module names on IR nodes (``graph.meta["modules"]``: ``{node name: module name}``,
filled by the ONNX importer from torch's export metadata, :mod:`qdeploy.compiler.frontends.torch_names`)
and per-layer settings keyed by them.

Per-layer settings (e.g. hls4ml's ``reuse_factor: {fc1: 4, default: 1}``) may name a layer by its
IR node name or by the PyTorch/Brevitas module it came from, as hls4ml's ``LayerName`` config
names layers by the source model's names.  :func:`node_keyed` turns such a mapping into one keyed by
IR node names only, so every consumer (emit, estimate, search) sees the same keys.
"""
from __future__ import annotations

from typing import Iterable, Mapping

__all__ = ["module_of", "node_keyed"]


def module_of(graph, node_name: str) -> str | None:
    """The module name recorded for IR node ``node_name`` of ``graph``, or None."""
    return (graph.meta.get("modules") or {}).get(node_name)


def node_keyed(mapping, graph, nodes: Iterable[str] | None = None, reserved: Iterable[str] = ("default",)):
    """``mapping`` with module-name keys replaced by the IR node names of that module.

    Args:
        mapping: a per-layer setting (a dict; anything else is returned unchanged).
        graph: the IR graph (its ``meta["modules"]``).
        nodes: the node names the setting applies to (e.g. the Dense/Conv nodes); default all.
        reserved: keys kept as they are (``default``).
    Returns:
        a new dict: node-name keys and reserved keys as given; a key that is no node name but a
        module name becomes one entry per node of that module among ``nodes`` (a node named
        explicitly keeps its own value); other keys are kept, so the caller's check of unknown
        keys still names them.
    """
    if not isinstance(mapping, Mapping):
        return mapping
    names = set(nodes) if nodes is not None else {n.name for n in graph.nodes}
    mods = graph.meta.get("modules") or {}
    out = {}
    for k, v in mapping.items():
        if k in reserved or k in names:
            out[k] = v
            continue
        hit = [n for n in sorted(names) if mods.get(n) == k]
        if not hit:
            out[k] = v
        for n in hit:
            if n not in mapping:
                out[n] = v
    return out
