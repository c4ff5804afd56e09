"""QONNX / ONNX importer: an ONNX file (or ``onnx.ModelProto``) -> qdeploy IR :class:`Graph`.

Pipeline
--------
1. Load (file path, bytes or ModelProto).  Unparsable / truncated files raise
   :class:`ModelImportError` with a one-line reason.
2. Checks on the raw model: every node has a known domain and op (else
   :class:`UnsupportedError` naming the node); graph inputs have static shapes except the first
   (batch) dimension (else :class:`UnsupportedError` naming the input).
3. QONNX cleanup (the steps of ``qonnx.util.cleanup.cleanup_model`` without its renaming, so error
   messages name the nodes of the user's file): shape inference, constant folding with
   ``Quant``/``BipolarQuant`` preserved (the TFC ``Shape/Gather/Unsqueeze/Concat`` flatten subgraph
   folds into a constant ``Reshape``), unused-tensor removal.
4. Conversion node by node.  ONNX is NCHW, the IR channels-last: each ONNX tensor is carried as an IR
   value plus a per-sample axis permutation ``perm`` with ``ir = onnx_sample.transpose(perm)``.
   Layout-sensitive ops (Conv, pools) ask for the channels-last layout, Flatten/Reshape for the ONNX
   order (a ``Transpose`` is inserted only where the element order really changes, and a flatten
   that feeds a ``Dense`` folds the permutation into the weight rows instead).
5. A small clean-up (merging Reshape chains, removing no-op Reshape/Transpose), then type inference
   and verification by :class:`GraphBuilder`.

Shapes in the IR exclude the batch dimension.  ``graph.meta["input_perms"][name]`` is the
batch-first permutation from the user's ONNX input layout to the IR layout (``[0, 2, 3, 1]`` for
NCHW images) and ``graph.meta["output_perms"][name]`` the permutation from the IR output layout
back to the ONNX layout (``[0, 3, 1, 2]``).

Modules: :mod:`.onnx_load` (steps 1-3), :mod:`.onnx_convert` (the converter, steps 4-5) and
:mod:`.onnx_ops` (the table of per-ONNX-op handlers).
"""
from __future__ import annotations

import os
from pathlib import Path

import onnx

from ..ir.graph import Graph
from .onnx_convert import OnnxConverter
from .onnx_load import load_proto, prepare
from .onnx_ops import importer_for
from .torch_names import module_names


def import_onnx(model: "str | os.PathLike | bytes | onnx.ModelProto", *, name: str | None = None) -> Graph:
    """Import a QONNX/ONNX model into the IR.

    Args:
        model: path to an ``.onnx`` file, its bytes, or an ``onnx.ModelProto`` (not modified).
        name: graph name (default: the ONNX graph name, else the file stem).
    Returns:
        A verified :class:`Graph`; activations are channels-last with the batch dim dropped
        (ONNX ``[N, C, H, W]`` -> IR ``(H, W, C)``; ``[N, C, L]`` -> ``(L, C)``; ``[N, K]`` -> ``(K,)``).
        ``meta``: ``source``, ``frontend="qonnx"``, ``input_perms``, ``output_perms``, ``opset``,
        and ``modules`` (``{node name: PyTorch module name}``) when the file carries torch's
        export metadata (:mod:`.torch_names`).
    Raises:
        ModelImportError: missing, malformed or truncated file; QONNX cleanup failure.
        UnsupportedError: an op, attribute or quantizer the IR cannot express, or a dynamic
            non-batch input dimension (the message names the ONNX node or input).
        VerifyError: the converted graph is inconsistent (names the node).
    """
    proto, source = load_proto(model)
    gname = name or proto.graph.name or (Path(source).stem if source != "<ModelProto>" else "model")
    modules = module_names(proto)  # before the clean-up, which may drop node metadata
    wrapper = prepare(proto)
    g = OnnxConverter(wrapper, gname, source, importer_for).run()
    mods = {n.name: modules[n.name] for n in g.nodes if n.name in modules}
    return g.with_(meta={**g.meta, "modules": mods}) if mods else g
