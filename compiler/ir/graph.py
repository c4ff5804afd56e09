"""The IR containers: :class:`Value`, :class:`Const`, :class:`Node`, :class:`Graph`.

Conventions
-----------
* Layout is channels-last: a 2-D feature map is ``(H, W, C)``, a 1-D one ``(L, C)``.
* Every activation :class:`Value` has an implicit leading batch dimension that its ``shape``
  omits; a value of shape ``(16,)`` holds ``(N, 16)`` at run time.
* Constants (:class:`Const`) live in node ``params`` (``weight``, ``bias``, ``scale``...),
  not in the value table.  A fixed-point constant stores its int64 *codes*; a float one its
  float32 data.
* Graphs are immutable: :class:`GraphBuilder` builds new ones, passes never mutate.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import numpy as np

from ..errors import VerifyError
from .types import DType, FixedType, FloatType, exact_type_for_values, type_from_dict


@dataclass(frozen=True)
class Value:
    """A named activation tensor: ``shape`` (batch omitted) and element ``dtype``."""

    name: str
    shape: tuple[int, ...]
    dtype: DType

    @property
    def size(self) -> int:
        """Elements per sample."""
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass(frozen=True, eq=False)
class Const:
    """A constant tensor.

    Attributes:
        data: int64 codes when ``dtype`` is a :class:`FixedType` (real value = code * 2**-F),
            float32 values when it is :class:`FloatType`.
        dtype: element type.
    """

    data: np.ndarray
    dtype: DType

    def __post_init__(self):
        want = np.int64 if isinstance(self.dtype, FixedType) else np.float32
        arr = np.ascontiguousarray(np.asarray(self.data), dtype=want)
        arr.setflags(write=False)
        object.__setattr__(self, "data", arr)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def real(self) -> np.ndarray:
        """Real values as float64."""
        if isinstance(self.dtype, FixedType):
            return self.dtype.to_real(self.data)
        return self.data.astype(np.float64)

    @staticmethod
    def from_real(values, dtype: DType | None = None, max_width: int = 32) -> "Const":
        """Make a constant from reals: exact fixed type when possible (or the given one).

        With ``dtype=None`` the narrowest exact fixed type is chosen
        (:func:`~qdeploy.compiler.ir.types.exact_type_for_values`); float32 when none exists.
        """
        v = np.asarray(values, dtype=np.float64)
        if dtype is None:
            dtype = exact_type_for_values(v, max_width) or FloatType()
        if isinstance(dtype, FixedType):
            return Const(dtype.quantize_real(v), dtype)
        return Const(v.astype(np.float32), dtype)

    def digest(self) -> str:
        return hashlib.sha256(self.data.tobytes() + str(self.dtype).encode()).hexdigest()[:16]


def _freeze(d: Mapping | None) -> Mapping:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True, eq=False)
class Node:
    """One operation.

    Attributes:
        name: unique node name (taken from the source model where there is one).
        op: op type, one of :data:`qdeploy.compiler.ir.ops.OPS`.
        inputs: names of activation values read, in order.
        outputs: names of values written (every op has exactly one output).
        attrs: op attributes (plain Python values and types), read-only.
        params: constant tensors by role (``weight``, ``bias``, ``scale``...), read-only.
    """

    name: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Const] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "attrs", _freeze(self.attrs))
        object.__setattr__(self, "params", _freeze(self.params))

    @property
    def output(self) -> str:
        return self.outputs[0]

    def replace(self, **kw) -> "Node":
        d = dict(name=self.name, op=self.op, inputs=self.inputs, outputs=self.outputs,
                 attrs=dict(self.attrs), params=dict(self.params))
        d.update(kw)
        return Node(**d)


class Graph:
    """An immutable dataflow graph in topological order.

    Args:
        nodes: nodes in topological order.
        values: every activation value (graph inputs and node outputs) by name.
        inputs / outputs: names of graph input and output values.
        name: model name.
        meta: free-form provenance (source file, frontend notes) copied along by passes.
    """

    def __init__(self, nodes: Iterable[Node], values: Mapping[str, Value], inputs: Iterable[str],
                 outputs: Iterable[str], name: str = "model", meta: Mapping | None = None):
        self._nodes = tuple(nodes)
        self._values = MappingProxyType(dict(values))
        self._inputs = tuple(inputs)
        self._outputs = tuple(outputs)
        self.name = name
        self.meta = MappingProxyType(dict(meta or {}))
        self._producer = {o: n for n in self._nodes for o in n.outputs}

    # --------------------------------------------------------------- accessors
    @property
    def nodes(self) -> tuple[Node, ...]:
        return self._nodes

    @property
    def values(self) -> Mapping[str, Value]:
        return self._values

    @property
    def inputs(self) -> tuple[str, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[str, ...]:
        return self._outputs

    def value(self, name: str) -> Value:
        return self._values[name]

    def node(self, name: str) -> Node:
        for n in self._nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def producer(self, value: str) -> Node | None:
        """The node writing ``value`` (None for graph inputs)."""
        return self._producer.get(value)

    def consumers(self, value: str) -> list[Node]:
        return [n for n in self._nodes if value in n.inputs]

    def input_values(self) -> list[Value]:
        return [self._values[i] for i in self._inputs]

    def output_values(self) -> list[Value]:
        return [self._values[o] for o in self._outputs]

    def is_quantized(self) -> bool:
        """True when the graph has at least one fixed-point value or constant."""
        return any(isinstance(v.dtype, FixedType) for v in self._values.values()) or any(
            isinstance(c.dtype, FixedType) for n in self._nodes for c in n.params.values())

    def param_count(self) -> int:
        return int(sum(c.data.size for n in self._nodes for c in n.params.values()))

    def with_(self, nodes=None, values=None, inputs=None, outputs=None, name=None, meta=None) -> "Graph":
        """A copy with some parts replaced; values no longer referenced are dropped."""
        nodes = self._nodes if nodes is None else tuple(nodes)
        values = dict(self._values if values is None else values)
        inputs = self._inputs if inputs is None else tuple(inputs)
        outputs = self._outputs if outputs is None else tuple(outputs)
        used = set(inputs) | set(outputs) | {v for n in nodes for v in (*n.inputs, *n.outputs)}
        values = {k: v for k, v in values.items() if k in used}
        return Graph(nodes, values, inputs, outputs, name or self.name,
                     self.meta if meta is None else meta)

    def __str__(self) -> str:
        from .printer import format_graph
        return format_graph(self)

    def __repr__(self) -> str:
        return f"<Graph {self.name}: {len(self._nodes)} nodes>"

    # --------------------------------------------------------------- serialization
    def to_json(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able structure, arrays) -- save arrays with ``np.savez``."""
        arrays: dict[str, np.ndarray] = {}
        nodes = []
        for i, n in enumerate(self._nodes):
            params = {}
            for role, c in n.params.items():
                key = f"n{i}_{role}"
                arrays[key] = c.data
                params[role] = {"array": key, "dtype": c.dtype.to_dict()}
            nodes.append({"name": n.name, "op": n.op, "inputs": list(n.inputs), "outputs": list(n.outputs),
                          "attrs": _attrs_to_json(n.attrs), "params": params})
        values = {k: {"shape": list(v.shape), "dtype": v.dtype.to_dict()} for k, v in self._values.items()}
        doc = {"name": self.name, "inputs": list(self._inputs), "outputs": list(self._outputs),
               "values": values, "nodes": nodes, "meta": _jsonable(dict(self.meta))}
        return doc, arrays

    @staticmethod
    def from_json(doc: dict, arrays: Mapping[str, np.ndarray]) -> "Graph":
        values = {k: Value(k, tuple(v["shape"]), type_from_dict(v["dtype"])) for k, v in doc["values"].items()}
        nodes = []
        for nd in doc["nodes"]:
            params = {r: Const(np.asarray(arrays[p["array"]]), type_from_dict(p["dtype"])) for r, p in nd["params"].items()}
            nodes.append(Node(nd["name"], nd["op"], nd["inputs"], nd["outputs"], _attrs_from_json(nd["attrs"]), params))
        return Graph(nodes, values, doc["inputs"], doc["outputs"], doc["name"], doc.get("meta", {}))

    def save(self, path_stem: str) -> None:
        """Write ``<stem>.json`` and ``<stem>.npz``."""
        doc, arrays = self.to_json()
        with open(path_stem + ".json", "w") as f:
            json.dump(doc, f, indent=1)
        np.savez(path_stem + ".npz", **arrays)

    @staticmethod
    def load(path_stem: str) -> "Graph":
        with open(path_stem + ".json") as f:
            doc = json.load(f)
        with np.load(path_stem + ".npz") as z:
            arrays = {k: z[k] for k in z.files}
        return Graph.from_json(doc, arrays)

    def digest(self) -> str:
        """Content hash of structure, types and constants (16 hex chars)."""
        doc, arrays = self.to_json()
        doc = dict(doc)
        doc.pop("meta", None)
        h = hashlib.sha256(json.dumps(doc, sort_keys=True).encode())
        for k in sorted(arrays):
            h.update(k.encode())
            h.update(np.ascontiguousarray(arrays[k]).tobytes())
        return h.hexdigest()[:16]


def _attrs_to_json(attrs: Mapping) -> dict:
    out = {}
    for k, v in attrs.items():
        if isinstance(v, (FixedType, FloatType)):
            out[k] = {"__type__": v.to_dict()}
        else:
            out[k] = _jsonable(v)
    return out


def _attrs_from_json(d: Mapping) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and "__type__" in v:
            out[k] = type_from_dict(v["__type__"])
        elif isinstance(v, list):
            out[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        else:
            out[k] = v
    return out


def _jsonable(v):
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    if isinstance(v, (FixedType, FloatType)):
        return str(v)
    return v


class GraphBuilder:
    """Builds a :class:`Graph` node by node, inferring every output value with the op's type
    rule (:func:`qdeploy.compiler.ir.ops.infer`).

    Example::

        b = GraphBuilder("mlp")
        x = b.input("x", (16,), parse_type("fixed<18,2>"))
        h = b.add("fc1", "Dense", [x], params={"weight": w, "bias": bias})
        b.output(h)
        g = b.build()

    Raises:
        VerifyError: when a rule rejects the node (the message names it).
    """

    def __init__(self, name: str = "model", meta: Mapping | None = None):
        self.name = name
        self.meta = dict(meta or {})
        self.nodes: list[Node] = []
        self.values: dict[str, Value] = {}
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self._names: set[str] = set()

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self._names or name in self.values:
            name = f"{base}_{i}"
            i += 1
        self._names.add(name)
        return name

    def input(self, name: str, shape, dtype: DType) -> str:
        if name in self.values:
            raise VerifyError(f"duplicate input name {name!r}", name)
        self.values[name] = Value(name, tuple(int(s) for s in shape), dtype)
        self.inputs.append(name)
        return name

    def add(self, name: str, op: str, inputs: list[str], attrs: Mapping | None = None,
            params: Mapping[str, Const] | None = None, out: str | None = None) -> str:
        """Append a node and return the name of its output value."""
        from .ops import infer

        name = self.unique(name) if name in self._names else name
        self._names.add(name)
        out = out or name
        if out in self.values:
            out = self.unique(out)
        for i in inputs:
            if i not in self.values:
                raise VerifyError(f"input value {i!r} is not defined before this node", name)
        node = Node(name, op, tuple(inputs), (out,), attrs or {}, params or {})
        shape, dtype = infer(node, [self.values[i] for i in inputs])
        self.values[out] = Value(out, tuple(int(s) for s in shape), dtype)
        self.nodes.append(node)
        return out

    def add_node(self, node: Node) -> str:
        """Append an existing node (re-inferring its output value)."""
        return self.add(node.name, node.op, list(node.inputs), dict(node.attrs), dict(node.params), node.output)

    def output(self, *names: str) -> None:
        self.outputs.extend(names)

    def build(self) -> Graph:
        from .verify import verify

        g = Graph(self.nodes, self.values, self.inputs, self.outputs, self.name, self.meta)
        verify(g)
        return g


def rebuild(graph: Graph, nodes: Iterable[Node], inputs=None, outputs=None, values=None) -> Graph:
    """Re-run type inference over ``nodes`` starting from the graph's (or given) inputs."""
    b = GraphBuilder(graph.name, dict(graph.meta))
    src = values or graph.values
    for i in (inputs or graph.inputs):
        b.input(i, src[i].shape, src[i].dtype)
    for n in nodes:
        b.add_node(n)
    b.output(*(outputs or graph.outputs))
    return b.build()
