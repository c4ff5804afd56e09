"""`CompiledModel`: load any compiled artifact directory and run it."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..compiler.errors import QDeployError
from ..compiler.ir.graph import Graph
from ..compiler.ir.types import FixedType
from ..compiler.reference import prepare_feeds
from .artifact import ArtifactError, read_manifest


def to_ir_layout(graph: Graph, name: str, x: np.ndarray) -> np.ndarray:
    """Permute a user array (the source model's layout, e.g. NCHW) into the IR's channels-last
    layout using ``graph.meta['input_perms']``; arrays already in IR layout pass through."""
    perm = (graph.meta.get("input_perms") or {}).get(name)
    x = np.asarray(x)
    v = graph.value(name)
    if perm is not None and x.ndim == len(perm) and tuple(x.shape[1:]) != tuple(v.shape):
        x = np.transpose(x, perm)
    return x


def from_ir_layout(graph: Graph, name: str, y: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_ir_layout` for outputs (``graph.meta['output_perms']``)."""
    perm = (graph.meta.get("output_perms") or {}).get(name)
    if perm is not None and y.ndim == len(perm):
        y = np.transpose(y, perm)
    return y


def user_feeds(graph: Graph, inputs) -> dict[str, np.ndarray]:
    """User inputs (one array, a list or a dict; batch first; source layout; real values) ->
    runtime arrays of the IR graph inputs (int64 codes for fixed-point inputs)."""
    if isinstance(inputs, dict):
        named = dict(inputs)
    else:
        seq = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        named = dict(zip(graph.inputs, seq))
        if len(seq) != len(graph.inputs):
            raise QDeployError(f"model takes {len(graph.inputs)} input(s), got {len(seq)}", graph.name)
    named = {k: to_ir_layout(graph, k, np.asarray(v)) for k, v in named.items()}
    return prepare_feeds(graph, named)


def user_outputs(graph: Graph, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Runtime output arrays -> real values in the source layout (float64 for fixed types)."""
    outs = []
    for o in graph.outputs:
        t = graph.value(o).dtype
        a = arrays[o]
        real = t.to_real(a) if isinstance(t, FixedType) else np.asarray(a, dtype=np.float32)
        outs.append(from_ir_layout(graph, o, real))
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
    """

    def __init__(self, out_dir: Path, manifest: dict, graph: Graph, fn):
        self.out_dir = Path(out_dir)
        self.manifest = manifest
        self.graph = graph
        self._fn = fn

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @classmethod
    def load(cls, out_dir) -> "CompiledModel":
        """Load an artifact directory.

        Raises:
            ArtifactError: missing/invalid manifest or IR files.
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

    def run_codes(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runtime arrays in (codes for fixed inputs, IR layout), runtime arrays out."""
        return self._fn(feeds)

    def predict(self, *inputs):
        """Run the model on real-valued inputs (batch first, the source model's layout).

        Returns:
            the real-valued output (float64 for fixed-point outputs, float32 for float ones),
            or a list when the model has several outputs.
        """
        x = inputs[0] if len(inputs) == 1 else list(inputs)
        outs = user_outputs(self.graph, self.run_codes(user_feeds(self.graph, x)))
        return outs[0] if len(outs) == 1 else outs
