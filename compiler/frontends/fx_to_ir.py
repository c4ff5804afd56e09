"""One block of a captured control program (a ``torch.fx`` GraphModule) -> an IR graph of its
device part plus the host ops around it (:func:`block_to_ir`, :class:`BlockIR`).

Each fx node becomes one of:

* a **device** value: a supported tensor op whose inputs are device values or constants, mapped
  by the op table of :mod:`.fx_rules` (one rule per op family);
* a **constant**: a node whose inputs are all constants is evaluated now (folded);
* a **host op**: everything else, run with torch by the runtime.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

from .fx_rules import BatchDim, Conversion, convert
from ..ir.layout import NCHW, layout_of
from .program import BlockItem

__all__ = ["BlockIR", "block_to_ir"]


@dataclass
class BlockIR:
    """A block split into its device graph and its host ops.

    Attributes:
        graph: IR graph of the device part (None when the block has no device op: it is then a
            host-only / pass-through block and is removed from the device side).
        dev_inputs: ``[(var, ir input name, kind)]``.
        dev_outputs: ``{fx node name: (ir value name, kind)}`` -- device values read by host ops or
            returned.
        outputs: ``{var: (source, ref)}`` with source ``"dev"`` (ref = fx node name), ``"host"``
            (fx node name), ``"alias"`` (input var name) or ``"const"`` (a value).
        host_nodes: fx node names evaluated on the host (in order), ``host_ops``: their targets.
        folded: number of input-independent fx nodes folded into constants.
        node_alias: ``{fx node name: input var}`` for device nodes that only forward an input.
        consts: ``{fx node name: value}`` of folded nodes (read by host ops).
    """
    graph: Any
    dev_inputs: list
    dev_outputs: dict
    outputs: dict
    host_nodes: list
    host_ops: list
    folded: int
    gm: Any
    node_alias: dict = field(default_factory=dict)
    consts: dict = field(default_factory=dict)



def _is_batch_size(n) -> bool:
    """``x.size(0)`` or ``x.shape[0]``: the batch dimension."""
    import torch
    return (n.op == "call_method" and n.target == "size" and len(n.args) >= 2 and n.args[1] == 0) or \
        (n.op == "call_function" and n.target is operator.getitem and n.args[1] == 0
         and isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "call_function"
         and n.args[0].target is getattr and n.args[0].args[1] == "shape")


def _classify(cv: Conversion):
    """Walk the block's fx nodes in order: inputs, constants, folded values, device ops, host ops.
    Returns the ``output`` node."""
    import torch
    from ..ir import FLOAT32

    out_node = None
    for n in cv.gm.graph.nodes:
        if n.op == "placeholder":
            shape = cv.meta_shape(n)
            kind = layout_of(len(shape)) if shape is not None and cv.is_float_tensor(n) else None
            if kind is not None:
                ir_shape = (*shape[2:], shape[1]) if kind == NCHW else tuple(shape[1:])
                v = cv.b.input(n.name, ir_shape, FLOAT32)
                cv.dev[n] = (v, kind)
                cv.dev_inputs.append((n.target, v, kind))
            continue
        if n.op == "output":
            out_node = n
            continue
        if n.op == "get_attr":
            obj = cv.gm
            for p in n.target.split("."):
                obj = getattr(obj, p)
            cv.const[n] = obj.detach() if isinstance(obj, torch.Tensor) else obj
            cv.folded += 1
            continue
        ins = cv.arg_nodes(n)
        if _is_batch_size(n):
            cv.const[n] = BatchDim
            cv.host.append(n)  # also computable on the host (per sample it is 1)
            continue
        if n.op == "call_method" and n.target == "size" and len(n.args) >= 2 and cv.meta_shape(n.args[0]):
            cv.const[n] = cv.meta_shape(n.args[0])[n.args[1]]
            continue
        if ins and all(i in cv.const and cv.const[i] is not BatchDim for i in ins) and not (
                n.op == "call_function" and n.target in (torch.rand, torch.randn, torch.randint)):
            try:
                cv.const[n] = cv.fold(n)
                cv.folded += 1
                continue
            except Exception:
                pass
        r = None
        try:
            if any(i in cv.dev for i in ins) and all(i in cv.dev or i in cv.const for i in ins):
                r = convert(cv, n)
        except Exception:
            r = None
        if r is not None:
            cv.dev[n] = r
        else:
            cv.host.append(n)
    return out_node


def block_to_ir(blk: BlockItem, name: str = "block") -> BlockIR:
    """Convert a traced block into a device IR graph plus host ops (see :class:`BlockIR`).

    Args:
        blk: a block with ``gm`` set and shape-propagated (``tensor_meta`` on its nodes), as
            both capture paths leave it; name: the IR graph's name.
    Returns:
        the :class:`BlockIR`; its graph is unpruned (``qdeploy.dynamic.extract`` removes dead
        nodes and unused inputs).
    """
    import torch

    gm = blk.gm
    cv = Conversion(gm, name)
    out_node = _classify(cv)
    dev, const, b = cv.dev, cv.const, cv.b

    out_args = out_node.args[0]
    out_list = list(out_args) if isinstance(out_args, (tuple, list)) else [out_args]
    outputs, dev_outputs = {}, {}
    placeholders = {n: n.target for n in gm.graph.nodes if n.op == "placeholder"}
    # host nodes actually needed (backwards from host outputs)
    need = set()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def want(n):
        if not isinstance(n, torch.fx.Node) or n in need or n in placeholders:
            return
        if n in dev and n not in cv.host:
            return
        if n in const and n not in cv.host:
            return
        need.add(n)
        for a in cv.arg_nodes(n):
            want(a)

    for var, src in zip(blk.outputs, out_list):
        if isinstance(src, torch.fx.Node) and src in placeholders:
            outputs[var] = ("alias", placeholders[src])
        elif isinstance(src, torch.fx.Node) and src in dev and dev[src][0] not in b.inputs:
            outputs[var] = ("dev", src.name)
            dev_outputs[src.name] = dev[src]
        elif isinstance(src, torch.fx.Node) and src in dev:  # device alias of an input (e.g. Identity)
            outputs[var] = ("alias", next(p for p in placeholders if dev.get(p) == dev[src]).target)
        elif isinstance(src, torch.fx.Node) and src in const and const[src] is not BatchDim:
            outputs[var] = ("const", const[src])
        elif isinstance(src, torch.fx.Node):
            outputs[var] = ("host", src.name)
            want(src)
        else:
            outputs[var] = ("const", src)
    for n in list(need):
        for a in cv.arg_nodes(n):
            if a in dev and a not in placeholders and dev[a][0] not in b.inputs:
                dev_outputs[a.name] = dev[a]
    host_nodes = sorted(need, key=order.get)
    graph = None
    ir_outs = []
    for k, (v, _kind) in dev_outputs.items():
        if v not in ir_outs:
            ir_outs.append(v)
    dev_inputs = cv.dev_inputs
    if ir_outs:
        b.output(*ir_outs)
        graph = b.build()  # unpruned: qdeploy.dynamic.extract removes dead nodes and unused inputs
    else:
        dev_inputs = []

    def op_name(n):
        if n.op == "call_module":
            return type(cv.mods[n.target]).__name__
        return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))

    inv = {v[0]: p.target for p, v in dev.items() if p in placeholders}
    node_alias = {n.name: inv[v[0]] for n, v in dev.items() if v[0] in inv}
    consts = {n.name: v for n, v in const.items() if v is not BatchDim}
    return BlockIR(graph, dev_inputs, dev_outputs, outputs, [n.name for n in host_nodes],
                   [op_name(n) for n in host_nodes], cv.folded, gm, node_alias, consts)
