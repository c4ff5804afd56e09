"""The ``torch.export`` capture path: ``forward`` -> a :class:`~.program.ControlProgram` from the
exported ATen graph, for models whose data-dependent control flow is written with ``torch.cond``.

The exported graph is split at every ``torch.ops.higher_order.cond`` node (see
:func:`capture_export`); blocks are rebuilt as ``torch.fx`` GraphModules whose ATen layers with
constant weights become ``nn.Module`` calls, so :func:`~.fx_to_ir.block_to_ir` maps them like the
fx-traced blocks of the ast path (:mod:`.ast_capture`, which also picks between the two paths).
"""
from __future__ import annotations

import itertools
import operator

from .fx_rules import as_pair
from .program import BlockItem, CaptureError, ControlProgram, IfItem, ReturnItem, liveness, propagate_shapes, walk_items

__all__ = ["capture_export"]


def _frame_line(node, filename, default):
    """First (outermost) line of ``filename`` in an exported node's stack trace."""
    import re
    for f, ln in re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or ""):
        if f == filename:
            return int(ln)
    return default


class _ExportLowerer:
    """Exported (ATen) graph -> program items.  ``env`` maps an fx node of the graph being
    lowered to ``("var", name)`` (a value computed by an earlier block / a block input) or
    ``("const", value)`` (parameters, buffers, lifted constants)."""

    def __init__(self, filename, first):
        import torch
        self.cond_op = torch.ops.higher_order.cond
        self.filename, self.first = filename, first
        self.ids = itertools.count()
        self.specializations = []

    def lower(self, owner, graph, env, prefix, out_names, line):
        import torch

        items, cur = [], []

        def var_of(n):
            return f"{prefix}{n.name}"

        def flush(assign=()):
            nonlocal cur
            if not cur and not assign:
                return
            local = set(cur)
            uses, defs = [], {var_of(n) for n in cur} | {nm for nm, _ in assign}
            srcs = []
            for n in cur:
                torch.fx.node.map_arg((n.args, n.kwargs), srcs.append)
            srcs += [src for _, src in assign if isinstance(src, torch.fx.Node)]
            for src in srcs:
                if src in local:
                    continue
                kind, val = env[src]
                if kind == "var" and val not in uses:
                    uses.append(val)
            lines = sorted({_frame_line(n, self.filename, line) for n in cur} or {line})
            blk = BlockItem(next(self.ids), [], tuple(lines))
            blk.recipe = (list(cur), env, list(assign), uses, defs, var_of)
            items.append(blk)
            for n in cur:
                env[n] = ("var", var_of(n))
            cur = []

        def need(n, what):
            if n in env or n in cur:
                return
            raise CaptureError(f"{self.filename}:{line}: {what} `{n.name}` is not a value of this graph")

        for n in graph.nodes:
            if n.op == "placeholder":
                if n not in env:
                    raise CaptureError(f"{self.filename}:{line}: exported input {n.name!r} not bound")
                continue
            if n.op == "get_attr":
                v = owner
                for part in n.target.split("."):
                    v = getattr(v, part)
                if not isinstance(v, torch.fx.GraphModule):
                    env[n] = ("const", v)
                continue
            if n.op == "output":
                vals = n.args[0]
                vals = list(vals) if isinstance(vals, (tuple, list)) else [vals]
                for v in vals:
                    if not isinstance(v, torch.fx.Node) or (v in env and env[v][0] == "const"):
                        raise CaptureError(f"{self.filename}:{line}: a constant (input-independent) output "
                                           f"is not supported")
                if out_names is None:   # top level: return
                    flush()
                    names = tuple(env[v][1] for v in vals)
                    items.append(ReturnItem(next(self.ids), names, _frame_line(n, self.filename, line),
                                            self.is_tuple))
                else:                   # a branch: define the cond's output variables
                    if len(vals) != len(out_names):
                        raise CaptureError(f"{self.filename}:{line}: torch.cond branch returns {len(vals)} "
                                           f"values, expected {len(out_names)}")
                    flush(list(zip(out_names, vals)))
                return items
            if n.op == "call_function" and n.target is self.cond_op:
                pred, tnode, fnode, operands = n.args[:4]
                ln = _frame_line(n, self.filename, line)
                need(pred, "condition")
                flush()
                outs = {}
                for u in n.users:
                    if u.op == "call_function" and u.target is operator.getitem:
                        outs[u.args[1]] = u
                tg = getattr(owner, tnode.target)
                fg = getattr(owner, fnode.target)
                n_out = len(next(iter(x for x in tg.graph.nodes if x.op == "output")).args[0])
                out_vars = [var_of(outs[i]) if i in outs else f"{prefix}{n.name}_{i}" for i in range(n_out)]
                k = next(self.ids)
                branches = []
                for sub, tag in ((tg, "t"), (fg, "f")):
                    phs = [x for x in sub.graph.nodes if x.op == "placeholder"]
                    if len(phs) != len(operands):
                        raise CaptureError(f"{self.filename}:{ln}: torch.cond branch takes {len(phs)} inputs, "
                                           f"{len(operands)} operands given")
                    sub_env = {}
                    for ph, op in zip(phs, operands):
                        need(op, "torch.cond operand")
                        sub_env[ph] = env[op]
                    branches.append((sub, sub_env, f"{prefix}c{k}{tag}_"))
                if env[pred][0] == "const":  # input-independent predicate: decided now
                    v = bool(env[pred][1])
                    self.specializations.append({"line": ln, "what": f"torch.cond {pred.name}", "value": v})
                    sub, sub_env, pre = branches[0 if v else 1]
                    items.extend(self.lower(sub, sub.graph, sub_env, pre, out_vars, ln))
                else:
                    item = IfItem(k, env[pred][1], f"torch.cond({pred.name})", ln)
                    item.then = self.lower(*branches[0][:1], branches[0][0].graph, branches[0][1], branches[0][2],
                                           out_vars, ln)
                    item.orelse = self.lower(branches[1][0], branches[1][0].graph, branches[1][1], branches[1][2],
                                             out_vars, ln)
                    items.append(item)
                for i, u in outs.items():
                    env[u] = ("var", out_vars[i])
                continue
            if n in env:  # getitem of a cond: defined by the branches
                continue
            if n.op != "call_function":
                raise CaptureError(f"{self.filename}:{_frame_line(n, self.filename, line)}: exported node "
                                   f"{n.op} {n.target} is not supported")
            cur.append(n)
        raise CaptureError(f"{self.filename}:{line}: exported graph has no output")


def _aten_to_module(n, cval):
    """An nn.Module equivalent to ATen node ``n`` whose weights are constants (``cval(arg)``
    returns the constant or None), so that :func:`~.fx_to_ir.block_to_ir` maps it like a layer
    call; None when ``n`` is not such a layer.  Returns (module, input node)."""
    import torch
    import torch.nn as nn

    A = torch.ops.aten
    t, a = n.target, list(n.args)
    if t is A.conv2d.default:
        a += [None, [1, 1], [0, 0], [1, 1], 1][len(a) - 2:]
        x, w, b, stride, pad, dil, groups = a[:7]
        w, bv = cval(w), (cval(b) if b is not None else None)
        if w is None or (b is not None and bv is None) or isinstance(pad, str):
            return None
        m = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]),
                      stride=tuple(as_pair(stride[0]) if len(stride) == 1 else stride),
                      padding=tuple(as_pair(pad[0]) if len(pad) == 1 else pad),
                      dilation=tuple(as_pair(dil[0]) if len(dil) == 1 else dil), groups=groups, bias=b is not None)
        m.weight.data.copy_(w)
        if b is not None:
            m.bias.data.copy_(bv)
        return m.eval(), x
    if t is A.linear.default:
        a += [None][len(a) - 2:]
        x, w, b = a[:3]
        w, bv = cval(w), (cval(b) if b is not None else None)
        if w is None or (b is not None and bv is None):
            return None
        m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        m.weight.data.copy_(w)
        if b is not None:
            m.bias.data.copy_(bv)
        return m.eval(), x
    if t is A.batch_norm.default and len(a) >= 8 and not a[5]:
        x, w, b, rm, rv, _tr, _mom, eps = a[:8]
        rm, rv = cval(rm), cval(rv)
        wv = cval(w) if w is not None else None
        bv = cval(b) if b is not None else None
        xv = x.meta.get("val")
        if rm is None or rv is None or xv is None or xv.dim() not in (2, 4) or (w is not None and wv is None) \
                or (b is not None and bv is None):
            return None
        m = (nn.BatchNorm2d if xv.dim() == 4 else nn.BatchNorm1d)(rm.shape[0], eps=eps, affine=True)
        m.running_mean.copy_(rm)
        m.running_var.copy_(rv)
        m.weight.data.copy_(wv if wv is not None else torch.ones_like(rm))
        m.bias.data.copy_(bv if bv is not None else torch.zeros_like(rm))
        return m.eval(), x
    if t is A.max_pool2d.default:
        a += [[], [0, 0], [1, 1], False][len(a) - 2:]
        x, k, s, p, d, ceil = a[:6]
        k = tuple(as_pair(k[0]) if len(k) == 1 else k)
        s = tuple(as_pair(s[0]) if len(s) == 1 else s) if s else k
        p = tuple(as_pair(p[0]) if len(p) == 1 else p)
        d = tuple(as_pair(d[0]) if len(d) == 1 else d)
        return nn.MaxPool2d(k, s, p, d, ceil_mode=ceil), x
    if t is A.avg_pool2d.default:
        a += [[], [0, 0], False, True, None][len(a) - 2:]
        x, k, s, p, ceil, cip, div = a[:7]
        k = tuple(as_pair(k[0]) if len(k) == 1 else k)
        s = tuple(as_pair(s[0]) if len(s) == 1 else s) if s else k
        p = tuple(as_pair(p[0]) if len(p) == 1 else p)
        return nn.AvgPool2d(k, s, p, ceil_mode=ceil, count_include_pad=cip, divisor_override=div), x
    return None


def _build_export_block(blk: BlockItem):
    """The fx GraphModule of an exported block: inputs = ``blk.inputs``, returns a tuple of
    ``blk.outputs``; constants become buffers (``get_attr``), ATen layers nn.Module calls."""
    import torch
    import torch.fx as fx

    nodes, env, assign, _uses, _defs, var_of = blk.recipe
    root = torch.nn.Module()
    g = fx.Graph()
    inputs = {v: g.placeholder(v) for v in blk.inputs}
    new: dict = {}
    consts: dict = {}

    def const_node(val):
        key = id(val)
        if key not in consts:
            nm = f"_qd_c{len(consts)}"
            if isinstance(val, torch.Tensor):
                root.register_buffer(nm, val.detach().clone())
            else:
                setattr(root, nm, val)
            consts[key] = (g.get_attr(nm), val)
        return consts[key][0]

    def arg(a):
        if a in new:
            return new[a]
        kind, val = env[a]
        return inputs[val] if kind == "var" else const_node(val)

    def cval(a):
        if isinstance(a, fx.Node) and a not in new and env.get(a, ("var",))[0] == "const":
            return env[a][1]
        return None

    for i, n in enumerate(nodes):
        mm = _aten_to_module(n, cval)
        if mm is not None:
            m, x = mm
            root.add_module(f"_qd_m{i}", m)
            new[n] = g.call_module(f"_qd_m{i}", (arg(x),))
        else:
            new[n] = g.node_copy(n, arg)
    by_var = {var_of(n): n for n in nodes}
    by_var.update({nm: src for nm, src in assign})
    outs = []
    for v in blk.outputs:
        src = by_var[v]
        outs.append(arg(src) if isinstance(src, fx.Node) else src)
    g.output(tuple(outs))
    blk.gm = fx.GraphModule(root, g, class_name=f"QdExportBlock{blk.id}")
    blk.source = blk.gm.code
    return blk.gm


def capture_export(module, example_inputs, arg_names, filename="<unknown>", first=0) -> ControlProgram:
    """Capture with ``torch.export.export(module, example_inputs)`` (for ``torch.cond`` models).

    The exported ATen graph is split at every ``torch.ops.higher_order.cond`` node: the
    straight-line nodes before it form a block (which also computes the predicate), the
    predicate is a condition evaluated on the host, the ``true``/``false`` branch subgraphs
    (``get_attr`` GraphModules) are lowered recursively (so nested and sequential conds work)
    into the two paths, and what follows forms the next block.  Parameters, buffers and
    lifted constants become constants of the blocks; ``aten.conv2d``/``linear``/``batch_norm``
    (eval)/``max_pool2d``/``avg_pool2d`` with constant weights become the equivalent
    ``nn.Module`` calls and the other ATen ops keep their targets, so
    :func:`~.fx_to_ir.block_to_ir` maps them like the fx-traced blocks of the ast path (DyCL,
    arXiv 2307.04963, section 3).

    Args:
        module: ``nn.Module`` in eval mode; example_inputs: tuple of batch-1 tensors;
        arg_names: ``forward``'s argument names; filename/first: for messages.
    Returns:
        a :class:`ControlProgram` with ``capture == "torch.export"``.
    Raises:
        CaptureError: an exported node that is not a function call, a constant output,
            a branch/operand mismatch; torch.export's own errors propagate.
    """
    import torch
    from torch.export.graph_signature import InputKind

    with torch.no_grad():
        ep = torch.export.export(module, tuple(example_inputs))
        ref = module(*example_inputs)
    gm = ep.graph_module
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
    env = {}
    users = iter(arg_names)
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        s = specs[n.name]
        if s.kind == InputKind.USER_INPUT:
            env[n] = ("var", next(users))
        elif s.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            env[n] = ("const", ep.state_dict[s.target] if s.target in ep.state_dict else ep.constants[s.target])
        elif s.kind == InputKind.CONSTANT_TENSOR:
            env[n] = ("const", ep.constants[s.target])
        else:
            raise CaptureError(f"{filename}:{first}: exported input {n.name} of kind {s.kind} is not supported")
    lw = _ExportLowerer(filename, first)
    lw.is_tuple = isinstance(ref, tuple)
    items = lw.lower(gm, gm.graph, env, "", None, first)
    liveness(items, set(), {b for it in walk_items(items) if isinstance(it, BlockItem) for b in it.recipe[4]}
             | set(arg_names))
    for blk in (i for i in walk_items(items) if isinstance(i, BlockItem)):
        _build_export_block(blk)
    prog = ControlProgram(items, list(arg_names), module, lw.specializations, [], filename, first,
                          capture="torch.export")
    with torch.no_grad():
        propagate_shapes(items, dict(zip(arg_names, example_inputs)), filename)
    return prog

