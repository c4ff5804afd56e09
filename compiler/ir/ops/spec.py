"""The op registry: one :class:`OpSpec` per IR op, and the helpers every op module shares.

An :class:`OpSpec` is the single declaration of an op: its attributes, arity, exact type rule,
reference kernel on runtime arrays, compute cost, and (optionally) its ONNX import/export
mapping.  Op modules (``quantize.py``, ``linear.py``, ...) build specs and :func:`register`
them; :func:`infer`, the reference interpreter and the cost analyses look them up with
:func:`get`.  Backends do *not* hang code on the spec: each owns an
:class:`~qdeploy.compiler.ir.optable.OpTable` keyed by op name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from ...errors import UnsupportedError, VerifyError
from ..types import FixedType, FloatType, FixedTypeError


def default_macs(node, graph) -> int:
    """Compute cost of an op with one operation per output element (at least 1)."""
    return max(1, graph.values[node.output].size)


@dataclass(frozen=True)
class OpSpec:
    """Everything the IR knows about one op.

    Attributes:
        name: the op name nodes carry in ``Node.op`` (e.g. ``"Dense"``).
        summary: one line for docs and error messages.
        infer: type rule ``(node, input Values) -> (output shape, output dtype)``; for
            fixed-point inputs the narrowest type that holds every result exactly.  Raises
            :class:`VerifyError` / :class:`UnsupportedError` naming the node.
        reference: kernel ``(node, args, in_types, out_type) -> array``: ``args`` are batch-first
            runtime arrays (int64 codes for fixed-point values, float32 for float), ``in_types``
            their IR dtypes; returns the output runtime array (codes when ``out_type`` is fixed).
        arity: number of inputs, or ``None`` when variadic (the rule then checks the count).
        attrs: attribute name -> default (``None``: required).  Documentation; the rule and the
            kernel read ``node.attrs`` themselves.
        params: names of the constant parameters the op reads from ``node.params``.
        macs: per-sample compute cost ``(node, graph) -> int`` (multiply-accumulates for
            Dense/Conv, window operations for pools, one per output element by default).
        kind: cost class for estimators that price ops generically: ``"mac"`` (Dense/Conv),
            ``"elementwise"`` (one result per input element: activations, quantizers, Add...),
            ``"layout"`` (data movement only: Reshape, Transpose, Concat) or ``"pool"``.
        quantizes: True for ops that may turn float inputs into a fixed-point output
            (``Quantize``, ``Sign``); every other op with a fixed-point output needs fixed inputs.
        onnx_import: ONNX op type -> handler ``(converter, onnx_node) -> None`` for ONNX ops
            this IR op imports from (see :mod:`qdeploy.compiler.frontends.onnx_ops`); only
            needed for ops the frontend's own table does not map.
        onnx_export: ``(exporter, node, input tensor names) -> output tensor name`` writing the
            op as QONNX/ONNX nodes (see :mod:`qdeploy.compiler.frontends.export`); ``None``
            when the exporter's own table maps it.
    """

    name: str
    summary: str
    infer: Callable
    reference: Callable
    arity: int | None = 1
    attrs: Mapping[str, Any] = field(default_factory=dict)
    params: tuple[str, ...] = ()
    macs: Callable = default_macs
    kind: str = "elementwise"
    quantizes: bool = False
    onnx_import: Mapping[str, Callable] = field(default_factory=dict)
    onnx_export: Callable | None = None


#: Op name -> :class:`OpSpec`, in registration order.
REGISTRY: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    """Add ``spec`` to :data:`REGISTRY` and return it.

    Raises:
        ValueError: an op of that name is already registered (each op is declared once).
    """
    if spec.name in REGISTRY:
        raise ValueError(f"op {spec.name!r} registered twice")
    REGISTRY[spec.name] = spec
    return spec


def get(op: str) -> OpSpec | None:
    """The :class:`OpSpec` of ``op``, or ``None`` for an unknown op."""
    return REGISTRY.get(op)


def all_ops() -> tuple[str, ...]:
    """Names of every registered op, in registration order."""
    return tuple(REGISTRY)


def check_arity(node, inputs, n: int) -> None:
    """Raise :class:`VerifyError` naming ``node`` unless it has exactly ``n`` inputs."""
    if len(inputs) != n:
        raise VerifyError(f"{node.op} takes {n} input(s), got {len(inputs)}", node.name)


def infer(node, inputs) -> tuple[tuple[int, ...], object]:
    """Output (shape, dtype) of ``node`` given its input :class:`Value` s.

    Raises:
        VerifyError / UnsupportedError: naming ``node.name`` when shapes, types or
            attributes are invalid (UnsupportedError for an unknown op).
    """
    spec = REGISTRY.get(node.op)
    if spec is None:
        raise UnsupportedError(f"unknown op type {node.op!r}", node.name)
    try:
        if spec.arity is not None:
            check_arity(node, inputs, spec.arity)
        return spec.infer(node, inputs)
    except (VerifyError, UnsupportedError):
        raise
    except FixedTypeError as e:
        raise VerifyError(str(e), node.name) from None
    except (KeyError, IndexError, ValueError) as e:
        raise VerifyError(f"{node.op}: invalid attributes or inputs ({type(e).__name__}: {e})", node.name) from None


# ------------------------------------------------------------------ helpers shared by op modules
def code_range(t: FixedType) -> tuple[int, int]:
    """(smallest, largest) code of fixed-point type ``t``."""
    return t.min_code, t.max_code


def all_fixed(*ts) -> bool:
    """True when every dtype in ``ts`` is a :class:`FixedType`."""
    return all(isinstance(t, FixedType) for t in ts)


def is_float(t) -> bool:
    """True for the float32 dtype."""
    return isinstance(t, FloatType)


def shift_range(lo: int, hi: int, s: int) -> tuple[int, int]:
    """(lo, hi) codes moved ``s`` fraction bits up (multiplied by ``2**s``)."""
    return lo << s, hi << s


def conv_out_shape(node, in_shape, kernel=None):
    """Spatial output sizes of Conv/MaxPool/AvgPool: floor((L + p0 + p1 - k) / s) + 1.

    Args:
        node: reads ``kernel``, ``strides`` (default 1) and ``pads`` (begins..., ends...; default 0).
        in_shape: channels-last per-sample input shape ``(*spatial, C)``.
        kernel: the (effective) kernel extent to use instead of ``node.attrs["kernel"]`` (a dilated
            convolution's ``d * (k - 1) + 1``).
    Raises:
        VerifyError: naming the node for a rank, stride/pad length or kernel size mismatch.
    """
    k = tuple(node.attrs["kernel"] if kernel is None else kernel)
    nd = len(k)
    s = tuple(node.attrs.get("strides", (1,) * nd))
    p = tuple(node.attrs.get("pads", (0,) * (2 * nd)))
    if len(in_shape) != nd + 1:
        raise VerifyError(f"{node.op} expects a {nd}-D channels-last input, got shape {in_shape}", node.name)
    if len(s) != nd or len(p) != 2 * nd:
        raise VerifyError(f"{node.op}: strides {s} / pads {p} do not match kernel {k}", node.name)
    out = []
    for i in range(nd):
        L = in_shape[i] + p[i] + p[i + nd] - k[i]
        if L < 0 or s[i] < 1:
            raise VerifyError(f"{node.op}: kernel {k} larger than padded input {in_shape[:-1]}", node.name)
        out.append(L // s[i] + 1)
    return tuple(out)


def broadcast_shape(node, a, b) -> tuple[int, ...]:
    """NumPy broadcast of per-sample shapes ``a`` and ``b``.

    Raises:
        VerifyError: naming the node when they do not broadcast.
    """
    try:
        return tuple(np.broadcast_shapes(a, b))
    except ValueError:
        raise VerifyError(f"{node.op}: shapes {a} and {b} do not broadcast", node.name) from None
