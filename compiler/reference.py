"""The bit-exact NumPy interpreter of the IR: the golden model.

Fixed-point values are carried as int64 codes and every fixed-point op is computed in exact
integer arithmetic (no float anywhere on the quantized path); casts follow ap_fixed rounding and
overflow rules (:func:`qdeploy.compiler.ir.types.requantize`).  Float32 values (unquantized parts)
are computed in float32 like ONNX Runtime.  Arrays are batch-first: a value of IR shape ``S`` is an
array of shape ``(N, *S)``.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .errors import FeedError, UnsupportedError
from .ir.cost import value_bytes
from .ir.graph import Graph, Node
from .ir.ops import get as get_op
from .ir.types import FixedType


def run_node(n: Node, args: list, in_types: list, out_t):
    """Compute one node with its op's reference kernel (``OpSpec.reference``).

    Args:
        n: the node.  args: its input runtime arrays.  in_types: their IR dtypes.
        out_t: the IR dtype of its output.
    Returns:
        the output runtime array (int64 codes for a fixed-point ``out_t``, float32 otherwise).
    Raises:
        UnsupportedError: naming the node for an op without a registered kernel.
        FeedError: NaN into a ``Quantize`` from float.
    """
    spec = get_op(n.op)
    if spec is None:
        raise UnsupportedError(f"reference interpreter has no kernel for op {n.op!r}", n.name)
    return spec.reference(n, args, in_types, out_t)


def check_real_dtype(name: str, a: np.ndarray) -> None:
    """Refuse an input array that does not hold real numbers (bool, integer or float dtypes):
    complex would lose its imaginary part, strings and objects fail deep inside NumPy.

    Raises:
        FeedError: naming input ``name`` and the dtype.
    """
    if a.dtype.kind not in "biuf":
        raise FeedError(f"input {name!r} has dtype {a.dtype}: give real numbers (float32 values or integer codes)",
                        name)


def prepare_feeds(graph: Graph, inputs, codes: bool = False) -> dict[str, np.ndarray]:
    """Turn user inputs (one array, a list, or a dict by input name; batch first) into runtime
    arrays: reals are cast into each fixed-point input type with that type's rounding/overflow.

    Raises:
        FeedError: wrong count, dtype (not real) or shape, or NaN fed to a fixed-point input.
    """
    if isinstance(inputs, Mapping):
        feeds = dict(inputs)
    else:
        seq = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        if len(seq) != len(graph.inputs):
            raise FeedError(f"model takes {len(graph.inputs)} input(s), got {len(seq)}", graph.name)
        feeds = dict(zip(graph.inputs, seq))
    out = {}
    for name in graph.inputs:
        if name not in feeds:
            raise FeedError(f"missing input {name!r}", name)
        v = graph.values[name]
        a = np.asarray(feeds[name])
        check_real_dtype(name, a)
        if a.shape[1:] != tuple(v.shape):
            if a.shape == tuple(v.shape):
                a = a[None]
            else:
                raise FeedError(f"input {name!r} has shape {a.shape}, expected (N, {', '.join(map(str, v.shape))})", name)
        if isinstance(v.dtype, FixedType):
            if codes:
                out[name] = a.astype(np.int64)
            else:
                if np.isnan(a).any():
                    raise FeedError(f"input {name!r} contains NaN", name)
                out[name] = v.dtype.quantize_real(a)
        else:
            out[name] = a.astype(np.float32)
    return out


def execute(graph: Graph, inputs, *, codes: bool = False, keep: bool = False,
            peak: dict | None = None) -> dict[str, np.ndarray]:
    """Run ``graph`` and return runtime arrays (int64 codes for fixed types, float32 otherwise).

    Args:
        graph: the IR graph.
        inputs: one array, a list, or a dict by input name; batch first, real values
            (or codes when ``codes=True``).
        keep: return every intermediate value, not only the graph outputs.
        peak: a dict to receive the measured peak of activation memory: the bytes of
            the values the interpreter actually holds after each node ran, before freeing, sized
            by :func:`qdeploy.compiler.ir.cost.value_bytes` with ``peak.get("packing", "byte")``.
            Sets ``peak["peak_bytes"]``, ``peak["peak_node"]`` and ``peak["per_step"]``; a value
            no node reads (and not an output) is then dropped right after it was produced.
    Returns:
        dict value name -> array of shape (N, *value.shape).
    """
    env = prepare_feeds(graph, inputs, codes)
    if peak is not None:
        peak.update(peak_bytes=-1, peak_node=None, per_step=[])
        _measure(graph, env, peak, None)
        peak["per_step"].clear()
    remaining = {}
    for n in graph.nodes:
        for i in n.inputs:
            remaining[i] = remaining.get(i, 0) + 1
    outs = set(graph.outputs)
    for n in graph.nodes:
        args = [env[i] for i in n.inputs]
        in_types = [graph.values[i].dtype for i in n.inputs]
        out_t = graph.values[n.output].dtype
        env[n.output] = run_node(n, args, in_types, out_t)
        if peak is not None:  # measured peak memory
            _measure(graph, env, peak, n.name)
        if not keep:
            for i in n.inputs:
                remaining[i] -= 1
                if remaining[i] == 0 and i not in outs:
                    del env[i]
            if peak is not None and remaining.get(n.output, 0) == 0 and n.output not in outs:
                del env[n.output]
    if keep:
        return env
    return {o: env[o] for o in graph.outputs}


def _measure(graph: Graph, env: dict, peak: dict, node_name) -> None:
    """Record the bytes of the values held in ``env`` (see ``execute(peak=...)``)."""
    batch = next((a.shape[0] for a in env.values()), 1)
    live = sum(value_bytes(graph.values[k], peak.get("packing", "byte"), batch) for k in env)
    peak["per_step"].append(live)
    if live > peak["peak_bytes"]:
        peak["peak_bytes"], peak["peak_node"] = live, node_name


def to_real(graph: Graph, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Real values (float64 for fixed types, float32 for float) of runtime arrays."""
    out = {}
    for k, a in arrays.items():
        t = graph.values[k].dtype
        out[k] = t.to_real(a) if isinstance(t, FixedType) else a
    return out


def run(graph: Graph, inputs) -> np.ndarray | list[np.ndarray]:
    """Real-valued outputs of ``graph`` on ``inputs``: one array, or a list for several outputs."""
    res = to_real(graph, execute(graph, inputs))
    outs = [res[o] for o in graph.outputs]
    return outs[0] if len(outs) == 1 else outs
