"""Capture of PyTorch modules with data-dependent control flow (DyCL-style, Chen et al.,
ISSTA 2023, arXiv 2307.04963): ``forward`` -> a control program of conditions and straight-line
tensor blocks, each block an FX graph that :func:`~.fx_to_ir.block_to_ir` turns into an IR graph.
This module holds :func:`capture` (which picks the path) and the ast path; the program data
model is in :mod:`.program`, the torch.export path in :mod:`.export_capture`.

Two capture paths (:func:`capture` picks one; ``ControlProgram.capture`` records it):

* ``"torch.export"`` -- when ``forward`` uses ``torch.cond`` and has no plain ``if``/``while``
  on local values: ``torch.export.export`` gives an ATen graph whose
  ``torch.ops.higher_order.cond`` nodes (true/false branches: ``get_attr`` subgraphs) become
  conditions and branch blocks, recursively (nested and sequential conds); see
  :func:`~.export_capture.capture_export`.  ATen layers with constant weights are mapped to
  ``nn.Module`` calls so both paths share :func:`~.fx_to_ir.block_to_ir`.
* ``"ast"`` -- everything else (plain data-dependent ``if``, also mixed with ``torch.cond``),
  and the fallback when ``torch.export`` fails (reason in ``capture_note``):

How the ast path works
----------------------
1. The source of ``type(module).forward`` is parsed with :mod:`ast`.  Loops with a trip count
   known before the input is seen are unrolled (the loop variable becomes a constant), ``if``
   statements whose test does not depend on the input are decided now (*specialization*,
   reported), ``torch.cond(pred, f_true, f_false, operands)`` becomes an ``if``.
2. Every remaining ``if`` splits the code: its test is hoisted into the block before it as
   ``_qd_cond<k> = <test>`` and becomes a :class:`IfItem`; ``return`` ends a path.
3. Liveness over the (loop-free) program gives each block its boundary: inputs = variables read
   before being written, outputs = variables written and read later on some path.
4. Each block is generated as a function, traced with ``torch.fx`` (submodules stay calls, so
   layers map 1:1 to IR ops), shape-propagated on example values.
5. :func:`~.fx_to_ir.block_to_ir` converts a block: supported tensor ops (Conv2d, Linear, BatchNorm, ReLU,
   pooling, flatten/view, add/sub/mul/div, softmax, cat) become an IR graph (channels-last);
   values that do not depend on the input are folded into constants; everything else
   (``max``, comparisons, ``sigmoid``, indexing, ``argmax``...) is a *host op* run with torch.

Supported Python subset of ``forward`` (anything else raises :class:`CaptureError` naming the
source line):

* positional tensor arguments (no ``*args``/``**kwargs``/defaults);
* assignments to local names or tuples of names (``x = ...``, ``a, b = ...``, ``x += ...``);
* ``if``/``elif``/``else`` on tensor values (evaluated per sample: the model is written for
  batch 1, as eager PyTorch requires for ``bool(tensor)``), including ``return`` inside a branch;
* ``for`` over ``range(...)``, a ``ModuleList``/``Sequential``, ``enumerate``/``zip`` of those --
  any iterable that can be evaluated from ``self``, globals and constants (constant trip count);
* ``torch.cond(pred, true_fn, false_fn, (operands...))`` as the right-hand side of an assignment;
* ``return`` of a local tensor expression or a tuple of them.

Rejected, with the line: ``while`` loops and ``for`` loops whose iterable depends on data
(unbounded / data-dependent trip count), ``break``/``continue``, recursion (``self(...)``,
``self.forward(...)``), side effects (``global``/``nonlocal``, assignment to attributes or
subscripts, expression statements such as ``print(...)`` or ``list.append``), ``try``/``with``,
branches that leave a variable with different shapes on different paths.  Submodules called from
``forward`` are traced by ``torch.fx`` and must themselves be straight-line.
"""
from __future__ import annotations

import ast
import copy
import inspect
import itertools
import textwrap

from .export_capture import capture_export
from .program import (BlockItem, CaptureError, ControlProgram, IfItem, ReturnItem, liveness, names_loaded,
                      names_stored, propagate_shapes)

__all__ = ["capture"]


class _Subst(ast.NodeTransformer):
    """Replace loads of bound loop variables with constants / named module references."""

    def __init__(self, binding: dict):
        self.binding = binding

    def visit_Name(self, node):
        if isinstance(node.ctx, ast.Load) and node.id in self.binding:
            return ast.copy_location(copy.deepcopy(self.binding[node.id]), node)
        return node


def _is_torch_cond(call) -> bool:
    if not isinstance(call, ast.Call):
        return False
    f = call.func
    return (isinstance(f, ast.Attribute) and f.attr == "cond"
            and isinstance(f.value, ast.Name) and f.value.id == "torch")


class _ForwardLowerer:
    """``forward``'s statements -> program items (the ast path): unrolls constant loops, decides
    input-independent ``if``s, hoists data-dependent tests into ``_qd_cond<k>`` variables."""

    def __init__(self, module, fn_ast, ns, first_line, filename):
        self.module = module
        self.ns = ns
        self.first_line = first_line
        self.filename = filename
        self.locals = {a.arg for a in fn_ast.args.args[1:]} | names_stored(fn_ast)
        self.ids = itertools.count()
        self.const_ids = itertools.count()
        self.specializations = []
        self.unrolled = []

    def line(self, node) -> int:
        return self.first_line + getattr(node, "lineno", 1) - 1

    def err(self, node, msg):
        src = ""
        try:
            src = ": `" + ast.unparse(node).splitlines()[0][:60] + "`"
        except Exception:
            pass
        raise CaptureError(f"{self.filename}:{self.line(node)}{src}: {msg}")

    # ---- helpers
    def depends_on_input(self, expr) -> bool:
        return bool(names_loaded(expr) & self.locals)

    def eval_static(self, expr):
        code = compile(ast.Expression(body=expr), "<qdeploy-capture>", "eval")
        return eval(code, self.ns)  # noqa: S307 - the user's own model source

    def bind_const(self, value):
        if isinstance(value, (bool, int, float, str)) or value is None:
            return ast.Constant(value)
        name = f"_qd_k{next(self.const_ids)}"
        self.ns[name] = value
        return ast.Name(name, ast.Load())

    def check_stmt_expr(self, node):
        for n in ast.walk(node):
            if isinstance(n, ast.Call):
                f = n.func
                if isinstance(f, ast.Name) and f.id == "self":
                    self.err(n, "recursion (calling self) is not supported")
                if (isinstance(f, ast.Attribute) and f.attr == "forward" and isinstance(f.value, ast.Name)
                        and f.value.id == "self"):
                    self.err(n, "recursion (self.forward) is not supported")
            if isinstance(n, (ast.Yield, ast.YieldFrom, ast.Await, ast.NamedExpr, ast.Lambda)):
                self.err(n, f"{type(n).__name__} is not supported in forward")

    # ---- statements
    def lower(self, stmts, out: list, cur: list) -> tuple[list, bool]:
        """Lower ``stmts`` appending items to ``out``; ``cur`` is the open block's statement
        list.  Returns (open block, whether the path returned)."""
        for s in stmts:
            if isinstance(s, ast.Expr):
                if isinstance(s.value, ast.Constant):
                    continue  # docstring / bare constant
                self.err(s, "expression statement (a call for its side effect) is not supported; "
                            "assign the result to a local name")
            elif isinstance(s, ast.Pass):
                continue
            elif isinstance(s, (ast.Global, ast.Nonlocal)):
                self.err(s, "side effects on globals (global/nonlocal) are not supported")
            elif isinstance(s, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                cur = self.assign(s, out, cur)
            elif isinstance(s, ast.If):
                cur, returned = self.if_(s, out, cur)
                if returned:
                    return cur, True
            elif isinstance(s, ast.For):
                cur, returned = self.for_(s, out, cur)
                if returned:
                    return cur, True
            elif isinstance(s, ast.While):
                self.err(s, "`while` loop: its trip count depends on data at run time and has no bound; "
                            "rewrite it as `for _ in range(N)` with a constant N and an `if` to skip")
            elif isinstance(s, (ast.Break, ast.Continue)):
                self.err(s, f"`{type(s).__name__.lower()}` is not supported (unrolled loops have no exits; "
                            f"use an `if` around the rest of the body)")
            elif isinstance(s, ast.Return):
                self.return_(s, out, cur)
                return [], True
            else:
                self.err(s, f"{type(s).__name__} statements are not supported in forward")
        return cur, False

    def flush(self, out, cur):
        if cur:
            lines = tuple(sorted({self.line(s) for s in cur}))
            out.append(BlockItem(next(self.ids), cur, lines))
        return []

    def assign(self, s, out, cur):
        self.check_stmt_expr(s)
        if isinstance(s, ast.AugAssign):
            if not isinstance(s.target, ast.Name):
                self.err(s, "augmented assignment to an attribute or subscript (side effect) is not supported")
            s = ast.copy_location(ast.Assign([ast.Name(s.target.id, ast.Store())],
                                             ast.BinOp(ast.Name(s.target.id, ast.Load()), s.op, s.value)), s)
        elif isinstance(s, ast.AnnAssign):
            if s.value is None:
                return cur
            s = ast.copy_location(ast.Assign([s.target], s.value), s)
        for t in s.targets:
            for n in ast.walk(t):
                if isinstance(n, (ast.Attribute, ast.Subscript, ast.Starred)):
                    self.err(s, "assignment to an attribute or subscript (a side effect on the module or "
                                "a shared object) is not supported; assign to a local name")
        if _is_torch_cond(s.value):
            return self.torch_cond(s, out, cur)
        cur.append(s)
        return cur

    def torch_cond(self, s, out, cur):
        call = s.value
        if len(call.args) != 4 or call.keywords:
            self.err(s, "torch.cond needs exactly (pred, true_fn, false_fn, operands)")
        pred, tf, ff, ops = call.args
        operands = ops.elts if isinstance(ops, (ast.Tuple, ast.List)) else [ops]
        branches = []
        for fn in (tf, ff):
            body = ast.copy_location(ast.Assign(s.targets, ast.Call(fn, list(operands), [])), s)
            branches.append([body])
        node = ast.copy_location(ast.If(pred, branches[0], branches[1]), s)
        cur, _ = self.if_(node, out, cur, origin="torch.cond")
        return cur

    def if_(self, s, out, cur, origin="if"):
        self.check_stmt_expr(s.test)
        if not self.depends_on_input(s.test):
            try:
                v = bool(self.eval_static(s.test))
            except Exception as e:
                self.err(s, f"cannot evaluate input-independent condition: {type(e).__name__}: {e}")
            self.specializations.append({"line": self.line(s), "what": f"{origin} {ast.unparse(s.test)}",
                                         "value": v})
            return self.lower(s.body if v else s.orelse, out, cur)
        k = next(self.ids)
        var = f"_qd_cond{k}"
        cur.append(ast.copy_location(ast.Assign([ast.Name(var, ast.Store())], s.test), s))
        self.locals.add(var)
        cur = self.flush(out, cur)
        item = IfItem(k, var, ast.unparse(s.test), self.line(s))
        then_cur, then_ret = self.lower(s.body, item.then, [])
        self.flush(item.then, then_cur)
        else_cur, else_ret = self.lower(s.orelse, item.orelse, [])
        self.flush(item.orelse, else_cur)
        out.append(item)
        return [], then_ret and else_ret

    def for_(self, s, out, cur):
        if s.orelse:
            self.err(s, "for/else is not supported")
        if self.depends_on_input(s.iter):
            self.err(s, "loop whose trip count depends on data: the iterable must be computable from "
                        "self, globals and constants (e.g. range(N), a ModuleList)")
        try:
            items = list(self.eval_static(s.iter))
        except Exception as e:
            self.err(s, f"cannot evaluate the loop iterable before run time: {type(e).__name__}: {e}")
        self.unrolled.append({"line": self.line(s), "trips": len(items)})
        for v in items:
            binding = {}
            self.bind_target(s, s.target, v, binding)
            body = [_Subst(binding).visit(copy.deepcopy(b)) for b in s.body]
            for b in body:
                ast.fix_missing_locations(b)
            cur, returned = self.lower(body, out, cur)
            if returned:
                return cur, True
        return cur, False

    def bind_target(self, s, target, value, binding):
        if isinstance(target, ast.Name):
            binding[target.id] = self.bind_const(value)
            self.locals.discard(target.id)
        elif isinstance(target, (ast.Tuple, ast.List)):
            vals = list(value)
            if len(vals) != len(target.elts):
                self.err(s, "loop target does not match the items")
            for t, v in zip(target.elts, vals):
                self.bind_target(s, t, v, binding)
        else:
            self.err(s, "loop target must be a name or a tuple of names")

    def return_(self, s, out, cur):
        if s.value is None:
            self.err(s, "`return` without a value")
        self.check_stmt_expr(s.value)
        elts = s.value.elts if isinstance(s.value, ast.Tuple) else [s.value]
        names = []
        for e in elts:
            if isinstance(e, ast.Name) and e.id in self.locals:
                names.append(e.id)
            else:
                var = f"_qd_ret{next(self.ids)}"
                self.locals.add(var)
                cur.append(ast.copy_location(ast.Assign([ast.Name(var, ast.Store())], e), s))
                names.append(var)
        self.flush(out, cur)
        out.append(ReturnItem(next(self.ids), tuple(names), self.line(s), isinstance(s.value, ast.Tuple)))


def _trace_block(lw: _ForwardLowerer, blk: BlockItem, fn_globals: dict):
    """Generate ``blk`` as a function of its inputs and trace it with ``torch.fx`` (submodules
    stay calls); sets ``blk.source`` and ``blk.gm``.  Raises CaptureError when it cannot be traced."""
    import torch
    import torch.fx as fx

    args = ", ".join(["_qd_root", *blk.inputs])
    body = "\n".join("    " + line for s in blk.stmts for line in ast.unparse(s).splitlines())
    rets = "".join(f"{o}, " for o in blk.outputs)
    src = f"def forward({args}):\n    self = _qd_root.m\n{body}\n    return ({rets})\n"
    blk.source = src
    ns = fn_globals
    exec(compile(src, f"<qdeploy block {blk.id}>", "exec"), ns)  # noqa: S102 - the user's own model source
    cls = type(f"QdBlock{blk.id}", (torch.nn.Module,), {"forward": ns.pop("forward")})
    root = cls()
    root.m = lw.module
    try:
        gm = fx.symbolic_trace(root)
    except Exception as e:
        raise CaptureError(f"{lw.filename}:{blk.lines[0] if blk.lines else '?'}: block {blk.id} (lines "
                           f"{', '.join(map(str, blk.lines))}) cannot be traced as straight-line code: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    blk.gm = gm
    return gm


def _uses_torch_cond(fn) -> bool:
    return any(_is_torch_cond(n) for n in ast.walk(fn))


def _has_data_if(fn, arg_names) -> bool:
    """Whether ``fn`` has an ``if``/``while``/conditional expression whose test reads a local
    (argument or assigned name): such a test may depend on data and needs the ast path."""
    local = set(arg_names) | names_stored(fn)
    return any(isinstance(n, (ast.If, ast.IfExp, ast.While)) and names_loaded(n.test) & local
               for n in ast.walk(fn))


def capture(module, example_inputs, method: str = "auto") -> ControlProgram:
    """Capture ``module.forward`` into a :class:`ControlProgram` (DyCL's control graph).

    Args:
        module: an ``nn.Module`` in eval mode.
        example_inputs: a batch-1 example tensor (or tuple of them), used for shapes only.
        method: ``"auto"`` (default): when ``forward`` uses ``torch.cond`` and has no plain
            ``if``/``while`` on local values, capture with ``torch.export`` (the exported
            graph's ``torch.ops.higher_order.cond`` nodes become conditions, their branch
            subgraphs blocks; see :func:`~.export_capture.capture_export`), falling back to the
            ``ast`` path (recorded in ``capture_note``) if export fails; otherwise the ``ast`` path.
            ``"export"`` / ``"ast"`` force one path (``"export"`` raises when it fails).
    Returns:
        the program; ``program.capture`` says which path built it.
    Raises:
        CaptureError: for anything outside the supported subset (see the module docstring),
            naming the file and line.
    """
    import torch

    if method not in ("auto", "export", "ast"):
        raise ValueError(f"method must be 'auto', 'export' or 'ast', not {method!r}")
    if module.training:
        raise CaptureError(f"{type(module).__name__} is in training mode; call .eval() before capture")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    fwd = type(module).forward
    try:
        lines, first = inspect.getsourcelines(fwd)
        filename = inspect.getsourcefile(fwd) or "<unknown>"
    except (OSError, TypeError) as e:
        raise CaptureError(f"cannot read the source of {type(module).__name__}.forward: {e}") from None
    tree = ast.parse(textwrap.dedent("".join(lines)))
    fn = tree.body[0]
    if not isinstance(fn, ast.FunctionDef):
        raise CaptureError(f"{filename}:{first}: forward must be a plain def")
    a = fn.args
    if a.vararg or a.kwarg or a.kwonlyargs or a.defaults or a.posonlyargs:
        raise CaptureError(f"{filename}:{first}: forward must take plain positional tensor arguments")
    arg_names = [x.arg for x in a.args[1:]]
    if len(arg_names) != len(example_inputs):
        raise CaptureError(f"forward takes {len(arg_names)} inputs, {len(example_inputs)} examples given")
    note = ""
    if method == "export" or (method == "auto" and _uses_torch_cond(fn) and not _has_data_if(fn, arg_names)):
        try:
            return capture_export(module, example_inputs, arg_names, filename, first)
        except Exception as e:
            if method == "export":
                raise
            note = f"torch.export failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
    ns = dict(fwd.__globals__)
    if fwd.__closure__:
        ns.update(zip(fwd.__code__.co_freevars, (c.cell_contents for c in fwd.__closure__)))
    ns["self"] = module
    lw = _ForwardLowerer(module, fn, ns, first, filename)
    items: list = []
    cur, returned = lw.lower(fn.body, items, [])
    if not returned:
        raise CaptureError(f"{filename}:{first}: some path through forward does not end in `return`")
    local_names = set(lw.locals) | set(arg_names)
    liveness(items, set(), local_names)
    ns.pop("self", None)
    prog = ControlProgram(items, arg_names, module, lw.specializations, lw.unrolled, filename, first,
                          capture="ast", capture_note=note)
    with torch.no_grad():
        propagate_shapes(items, dict(zip(arg_names, example_inputs)), filename,
                         lambda blk: _trace_block(lw, blk, ns))
    return prog

