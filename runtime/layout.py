"""Declared tensor layouts at an artifact's interface: nothing is inferred from shapes.

The IR is channels-last with the batch dimension dropped.  The user's arrays are batch first, in
the *source* model's layout (``NCHW`` / ``NCL`` / ``NC`` for ONNX and PyTorch models), or in the
IR's channels-last layout (``NHWC`` / ``NLC`` / ``NC``) when the user says so explicitly.

A :class:`Layout` names both and holds the batch-first axis permutation ``perm`` with
``ir_array = np.transpose(source_array, perm)``.  Layouts come from the frontend's
``graph.meta['input_perms']`` / ``['output_perms']`` when a model is imported, and from the
``layout`` field of each manifest input/output entry when an artifact is loaded
(:func:`declared_layouts`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..compiler.errors import FeedError, QDeployError
from ..compiler.reference import check_real_dtype

__all__ = ["Layout", "CHANNELS_LAST", "SOURCE", "ir_letters", "graph_layouts", "manifest_layouts",
           "declared_layouts", "channels_last_mode", "to_ir", "from_ir"]

#: ``layout`` value asking for the IR's channels-last layout (inputs and outputs alike).
CHANNELS_LAST = "channels-last"
#: ``layout`` value asking for the source model's layout (the default).
SOURCE = "source"


def ir_letters(rank: int) -> str:
    """Axis letters of the IR layout of a batch-first array of ``rank`` dimensions: ``N``,
    ``NC``, ``NLC``, ``NHWC``, ``NDHWC``; ranks above 5 use ``N``, ``A``, ``B``, ... and ``C``."""
    if rank <= 1:
        return "N"[:rank]
    spatial = {2: "", 3: "L", 4: "HW", 5: "DHW"}.get(rank) or "ABDEFGIJKMOPQRSTUVXYZ"[:rank - 2]
    return "N" + spatial + "C"


@dataclass(frozen=True)
class Layout:
    """One interface tensor's layouts.

    Attributes:
        source: axis letters of the source layout (e.g. ``"NCHW"``), batch first.
        ir: axis letters of the IR layout (e.g. ``"NHWC"``), batch first.
    """

    source: str
    ir: str

    @property
    def perm(self) -> tuple[int, ...]:
        """Batch-first permutation with ``ir_array = np.transpose(source_array, perm)``."""
        return tuple(self.source.index(a) for a in self.ir)

    @classmethod
    def from_input_perm(cls, perm, rank: int) -> "Layout":
        """The layout of a graph input from its ``input_perms`` entry (source -> IR; None:
        identity) and its batch-first rank."""
        ir = ir_letters(rank)
        perm = list(perm) if perm is not None else list(range(rank))
        src = [""] * rank
        for i, p in enumerate(perm):
            src[p] = ir[i]
        return cls("".join(src), ir)

    @classmethod
    def from_output_perm(cls, perm, rank: int) -> "Layout":
        """The layout of a graph output from its ``output_perms`` entry (IR -> source; None:
        identity) and its batch-first rank."""
        ir = ir_letters(rank)
        perm = list(perm) if perm is not None else list(range(rank))
        return cls("".join(ir[p] for p in perm), ir)


def graph_layouts(graph) -> tuple[dict[str, Layout], dict[str, Layout]]:
    """``(inputs, outputs)``: the :class:`Layout` of each graph input and output by name, from
    ``graph.meta['input_perms']`` / ``['output_perms']`` (a tensor missing there -- a model built
    directly as an IR graph -- is in IR layout)."""
    ip = graph.meta.get("input_perms") or {}
    op = graph.meta.get("output_perms") or {}
    ins = {n: Layout.from_input_perm(ip.get(n), len(graph.value(n).shape) + 1) for n in graph.inputs}
    outs = {n: Layout.from_output_perm(op.get(n), len(graph.value(n).shape) + 1) for n in graph.outputs}
    return ins, outs


def manifest_layouts(graph) -> dict:
    """Manifest fields of ``graph``'s interface: ``{"inputs": {name: {"layout", "ir_layout"}},
    "outputs": {...}}``."""
    ins, outs = graph_layouts(graph)
    return {"inputs": {n: {"layout": v.source, "ir_layout": v.ir} for n, v in ins.items()},
            "outputs": {n: {"layout": v.source, "ir_layout": v.ir} for n, v in outs.items()}}


def declared_layouts(manifest: dict, graph, where: str = "artifact") -> tuple[dict[str, Layout], dict[str, Layout]]:
    """The layouts an artifact declares: each manifest input/output entry's ``layout`` field (or
    a ``layouts`` mapping as :func:`manifest_layouts` returns it, for manifests whose inputs are
    plain names); for an artifact written before that field existed, the IR's ``input_perms`` /
    ``output_perms`` meta; a rank <= 2 tensor (``NC``) has only one layout.

    Raises:
        QDeployError: a declared layout that does not fit the tensor's rank, or an old artifact
            whose IR does not record the layout of a tensor of rank >= 3 (naming the tensor).
    """
    meta_in, meta_out = graph_layouts(graph)
    recorded = (set((graph.meta.get("input_perms") or {})), set((graph.meta.get("output_perms") or {})))
    lay = manifest.get("layouts") or {}
    entries = tuple({**{e.get("name"): e for e in manifest.get(key) or [] if isinstance(e, dict)},
                     **(lay.get(key) or {})} for key in ("inputs", "outputs"))
    result = ({}, {})
    for k, (names, meta) in enumerate(((graph.inputs, meta_in), (graph.outputs, meta_out))):
        for n in names:
            rank = len(graph.value(n).shape) + 1
            e = entries[k].get(n) or {}
            src = e.get("layout")
            if src is not None:
                ir = ir_letters(rank)
                if len(src) != rank or sorted(src) != sorted(ir):
                    raise QDeployError(f"{where}: {('input', 'output')[k]} {n!r} declares layout {src!r}, which does "
                                       f"not fit its rank {rank} (IR layout {ir})", n)
                result[k][n] = Layout(src, ir)
            elif n in recorded[k] or rank <= 2:
                result[k][n] = meta[n]
            else:
                raise QDeployError(f"{where}: the manifest declares no layout for {('input', 'output')[k]} {n!r} and "
                                   f"its IR does not record one: recompile the model with this qdeploy", n)
    return result


def channels_last_mode(layout, layouts: dict[str, Layout]) -> bool:
    """Whether a user's ``layout`` argument asks for channels-last arrays.

    Args:
        layout: None or ``"source"`` (the source layout), ``"channels-last"``, or axis letters
            naming, for every input of rank >= 3, either its source or its IR layout.
        layouts: the inputs' :class:`Layout` by name.
    Raises:
        QDeployError: any other value, naming the input it does not fit.
    """
    if layout is None or layout == SOURCE:
        return False
    if layout == CHANNELS_LAST:
        return True
    modes = set()
    for n, lay in layouts.items():
        if layout == lay.source == lay.ir:  # e.g. NC: the same either way
            continue
        if layout == lay.source:
            modes.add(False)
        elif layout == lay.ir:
            modes.add(True)
        elif lay.source != lay.ir or n == next(iter(layouts)) and not any(
                layout in (v.source, v.ir) for v in layouts.values()):
            raise FeedError(f"input {n!r} is {lay.source} (the source layout) or {lay.ir} "
                               f"({CHANNELS_LAST}); got layout {layout!r}", n)
    if len(modes) > 1:
        raise QDeployError(f"layout {layout!r} is the source layout of some inputs and the {CHANNELS_LAST} layout "
                           f"of others: pass {SOURCE!r} or {CHANNELS_LAST!r}")
    return True in modes


def to_ir(name: str, x, ir_shape, lay: Layout, channels_last: bool) -> np.ndarray:
    """A user array (batch first, or one sample without the batch axis) -> IR layout, batch first.

    Args:
        name: the input's name (for errors).
        x: the array, in ``lay.source`` (or ``lay.ir`` with ``channels_last``).
        ir_shape: the IR per-sample shape (no batch dimension).
    Raises:
        FeedError (a QDeployError): a dtype that is not real (complex, strings, objects), or a shape that does not match, stated in the user's layout, e.g.
            ``expected (N, 4, 4, 4) in NCHW``.
    """
    x = np.asarray(x)
    check_real_dtype(name, x)
    ir_shape = tuple(ir_shape)
    perm = tuple(range(len(lay.ir))) if channels_last else lay.perm
    user_shape = [0] * len(perm)
    for i, p in enumerate(perm):
        user_shape[p] = (("N",) + ir_shape)[i]
    want = tuple(user_shape[1:])
    if x.ndim == len(perm) - 1 and x.shape == want:
        x = x[None]
    if x.ndim != len(perm) or tuple(x.shape[1:]) != want:
        letters = lay.ir if channels_last else lay.source
        raise FeedError(f"input {name!r} has shape {x.shape}, expected ({', '.join(map(str, user_shape))}) in "
                        f"{letters}" + ("" if channels_last or lay.source == lay.ir else
                                        f" (or pass {lay.ir} arrays with layout {CHANNELS_LAST!r}: --layout "
                                        f"{CHANNELS_LAST} on the command line)"), name)
    return np.transpose(x, perm)


def from_ir(y, lay: Layout, channels_last: bool) -> np.ndarray:
    """An IR-layout output array (batch first) -> the source layout (unchanged with
    ``channels_last``)."""
    y = np.asarray(y)
    if channels_last:
        return y
    inv = tuple(lay.ir.index(a) for a in lay.source)
    return np.transpose(y, inv)
