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
from numpy.lib.stride_tricks import sliding_window_view

from .errors import QDeployError, UnsupportedError
from .ir.graph import Graph, Node
from .ir.ops import avg_shift
from .ir.types import FixedType, requantize


class ReferenceError_(QDeployError):
    """Bad feed for the interpreter (wrong shape, NaN into a fixed-point input)."""


def _real(arr, t):
    """float32 real view of a runtime array of type ``t``."""
    if isinstance(t, FixedType):
        return t.to_real(arr).astype(np.float32)
    return arr.astype(np.float32, copy=False)


def _align(codes, f_from, f_to):
    return np.left_shift(codes, f_to - f_from)


def _windows(x, kernel, strides, pads, pad_value):
    """x: (N, *spatial, C) -> view (N, *out_spatial, C, *kernel) of windows."""
    nd = len(kernel)
    pw = [(0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)] + [(0, 0)]
    if any(p != (0, 0) for p in pw):
        x = np.pad(x, pw, constant_values=pad_value)
    v = sliding_window_view(x, tuple(kernel), axis=tuple(range(1, nd + 1)))
    sl = (slice(None),) + tuple(slice(None, None, s) for s in strides)
    return v[sl]


def conv_nhwc(x, w, strides, pads, groups, pad_value=0):
    """Channels-last convolution for int64 or float32 arrays.

    Args:
        x: (N, *spatial, C_in).  w: (*kernel, C_in/groups, C_out).
    Returns:
        (N, *out_spatial, C_out), same dtype family as the inputs.
    """
    nd = w.ndim - 2
    kernel = w.shape[:nd]
    win = _windows(x, kernel, strides, pads, pad_value)  # (N, *out, C, *k)
    cin_g = w.shape[-2]
    cout_g = w.shape[-1] // groups
    outs = []
    for g in range(groups):
        wg = w[..., g * cout_g:(g + 1) * cout_g]  # (*k, cin_g, cout_g)
        xg = win[(Ellipsis, slice(g * cin_g, (g + 1) * cin_g)) + (slice(None),) * nd]
        if nd == 1:
            outs.append(np.einsum("nlck,kco->nlo", xg, wg, optimize=True))
        else:
            outs.append(np.einsum("nhwcij,ijco->nhwo", xg, wg, optimize=True))
    return np.concatenate(outs, axis=-1) if groups > 1 else outs[0]


def _per_sample_broadcast(a, b):
    """Align two batch-first arrays whose per-sample ranks differ (numpy broadcasting of
    the per-sample shapes, the batch axis kept first)."""
    ra, rb = a.ndim, b.ndim
    if ra < rb:
        a = a.reshape((a.shape[0],) + (1,) * (rb - ra) + a.shape[1:])
    elif rb < ra:
        b = b.reshape((b.shape[0],) + (1,) * (ra - rb) + b.shape[1:])
    return a, b


def _run_node(n: Node, args: list, in_types: list, out_t):
    """Compute one node; ``args`` are runtime arrays, ``in_types`` their IR dtypes."""
    op = n.op
    fixed_out = isinstance(out_t, FixedType)
    if op == "Quantize":
        t0 = in_types[0]
        if isinstance(t0, FixedType):
            return requantize(args[0], t0.frac_bits, out_t)
        if np.isnan(args[0]).any():
            bad = sorted({int(i) for i in np.argwhere(np.isnan(args[0]))[:, 0]})[:5]
            raise ReferenceError_(f"NaN in the input of this quantizer (value {n.inputs[0]!r}, sample(s) {bad}): "
                                  "fixed-point types have no NaN", n.name)
        return out_t.quantize_real(args[0])
    if op == "Sign":
        return np.where(args[0] >= 0, 1, -1).astype(np.int64)
    if op in ("Dense", "Conv"):
        w = n.params["weight"]
        b = n.params.get("bias")
        if op == "Conv" and w.data.ndim not in (3, 4):
            raise UnsupportedError(f"Conv with {w.data.ndim - 2} spatial dimensions: only 1-D and 2-D convolutions "
                                   f"are supported", n.name)
        if fixed_out:
            x = args[0]
            if op == "Dense":
                acc = np.matmul(x, w.data)
            else:
                acc = conv_nhwc(x, w.data, n.attrs.get("strides", (1,) * (w.data.ndim - 2)),
                                n.attrs.get("pads", (0,) * 2 * (w.data.ndim - 2)), int(n.attrs.get("groups", 1)))
            f = in_types[0].frac_bits + w.dtype.frac_bits
            acc = _align(acc, f, out_t.frac_bits)
            if b is not None:
                acc = acc + _align(b.data, b.dtype.frac_bits, out_t.frac_bits)
            return acc
        x = _real(args[0], in_types[0])
        wr = w.real().astype(np.float32)
        if op == "Dense":
            y = np.matmul(x, wr)
        else:
            y = conv_nhwc(x, wr, n.attrs.get("strides", (1,) * (wr.ndim - 2)),
                          n.attrs.get("pads", (0,) * 2 * (wr.ndim - 2)), int(n.attrs.get("groups", 1))).astype(np.float32)
        if b is not None:
            y = y + b.real().astype(np.float32)
        return y.astype(np.float32)
    if op == "Relu":
        return np.maximum(args[0], 0)
    if op in ("Add", "Mul"):
        a, b = _per_sample_broadcast(*args)
        ta, tb = in_types
        if fixed_out:
            if op == "Add":
                F = out_t.frac_bits
                return _align(a, ta.frac_bits, F) + _align(b, tb.frac_bits, F)
            return a * b
        a, b = _real(a, ta), _real(b, tb)
        return (a + b) if op == "Add" else (a * b)
    if op == "Affine":
        s = n.params.get("scale")
        b = n.params.get("bias")
        if fixed_out:
            y = args[0]
            f = in_types[0].frac_bits
            if s is not None:
                y = y * s.data
                f += s.dtype.frac_bits
            y = _align(y, f, out_t.frac_bits)
            if b is not None:
                y = y + _align(b.data, b.dtype.frac_bits, out_t.frac_bits)
            return y
        y = _real(args[0], in_types[0])
        if s is not None:
            y = y * s.real().astype(np.float32)
        if b is not None:
            y = y + b.real().astype(np.float32)
        return y.astype(np.float32)
    if op == "Concat":
        axis = int(n.attrs.get("axis", -1))
        axis = axis + 1 if axis >= 0 else axis
        if fixed_out:
            parts = [_align(a, t.frac_bits, out_t.frac_bits) for a, t in zip(args, in_types)]
        else:
            parts = [_real(a, t) for a, t in zip(args, in_types)]
        return np.concatenate(parts, axis=axis)
    if op == "Reshape":
        return args[0].reshape((args[0].shape[0], *n.attrs["shape"]))
    if op == "Transpose":
        return np.transpose(args[0], (0, *(p + 1 for p in n.attrs["perm"])))
    if op in ("MaxPool", "AvgPool"):
        k = tuple(n.attrs["kernel"])
        nd = len(k)
        s = tuple(n.attrs.get("strides", (1,) * nd))
        p = tuple(n.attrs.get("pads", (0,) * 2 * nd))
        x = args[0]
        t0 = in_types[0]
        if op == "MaxPool":
            pad = t0.min_code if isinstance(t0, FixedType) else -np.inf
            win = _windows(x, k, s, p, pad)
            return win.max(axis=tuple(range(-nd, 0)))
        win = _windows(x, k, s, p, 0)
        cnt = int(np.prod(k))
        if fixed_out:
            tot = win.sum(axis=tuple(range(-nd, 0)))
            return np.floor_divide(np.left_shift(tot, avg_shift(cnt)), cnt)
        return (win.astype(np.float32).sum(axis=tuple(range(-nd, 0))) / np.float32(cnt)).astype(np.float32)
    if op == "GlobalAvgPool":
        x = args[0]
        axes = tuple(range(1, x.ndim - 1))
        cnt = int(np.prod(x.shape[1:-1]))
        if fixed_out:
            return np.floor_divide(np.left_shift(x.sum(axis=axes), avg_shift(cnt)), cnt)
        return (_real(x, in_types[0]).mean(axis=axes)).astype(np.float32)
    if op == "Softmax":
        x = _real(args[0], in_types[0])
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    raise UnsupportedError(f"reference interpreter has no kernel for op {op!r}", n.name)


def prepare_feeds(graph: Graph, inputs, codes: bool = False) -> dict[str, np.ndarray]:
    """Turn user inputs (one array, a list, or a dict by input name; batch first) into runtime
    arrays: reals are cast into each fixed-point input type with that type's rounding/overflow.

    Raises:
        ReferenceError_: wrong count or shape, or NaN fed to a fixed-point input.
    """
    if isinstance(inputs, Mapping):
        feeds = dict(inputs)
    else:
        seq = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        if len(seq) != len(graph.inputs):
            raise ReferenceError_(f"model takes {len(graph.inputs)} input(s), got {len(seq)}", graph.name)
        feeds = dict(zip(graph.inputs, seq))
    out = {}
    for name in graph.inputs:
        if name not in feeds:
            raise ReferenceError_(f"missing input {name!r}", name)
        v = graph.values[name]
        a = np.asarray(feeds[name])
        if a.shape[1:] != tuple(v.shape):
            if a.shape == tuple(v.shape):
                a = a[None]
            else:
                raise ReferenceError_(f"input {name!r} has shape {a.shape}, expected (N, {', '.join(map(str, v.shape))})", name)
        if isinstance(v.dtype, FixedType):
            if codes:
                out[name] = a.astype(np.int64)
            else:
                if np.isnan(a).any():
                    raise ReferenceError_(f"input {name!r} contains NaN", name)
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
        peak: (issue 8) a dict to receive the measured peak of activation memory: the bytes of
            the values the interpreter actually holds after each node ran, before freeing, sized
            by :func:`qdeploy.passes.memory.value_bytes` with ``peak.get("packing", "byte")``.
            Sets ``peak["peak_bytes"]``, ``peak["peak_node"]`` and ``peak["per_step"]``; a value
            no node reads (and not an output) is then dropped right after it was produced.
    Returns:
        dict value name -> array of shape (N, *value.shape).
    """
    env = prepare_feeds(graph, inputs, codes)
    if peak is not None:  # issue 8
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
        env[n.output] = _run_node(n, args, in_types, out_t)
        if peak is not None:  # issue 8: measured peak memory
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
    """Issue 8: record the bytes of the values held in ``env`` (see ``execute(peak=...)``)."""
    from ..passes.memory import value_bytes
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
