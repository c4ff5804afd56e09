"""`CompiledModel`: load any compiled artifact directory and run it."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..compiler.errors import QDeployError
from ..compiler.ir.graph import Graph
from ..compiler.ir.types import FixedType
from ..compiler.reference import prepare_feeds
from .artifact import ArtifactError, read_manifest
from .layout import Layout, channels_last_mode, declared_layouts, from_ir, graph_layouts, to_ir
from .predictor import Predictor


def to_ir_layout(graph: Graph, name: str, x: np.ndarray, channels_last: bool = False) -> np.ndarray:
    """A user array of graph input ``name`` (batch first, in the source model's layout from
    ``graph.meta['input_perms']``, or channels-last with ``channels_last``) -> IR layout.  The
    layout is never inferred from the shape.

    Raises:
        QDeployError: a shape that does not match, stated in the user's layout.
    """
    ins, _ = graph_layouts(graph)
    return to_ir(name, x, graph.value(name).shape, ins[name], channels_last)


def from_ir_layout(graph: Graph, name: str, y: np.ndarray, channels_last: bool = False) -> np.ndarray:
    """Inverse of :func:`to_ir_layout` for graph output ``name`` (``graph.meta['output_perms']``)."""
    _, outs = graph_layouts(graph)
    return from_ir(y, outs[name], channels_last)


def user_feeds(graph: Graph, inputs, layout=None, layouts: dict[str, Layout] | None = None) -> dict[str, np.ndarray]:
    """User inputs -> runtime arrays of the IR graph inputs (int64 codes for fixed-point inputs).

    Args:
        inputs: one array, a list in input order or a dict by input name; batch first; real values.
        layout: ``None``/``"source"`` (the source model's layout), ``"channels-last"``, or the
            axis letters of either (see :func:`qdeploy.runtime.layout.channels_last_mode`).
        layouts: the inputs' declared layouts (default: from ``graph.meta``).
    Raises:
        QDeployError: wrong input count, a bad ``layout``, or a shape that does not match.
    """
    if isinstance(inputs, dict):
        named = dict(inputs)
    else:
        seq = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        named = dict(zip(graph.inputs, seq))
        if len(seq) != len(graph.inputs):
            raise QDeployError(f"model takes {len(graph.inputs)} input(s), got {len(seq)}", graph.name)
    layouts = layouts if layouts is not None else graph_layouts(graph)[0]
    cl = channels_last_mode(layout, layouts)
    named = {k: to_ir(k, v, graph.value(k).shape, layouts[k], cl) if k in layouts else np.asarray(v)
             for k, v in named.items()}
    return prepare_feeds(graph, named)


def user_outputs(graph: Graph, arrays: dict[str, np.ndarray], channels_last: bool = False,
                 layouts: dict[str, Layout] | None = None) -> list[np.ndarray]:
    """Runtime output arrays -> real values (float64 for fixed types, float32 otherwise) in the
    source layout (IR layout with ``channels_last``), in graph output order.

    Args:
        layouts: the outputs' declared layouts (default: from ``graph.meta``).
    """
    layouts = layouts if layouts is not None else graph_layouts(graph)[1]
    outs = []
    for o in graph.outputs:
        t = graph.value(o).dtype
        a = arrays[o]
        real = t.to_real(a) if isinstance(t, FixedType) else np.asarray(a, dtype=np.float32)
        outs.append(from_ir(real, layouts[o], channels_last))
    return outs


class CompiledModel:
    """A compiled artifact (any target) ready to run.

    ``CompiledModel.load(out_dir).predict(x)`` reads ``out_dir/manifest.json``, loads the IR
    (``out_dir/ir/model.json``) and the target's library through its backend, and runs it.

    Attributes:
        out_dir: the artifact directory.
        manifest: the parsed manifest (target, versions, config, inputs/outputs, hashes,
            exactness).
        graph: the compiled IR graph.
        input_layouts / output_layouts: the declared :class:`~qdeploy.runtime.layout.Layout`
            of each input / output by name (``manifest.json``'s ``layout`` fields).
    """

    def __init__(self, out_dir: Path, manifest: dict, graph: Graph, fn):
        self.out_dir = Path(out_dir)
        self.manifest = manifest
        self.graph = graph
        self._fn = fn
        self.input_layouts, self.output_layouts = declared_layouts(manifest, graph, str(self.out_dir))
        self._predictor = Predictor(graph, self.input_layouts, self.output_layouts, fn, self._predict_general)

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @classmethod
    def load(cls, out_dir) -> "CompiledModel":
        """Load an artifact directory.

        Raises:
            ArtifactError: missing/invalid manifest or IR files.
            QDeployError: an artifact that declares no layout for an input/output of rank >= 3
                and whose IR does not record one either.
        """
        from ..backends import get_backend

        out_dir = Path(out_dir)
        manifest = read_manifest(out_dir)
        try:
            graph = Graph.load(str(out_dir / "ir" / "model"))
        except (OSError, ValueError, KeyError) as e:
            raise ArtifactError(f"{out_dir}: unreadable artifact ({type(e).__name__}: {e})") from None
        backend = get_backend(manifest["target"])
        fn = backend.load(out_dir, manifest.get("backend", {}), graph)
        return cls(out_dir, manifest, graph, fn)

    @property
    def library_variant(self) -> str | None:
        """Which compiled library this process runs: for a TVM CPU artifact, the ``mcpu`` of the
        library loaded (the portable one, e.g. ``"x86-64"``, or the highest CPU variant this
        machine can run, e.g. ``"x86-64-v4"``; ``$QDEPLOY_TVM_VARIANT`` forces one); None for
        targets with a single library."""
        return getattr(self._fn, "variant", None)

    @property
    def predictor(self) -> Predictor:
        """The :class:`~qdeploy.runtime.predictor.Predictor` behind :meth:`predict` (its
        ``thin`` flag, and ``raw_call`` for measuring the overhead over the bare library call)."""
        return self._predictor

    def run_codes(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runtime arrays in (codes for fixed inputs, IR layout), runtime arrays out."""
        return self._fn(feeds)

    def predict(self, *inputs, layout=None):
        """Run the model on real-valued inputs, batch first.

        Args:
            inputs: one array per model input (or a single dict by input name).
            layout: ``None``/``"source"``: arrays in the layout the manifest declares (the source
                model's: ``NCHW``, ``NCL``, ``NC`` for ONNX and PyTorch models), outputs likewise;
                ``"channels-last"`` (or the IR letters, e.g. ``"NHWC"``): inputs and outputs in
                the IR's channels-last layout.  Never inferred from the shapes.
        Returns:
            the real-valued output (float64 for fixed-point outputs, float32 for float ones),
            or a list in graph output order when the model has several outputs.
        Raises:
            QDeployError: a bad ``layout`` or an input shape that does not match, stated in the
                user's layout (``expected (N, 4, 4, 4) in NCHW``).

        For backends with a positional library call (TVM) this takes the thin path of
        :class:`~qdeploy.runtime.predictor.Predictor` (the same results and errors, less work per
        call); :attr:`predictor` ``.raw_call`` measures what it adds over the bare library call.
        """
        return self._predictor(inputs, layout)

    def _predict_general(self, inputs: tuple, layout=None):
        """The general path of :meth:`predict` (any backend, any input; raises its errors): the
        thin path (:class:`~qdeploy.runtime.predictor.Predictor`) hands every case it does not
        handle to this."""
        x = inputs[0] if len(inputs) == 1 else list(inputs)
        cl = channels_last_mode(layout, self.input_layouts)
        feeds = user_feeds(self.graph, x, layout, self.input_layouts)
        outs = user_outputs(self.graph, self.run_codes(feeds), cl, self.output_layouts)
        return outs[0] if len(outs) == 1 else outs
