"""The saved control plan of a dynamic program: what the host needs to run it without the model.

On disk (next to the block artifacts ``block<k>/``)::

    plan.json   kind "dynamic": target, capture path, inputs, stages (one per device block),
                control (the control graph, :func:`control_json`), host_program, report
    host.pt     the host side of every block (:func:`save_host_program`): the wiring of its
                device inputs/outputs, its outputs, the host ops (fx nodes: op, target, arguments)
                with the modules they call and the folded constants they read

``host.pt`` is written with ``torch.save`` and read back with ``torch.load(weights_only=False)``:
it holds the callables of the host ops (torch functions, methods, ``nn.Module`` objects), so load
only programs you trust -- as for the compiled block libraries next to it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..multistage import PlanError

__all__ = ["BlockStep", "IfStep", "ReturnStep", "ControlPlan", "control_json", "control_from_json", "walk_steps",
           "stage_name", "HostBlock", "HostGraph", "NodeRef", "OpName", "HOST_PROGRAM", "save_host_program",
           "load_host_program"]

#: File name of the host program next to ``plan.json``.
HOST_PROGRAM = "host.pt"
HOST_FORMAT = 1


@dataclass
class BlockStep:
    """A straight-line block: live variables at its boundaries and its source lines."""
    id: int
    inputs: list
    outputs: list
    lines: tuple = ()


@dataclass
class IfStep:
    """A condition: ``cond_var`` (computed by the preceding block) selects ``then`` / ``orelse``."""
    id: int
    cond_var: str
    test_src: str
    line: int
    then: list = field(default_factory=list)
    orelse: list = field(default_factory=list)


@dataclass
class ReturnStep:
    """``return``: the variables returned (a tuple when ``is_tuple``)."""
    id: int
    names: tuple
    is_tuple: bool = False


@dataclass
class ControlPlan:
    """The control graph the host walks: ``items`` (:class:`BlockStep` / :class:`IfStep` /
    :class:`ReturnStep`), ``forward``'s tensor arguments and the capture path (``"torch.export"``
    or ``"ast"``)."""
    items: list
    arg_names: list
    capture: str = "ast"

    def blocks(self) -> list:
        """Every :class:`BlockStep`, depth first."""
        return [i for i in walk_steps(self.items) if isinstance(i, BlockStep)]

    def conditions(self) -> list:
        """Every :class:`IfStep`, depth first."""
        return [i for i in walk_steps(self.items) if isinstance(i, IfStep)]

    def returns(self) -> list:
        """Every :class:`ReturnStep`, depth first."""
        return [i for i in walk_steps(self.items) if isinstance(i, ReturnStep)]


def walk_steps(items):
    """Every step of ``items``, depth first (the branches of a condition after it)."""
    for it in items:
        yield it
        if isinstance(it, IfStep):
            yield from walk_steps(it.then)
            yield from walk_steps(it.orelse)


def stage_name(block_id: int) -> str:
    """Stage name (and artifact directory) of device block ``block_id``: ``block<k>``."""
    return f"block{block_id}"


def control_json(items) -> list:
    """JSON form of a control graph (``plan.json`` ``control``): ``{"block", "inputs",
    "outputs", "lines"}``, ``{"if", "cond", "test", "line", "then", "else"}``, ``{"return",
    "values", "tuple"}``."""
    out = []
    for it in items:
        if isinstance(it, BlockStep):
            out.append({"block": it.id, "inputs": list(it.inputs), "outputs": list(it.outputs),
                        "lines": list(it.lines)})
        elif isinstance(it, IfStep):
            out.append({"if": it.id, "cond": it.cond_var, "test": it.test_src, "line": it.line,
                        "then": control_json(it.then), "else": control_json(it.orelse)})
        else:
            out.append({"return": it.id, "values": list(it.names), "tuple": bool(it.is_tuple)})
    return out


def control_from_json(control: list) -> list:
    """Inverse of :func:`control_json` (a ``stage`` key, as ``plan.json`` has, is ignored).

    Raises:
        PlanError: an entry that is none of block / if / return.
    """
    out = []
    for c in control:
        if "block" in c:
            out.append(BlockStep(int(c["block"]), list(c["inputs"]), list(c["outputs"]), tuple(c.get("lines", ()))))
        elif "if" in c:
            out.append(IfStep(int(c["if"]), c["cond"], c.get("test", ""), int(c.get("line", 0)),
                              control_from_json(c["then"]), control_from_json(c["else"])))
        elif "return" in c:
            out.append(ReturnStep(int(c["return"]), tuple(c["values"]), bool(c.get("tuple", False))))
        else:
            raise PlanError(f"bad control entry {sorted(c)}: expected block, if or return")
    return out


class NodeRef:
    """A reference to an fx node by name inside saved host-op arguments."""
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __reduce__(self):
        return (NodeRef, (self.name,))


class OpName:
    """A torch operator (``torch.ops.<ns>.<op>[.<overload>]``, e.g. ``aten.gt.Scalar``) saved by
    name: operator objects cannot be pickled."""
    __slots__ = ("qualname",)

    def __init__(self, qualname: str):
        self.qualname = qualname

    def __reduce__(self):
        return (OpName, (self.qualname,))

    def resolve(self):
        """The operator object, looked up in ``torch.ops``."""
        import torch

        obj = torch.ops
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return obj


def _saved_target(t):
    import torch

    return OpName(str(t)) if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) else t


class HostGraph:
    """The host ops of one block as an fx graph (``graph``) plus the modules they call
    (``named_modules()``: ``{target: nn.Module}`` items), rebuilt from ``host.pt``."""

    def __init__(self, graph, modules: dict):
        self.graph = graph
        self._modules = dict(modules)

    def named_modules(self):
        """``(target, module)`` pairs of the ``call_module`` host ops."""
        return self._modules.items()


@dataclass
class HostBlock:
    """What the host needs of one block (the runtime form of the frontend's ``BlockIR``).

    Attributes:
        graph: IR graph of the device part (the stage artifact's), or None for a host-only block.
        dev_inputs: ``[(var, ir input name, kind)]``.
        dev_outputs: ``{fx node name: (ir value name, kind)}``.
        outputs: ``{var: (source, ref)}``, source ``dev`` / ``host`` / ``alias`` / ``const``.
        host_nodes / host_ops: fx node names evaluated on the host (in order) and their targets.
        node_alias: ``{fx node name: input var}``; consts: ``{fx node name: value}``.
        gm: a :class:`HostGraph` holding the host ops.
    """
    graph: Any
    dev_inputs: list
    dev_outputs: dict
    outputs: dict
    host_nodes: list
    host_ops: list
    gm: Any
    node_alias: dict = field(default_factory=dict)
    consts: dict = field(default_factory=dict)


def _host_record(bir) -> dict:
    """The picklable host side of a block (``bir``: a frontend ``BlockIR`` or a :class:`HostBlock`)."""
    import torch

    names = set(bir.host_nodes)
    mods = dict(bir.gm.named_modules()) if bir.host_nodes else {}
    nodes, leaves, modules = [], {}, {}

    def ref(n):
        if n.name not in names and n.name not in leaves:
            leaves[n.name] = (n.op == "placeholder", n.target if n.op == "placeholder" else None)
        return NodeRef(n.name)

    for nd in (bir.gm.graph.nodes if bir.host_nodes else ()):
        if nd.name not in names:
            continue
        if nd.op == "call_module":
            modules[nd.target] = mods[nd.target]
        nodes.append({"name": nd.name, "op": nd.op, "target": _saved_target(nd.target),
                      "args": torch.fx.node.map_arg(nd.args, ref), "kwargs": torch.fx.node.map_arg(nd.kwargs, ref)})
    return {"dev_inputs": [tuple(d) for d in bir.dev_inputs], "dev_outputs": dict(bir.dev_outputs),
            "outputs": dict(bir.outputs), "host_nodes": list(bir.host_nodes), "host_ops": list(bir.host_ops),
            "node_alias": dict(bir.node_alias), "consts": dict(bir.consts),
            "leaves": [(k, ph, t) for k, (ph, t) in leaves.items()], "nodes": nodes, "modules": modules}


def save_host_program(out_dir, blocks: dict) -> Path:
    """Write ``out_dir/host.pt``: the host side of every block (``{block id: BlockIR or
    HostBlock}``); returns its path.

    Raises:
        PlanError: a host op that cannot be saved (e.g. a lambda or a local function).
    """
    import torch

    path = Path(out_dir) / HOST_PROGRAM
    data = {"format": HOST_FORMAT, "blocks": {int(bid): _host_record(b) for bid, b in blocks.items()}}
    try:
        torch.save(data, path)
    except Exception as e:  # pickling: an unpicklable host op
        raise PlanError(f"cannot save the host program: {type(e).__name__}: {e}") from None
    return path


def _leaf_value(name):  # target of rebuilt non-host leaf nodes; never called
    raise PlanError(f"leaf {name!r} is not a host op")


def _host_graph(rec: dict) -> HostGraph:
    import torch

    g = torch.fx.Graph()
    made = {}
    for name, is_ph, target in rec["leaves"]:
        made[name] = (g.create_node("placeholder", target, name=name) if is_ph
                      else g.create_node("call_function", _leaf_value, (name,), name=name))

    def resolve(a):
        return torch.fx.node.map_aggregate(a, lambda x: made[x.name] if isinstance(x, NodeRef) else x)

    for r in rec["nodes"]:
        target = r["target"].resolve() if isinstance(r["target"], OpName) else r["target"]
        made[r["name"]] = g.create_node(r["op"], target, resolve(r["args"]), resolve(r["kwargs"]), name=r["name"])
    bad = [k for k, n in made.items() if n.name != k]
    if bad:
        raise PlanError(f"host program: fx node names {bad} could not be restored")
    return HostGraph(g, rec["modules"])


def load_host_program(out_dir, graphs: dict) -> dict:
    """``{block id: HostBlock}`` from ``out_dir/host.pt``; ``graphs`` maps a block id to its
    device IR graph (None for a host-only block).

    Raises:
        PlanError: no or unreadable host program, another format, or blocks that differ from
            ``graphs``.
    """
    import torch

    path = Path(out_dir) / HOST_PROGRAM
    if not path.is_file():
        raise PlanError(f"{out_dir}: no {HOST_PROGRAM} (the host program of a dynamic network)")
    try:
        data = torch.load(path, weights_only=False)
    except Exception as e:
        raise PlanError(f"{out_dir}: unreadable {HOST_PROGRAM} ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or data.get("format") != HOST_FORMAT:
        raise PlanError(f"{path}: unsupported host program format")
    recs = data["blocks"]
    if set(recs) != set(graphs):
        raise PlanError(f"{out_dir}: host program blocks {sorted(recs)} differ from the plan's {sorted(graphs)}")
    out = {}
    for bid, r in recs.items():
        out[bid] = HostBlock(graphs[bid], [tuple(d) for d in r["dev_inputs"]], dict(r["dev_outputs"]),
                             dict(r["outputs"]), list(r["host_nodes"]), list(r["host_ops"]), _host_graph(r),
                             dict(r["node_alias"]), dict(r["consts"]))
    return out
