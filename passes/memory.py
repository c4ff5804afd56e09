"""Memory and cost analyses of an IR graph: value sizes from quantized types,
liveness under the graph's node order, peak live bytes, per-node compute cost.

Memory model (the one :func:`qdeploy.compiler.reference.execute` measures with ``peak=``):

* every graph input is live from the start until its last reader runs;
* a node's output becomes live when the node runs; a value is freed right after its last
  reader ran (graph outputs are never freed; a value nobody reads is freed right after the
  step that produced it);
* the memory *at step t* is the bytes live while node t runs: its inputs, its output and
  everything else still held.  The peak is the maximum over steps (and the graph inputs alone).

Sizes are per sample (the IR omits the batch axis; multiply by ``batch``).  Constants (weights)
are not counted: they live in ROM/flash or as HLS constants, not in activation memory.

Value sizes under each packing (``"byte"``, ``"container"``, ``"bit"``, ``"runtime"``) are
:func:`qdeploy.compiler.ir.cost.value_bytes`; per-node compute costs are each op's ``OpSpec.macs``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..compiler.ir.cost import value_bytes
from ..compiler.ir.graph import Graph, Node
from ..compiler.ir.ops import default_macs, get as get_op


@dataclass(frozen=True)
class MemoryProfile:
    """Result of :func:`memory_profile`.

    Attributes:
        peak: peak live bytes.  peak_step: index of the node at the peak (-1: graph inputs alone).
        per_step: bytes live while each node runs, in node order.
        live_at_peak: names of the values live at the peak.
        sizes: bytes of every value.
    """

    peak: int
    peak_step: int
    per_step: tuple[int, ...]
    live_at_peak: tuple[str, ...]
    sizes: dict

    @property
    def peak_node(self) -> str | None:
        return None if self.peak_step < 0 else self._names[self.peak_step]


def last_uses(graph: Graph) -> dict[str, int]:
    """Value name -> index of the step after which it is freed (len(nodes) for outputs)."""
    n = len(graph.nodes)
    last = {i: -1 for i in graph.inputs}
    for t, node in enumerate(graph.nodes):
        last[node.output] = t
        for i in node.inputs:
            last[i] = t
    for o in graph.outputs:
        last[o] = n
    return last


def memory_profile(graph: Graph, packing: str = "byte", batch: int = 1) -> MemoryProfile:
    """Liveness and per-step live bytes of ``graph`` executed in its node order."""
    sizes = {k: value_bytes(v, packing, batch) for k, v in graph.values.items()}
    last = last_uses(graph)
    nodes = graph.nodes
    delta_free = [0] * (len(nodes) + 1)
    live = 0
    for i in dict.fromkeys(graph.inputs):
        live += sizes[i]
        if last[i] < 0:  # an input nobody reads: the interpreter holds it to the end
            last[i] = len(nodes)
        delta_free[last[i]] += sizes[i] if last[i] < len(nodes) else 0
    peak, peak_step = live, -1
    per_step = []
    for t, node in enumerate(nodes):
        live += sizes[node.output]
        if last[node.output] < len(nodes):
            delta_free[last[node.output]] += sizes[node.output]
        per_step.append(live)
        if live > peak:
            peak, peak_step = live, t
        live -= delta_free[t]
    birth = {i: -1 for i in graph.inputs}
    birth.update({nd.output: t for t, nd in enumerate(nodes)})
    at = tuple(v for v, b in birth.items() if b <= peak_step and last[v] >= max(peak_step, 0)
               and (last[v] >= peak_step or v in graph.inputs))
    prof = MemoryProfile(peak, peak_step, tuple(per_step), at, sizes)
    object.__setattr__(prof, "_names", [nd.name for nd in nodes])
    return prof


def peak_memory(graph: Graph, packing: str = "byte", batch: int = 1) -> int:
    """Peak live bytes of ``graph`` in its node order (:func:`memory_profile`)."""
    return memory_profile(graph, packing, batch).peak


def min_feasible_bytes(graph: Graph, packing: str = "byte", batch: int = 1) -> tuple[int, str]:
    """A lower bound on the peak of *any* schedule, with or without recomputation: the largest
    single node's distinct inputs plus its output (also all graph inputs, which are live at the
    first step, and all graph outputs, live at the last).  Returns (bytes, what attains it)."""
    sizes = {k: value_bytes(v, packing, batch) for k, v in graph.values.items()}
    best, why = 0, ""
    for nd in graph.nodes:
        b = sum(sizes[i] for i in dict.fromkeys(nd.inputs)) + sizes[nd.output]
        if b > best:
            best, why = b, f"node {nd.name!r} (inputs + output)"
    b = sum(sizes[i] for i in dict.fromkeys(graph.inputs))
    if b > best:
        best, why = b, "the graph inputs"
    b = sum(sizes[o] for o in dict.fromkeys(graph.outputs))
    if b > best:
        best, why = b, "the graph outputs"
    return best, why


# ------------------------------------------------------------------ cost model
def node_macs(node: Node, graph: Graph) -> int:
    """Per-sample compute cost of ``node``: its op's ``OpSpec.macs`` (multiply-accumulates for
    Dense/Conv, window operations for pools, one per output element otherwise -- also for an
    op that is not registered; at least 1)."""
    spec = get_op(node.op)
    return (spec.macs if spec is not None else default_macs)(node, graph)


def node_costs(graph: Graph, model: str = "macs") -> dict[str, int]:
    """Node name -> cost.  ``model``: ``"macs"`` (:func:`node_macs`) or ``"unit"`` (1 each)."""
    if model == "unit":
        return {nd.name: 1 for nd in graph.nodes}
    if model != "macs":
        raise ValueError(f"unknown cost model {model!r}; one of macs, unit")
    return {nd.name: node_macs(nd, graph) for nd in graph.nodes}


def fmt_bytes(b: float) -> str:
    """``b`` bytes for humans: ``"48 KiB"``, ``"1.5 MiB"``, ``"512 B"`` (binary units)."""
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= k:
            return f"{b / k:.3g} {unit}"
    return f"{int(b)} B"


def bytes_text(b: float) -> str:
    """``"49152 B (48 KiB)"``; ``"384 B"`` below 1 KiB (no repeated figure)."""
    h = fmt_bytes(b)
    return f"{int(b)} B" + ("" if h == f"{int(b)} B" else f" ({h})")


def parse_memory_budget(text) -> tuple[str, float]:
    """``"48KiB"``/``"48kB"``/``"49152"`` -> ("bytes", n); ``"0.8"``/``"80%"`` -> ("fraction", 0.8).

    A bare number <= 1 is a fraction of the no-remat peak; a bare whole number >= 64 is bytes; anything
    between (e.g. 1.5) is refused as ambiguous (units make small byte counts explicit).

    Raises:
        ValueError: unparsable, non-positive or ambiguous budget.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return ("fraction", float(text)) if 0 < text <= 1 else ("bytes", float(text))
    s = str(text).strip().replace(" ", "")
    units = {"gib": 1 << 30, "mib": 1 << 20, "kib": 1 << 10, "gb": 10 ** 9, "mb": 10 ** 6, "kb": 10 ** 3, "b": 1}
    try:
        if s.endswith("%"):
            return "fraction", float(s[:-1]) / 100
        low = s.lower()
        for u, k in units.items():
            if low.endswith(u):
                return "bytes", float(s[:-len(u)]) * k
        x = float(s)
    except ValueError:
        raise ValueError(f"bad memory budget {text!r}: give bytes with a unit (48KiB, 1.5MB, 49152) "
                         f"or a fraction of the unrematerialized peak (0.8 or 80%)") from None
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"bad memory budget {text!r}: must be positive")
    if x <= 1:
        return "fraction", x
    if x != int(x) or x < 64:  # 1.5 or 2: surely a mistyped fraction, not 1 or 2 bytes
        raise ValueError(f"bad memory budget {text!r}: a bare number is a fraction of the peak (0 < f <= 1) or a "
                         f"whole number of bytes (>= 64); use a unit for small sizes (e.g. 48B, 48KiB)")
    return "bytes", x
