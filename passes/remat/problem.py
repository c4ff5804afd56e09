"""The rematerialization problem: which nodes may be recomputed, the IR-independent instance
(:class:`Problem`), schedules (:class:`Schedule`), the two no-recomputation orders, and the budget.

Modelling decisions: graph inputs are held from the start until their last reader (they cannot
be recomputed); graph-output nodes are computed once and held to the end; constants (weights)
are not activation memory; every IR op is stateless (asserted: recomputing never changes state).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ...compiler.errors import QDeployError, UnsupportedError
from ...compiler.ir.graph import Graph
from ...compiler.ir.ops import OPS
from ..memory import parse_memory_budget, value_bytes
from .cost import resolve_costs

STATELESS_OPS = frozenset(OPS)


def assert_stateless(graph: Graph) -> None:
    """Check that every node of ``graph`` may be recomputed without changing any state.

    Inference graphs are stateless: the IR has no op with state (``STATELESS_OPS`` is every IR
    op), the importers fold eval-mode batch norm into ``Affine`` with frozen statistics and
    refuse batch norm in training mode.  A node of an op outside the IR, or one marked
    ``attrs["stateful"]`` by a pass, is refused here.

    Raises:
        UnsupportedError: naming the first stateful (or unknown) node.
    """
    for nd in graph.nodes:
        if nd.op not in STATELESS_OPS or nd.attrs.get("stateful"):
            raise UnsupportedError(f"op {nd.op} is not known to be stateless; it cannot be recomputed", nd.name)


class RematError(QDeployError):
    """The memory budget cannot be met (the message states the smallest feasible peak)."""


# =============================================================== problem and schedules
@dataclass
class Problem:
    """A rematerialization instance, independent of the IR (benchmarks build these directly).

    Attributes:
        names: compute nodes in topological order.
        preds: for each node, the distinct node indices it reads (in first-read order).
        src_preds: for each node, the distinct source (graph input) indices it reads.
        sizes / costs: output bytes and compute cost of each node.
        src_names / src_sizes: graph inputs (held from the start, never recomputed).
        outputs: node indices that are graph outputs (computed once, held to the end).
    """

    names: list
    preds: list
    src_preds: list
    sizes: list
    costs: list
    src_names: list = field(default_factory=list)
    src_sizes: list = field(default_factory=list)
    outputs: frozenset = frozenset()

    def __post_init__(self):
        self.n = len(self.names)
        self.users = [[] for _ in range(self.n)]
        for v, ps in enumerate(self.preds):
            for u in ps:
                if u >= v:
                    raise ValueError(f"node {self.names[v]!r} reads node {self.names[u]!r} that is not before it")
                self.users[u].append(v)
        self.src_users = [[] for _ in self.src_names]
        for v, ps in enumerate(self.src_preds):
            for x in ps:
                self.src_users[x].append(v)
        self.outputs = frozenset(self.outputs)

    def reordered(self, order) -> "Problem":
        """The same instance with its nodes renumbered so that ``order`` (a topological order of
        node indices, e.g. the node sequence of :func:`low_memory_order`) is the index order;
        node ``k`` of the result is node ``order[k]`` of ``self``.

        Raises:
            ValueError: ``order`` is not a permutation or not topological.
        """
        order = list(order)
        if sorted(order) != list(range(self.n)):
            raise ValueError("order must be a permutation of the node indices")
        new = {v: k for k, v in enumerate(order)}
        q = Problem([self.names[v] for v in order], [tuple(new[u] for u in self.preds[v]) for v in order],
                    [self.src_preds[v] for v in order], [self.sizes[v] for v in order],
                    [self.costs[v] for v in order], list(self.src_names), list(self.src_sizes),
                    frozenset(new[o] for o in self.outputs))
        if hasattr(self, "title"):
            q.title = self.title
        return q

    @property
    def edges(self) -> int:
        """Node-to-node dependencies (reads of graph inputs not counted)."""
        return sum(len(p) for p in self.preds)

    def lower_bound(self) -> int:
        """No schedule can peak below this (bytes): a node's inputs + output, all sources, all outputs."""
        return self.lower_bound_why()[0]

    def lower_bound_why(self) -> tuple[int, str]:
        """:meth:`lower_bound` in bytes and its proof, e.g. ``"node 'conv2' runs with its inputs
        (1 x 3211264 B) and its output (3211264 B) live"``.  Every execution of a node (first run
        or recomputation) holds its distinct inputs and its output at once; the graph inputs are
        all live before the first step and the graph outputs all live after the last."""
        best, why = 0, "empty graph"
        for v in range(self.n):
            ins = [self.sizes[u] for u in self.preds[v]] + [self.src_sizes[x] for x in self.src_preds[v]]
            b = self.sizes[v] + sum(ins)
            if b > best:
                desc = " + ".join(f"{k} x {sz} B" for sz, k in sorted(
                    ((sz, ins.count(sz)) for sz in set(ins)), reverse=True)) or "none"
                best, why = b, (f"node {self.names[v]!r} runs with its inputs ({desc}) and its output "
                                f"({self.sizes[v]} B) live")
        b = sum(self.src_sizes)
        if b > best:
            best, why = b, f"the {len(self.src_sizes)} graph input(s) are all live before the first step"
        b = sum(self.sizes[o] for o in self.outputs)
        if b > best:
            best, why = b, f"the {len(self.outputs)} graph output(s) are all live after the last step"
        return best, why

    @staticmethod
    def from_graph(graph: Graph, packing: str = "byte", batch: int = 1, cost_model: str = "macs",
                   costs: dict | None = None) -> "Problem":
        """The instance of an IR graph: sizes in bytes (:func:`qdeploy.passes.memory.value_bytes`
        under ``packing``, ``batch`` samples), costs per ``cost_model``: ``macs``/``unit``
        (:func:`qdeploy.passes.memory.node_costs`) or a provider of the active pass context such as
        ``cycles`` (:func:`.cost.resolve_costs`, default options); ``costs`` (node name -> cost)
        overrides it.

        Raises:
            UnsupportedError: a node that is not stateless (:func:`assert_stateless`).
        """
        assert_stateless(graph)
        idx = {nd.output: t for t, nd in enumerate(graph.nodes)}
        sidx = {x: k for k, x in enumerate(graph.inputs)}
        if costs is None:
            costs = resolve_costs(graph, cost_model)[0]
        preds, spreds = [], []
        for nd in graph.nodes:
            ins = list(dict.fromkeys(nd.inputs))
            preds.append(tuple(idx[i] for i in ins if i in idx))
            spreds.append(tuple(sidx[i] for i in ins if i not in idx))
        return Problem([nd.name for nd in graph.nodes], preds, spreds,
                       [value_bytes(graph.values[nd.output], packing, batch) for nd in graph.nodes],
                       [costs[nd.name] for nd in graph.nodes], list(graph.inputs),
                       [value_bytes(graph.values[x], packing, batch) for x in graph.inputs],
                       frozenset(idx[o] for o in graph.outputs if o in idx))


@dataclass
class Schedule:
    """Node executions in order.  ``steps[t] = (node, reads)``: ``reads[k]`` is the index of the
    earlier step whose output this execution reads for ``preds[node][k]``."""

    steps: list

    def __len__(self):
        return len(self.steps)


def no_remat(p: Problem) -> Schedule:
    """The graph order, each node run once, reading the only run of each input."""
    return Schedule([(v, tuple(p.preds[v])) for v in range(p.n)])


def low_memory_order(p: Problem) -> Schedule:
    """A topological order without recomputation that keeps live bytes low (list scheduling).

    At each step, among the nodes whose inputs have all run, run the one that leaves the fewest
    bytes live after it (its output, if read later or a graph output, minus the inputs it was
    the last reader of), ties broken by the smaller live bytes while it runs, then by graph
    order.  Used as the greedy's starting order when its peak is lower than the graph order's
    (:func:`solve_greedy`), so the warm start of :func:`solve_cp` already exploits reordering.
    """
    left = [len(p.users[u]) for u in range(p.n)]
    src_left = [len(us) for us in p.src_users]
    missing = [len(p.preds[v]) for v in range(p.n)]
    ready = {v for v in range(p.n) if missing[v] == 0}
    pos, steps = {}, []
    live = sum(p.src_sizes)

    def delta(v):
        freed = sum(p.sizes[u] for u in p.preds[v] if left[u] == 1 and u not in p.outputs)
        freed += sum(p.src_sizes[x] for x in p.src_preds[v] if src_left[x] == 1)
        keep = p.sizes[v] if (p.users[v] or v in p.outputs) else 0
        return keep - freed, p.sizes[v], v

    while ready:
        v = min(ready, key=delta)
        ready.discard(v)
        d = delta(v)[0]
        live += d
        steps.append((v, tuple(pos[u] for u in p.preds[v])))
        pos[v] = len(steps) - 1
        for u in p.preds[v]:
            left[u] -= 1
        for x in p.src_preds[v]:
            src_left[x] -= 1
        for w in p.users[v]:
            missing[w] -= 1
            if missing[w] == 0:
                ready.add(w)
    return Schedule(steps)


def resolve_budget(budget, base_peak: int) -> int:
    """Budget in bytes from ``budget`` (bytes, text with a unit, or a fraction of ``base_peak``
    bytes: :func:`qdeploy.passes.memory.parse_memory_budget`); fractions round down.

    Raises:
        ValueError: an unparsable or non-positive budget.
    """
    kind, x = parse_memory_budget(budget)
    return int(math.floor(x * base_peak)) if kind == "fraction" else int(x)
