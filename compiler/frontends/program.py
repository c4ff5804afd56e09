"""The control program of a captured ``forward``: the data model both capture paths build
(:mod:`.ast_capture`, :mod:`.export_capture`), :mod:`.fx_to_ir` converts block by block and the
dynamic runtime walks, plus the two analyses both paths run on it: liveness (each block's
boundary) and shape propagation on example values.

A program is a list of items: :class:`BlockItem` (straight-line tensor code), :class:`IfItem`
(a data-dependent condition with two sub-lists) and :class:`ReturnItem`; it is loop-free (loops
are unrolled at capture time).  DyCL's control graph (Chen et al., ISSTA 2023, arXiv 2307.04963).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import UnsupportedError

__all__ = ["CaptureError", "BlockItem", "IfItem", "ReturnItem", "ControlProgram", "walk_items", "count_items",
           "names_loaded", "names_stored", "liveness", "propagate_shapes"]


class CaptureError(UnsupportedError):
    """Dynamism outside the supported subset; the message names the source line."""


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

    def uses_defs(self) -> tuple[list, set]:
        """``(uses, defs)``: variables read before being written (in first-read order) and the
        variables written.  From the export recipe when there is one, else from the block's
        ``ast`` assignment statements."""
        if self.recipe is not None:
            return list(self.recipe[3]), set(self.recipe[4])
        uses, defs = [], set()
        for s in self.stmts:
            for n in sorted(names_loaded(s.value)):
                if n not in defs and n not in uses:
                    uses.append(n)
            defs |= names_stored(s)
        return uses, defs


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
        """Every :class:`BlockItem`, in program order (both branches of each condition)."""
        return [i for i in walk_items(self.items) if isinstance(i, BlockItem)]

    def conditions(self) -> list:
        """Every :class:`IfItem`, in program order."""
        return [i for i in walk_items(self.items) if isinstance(i, IfItem)]

    def returns(self) -> list:
        """Every :class:`ReturnItem`, in program order."""
        return [i for i in walk_items(self.items) if isinstance(i, ReturnItem)]


def walk_items(items):
    """Yield every item of ``items`` depth-first: a condition, then its ``then`` and ``orelse`` items."""
    for it in items:
        yield it
        if isinstance(it, IfItem):
            yield from walk_items(it.then)
            yield from walk_items(it.orelse)


def count_items(items) -> dict:
    """``{"blocks", "conditions", "returns"}``: how many of each item ``items`` holds (recursively)."""
    c = {"blocks": 0, "conditions": 0, "returns": 0}
    for it in walk_items(items):
        c[{BlockItem: "blocks", IfItem: "conditions", ReturnItem: "returns"}[type(it)]] += 1
    return c


def names_loaded(node) -> set:
    """Names an ``ast`` node reads (``ast.Name`` in load context)."""
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def names_stored(node) -> set:
    """Names an ``ast`` node assigns (``ast.Name`` in store context)."""
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


def liveness(items, live_after: set, local_names: set) -> set:
    """Backward liveness over a loop-free program: sets each block's ``inputs`` (its uses that are
    local names, in first-read order) and ``outputs`` (its definitions live afterwards, sorted).

    Args:
        items: program items; live_after: variables live after them; local_names: the
            ``forward`` arguments and assigned names (other names are globals/constants).
    Returns:
        the variables live before ``items``.
    """
    live = set(live_after)
    for it in reversed(items):
        if isinstance(it, ReturnItem):
            live = set(it.names)
        elif isinstance(it, IfItem):
            live = {it.cond_var} | liveness(it.then, live, local_names) | liveness(it.orelse, live, local_names)
        else:
            uses, defs = it.uses_defs()
            uses = [u for u in uses if u in local_names]
            it.inputs = uses
            it.outputs = sorted(d for d in defs if d in live)
            live = (live - defs) | set(uses)
    return live


def shape_of(v):
    """A tensor's shape tuple, or the type name of a non-tensor value (for merge messages)."""
    import torch
    return tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__


def propagate_shapes(items, env, filename: str, trace_block: Callable | None = None):
    """Run every block on example values (``torch.fx`` ``ShapeProp``, so each node gets its
    ``tensor_meta``); both branches of every condition are explored.

    Args:
        items: program items; env: ``{variable: example value}`` before them;
        filename: for messages; trace_block: ``trace_block(blk) -> GraphModule`` for a block not
            traced yet (``blk.gm`` None); the export path builds every block up front.
    Returns:
        the env after the items (None when all paths returned).
    Raises:
        CaptureError: a block input undefined on some path, a block failing on the example values,
            or a variable with different shapes on the two paths of a condition.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    for it in items:
        if env is None:
            return None
        if isinstance(it, BlockItem):
            gm = it.gm if it.gm is not None else trace_block(it)
            missing = [i for i in it.inputs if i not in env]
            if missing:
                raise CaptureError(f"{filename}:{it.lines[0]}: variable(s) {', '.join(missing)} may be "
                                   f"undefined here on some path")
            try:
                res = ShapeProp(gm).propagate(*[env[i] for i in it.inputs])
            except Exception as e:
                raise CaptureError(f"{filename}:{it.lines[0]}: block {it.id} fails on example values: "
                                   f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
            env = dict(env)
            env.update(zip(it.outputs, res))
        elif isinstance(it, IfItem):
            a = propagate_shapes(it.then, dict(env), filename, trace_block)
            b = propagate_shapes(it.orelse, dict(env), filename, trace_block)
            if a is None or b is None:
                env = a if b is None else b
                continue
            merged = {}
            for k in set(a) | set(b):
                if k in a and k in b:
                    sa, sb = shape_of(a[k]), shape_of(b[k])
                    if sa != sb:
                        raise CaptureError(f"{filename}:{it.line}: after `if {it.test_src}`, variable {k!r} "
                                           f"has shape {sa} on one path and {sb} on the other")
                merged[k] = a[k] if k in a else b[k]
            env = merged
        else:
            return None
    return env
