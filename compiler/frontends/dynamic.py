"""Capture of PyTorch modules with data-dependent control flow (DyCL-style, Chen et al.,
ISSTA 2023, arXiv 2307.04963): ``forward`` -> a control program of conditions and straight-line
tensor blocks, each block an FX graph that :func:`block_to_ir` turns into an IR graph.

Two capture paths (:func:`capture` picks one; ``ControlProgram.capture`` records it):

* ``"torch.export"`` -- when ``forward`` uses ``torch.cond`` and has no plain ``if``/``while``
  on local values: ``torch.export.export`` gives an ATen graph whose
  ``torch.ops.higher_order.cond`` nodes (true/false branches: ``get_attr`` subgraphs) become
  conditions and branch blocks, recursively (nested and sequential conds); see
  :func:`capture_export`.  ATen layers with constant weights are mapped to ``nn.Module`` calls
  so both paths share :func:`block_to_ir`.
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
5. :func:`block_to_ir` converts a block: supported tensor ops (Conv2d, Linear, BatchNorm, ReLU,
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
import operator
import textwrap
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UnsupportedError
from ..ir.layout import NCHW, PLAIN, layout_of

__all__ = ["CaptureError", "BlockItem", "IfItem", "ReturnItem", "ControlProgram", "capture", "BlockIR",
           "block_to_ir", "count_items", "walk_items", "capture_export"]


class CaptureError(UnsupportedError):
    """Dynamism outside the supported subset; the message names the source line."""


# --------------------------------------------------------------------------- program items
@dataclass
class BlockItem:
    """A straight-line tensor block.  ``inputs``/``outputs``: live variable names at its
    boundaries; ``gm``: the traced ``torch.fx.GraphModule`` (args = inputs, returns a tuple of
    outputs); ``lines``: source lines of its statements."""
    id: int
    stmts: list
    lines: tuple = ()
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    gm: Any = None
    source: str = ""
    recipe: Any = None  # torch.export path: (fx nodes, env, output assignments, uses, defs)


@dataclass
class IfItem:
    """A condition: ``cond_var`` (computed by the preceding block) selects ``then`` / ``orelse``."""
    id: int
    cond_var: str
    test_src: str
    line: int
    then: list = field(default_factory=list)
    orelse: list = field(default_factory=list)


@dataclass
class ReturnItem:
    """``return``: the variables returned (a tuple when ``is_tuple``)."""
    id: int
    names: tuple
    line: int
    is_tuple: bool = False


@dataclass
class ControlProgram:
    """The captured control graph of one ``forward``.

    Attributes:
        items: the structured program (blocks, conditions, returns).
        arg_names: ``forward``'s tensor arguments.
        specializations: decisions taken at capture time (``{"line", "what", "value"}``).
        unrolled: loops unrolled (``{"line", "trips"}``).
        filename / first_line: where ``forward`` lives (lines in messages are file lines).
        capture: ``"torch.export"`` (``torch.cond`` lowered from the exported graph) or
            ``"ast"`` (source analysis); ``capture_note``: why the ast path was used when
            ``torch.export`` was tried and failed (empty otherwise).
    """
    items: list
    arg_names: list
    module: Any
    specializations: list
    unrolled: list
    filename: str
    first_line: int
    capture: str = "ast"
    capture_note: str = ""

    def blocks(self) -> list:
        return [i for i in walk_items(self.items) if isinstance(i, BlockItem)]

    def conditions(self) -> list:
        return [i for i in walk_items(self.items) if isinstance(i, IfItem)]

    def returns(self) -> list:
        return [i for i in walk_items(self.items) if isinstance(i, ReturnItem)]


def walk_items(items):
    for it in items:
        yield it
        if isinstance(it, IfItem):
            yield from walk_items(it.then)
            yield from walk_items(it.orelse)


def count_items(items) -> dict:
    c = {"blocks": 0, "conditions": 0, "returns": 0}
    for it in walk_items(items):
        c[{BlockItem: "blocks", IfItem: "conditions", ReturnItem: "returns"}[type(it)]] += 1
    return c


# --------------------------------------------------------------------------- AST lowering
class _Subst(ast.NodeTransformer):
    """Replace loads of bound loop variables with constants / named module references."""

    def __init__(self, binding: dict):
        self.binding = binding

    def visit_Name(self, node):
        if isinstance(node.ctx, ast.Load) and node.id in self.binding:
            return ast.copy_location(copy.deepcopy(self.binding[node.id]), node)
        return node


def _names_loaded(node) -> set:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _names_stored(node) -> set:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


def _is_torch_cond(call) -> bool:
    if not isinstance(call, ast.Call):
        return False
    f = call.func
    return (isinstance(f, ast.Attribute) and f.attr == "cond"
            and isinstance(f.value, ast.Name) and f.value.id == "torch")


class _Lowerer:
    def __init__(self, module, fn_ast, ns, first_line, filename):
        self.module = module
        self.ns = ns
        self.first_line = first_line
        self.filename = filename
        self.locals = {a.arg for a in fn_ast.args.args[1:]} | _names_stored(fn_ast)
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
        return bool(_names_loaded(expr) & self.locals)

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


# --------------------------------------------------------------------------- liveness
def _block_uses_defs(stmts):
    uses, defs = [], set()
    for s in stmts:
        for n in sorted(_names_loaded(s.value)):
            if n not in defs and n not in uses:
                uses.append(n)
        defs |= _names_stored(s)
    return uses, defs


def _liveness(items, live_after: set, local_names: set) -> set:
    live = set(live_after)
    for it in reversed(items):
        if isinstance(it, ReturnItem):
            live = set(it.names)
        elif isinstance(it, IfItem):
            live = {it.cond_var} | _liveness(it.then, live, local_names) | _liveness(it.orelse, live, local_names)
        else:
            if it.recipe is not None:
                uses, defs = list(it.recipe[3]), set(it.recipe[4])
            else:
                uses, defs = _block_uses_defs(it.stmts)
            uses = [u for u in uses if u in local_names]
            it.inputs = uses
            it.outputs = sorted(d for d in defs if d in live)
            live = (live - defs) | set(uses)
    return live


# --------------------------------------------------------------------------- tracing
def _trace_block(lw: _Lowerer, blk: BlockItem, fn_globals: dict):
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


def _propagate(lw, items, env, fn_globals):
    """Trace every block and run it on example values (shape propagation); both branches of
    every condition are explored.  Returns the env after the items (None when all paths returned)."""
    from torch.fx.passes.shape_prop import ShapeProp

    for it in items:
        if env is None:
            return None
        if isinstance(it, BlockItem):
            gm = it.gm if it.gm is not None else _trace_block(lw, it, fn_globals)
            missing = [i for i in it.inputs if i not in env]
            if missing:
                raise CaptureError(f"{lw.filename}:{it.lines[0]}: variable(s) {', '.join(missing)} may be "
                                   f"undefined here on some path")
            try:
                res = ShapeProp(gm).propagate(*[env[i] for i in it.inputs])
            except Exception as e:
                raise CaptureError(f"{lw.filename}:{it.lines[0]}: block {it.id} fails on example values: "
                                   f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
            env = dict(env)
            env.update(zip(it.outputs, res))
        elif isinstance(it, IfItem):
            a = _propagate(lw, it.then, dict(env), fn_globals)
            b = _propagate(lw, it.orelse, dict(env), fn_globals)
            if a is None or b is None:
                env = a if b is None else b
                continue
            merged = {}
            for k in set(a) | set(b):
                if k in a and k in b:
                    sa, sb = _shape_of(a[k]), _shape_of(b[k])
                    if sa != sb:
                        raise CaptureError(f"{lw.filename}:{it.line}: after `if {it.test_src}`, variable {k!r} "
                                           f"has shape {sa} on one path and {sb} on the other")
                merged[k] = a[k] if k in a else b[k]
            env = merged
        else:
            return None
    return env


def _shape_of(v):
    import torch
    return tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__


def _uses_torch_cond(fn) -> bool:
    return any(_is_torch_cond(n) for n in ast.walk(fn))


def _has_data_if(fn, arg_names) -> bool:
    """Whether ``fn`` has an ``if``/``while``/conditional expression whose test reads a local
    (argument or assigned name): such a test may depend on data and needs the ast path."""
    local = set(arg_names) | _names_stored(fn)
    return any(isinstance(n, (ast.If, ast.IfExp, ast.While)) and _names_loaded(n.test) & local
               for n in ast.walk(fn))


def capture(module, example_inputs, method: str = "auto") -> ControlProgram:
    """Capture ``module.forward`` into a :class:`ControlProgram` (DyCL's control graph).

    Args:
        module: an ``nn.Module`` in eval mode.
        example_inputs: a batch-1 example tensor (or tuple of them), used for shapes only.
        method: ``"auto"`` (default): when ``forward`` uses ``torch.cond`` and has no plain
            ``if``/``while`` on local values, capture with ``torch.export`` (the exported
            graph's ``torch.ops.higher_order.cond`` nodes become conditions, their branch
            subgraphs blocks; see :func:`capture_export`), falling back to the ``ast`` path
            (recorded in ``capture_note``) if export fails; otherwise the ``ast`` path.
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
    lw = _Lowerer(module, fn, ns, first, filename)
    items: list = []
    cur, returned = lw.lower(fn.body, items, [])
    if not returned:
        raise CaptureError(f"{filename}:{first}: some path through forward does not end in `return`")
    local_names = set(lw.locals) | set(arg_names)
    _liveness(items, set(), local_names)
    ns.pop("self", None)
    prog = ControlProgram(items, arg_names, module, lw.specializations, lw.unrolled, filename, first,
                          capture="ast", capture_note=note)
    with torch.no_grad():
        _propagate(lw, items, dict(zip(arg_names, example_inputs)), ns)
    return prog


# --------------------------------------------------------------------------- torch.export path
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
    returns the constant or None), so that :func:`block_to_ir` maps it like a layer call;
    None when ``n`` is not such a layer.  Returns (module, input node)."""
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
        m = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=tuple(_pair(stride[0]) if len(stride) == 1 else stride),
                      padding=tuple(_pair(pad[0]) if len(pad) == 1 else pad),
                      dilation=tuple(_pair(dil[0]) if len(dil) == 1 else dil), groups=groups, bias=b is not None)
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
        k = tuple(_pair(k[0]) if len(k) == 1 else k)
        s = tuple(_pair(s[0]) if len(s) == 1 else s) if s else k
        p = tuple(_pair(p[0]) if len(p) == 1 else p)
        d = tuple(_pair(d[0]) if len(d) == 1 else d)
        return nn.MaxPool2d(k, s, p, d, ceil_mode=ceil), x
    if t is A.avg_pool2d.default:
        a += [[], [0, 0], False, True, None][len(a) - 2:]
        x, k, s, p, ceil, cip, div = a[:7]
        k = tuple(_pair(k[0]) if len(k) == 1 else k)
        s = tuple(_pair(s[0]) if len(s) == 1 else s) if s else k
        p = tuple(_pair(p[0]) if len(p) == 1 else p)
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
    ``nn.Module`` calls and the other ATen ops keep their targets, so :func:`block_to_ir`
    maps them like the fx-traced blocks of the ast path (DyCL, arXiv 2307.04963, section 3).

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
    _liveness(items, set(), {b for it in walk_items(items) if isinstance(it, BlockItem) for b in it.recipe[4]}
              | set(arg_names))
    for blk in (i for i in walk_items(items) if isinstance(i, BlockItem)):
        _build_export_block(blk)
    prog = ControlProgram(items, list(arg_names), module, lw.specializations, [], filename, first,
                          capture="torch.export")

    class _Where:
        pass
    where = _Where()
    where.filename = filename
    with torch.no_grad():
        _propagate(where, items, dict(zip(arg_names, example_inputs)), {})
    return prog


# --------------------------------------------------------------------------- FX block -> IR
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


class _Batch:
    """Marker for ``x.size(0)`` / ``x.shape[0]`` (the batch dimension)."""


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def block_to_ir(blk: BlockItem, name: str = "block") -> BlockIR:
    """Convert a traced block into a device IR graph plus host ops (see :class:`BlockIR`)."""
    import torch
    import torch.nn as nn

    from ..ir import FLOAT32, Const, GraphBuilder

    gm = blk.gm
    mods = dict(gm.named_modules())
    b = GraphBuilder(name)
    dev: dict = {}     # fx node -> (ir value, kind)
    const: dict = {}   # fx node -> python/torch value
    host: list = []
    folded = 0
    dev_inputs = []

    def meta_shape(n):
        tm = n.meta.get("tensor_meta")
        return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None

    def is_float_tensor(n):
        tm = n.meta.get("tensor_meta")
        return tm is not None and hasattr(tm, "dtype") and tm.dtype == torch.float32

    def cf(v):
        return Const(np.asarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v, np.float32), FLOAT32)

    def arg_nodes(n):
        out = []
        torch.fx.node.map_arg((n.args, n.kwargs), lambda a: out.append(a))
        return out

    def resolve(a):
        return torch.fx.node.map_arg(a, lambda x: const[x])

    def fold(n):
        args, kwargs = resolve(n.args), resolve(n.kwargs)
        if n.op == "call_module":
            return mods[n.target](*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        return getattr(args[0], n.target)(*args[1:], **kwargs)

    def const_channel(c, kind, shape):
        """A constant operand as an Affine param: scalar, or per channel of a device value."""
        t = torch.as_tensor(c, dtype=torch.float32)
        if t.numel() == 1:
            return cf(t.reshape(()))
        C = shape[1] if shape else None
        if kind == NCHW and tuple(t.shape) in ((C, 1, 1), (1, C, 1, 1)):
            return cf(t.reshape(C))
        if kind == PLAIN and len(shape) == 2 and tuple(t.shape) in ((C,), (1, C)):
            return cf(t.reshape(C))
        return None

    def add(op, ins, attrs=None, params=None, nm=None):
        return b.add(nm, op, ins, attrs or {}, params or {})

    def flatten_dev(x, kind, shape, nm):
        if kind == PLAIN:
            return x
        _, C, H, W = shape
        if H * W != 1:
            x = add("Transpose", [x], {"perm": (2, 0, 1)}, nm=nm + "_chw")
        return add("Reshape", [x], {"shape": (C * H * W,)}, nm=nm)

    def convert(n):
        """IR value for fx node ``n`` (returns (value, kind)) or None when it is a host op."""
        t = n.target
        args = n.args
        shape = meta_shape(n)
        kind = layout_of(len(shape)) if shape is not None else None
        nm = n.name
        x = dev.get(args[0]) if args and isinstance(args[0], torch.fx.Node) else None
        if n.op == "call_module":
            m = mods[t]
            if x is None:
                return None
            xv, xk = x
            if isinstance(m, (nn.Identity, nn.Dropout)):
                return x
            if isinstance(m, nn.Conv2d) and xk == NCHW and m.padding_mode == "zeros" and _pair(m.dilation) == (1, 1) \
                    and not isinstance(m.padding, str):
                w = m.weight.detach().permute(2, 3, 1, 0)
                ph, pw = _pair(m.padding)
                params = {"weight": cf(w)}
                if m.bias is not None:
                    params["bias"] = cf(m.bias)
                return add("Conv", [xv], {"kernel": tuple(m.kernel_size), "strides": _pair(m.stride),
                                          "pads": (ph, pw, ph, pw), "groups": m.groups}, params, nm), NCHW
            if isinstance(m, nn.Linear) and xk == PLAIN:
                params = {"weight": cf(m.weight.detach().t())}
                if m.bias is not None:
                    params["bias"] = cf(m.bias)
                return add("Dense", [xv], {}, params, nm), PLAIN
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) and m.running_mean is not None and \
                    ((isinstance(m, nn.BatchNorm2d) and xk == NCHW) or (isinstance(m, nn.BatchNorm1d) and xk == PLAIN)):
                s = (m.weight.detach() if m.weight is not None else 1.0) / torch.sqrt(m.running_var + m.eps)
                bias = (m.bias.detach() if m.bias is not None else 0.0) - m.running_mean * s
                return add("Affine", [xv], {}, {"scale": cf(s), "bias": cf(bias)}, nm), xk
            if isinstance(m, nn.ReLU):
                return add("Relu", [xv], nm=nm), xk
            if isinstance(m, nn.MaxPool2d) and xk == NCHW and not m.ceil_mode and _pair(m.dilation) == (1, 1):
                k, s, p = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding)
                return add("MaxPool", [xv], {"kernel": k, "strides": s, "pads": (*p, *p)}, nm=nm), NCHW
            if isinstance(m, nn.AvgPool2d) and xk == NCHW and _pair(m.padding) == (0, 0) and not m.ceil_mode \
                    and m.divisor_override is None:
                k, s = _pair(m.kernel_size), _pair(m.stride or m.kernel_size)
                return add("AvgPool", [xv], {"kernel": k, "strides": s, "pads": (0, 0, 0, 0)}, nm=nm), NCHW
            if isinstance(m, nn.AdaptiveAvgPool2d) and xk == NCHW and _pair(m.output_size) == (1, 1):
                g = add("GlobalAvgPool", [xv], nm=nm + "_gap")
                return add("Reshape", [g], {"shape": (1, 1, shape[1])}, nm=nm), NCHW
            if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
                return flatten_dev(xv, xk, meta_shape(args[0]), nm), PLAIN
            if isinstance(m, nn.Softmax) and xk == PLAIN and m.dim in (1, -1):
                return add("Softmax", [xv], {"axis": -1}, nm=nm), PLAIN
            return None
        if n.op not in ("call_function", "call_method"):
            return None
        if isinstance(t, torch._ops.OpOverload):  # exported ATen op: aten::relu -> "relu"
            name = t._schema.name.split("::")[-1]
        else:
            name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
        kw = n.kwargs
        if name in ("relu", "relu_") and x is not None:
            return add("Relu", [x[0]], nm=nm), x[1]
        if name in ("contiguous", "clone", "dropout") and x is not None:
            return x
        if name == "flatten" and x is not None:
            sd = args[1] if len(args) > 1 else kw.get("start_dim", 0 if n.op == "call_function" and False else 1)
            ed = args[2] if len(args) > 2 else kw.get("end_dim", -1)
            if sd == 1 and ed == -1:
                return flatten_dev(x[0], x[1], meta_shape(args[0]), nm), PLAIN
            return None
        if name in ("view", "reshape") and x is not None:
            tgt = args[1:] if not (len(args) == 2 and isinstance(args[1], (tuple, list))) else args[1]
            tgt = [const.get(a, a) if isinstance(a, torch.fx.Node) else a for a in tgt]
            if len(tgt) == 2 and (tgt[0] is _Batch or tgt[0] == -1) and shape is not None and len(shape) == 2:
                return flatten_dev(x[0], x[1], meta_shape(args[0]), nm), PLAIN
            return None
        if name in ("softmax",) and x is not None and x[1] == PLAIN:
            dim = args[1] if len(args) > 1 else kw.get("dim")
            if dim in (1, -1):
                return add("Softmax", [x[0]], {"axis": -1}, nm=nm), PLAIN
            return None
        if name in ("adaptive_avg_pool2d",) and x is not None and x[1] == NCHW:
            os_ = args[1] if len(args) > 1 else kw.get("output_size")
            if _pair(os_) == (1, 1):
                g = add("GlobalAvgPool", [x[0]], nm=nm + "_gap")
                return add("Reshape", [g], {"shape": (1, 1, shape[1])}, nm=nm), NCHW
            return None
        if name == "mean" and x is not None and x[1] == NCHW:
            dims = args[1] if len(args) > 1 else kw.get("dim")
            if tuple(dims or ()) in ((2, 3), (-2, -1)) and not kw.get("keepdim", False) and len(args) <= 2:
                return add("GlobalAvgPool", [x[0]], nm=nm), PLAIN
            return None
        if name == "cat":
            xs = args[0]
            dim = args[1] if len(args) > 1 else kw.get("dim", 0)
            if all(a in dev for a in xs) and len({dev[a][1] for a in xs}) == 1 and dim == 1 and len(xs) >= 2:
                return add("Concat", [dev[a][0] for a in xs], {"axis": -1}, nm=nm), dev[xs[0]][1]
            return None
        if name in ("add", "iadd", "sub", "isub", "mul", "imul", "truediv", "div", "neg") and shape is not None:
            if name == "neg":
                return (add("Affine", [x[0]], {}, {"scale": cf(np.float32(-1))}, nm=nm), x[1]) if x else None
            if len(args) != 2 or kw.get("alpha", 1) != 1:
                return None
            a, c = args
            da = dev.get(a) if isinstance(a, torch.fx.Node) else None
            dc = dev.get(c) if isinstance(c, torch.fx.Node) else None
            ca = const[a] if isinstance(a, torch.fx.Node) and a in const else (a if not isinstance(a, torch.fx.Node) else None)
            cc = const[c] if isinstance(c, torch.fx.Node) and c in const else (c if not isinstance(c, torch.fx.Node) else None)
            base = {"iadd": "add", "isub": "sub", "imul": "mul", "div": "truediv"}.get(name, name)
            if da and dc:
                if kind is None or da[1] != dc[1] or da[1] != kind or len(meta_shape(a)) != len(meta_shape(c)):
                    return None
                if base == "add":
                    return add("Add", [da[0], dc[0]], nm=nm), kind
                if base == "mul":
                    return add("Mul", [da[0], dc[0]], nm=nm), kind
                if base == "sub":
                    neg = add("Affine", [dc[0]], {}, {"scale": cf(np.float32(-1))}, nm=nm + "_neg")
                    return add("Add", [da[0], neg], nm=nm), kind
                return None
            if da and cc is not None and isinstance(cc, (int, float, torch.Tensor)) and not isinstance(cc, bool):
                p = const_channel(cc, da[1], meta_shape(a))
                if p is None or meta_shape(a) != shape:
                    return None
                if base == "add":
                    return add("Affine", [da[0]], {}, {"bias": p}, nm=nm), da[1]
                if base == "sub":
                    return add("Affine", [da[0]], {}, {"bias": cf(-p.data)}, nm=nm), da[1]
                if base == "mul":
                    return add("Affine", [da[0]], {}, {"scale": p}, nm=nm), da[1]
                if base == "truediv":
                    return add("Affine", [da[0]], {}, {"scale": cf(np.float32(1) / p.data)}, nm=nm), da[1]
                return None
            if dc and ca is not None and isinstance(ca, (int, float, torch.Tensor)) and not isinstance(ca, bool):
                p = const_channel(ca, dc[1], meta_shape(c))
                if p is None or meta_shape(c) != shape:
                    return None
                if base == "add":
                    return add("Affine", [dc[0]], {}, {"bias": p}, nm=nm), dc[1]
                if base == "mul":
                    return add("Affine", [dc[0]], {}, {"scale": p}, nm=nm), dc[1]
                if base == "sub":
                    return add("Affine", [dc[0]], {}, {"scale": cf(np.float32(-1)), "bias": p}, nm=nm), dc[1]
            return None
        return None

    out_node = None
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            shape = meta_shape(n)
            kind = layout_of(len(shape)) if shape is not None and is_float_tensor(n) else None
            if kind is not None:
                ir_shape = (*shape[2:], shape[1]) if kind == NCHW else tuple(shape[1:])
                v = b.input(n.name, ir_shape, FLOAT32)
                dev[n] = (v, kind)
                dev_inputs.append((n.target, v, kind))
            continue
        if n.op == "output":
            out_node = n
            continue
        if n.op == "get_attr":
            obj = gm
            for p in n.target.split("."):
                obj = getattr(obj, p)
            const[n] = obj.detach() if isinstance(obj, torch.Tensor) else obj
            folded += 1
            continue
        ins = arg_nodes(n)
        if (n.op == "call_method" and n.target == "size" and len(n.args) >= 2 and n.args[1] == 0) or \
                (n.op == "call_function" and n.target is operator.getitem and n.args[1] == 0 and isinstance(n.args[0], torch.fx.Node)
                 and n.args[0].op == "call_function" and n.args[0].target is getattr and n.args[0].args[1] == "shape"):
            const[n] = _Batch
            host.append(n)  # also computable on the host (per sample it is 1)
            continue
        if n.op == "call_method" and n.target == "size" and len(n.args) >= 2 and meta_shape(n.args[0]):
            const[n] = meta_shape(n.args[0])[n.args[1]]
            continue
        if ins and all(i in const and const[i] is not _Batch for i in ins) and not (n.op == "call_function" and n.target in (
                torch.rand, torch.randn, torch.randint)):
            try:
                const[n] = fold(n)
                folded += 1
                continue
            except Exception:
                pass
        r = None
        try:
            if any(i in dev for i in ins) and all(i in dev or i in const for i in ins):
                r = convert(n)
        except Exception:
            r = None
        if r is not None:
            dev[n] = r
        else:
            host.append(n)

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
        if n in dev and n not in host:
            return
        if n in const and n not in host:
            return
        need.add(n)
        for a in arg_nodes(n):
            want(a)

    for var, src in zip(blk.outputs, out_list):
        if isinstance(src, torch.fx.Node) and src in placeholders:
            outputs[var] = ("alias", placeholders[src])
        elif isinstance(src, torch.fx.Node) and src in dev and dev[src][0] not in b.inputs:
            outputs[var] = ("dev", src.name)
            dev_outputs[src.name] = dev[src]
        elif isinstance(src, torch.fx.Node) and src in dev:  # device alias of an input (e.g. Identity)
            outputs[var] = ("alias", next(p for p in placeholders if dev.get(p) == dev[src]).target)
        elif isinstance(src, torch.fx.Node) and src in const and const[src] is not _Batch:
            outputs[var] = ("const", const[src])
        elif isinstance(src, torch.fx.Node):
            outputs[var] = ("host", src.name)
            want(src)
        else:
            outputs[var] = ("const", src)
    for n in list(need):
        for a in arg_nodes(n):
            if a in dev and a not in placeholders and dev[a][0] not in b.inputs:
                dev_outputs[a.name] = dev[a]
    host_nodes = sorted(need, key=order.get)
    graph = None
    ir_outs = []
    for k, (v, _kind) in dev_outputs.items():
        if v not in ir_outs:
            ir_outs.append(v)
    if ir_outs:
        b.output(*ir_outs)
        graph = b.build()  # unpruned: qdeploy.dynamic.extract removes dead nodes and unused inputs
    else:
        dev_inputs = []

    def op_name(n):
        if n.op == "call_module":
            return type(mods[n.target]).__name__
        return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))

    inv = {v[0]: p.target for p, v in dev.items() if p in placeholders}
    node_alias = {n.name: inv[v[0]] for n, v in dev.items() if v[0] in inv}
    consts = {n.name: v for n, v in const.items() if v is not _Batch}
    return BlockIR(graph, dev_inputs, dev_outputs, outputs, [n.name for n in host_nodes],
                   [op_name(n) for n in host_nodes], folded, gm, node_alias, consts)
