"""The ``reference`` target: the artifact is the IR itself, run by the NumPy interpreter."""
from __future__ import annotations

from pathlib import Path

from ..compiler.ir.graph import Graph
from ..compiler.reference import execute


class ReferenceBackend:
    """Writes ``model.json``/``model.npz`` (the IR); ``load`` runs it with
    :func:`qdeploy.compiler.reference.execute`.  Exact by definition."""

    def __init__(self, name: str = "reference"):
        self.name = name

    def emit(self, graph: Graph, config: dict, out_dir) -> dict:
        graph.save(str(Path(out_dir) / "model"))
        return {"files": ["model.json", "model.npz"]}

    def build(self, out_dir, info: dict) -> None:
        return None

    def load(self, out_dir, info: dict, graph: Graph | None = None):
        g = Graph.load(str(Path(out_dir) / "model"))
        return lambda feeds: execute(g, feeds, codes=True)
