"""The PassManager: runs ``Graph -> Graph`` passes, times each, verifies between them."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..compiler.ir.graph import Graph
from ..compiler.ir.verify import verify


@dataclass
class PassRecord:
    """What one pass did: name, wall time (ms), node counts before/after."""

    name: str
    ms: float
    nodes_before: int
    nodes_after: int
    notes: list[str] = field(default_factory=list)


class PassManager:
    """Run passes in order.

    Args:
        passes: callables ``Graph -> Graph`` (a pass may also return ``(Graph, notes)`` with a
            list of human-readable notes); each should carry a ``__name__``.
        verify_each: run :func:`verify` after every pass (raises ``VerifyError`` naming the node
            and, in the message, the pass that broke the graph).
        dump: optional callable ``dump(pass_name, graph)`` called after each pass (e.g. to write
            the IR text after each step).
    """

    def __init__(self, passes: Sequence[Callable], verify_each: bool = True,
                 dump: Callable[[str, Graph], None] | None = None):
        self.passes = list(passes)
        self.verify_each = verify_each
        self.dump = dump
        self.records: list[PassRecord] = []

    def run(self, graph: Graph) -> Graph:
        self.records = []
        for p in self.passes:
            name = getattr(p, "__name__", type(p).__name__)
            t0 = time.perf_counter()
            before = len(graph.nodes)
            res = p(graph)
            notes: list[str] = []
            if isinstance(res, tuple):
                res, notes = res
            if self.verify_each:
                try:
                    verify(res)
                except Exception as e:  # re-raise with the pass name
                    e.args = (f"after pass {name}: {e.args[0] if e.args else e}",) + tuple(e.args[1:])
                    raise
            self.records.append(PassRecord(name, (time.perf_counter() - t0) * 1e3, before, len(res.nodes), list(notes)))
            if self.dump:
                self.dump(name, res)
            graph = res
        return graph
