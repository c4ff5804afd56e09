"""Pass infrastructure: the pass context, the named pass registry, pipelines as data, and the
:class:`PassManager` that runs them.

A pass is a function ``pass(graph, **options) -> Graph`` registered under a name with
:func:`register_pass`; it never mutates its input.  What a pass wants to *say* (notes for the
report) or *compute beside the graph* (e.g. the rematerialization summary) goes to the active
:class:`PassContext`, reached with :func:`current_context` -- a context variable, so pass
signatures stay ``Graph -> Graph``.  A pipeline is data: a list of pass names, each optionally
with its options, e.g. ``["dce", ("quantize_inputs", {"input_type": "auto"}), ("remat",
{"budget": 0.8})]``; :func:`describe_pipeline` gives its JSON form for the report.
"""
from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..compiler.errors import PassError, QDeployError, VerifyError
from ..compiler.ir.graph import Graph
from ..compiler.ir.verify import verify


# ------------------------------------------------------------------ the pass context
class PassContext:
    """Where passes put their notes and results; the :class:`PassManager` makes one active for a run.

    Use it directly to collect the notes of a pass called outside a manager::

        with PassContext() as ctx:
            g2 = affine_to_fixed(g)
        ctx.notes  # ['bn1: float affine -> fixed-point ...']

    Attributes:
        pass_name: the name of the pass running now (None outside a manager's run).
        options: the options the running pass was given (a dict).
        notes: every note so far, in order (the manager also splits them per pass into
            :class:`PassRecord`).
        results: pass name -> the result that pass stored with :meth:`set_result`.
        cost_models: named cost providers ``fn(graph, options) -> (node name -> cost, notes)``
            that passes look up by name (e.g. the ``remat`` pass's ``cost: cycles``,
            :func:`qdeploy.passes.remat.cost.resolve_costs`).  Passes import no backend; the user
            layer supplies backend-priced models here (:func:`qdeploy.api.cost_models`).
    """

    def __init__(self, cost_models: dict[str, Callable] | None = None):
        self.pass_name: str | None = None
        self.options: dict = {}
        self.notes: list[str] = []
        self.results: dict[str, Any] = {}
        self.cost_models: dict[str, Callable] = dict(cost_models or {})
        self._token = None

    def note(self, text: str) -> None:
        """Record a human-readable note of the running pass (shown in the report)."""
        self.notes.append(str(text))

    def set_result(self, value, key: str | None = None) -> None:
        """Store the running pass's result (under ``key``, default the pass name)."""
        self.results[key or self.pass_name or "result"] = value

    def __enter__(self) -> "PassContext":
        self._token = _CURRENT.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _CURRENT.reset(self._token)
        self._token = None


_CURRENT: contextvars.ContextVar[PassContext | None] = contextvars.ContextVar("qdeploy_pass_context", default=None)


def current_context() -> PassContext:
    """The active :class:`PassContext`; outside any (a pass called directly) a fresh detached one,
    so notes and results of that call are discarded."""
    ctx = _CURRENT.get()
    return ctx if ctx is not None else PassContext()


def note(text: str) -> None:
    """Shorthand for ``current_context().note(text)``."""
    current_context().note(text)


# ------------------------------------------------------------------ the registry
PASSES: dict[str, Callable[..., Graph]] = {}


def register_pass(name: str) -> Callable:
    """Decorator: register ``fn(graph, **options) -> Graph`` as the pass ``name`` (sets
    ``fn.pass_name``).

    Raises:
        ValueError: another function is already registered under ``name``.
    """
    def deco(fn):
        old = PASSES.get(name)
        if old is not None and old is not fn:
            raise ValueError(f"pass {name!r} is already registered ({old.__module__}.{old.__qualname__})")
        fn.pass_name = name
        PASSES[name] = fn
        return fn
    return deco


def get_pass(name: str) -> Callable[..., Graph]:
    """The pass registered as ``name``.

    Raises:
        QDeployError: no pass of that name (the message lists the known ones).
    """
    try:
        return PASSES[name]
    except KeyError:
        raise QDeployError(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASSES))}") from None


def pass_names() -> list[str]:
    """Names of every registered pass, sorted."""
    return sorted(PASSES)


def normalize_pipeline(pipeline: Sequence) -> list[tuple[str, dict, Callable]]:
    """``(name, options, function)`` for each pipeline entry.

    An entry is a registered pass name, a ``(name, options)`` pair, or a callable ``Graph ->
    Graph`` (named by its ``pass_name`` or ``__name__``; for ad-hoc passes in tests and tools).

    Raises:
        QDeployError: an unknown pass name or a malformed entry.
    """
    out = []
    for entry in pipeline:
        if isinstance(entry, str):
            out.append((entry, {}, get_pass(entry)))
        elif isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str):
            out.append((entry[0], dict(entry[1] or {}), get_pass(entry[0])))
        elif callable(entry):
            name = getattr(entry, "pass_name", None) or getattr(entry, "__name__", type(entry).__name__)
            out.append((name, {}, entry))
        else:
            raise QDeployError(f"bad pipeline entry {entry!r}: give a pass name, (name, options) or a callable")
    return out


def _describe(v):
    """A short JSON-friendly rendering of an option value (arrays by shape and dtype)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, np.ndarray):
        return f"array{list(v.shape)} {v.dtype}"
    if isinstance(v, dict):
        return {str(k): _describe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_describe(x) for x in v]
    return str(v)


def describe_pipeline(pipeline: Sequence) -> list[dict]:
    """The pipeline as the report shows it: ``[{"name": ..., "options": {...}}, ...]`` (option
    values made JSON-friendly: arrays as ``"array[64, 16] float32"``, other objects as text)."""
    return [{"name": name, "options": _describe(opts)} for name, opts, _ in normalize_pipeline(pipeline)]


# ------------------------------------------------------------------ the manager
@dataclass
class PassRecord:
    """What one pass did: name, options, wall time (ms), node counts before/after, its notes."""

    name: str
    ms: float
    nodes_before: int
    nodes_after: int
    notes: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)


def dump_to(directory) -> Callable[[str, Graph], None]:
    """A ``dump`` callable for :class:`PassManager` writing the IR text after each pass to
    ``directory/NN_<pass>.txt`` (NN counts from 01)."""
    d = Path(directory)
    count = [0]

    def dump(name: str, graph: Graph) -> None:
        count[0] += 1
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{count[0]:02d}_{name}.txt").write_text(str(graph) + "\n")
    return dump


class PassManager:
    """Run a pipeline of passes in order.

    Args:
        pipeline: pass names, ``(name, options)`` pairs or callables (:func:`normalize_pipeline`).
        verify_each: run :func:`verify` on the input graph before the first pass and after every
            pass.  A bad input graph raises :class:`VerifyError` ("input graph ..."), a graph a
            pass broke raises :class:`PassError` naming the pass.
        dump: optional callable ``dump(pass_name, graph)`` called after each pass (e.g.
            :func:`dump_to` a directory, to see the IR after each step).
        cost_models: named cost providers given to the run's :class:`PassContext`
            (``PassContext.cost_models``), e.g. ``{"cycles": cycle_costs}``.

    After :meth:`run`: ``records`` (one :class:`PassRecord` a pass) and ``context`` (the
    :class:`PassContext` of the run: notes and pass results such as ``results["remat"]``).
    """

    def __init__(self, pipeline: Sequence, verify_each: bool = True,
                 dump: Callable[[str, Graph], None] | None = None,
                 cost_models: dict[str, Callable] | None = None):
        self.steps = normalize_pipeline(pipeline)
        self.pipeline = [(name, opts) for name, opts, _ in self.steps]
        self.verify_each = verify_each
        self.dump = dump
        self.records: list[PassRecord] = []
        self.cost_models = dict(cost_models or {})
        self.context = PassContext(self.cost_models)

    def describe(self) -> list[dict]:
        """The pipeline as data for the report (:func:`describe_pipeline`)."""
        return [{"name": name, "options": _describe(opts)} for name, opts in self.pipeline]

    def run(self, graph: Graph) -> Graph:
        """Run every pass on ``graph`` and return the result.

        Raises:
            VerifyError: the input graph is invalid (checked before the first pass).
            PassError: a pass raised (its ``cause``) or returned something that is not a valid
                :class:`Graph`; ``pass_name`` names it.
        """
        self.records = []
        self.context = ctx = PassContext(self.cost_models)
        if self.verify_each and self.steps:
            try:
                verify(graph)
            except VerifyError as e:
                raise VerifyError(f"input graph (before the first pass, {self.steps[0][0]}): {e.reason}",
                                  e.node) from None
        with ctx:
            for name, opts, fn in self.steps:
                ctx.pass_name, ctx.options = name, dict(opts)
                first_note = len(ctx.notes)
                t0 = time.perf_counter()
                before = len(graph.nodes)
                try:
                    res = fn(graph, **opts)
                except QDeployError as e:
                    raise PassError(e.reason, e.node, name, e) from e
                except Exception as e:
                    raise PassError(f"{type(e).__name__}: {e}", None, name, e) from e
                if not isinstance(res, Graph):
                    raise PassError(f"returned a {type(res).__name__}, not a Graph", None, name)
                if self.verify_each:
                    try:
                        verify(res)
                    except VerifyError as e:
                        raise PassError(f"left an invalid graph: {e.reason}", e.node, name, e) from e
                self.records.append(PassRecord(name, (time.perf_counter() - t0) * 1e3, before, len(res.nodes),
                                               ctx.notes[first_note:], dict(opts)))
                if self.dump:
                    self.dump(name, res)
                graph = res
            ctx.pass_name, ctx.options = None, {}
        return graph
