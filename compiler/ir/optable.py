"""Per-backend op tables: one entry per IR op, an implementation or an explicit rejection.

Every backend and estimator owns exactly one :class:`OpTable` keyed by IR op name (e.g.
``backends/tvm/ops.py``, ``backends/hls4ml/ops.py``).  An entry is either the backend's
implementation of the op (whatever callable or object that backend needs) or a
:class:`Rejected` with the reason the op cannot be done there.  A test requires every op of the
IR registry to have an entry in every table, so adding an op without deciding what each backend
does with it fails CI instead of failing a user's compile.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..errors import UnsupportedError


@dataclass(frozen=True)
class Rejected:
    """A table entry meaning "this backend cannot do this op", with the reason shown to users."""

    reason: str


class OpTable:
    """Op name -> implementation (or :class:`Rejected`) for one backend or estimator.

    Args:
        backend: name used in error messages (e.g. ``"tvm"``, ``"hls4ml"``, ``"asic estimate"``).

    Use :meth:`register` as a decorator (``@TABLE.register("Dense")``) or :meth:`set`, and
    :meth:`reject` for ops the backend refuses.
    """

    def __init__(self, backend: str):
        self.backend = backend
        self._entries: dict[str, Any] = {}

    def register(self, *ops: str) -> Callable:
        """Decorator: the decorated object implements each op in ``ops``."""
        def deco(fn):
            for op in ops:
                self.set(op, fn)
            return fn
        return deco

    def set(self, op: str, impl: Any) -> None:
        """Set the entry of ``op``.

        Raises:
            ValueError: ``op`` already has an entry (each op is declared once per table).
        """
        if op in self._entries:
            raise ValueError(f"{self.backend} op table: {op!r} registered twice")
        self._entries[op] = impl

    def reject(self, op: str, reason: str) -> None:
        """Declare that this backend refuses ``op``, with the reason users will see."""
        self.set(op, Rejected(reason))

    def __contains__(self, op: str) -> bool:
        return op in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def entry(self, op: str) -> Any:
        """The raw entry (implementation or :class:`Rejected`); ``None`` when ``op`` has none."""
        return self._entries.get(op)

    def lookup(self, node) -> Any:
        """The implementation for ``node.op``.

        Raises:
            UnsupportedError: naming ``node.name`` when the op is rejected (with the reason) or
                has no entry.
        """
        e = self._entries.get(node.op)
        if e is None:
            raise UnsupportedError(f"op {node.op!r} has no {self.backend} implementation", node.name)
        if isinstance(e, Rejected):
            raise UnsupportedError(f"{node.op} is not supported by {self.backend}: {e.reason}", node.name)
        return e

    def unsupported(self, graph) -> list[tuple[str, str]]:
        """``[(node name, reason)]`` for every node of ``graph`` this table cannot handle."""
        out = []
        for n in graph.nodes:
            e = self._entries.get(n.op)
            if e is None:
                out.append((n.name, f"op {n.op!r} has no {self.backend} implementation"))
            elif isinstance(e, Rejected):
                out.append((n.name, e.reason))
        return out

    def supports(self, graph) -> bool:
        """True when every node's op has an implementation here (attribute-level limits, e.g. a
        3-D kernel, are still checked when the node is lowered)."""
        return not self.unsupported(graph)
