"""QONNX / ONNX importer: an ONNX file (or ``onnx.ModelProto``) -> qdeploy IR :class:`Graph`.

Pipeline
--------
1. Load (file path, bytes or ModelProto).  Unparsable / truncated files raise
   :class:`ImportError_` with a one-line reason.
2. Checks on the raw model: every node has a known domain and op (else
   :class:`UnsupportedError` naming the node); graph inputs have static shapes except the first
   (batch) dimension (else :class:`UnsupportedError` naming the input).
3. QONNX cleanup (the steps of ``qonnx.util.cleanup.cleanup_model`` without its renaming, so error
   messages name the nodes of the user's file): shape inference, constant folding with
   ``Quant``/``BipolarQuant`` preserved (the TFC ``Shape/Gather/Unsqueeze/Concat`` flatten subgraph
   folds into a constant ``Reshape``), unused-tensor removal.
4. Conversion node by node.  ONNX is NCHW, the IR channels-last: each ONNX tensor is carried as an IR
   value plus a per-sample axis permutation ``perm`` with ``ir = onnx_sample.transpose(perm)``.
   Layout-sensitive ops (Conv, pools) ask for the channels-last layout, Flatten/Reshape for the ONNX
   order (a ``Transpose`` is inserted only where the element order really changes, and a flatten
   that feeds a ``Dense`` folds the permutation into the weight rows instead).
5. A small clean-up (merging Reshape chains, removing no-op Reshape/Transpose), then type inference
   and verification by :class:`GraphBuilder`.

Shapes in the IR exclude the batch dimension.  ``graph.meta["input_perms"][name]`` is the
batch-first permutation from the user's ONNX input layout to the IR layout (``[0, 2, 3, 1]`` for
NCHW images) and ``graph.meta["output_perms"][name]`` the permutation from the IR output layout
back to the ONNX layout (``[0, 3, 1, 2]``).
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ImportError_, QDeployError, UnsupportedError, VerifyError
from ..ir.graph import Const, Graph, GraphBuilder
from ..ir.types import FLOAT32, FixedType, FloatType

#: Domains whose ``Quant`` / ``BipolarQuant`` nodes follow the QONNX definitions.
QONNX_DOMAINS = ("qonnx.custom_op.general", "finn.custom_op.general", "onnx.brevitas", "finn",
                 "qonnx.custom_op", "finn.custom_op")
_STD_DOMAINS = ("", "ai.onnx")
_QONNX_OPS = ("Quant", "BipolarQuant")

#: QONNX rounding_mode -> ap_fixed quantization mode.
ROUNDING_MAP = {"ROUND": "RND_CONV", "HALF_EVEN": "RND_CONV", "FLOOR": "TRN", "ROUND_TO_ZERO": "TRN_ZERO",
                "DOWN": "TRN_ZERO", "HALF_UP": "RND_INF", "HALF_DOWN": "RND_ZERO"}

# ops evaluated here when all their inputs are constants (Quant folding and the like)
_CONST_OPS = ("Quant", "BipolarQuant", "Transpose", "Identity", "Reshape", "Flatten", "Mul", "Add", "Sub",
              "Div", "Neg", "Cast")


# ====================================================================== entry point
def import_onnx(model: "str | os.PathLike | bytes | onnx.ModelProto", *, name: str | None = None) -> Graph:
    """Import a QONNX/ONNX model into the IR.

    Args:
        model: path to an ``.onnx`` file, its bytes, or an ``onnx.ModelProto`` (not modified).
        name: graph name (default: the ONNX graph name, else the file stem).
    Returns:
        A verified :class:`Graph`; activations are channels-last with the batch dim dropped
        (ONNX ``[N, C, H, W]`` -> IR ``(H, W, C)``; ``[N, C, L]`` -> ``(L, C)``; ``[N, K]`` -> ``(K,)``).
        ``meta``: ``source``, ``frontend="qonnx"``, ``input_perms``, ``output_perms``, ``opset``.
    Raises:
        ImportError_: missing, malformed or truncated file; QONNX cleanup failure.
        UnsupportedError: an op, attribute or quantizer the IR cannot express, or a dynamic
            non-batch input dimension (the message names the ONNX node or input).
        VerifyError: the converted graph is inconsistent (names the node).
    """
    proto, source = _load(model)
    gname = name or proto.graph.name or (Path(source).stem if source != "<ModelProto>" else "model")
    wrapper = _prepare(proto)
    return _Converter(wrapper, gname, source).run()


# ====================================================================== loading & cleanup
def _load(model) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        return proto, "<ModelProto>"
    if isinstance(model, (bytes, bytearray)):
        data, source = bytes(model), "<bytes>"
    else:
        path = Path(model)
        if not path.is_file():
            raise ImportError_(f"model file {str(path)!r} not found")
        data, source = path.read_bytes(), str(path)
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf DecodeError and friends
        raise ImportError_(f"cannot parse ONNX model {source}: {type(e).__name__}: {e}") from None
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise ImportError_(f"ONNX model {source} has no graph nodes (malformed or truncated file?)")
    return proto, source


def _prepare(proto: onnx.ModelProto):
    """Name nodes, check domains/ops and input shapes, fix the batch to 1, run the QONNX cleanup."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.fold_constants import FoldConstants
    from qonnx.transformation.general import GiveUniqueParameterTensors, RemoveStaticGraphInputs, RemoveUnusedTensors
    from qonnx.transformation.infer_shapes import InferShapes

    g = proto.graph
    used = {n.name for n in g.node if n.name}
    for i, n in enumerate(g.node):
        if not n.name:
            base = f"{n.op_type}_{i}"
            nm, k = base, 1
            while nm in used:
                nm, k = f"{base}_{k}", k + 1
            n.name = nm
            used.add(nm)
    for n in g.node:
        if n.domain in _STD_DOMAINS:
            if not onnx.defs.has(n.op_type):
                raise UnsupportedError(f"unsupported op type {n.op_type!r} (domain 'ai.onnx')", n.name)
        elif n.domain in QONNX_DOMAINS and n.op_type in _QONNX_OPS:
            n.domain = "qonnx.custom_op.general"
        else:
            raise UnsupportedError(f"unsupported op type {n.op_type!r} (domain {n.domain!r})", n.name)
    _check_graph(g)
    inits = {t.name for t in g.initializer}
    for inp in g.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        if not inp.type.HasField("tensor_type") or not tt.HasField("shape"):
            raise UnsupportedError(f"graph input {inp.name!r} has no static shape", inp.name)
        dims = tt.shape.dim
        if len(dims) == 0:
            raise UnsupportedError(f"graph input {inp.name!r} is a scalar: expected a batch dimension", inp.name)
        for ax, d in enumerate(dims[1:], start=1):
            if not d.HasField("dim_value") or d.dim_value <= 0:
                what = d.dim_param or "?"
                raise UnsupportedError(f"graph input {inp.name!r} has dynamic dimension {what!r} at axis {ax}: "
                                       f"only the first (batch) dimension may be dynamic", inp.name)
        dims[0].Clear()
        dims[0].dim_value = 1
    for out in g.output:
        tt = out.type.tensor_type
        if tt.HasField("shape"):
            tt.ClearField("shape")
    del g.value_info[:]
    try:
        m = ModelWrapper(proto)
        for t in (InferShapes(), GiveUniqueParameterTensors(),
                  FoldConstants(exclude_op_types=["Quant", "BipolarQuant", "QuantizeLinear", "DequantizeLinear"]),
                  RemoveUnusedTensors(), RemoveStaticGraphInputs()):
            m = m.transform(t)
    except QDeployError:
        raise
    except Exception as e:
        raise ImportError_(f"QONNX cleanup (shape inference / constant folding) failed: {type(e).__name__}: {e}") from None
    return m


def _check_graph(g) -> None:
    """Structural checks on the raw graph, each naming the node at fault: node inputs that nothing
    produces, cycles, and NaN/Inf in the constants (initializers and ``Constant`` nodes)."""
    avail = {t.name for t in g.initializer} | {i.name for i in g.input}
    producer = {o: n for n in g.node for o in n.output if o}
    consumers = defaultdict(list)
    for n in g.node:
        for t in n.input:
            if not t:
                continue
            if t not in avail and t not in producer:
                raise ImportError_(f"{n.op_type} input {t!r} is not produced by any node, initializer or graph "
                                   f"input (missing initializer?)", n.name)
            consumers[t].append(n)
    # cycles: Kahn's algorithm over node-to-node edges
    deps = {id(n): {id(producer[t]) for t in n.input if t in producer and t not in avail} for n in g.node}
    users = defaultdict(set)
    for n in g.node:
        for d in deps[id(n)]:
            users[d].add(id(n))
    ready = [k for k, d in deps.items() if not d]
    left = {k: set(d) for k, d in deps.items() if d}
    while ready:
        k = ready.pop()
        for u in users[k]:
            if u in left:
                left[u].discard(k)
                if not left[u]:
                    del left[u]
                    ready.append(u)
    if left:
        ring = set(left)
        changed = True
        while changed:  # drop nodes downstream of the cycle: keep those feeding another remaining node
            changed = False
            for k in list(ring):
                if not (users[k] & ring):
                    ring.discard(k)
                    changed = True
        names = [n.name for n in g.node if id(n) in (ring or left)]
        raise ImportError_(f"the graph has a cycle through nodes {', '.join(names)}", names[0])

    def finite(arr, what, node):
        a = np.asarray(arr)
        if a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
            nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
            raise ImportError_(f"{what} has non-finite values ({nan} NaN, {inf} Inf of {a.size})", node)

    for t in g.initializer:
        if consumers.get(t.name):
            n = consumers[t.name][0]
            finite(numpy_helper.to_array(t), f"{n.op_type} constant input {t.name!r}", n.name)
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    finite(numpy_helper.to_array(a.t), "Constant value", n.name)


def _check_quant_params(node, scale, zp, bw) -> None:
    """Values no QONNX ``Quant`` may have (activation or weight quantizer), naming the node."""
    if scale.size == 0 or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        bad = scale.ravel()[~(np.isfinite(scale.ravel()) & (scale.ravel() > 0))]
        raise ImportError_(f"Quant scale must be positive and finite, got {bad[0] if bad.size else scale.ravel()}",
                           node.name)
    if not np.all(np.isfinite(zp)):
        raise ImportError_("Quant zero point is not finite", node.name)
    if bw.size == 0 or not np.all(np.isfinite(bw)) or np.any(bw < 1):
        raise ImportError_(f"Quant bit width {bw.ravel().tolist()[:4]} must be >= 1", node.name)


# ====================================================================== layout helpers
def canonical_perm(rank: int) -> tuple[int, ...]:
    """Per-sample axis permutation ONNX -> IR: channels-last for rank >= 2 ((C,H,W) -> (H,W,C))."""
    if rank >= 2:
        return tuple(range(1, rank)) + (0,)
    return tuple(range(rank))


def _inv(p) -> tuple[int, ...]:
    inv = [0] * len(p)
    for i, a in enumerate(p):
        inv[a] = i
    return tuple(inv)


def _is_pow2(s: float) -> bool:
    if not (s > 0 and math.isfinite(s)):
        return False
    m, _ = math.frexp(s)
    return m == 0.5


class _Entry:
    """An ONNX activation tensor in the IR: IR value name + layout (+ pending row permutation)."""

    __slots__ = ("value", "perm", "rowperm")

    def __init__(self, value: str, perm: tuple[int, ...], rowperm=None):
        self.value, self.perm, self.rowperm = value, tuple(perm), rowperm


# ====================================================================== converter
class _Converter:
    def __init__(self, m, name: str, source: str):
        self.m = m
        self.g = m.graph
        self.opset = next((o.version for o in m.model.opset_import if o.domain in _STD_DOMAINS), 13)
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in self.g.initializer}
        self.quantized: set[str] = set()  # constants produced by Quant/BipolarQuant (exact fixed reals)
        self.env: dict[str, _Entry] = {}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in self.g.node:
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.graph_outputs = [o.name for o in self.g.output]
        self.absorbed: set[str] = set()
        self.source = source
        self.b = GraphBuilder(name, {"source": source, "frontend": "qonnx", "opset": self.opset})
        self._layout_cache: dict[tuple, str] = {}

    # -------------------------------------------------------------- small helpers
    def attr(self, node, key, default=None):
        for a in node.attribute:
            if a.name == key:
                v = onnx.helper.get_attribute_value(a)
                return v.decode() if isinstance(v, bytes) else v
        return default

    def is_const(self, t: str) -> bool:
        return t in self.consts

    def const(self, node, t: str) -> np.ndarray:
        if t not in self.consts:
            raise UnsupportedError(f"{node.op_type} input {t!r} must be a constant", node.name)
        return self.consts[t]

    def entry(self, node, t: str) -> _Entry:
        if t not in self.env:
            if t in self.consts:
                raise UnsupportedError(f"{node.op_type}: constant input {t!r} where an activation is expected",
                                       node.name)
            raise ImportError_(f"{node.op_type}: input {t!r} is not produced by any node", node.name)
        return self.env[t]

    def onnx_shape(self, e: _Entry) -> tuple[int, ...]:
        """Per-sample ONNX shape of an entry."""
        ir = self.b.values[e.value].shape
        inv = _inv(e.perm)
        return tuple(ir[inv[a]] for a in range(len(ir)))

    def dtype(self, e: _Entry):
        return self.b.values[e.value].dtype

    def layout(self, node, e: _Entry, q) -> str:
        """IR value holding entry ``e`` in layout ``q`` (inserting a Transpose/Reshape if needed)."""
        q = tuple(q)
        if e.rowperm is not None:
            raise UnsupportedError("internal: flattened tensor with a pending row permutation used by a "
                                   "non-Dense consumer", node.name)
        if e.perm == q:
            return e.value
        key = (e.value, q)
        if key in self._layout_cache:
            return self._layout_cache[key]
        pinv = _inv(e.perm)
        r = tuple(pinv[a] for a in q)
        shape = self.b.values[e.value].shape
        big = [a for a in r if shape[a] != 1]
        if big == sorted(big):  # only size-1 axes move: element order unchanged
            out = self.b.add(f"{node.name}__relayout", "Reshape", [e.value],
                             {"shape": tuple(shape[a] for a in r)}, out=f"{e.value}__relayout")
        else:
            out = self.b.add(f"{node.name}__transpose", "Transpose", [e.value], {"perm": r},
                             out=f"{e.value}__transposed")
        self._layout_cache[key] = out
        return out

    def channel_vector(self, c: np.ndarray, e: _Entry):
        """A constant broadcast against activation ``e`` as an IR per-channel vector [C] (or a scalar
        when it has one element); None when it varies along other axes."""
        c = np.asarray(c, dtype=np.float64)
        if c.size == 1:
            return c.reshape(())
        shp = self.onnx_shape(e)
        try:
            full = np.broadcast_to(c, (1, *shp))
        except ValueError:
            return None
        if full.ndim != len(shp) + 1:
            return None
        ir = full[0].transpose(e.perm) if shp else full[0]
        if ir.ndim == 0:
            return ir
        flat = ir.reshape(-1, ir.shape[-1])
        if not np.all(flat == flat[0]):
            return None
        return flat[0].copy()

    def add(self, name, op, inputs, attrs=None, params=None, out=None) -> str:
        return self.b.add(name, op, inputs, attrs, params, out=out)

    def add_fallback(self, name, op, inputs, attrs, params: dict, float_roles, out):
        """Add a node; if the exact fixed-point rule fails (too wide), retry with float ``float_roles``."""
        try:
            return self.b.add(name, op, inputs, attrs, params, out=out)
        except VerifyError:
            p2 = {k: (Const(v.real(), FLOAT32) if k in float_roles and isinstance(v.dtype, FixedType) else v)
                  for k, v in params.items()}
            self.b._names.discard(name)
            return self.b.add(name, op, inputs, attrs, p2, out=out)

    def weight_const(self, t: str, values: np.ndarray) -> Const:
        """Weights: exact fixed Const when they come from a QONNX quantizer, else float32."""
        if t in self.quantized:
            c = Const.from_real(values)
            if isinstance(c.dtype, FixedType) and c.dtype.width > 16:
                self.b.meta.setdefault("notes", []).append(
                    f"weights {t!r} need {c.dtype} to be represented exactly (their quantizer scale is not a power "
                    f"of two); use power-of-two (FixedPoint) quantizers for hardware-sized weights")
            elif isinstance(c.dtype, FloatType):
                self.b.meta.setdefault("notes", []).append(
                    f"weights {t!r} have no exact fixed-point type of <= 32 bits; kept as float32")
            return c
        return Const(np.asarray(values, dtype=np.float32), FLOAT32)

    # -------------------------------------------------------------- main loop
    def run(self) -> Graph:
        input_perms, output_perms = {}, {}
        for inp in self.g.input:
            if inp.name in self.consts:
                continue
            shape = self.m.get_tensor_shape(inp.name)
            ps = tuple(int(d) for d in shape[1:])
            p = canonical_perm(len(ps))
            elem = inp.type.tensor_type.elem_type
            if elem not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
                raise UnsupportedError(f"graph input {inp.name!r} has element type "
                                       f"{onnx.TensorProto.DataType.Name(elem)}: only float inputs", inp.name)
            self.b.input(inp.name, tuple(ps[a] for a in p), FLOAT32)
            self.env[inp.name] = _Entry(inp.name, p)
            input_perms[inp.name] = [0] + [a + 1 for a in p]
        for node in self.g.node:
            if node.name in self.absorbed:
                continue
            self.convert(node)
        final = []
        for o in self.graph_outputs:
            if o in self.consts:
                raise UnsupportedError(f"graph output {o!r} is a constant", o)
            e = self.env.get(o)
            if e is None:
                raise ImportError_(f"graph output {o!r} is not produced by any node", o)
            rank = len(self.b.values[e.value].shape)
            q = canonical_perm(rank)
            fake = onnx.helper.make_node("Identity", [o], [o], name=o)
            v = self.layout(fake, e, q)
            final.append(v)
            output_perms[o] = [0] + [a + 1 for a in _inv(q)]
        self.b.meta["input_perms"] = input_perms
        self.b.meta["output_perms"] = output_perms
        return self.finish(final)

    def convert(self, node):
        op = node.op_type
        ins = [i for i in node.input]
        if all((not i) or self.is_const(i) for i in ins) and op in _CONST_OPS:
            self.fold_const(node)
            return
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            raise UnsupportedError(f"unsupported op type {op!r} (domain {node.domain or 'ai.onnx'!r})", node.name)
        handler(node)

    # -------------------------------------------------------------- constants
    def fold_const(self, node):
        op = node.op_type
        x = [self.consts[i] if i else None for i in node.input]
        quant = False
        if op == "Quant":
            from qonnx.custom_op.general.intquant import int_quant
            _check_quant_params(node, *(np.asarray(v, dtype=np.float64) for v in x[1:4]))
            y = int_quant(x[0], x[1], x[2], x[3], int(self.attr(node, "signed", 1)), int(self.attr(node, "narrow", 0)),
                          self.attr(node, "rounding_mode", "ROUND"))
            quant = True
        elif op == "BipolarQuant":
            y = np.where(x[0] >= 0, 1.0, -1.0).astype(x[0].dtype) * x[1]
            quant = True
        elif op == "Transpose":
            y = np.transpose(x[0], self.attr(node, "perm"))
            quant = node.input[0] in self.quantized
        elif op in ("Identity", "Cast"):
            y = x[0]
            quant = node.input[0] in self.quantized
        elif op == "Reshape":
            y = x[0].reshape([d if d != 0 else x[0].shape[i] for i, d in enumerate(x[1].tolist())])
            quant = node.input[0] in self.quantized
        elif op == "Flatten":
            ax = int(self.attr(node, "axis", 1)) % max(x[0].ndim, 1)
            y = x[0].reshape(int(np.prod(x[0].shape[:ax])), -1)
            quant = node.input[0] in self.quantized
        else:
            a, b = x[0], x[1] if len(x) > 1 else None
            y = {"Mul": lambda: a * b, "Add": lambda: a + b, "Sub": lambda: a - b, "Div": lambda: a / b,
                 "Neg": lambda: -a}[op]()
        self.consts[node.output[0]] = np.asarray(y)
        if quant:
            self.quantized.add(node.output[0])

    # -------------------------------------------------------------- quantizers
    def op_Quant(self, node):
        e = self.entry(node, node.input[0])
        scale, zp, bw = (np.asarray(self.const(node, t), dtype=np.float64) for t in node.input[1:4])
        signed = bool(int(self.attr(node, "signed", 1)))
        narrow = bool(int(self.attr(node, "narrow", 0)))
        mode = str(self.attr(node, "rounding_mode", "ROUND")).upper()
        _check_quant_params(node, scale, zp, bw)
        if scale.size != 1 and not np.all(scale == scale.ravel()[0]):
            raise UnsupportedError(f"Quant has a per-channel activation scale (shape {scale.shape}): only per-tensor "
                                   f"power-of-two scales map to a fixed-point type", node.name)
        s = float(scale.ravel()[0])
        if not _is_pow2(s):
            raise UnsupportedError(f"Quant scale {s:.6g} is not a power of two: no exact fixed-point type", node.name)
        if np.any(zp != 0):
            raise UnsupportedError(f"Quant zero point {zp.ravel()[0]:g} is not 0: no exact fixed-point type", node.name)
        if bw.size != 1 or float(bw.ravel()[0]) != int(bw.ravel()[0]) or not 1 <= int(bw.ravel()[0]) <= 32:
            raise UnsupportedError(f"Quant bit width {bw.ravel().tolist()} is not an integer in 1..32", node.name)
        w = int(bw.ravel()[0])
        if mode not in ROUNDING_MAP:
            raise UnsupportedError(f"Quant rounding mode {mode!r} is not supported "
                                   f"(ROUND, FLOOR, ROUND_TO_ZERO/DOWN, HALF_UP, HALF_DOWN)", node.name)
        if narrow and not signed:
            raise UnsupportedError("narrow unsigned Quant (range [1, 2^b - 1]... excludes 0's neighbour) has no "
                                   "fixed-point type: unsigned narrow range is not supported", node.name)
        if w == 1 and signed:  # QONNX: 1-bit signed Quant is bipolar (+-scale)
            if s != 1.0:
                raise UnsupportedError(f"1-bit signed Quant (bipolar) with scale {s:g}: only scale 1 is supported",
                                       node.name)
            v = self.add(node.name, "Sign", [e.value], out=node.output[0])
        else:
            F = -int(round(math.log2(s)))
            to = FixedType(w, w - F, signed, ROUNDING_MAP[mode], "SAT_SYM" if (signed and narrow) else "SAT")
            v = self.add(node.name, "Quantize", [e.value], {"to": to}, out=node.output[0])
        self.env[node.output[0]] = _Entry(v, e.perm)

    def op_BipolarQuant(self, node):
        e = self.entry(node, node.input[0])
        scale = np.asarray(self.const(node, node.input[1]), dtype=np.float64)
        if scale.size != 1 or float(scale.ravel()[0]) != 1.0:
            raise UnsupportedError(f"BipolarQuant on an activation with scale {scale.ravel().tolist()}: "
                                   f"only scale 1 is supported", node.name)
        v = self.add(node.name, "Sign", [e.value], out=node.output[0])
        self.env[node.output[0]] = _Entry(v, e.perm)

    # -------------------------------------------------------------- linear layers
    def _absorb(self, node, out: str, w: np.ndarray, bias, w_float: bool, bias_quant: bool, nd: int):
        """Follow ``out`` through Add/Sub-of-constant (bias) and BatchNormalization (float weights only).

        ``w`` has the output channel on its last axis.  Returns (final onnx tensor, w, bias, bias_quant).
        """
        while out not in self.graph_outputs and len(self.consumers[out]) == 1:
            c = self.consumers[out][0]
            if c.op_type in ("Add", "Sub") and len(c.input) == 2:
                other = c.input[1] if c.input[0] == out else c.input[0]
                if other == out or not self.is_const(other) or (c.op_type == "Sub" and c.input[0] != out):
                    break
                cv = self._bias_vector(self.consts[other], w.shape[-1], nd)
                if cv is None:
                    break
                if c.op_type == "Sub":
                    cv = -cv
                bias_quant = (bias is None or bias_quant) and other in self.quantized
                bias = cv if bias is None else bias + cv
            elif c.op_type == "BatchNormalization" and w_float and c.input[0] == out:
                if int(self.attr(c, "training_mode", 0)) or len([o for o in c.output if o]) > 1:
                    break
                if not all(self.is_const(t) for t in c.input[1:5]):
                    break
                scale, beta = self._bn_params(c)
                w = w * scale
                bias = (np.zeros(w.shape[-1]) if bias is None else bias) * scale + beta
                bias_quant = False
            else:
                break
            self.absorbed.add(c.name)
            out = c.output[0]
        return out, w, bias, bias_quant

    def _bias_vector(self, c, n_out, nd):
        """A constant added to a Dense (nd=0) / Conv (nd spatial dims) output as a [n_out] vector, or None.

        Accepted: a scalar, or a tensor that broadcasts as ``[1, n_out, 1, ..., 1]`` (e.g. ``[C,1,1]``)."""
        c = np.asarray(c, dtype=np.float64)
        if c.size == 1:
            return np.full(n_out, float(c.ravel()[0]))
        if c.ndim > nd + 2:
            return None
        shp = (1,) * (nd + 2 - c.ndim) + tuple(c.shape)
        if shp[0] != 1 or shp[1] != n_out or any(d != 1 for d in shp[2:]):
            return None
        return c.reshape(n_out).copy()

    def _bn_params(self, c):
        gamma, beta, mean, var = (np.asarray(self.consts[t], dtype=np.float64) for t in c.input[1:5])
        eps = float(self.attr(c, "epsilon", 1e-5))
        scale = gamma / np.sqrt(var + eps)
        return scale, beta - mean * scale

    def _emit_dense(self, node, e: _Entry, w_name, w: np.ndarray, bias, bias_quant, out):
        if e.rowperm is not None:
            w = w[e.rowperm]
            x = e.value
        else:
            x = self.layout(node, e, tuple(range(len(e.perm))))
        params = {"weight": self.weight_const(w_name, w)}
        if bias is not None:
            params["bias"] = Const.from_real(bias) if (bias_quant or isinstance(params["weight"].dtype, FixedType)) \
                else Const(bias.astype(np.float32), FLOAT32)
        v = self.add_fallback(node.name, "Dense", [x], {}, params, ("bias",), out)
        self.env[out] = _Entry(v, tuple(range(len(self.b.values[v].shape))))

    def op_MatMul(self, node):
        a, bname = node.input
        if self.is_const(a):
            raise UnsupportedError("MatMul with a constant first operand (W x) is not supported: expected x W", node.name)
        if not self.is_const(bname):
            raise UnsupportedError("MatMul of two activations is not supported (the weight must be constant)", node.name)
        w = np.asarray(self.consts[bname], dtype=np.float64)
        if w.ndim != 2:
            raise UnsupportedError(f"MatMul weight of shape {w.shape}: only 2-D [K, N] weights", node.name)
        e = self.entry(node, a)
        out, w, bias, bq = self._absorb(node, node.output[0], w, None, bname not in self.quantized, False, 0)
        self._emit_dense(node, e, bname, w, bias, bq, out)

    def op_Gemm(self, node):
        a, bname = node.input[0], node.input[1]
        cname = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if int(self.attr(node, "transA", 0)):
            raise UnsupportedError("Gemm with transA=1 is not supported", node.name)
        if not self.is_const(bname) or self.is_const(a):
            raise UnsupportedError("Gemm needs an activation A and a constant B", node.name)
        w = np.asarray(self.consts[bname], dtype=np.float64)
        if int(self.attr(node, "transB", 0)):
            w = w.T
        alpha, beta = float(self.attr(node, "alpha", 1.0)), float(self.attr(node, "beta", 1.0))
        quant = bname in self.quantized
        if alpha != 1.0:
            w = w * alpha
            quant = quant and _is_pow2(abs(alpha))
        bias, bq = None, False
        if cname is not None:
            bias = self._bias_vector(self.const(node, cname), w.shape[1], 0)
            if bias is None:
                raise UnsupportedError(f"Gemm C of shape {self.consts[cname].shape} is not a bias vector", node.name)
            bias = bias * beta
            bq = cname in self.quantized and (beta == 1.0 or _is_pow2(abs(beta)))
        e = self.entry(node, a)
        if quant:
            self.quantized.add(bname + "__gemm")
        out, w, bias, bq = self._absorb(node, node.output[0], w, bias, not quant, bq, 0)
        self._emit_dense(node, e, bname + "__gemm" if quant else bname, w, bias, bq, out)

    def _spatial_attrs(self, node, in_spatial, kernel):
        nd = len(kernel)
        strides = tuple(int(s) for s in self.attr(node, "strides", [1] * nd))
        dil = tuple(int(d) for d in self.attr(node, "dilations", [1] * nd))
        if any(d != 1 for d in dil):
            raise UnsupportedError(f"{node.op_type} dilations {dil} are not supported (only 1)", node.name)
        if int(self.attr(node, "ceil_mode", 0)):
            raise UnsupportedError(f"{node.op_type} with ceil_mode=1 is not supported", node.name)
        auto = str(self.attr(node, "auto_pad", "NOTSET"))
        if auto in ("NOTSET", ""):
            pads = tuple(int(p) for p in self.attr(node, "pads", [0] * 2 * nd))
        elif auto == "VALID":
            pads = (0,) * 2 * nd
        elif auto in ("SAME_UPPER", "SAME_LOWER"):
            begins, ends = [], []
            for L, k, s in zip(in_spatial, kernel, strides):
                total = max((-(-L // s) - 1) * s + k - L, 0)
                small = total // 2
                begins.append(small if auto == "SAME_UPPER" else total - small)
                ends.append(total - small if auto == "SAME_UPPER" else small)
            pads = tuple(begins + ends)
        else:
            raise UnsupportedError(f"{node.op_type} auto_pad {auto!r} is not supported", node.name)
        return strides, pads

    def op_Conv(self, node):
        xname, wname = node.input[0], node.input[1]
        bname = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if not self.is_const(wname):
            raise UnsupportedError("Conv weight must be a constant", node.name)
        e = self.entry(node, xname)
        rank = len(e.perm)
        x = self.layout(node, e, canonical_perm(rank))
        w = np.asarray(self.consts[wname], dtype=np.float64)  # [O, I/g, *k]
        kernel = tuple(int(k) for k in w.shape[2:])
        if tuple(self.attr(node, "kernel_shape", kernel)) != kernel:
            raise UnsupportedError(f"Conv kernel_shape {self.attr(node, 'kernel_shape')} does not match weight {w.shape}",
                                   node.name)
        in_spatial = self.b.values[x].shape[:-1]
        strides, pads = self._spatial_attrs(node, in_spatial, kernel)
        groups = int(self.attr(node, "group", 1))
        w = w.transpose(*range(2, w.ndim), 1, 0)  # [*k, I/g, O]
        bias, bq = None, False
        if bname is not None:
            bias = np.asarray(self.consts[bname], dtype=np.float64).reshape(-1)
            bq = bname in self.quantized
        out, w, bias, bq = self._absorb(node, node.output[0], w, bias, wname not in self.quantized, bq, len(kernel))
        params = {"weight": self.weight_const(wname, w)}
        if bias is not None:
            params["bias"] = Const.from_real(bias) if (bq or isinstance(params["weight"].dtype, FixedType)) \
                else Const(bias.astype(np.float32), FLOAT32)
        attrs = {"kernel": kernel, "strides": strides, "pads": pads, "groups": groups}
        v = self.add_fallback(node.name, "Conv", [x], attrs, params, ("bias",), out)
        self.env[out] = _Entry(v, canonical_perm(rank))

    # -------------------------------------------------------------- normalization & elementwise
    def op_BatchNormalization(self, node):
        if int(self.attr(node, "training_mode", 0)) or len([o for o in node.output if o]) > 1:
            raise UnsupportedError("BatchNormalization in training mode (training_mode=1 or running-stat outputs) "
                                   "is not supported: export the model in eval mode", node.name)
        for t in node.input[1:5]:
            self.const(node, t)
        e = self.entry(node, node.input[0])
        rank = len(e.perm)
        x = self.layout(node, e, canonical_perm(rank))
        scale, bias = self._bn_params(node)
        params = {"scale": Const(scale.astype(np.float32), FLOAT32), "bias": Const(bias.astype(np.float32), FLOAT32)}
        v = self.add(node.name, "Affine", [x], {}, params, out=node.output[0])
        self.env[node.output[0]] = _Entry(v, canonical_perm(rank))

    def _affine(self, node, e: _Entry, scale, bias):
        fixed_in = isinstance(self.dtype(e), FixedType)
        params = {}
        for role, val in (("scale", scale), ("bias", bias)):
            if val is not None:
                params[role] = Const.from_real(val) if fixed_in else Const(np.asarray(val, np.float32), FLOAT32)
        v = self.add_fallback(node.name, "Affine", [e.value], {}, params, ("scale", "bias"), node.output[0])
        self.env[node.output[0]] = _Entry(v, e.perm)

    def _binary(self, node):
        op = node.op_type
        a, b = node.input[0], node.input[1]
        ca, cb = self.is_const(a), self.is_const(b)
        if not ca and not cb:
            ea, eb = self.entry(node, a), self.entry(node, b)
            xb = self.layout(node, eb, ea.perm)
            xa = ea.value
            if op == "Add" or op == "Mul":
                v = self.add(node.name, op, [xa, xb], out=node.output[0])
            elif op == "Sub":
                neg = self.add(f"{node.name}__neg", "Affine", [xb], {},
                               {"scale": Const.from_real(-1.0) if isinstance(self.b.values[xb].dtype, FixedType)
                                else Const(np.float32(-1.0), FLOAT32)}, out=f"{node.output[0]}__neg")
                v = self.add(node.name, "Add", [xa, neg], out=node.output[0])
            else:
                raise UnsupportedError(f"{op} of two activations is not supported", node.name)
            self.env[node.output[0]] = _Entry(v, ea.perm)
            return
        if ca and cb:
            raise UnsupportedError(f"{op} of two constants was not folded", node.name)
        xname, cname = (b, a) if ca else (a, b)
        e = self.entry(node, xname)
        if e.rowperm is not None:
            e = _Entry(self.layout(node, _Entry(e.value, e.perm), e.perm), e.perm)
        c = self.consts[cname]
        vec = self.channel_vector(c, e)
        if vec is None:
            raise UnsupportedError(f"{op} with a constant of shape {tuple(np.shape(c))} that is neither a scalar nor "
                                   f"per-channel is not supported", node.name)
        const_first = ca
        if op == "Add":
            self._affine(node, e, None, vec)
        elif op == "Sub":
            self._affine(node, e, -1.0 if const_first else None, vec if const_first else -vec)
        elif op == "Mul":
            self._affine(node, e, vec, None)
        elif op == "Div":
            if const_first:
                raise UnsupportedError("Div of a constant by an activation is not supported", node.name)
            if np.any(vec == 0):
                raise UnsupportedError("Div by a constant containing 0", node.name)
            self._affine(node, e, 1.0 / vec, None)
        else:
            raise UnsupportedError(f"unsupported op type {op!r}", node.name)

    op_Add = op_Sub = op_Mul = op_Div = _binary

    def _unary(self, node, op):
        e = self.entry(node, node.input[0])
        if e.rowperm is not None:
            raise UnsupportedError(f"{node.op_type} between a Flatten and a Dense", node.name)
        v = self.add(node.name, op, [e.value], out=node.output[0])
        self.env[node.output[0]] = _Entry(v, e.perm)

    def op_Relu(self, node):
        self._unary(node, "Relu")

    def op_Identity(self, node):
        self.env[node.output[0]] = self.entry(node, node.input[0])

    op_Dropout = op_Identity

    # -------------------------------------------------------------- pooling
    def _pool(self, node, op):
        if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
            raise UnsupportedError("MaxPool with an Indices output is not supported", node.name)
        e = self.entry(node, node.input[0])
        rank = len(e.perm)
        x = self.layout(node, e, canonical_perm(rank))
        kernel = tuple(int(k) for k in self.attr(node, "kernel_shape"))
        strides, pads = self._spatial_attrs(node, self.b.values[x].shape[:-1], kernel)
        if node.op_type == "AveragePool" and any(pads) and not int(self.attr(node, "count_include_pad", 0)):
            raise UnsupportedError("AveragePool with padding (count_include_pad=0) is not supported", node.name)
        v = self.add(node.name, op, [x], {"kernel": kernel, "strides": strides, "pads": pads}, out=node.output[0])
        self.env[node.output[0]] = _Entry(v, canonical_perm(rank))

    def op_MaxPool(self, node):
        self._pool(node, "MaxPool")

    def op_AveragePool(self, node):
        self._pool(node, "AvgPool")

    def op_GlobalAveragePool(self, node):
        e = self.entry(node, node.input[0])
        rank = len(e.perm)
        x = self.layout(node, e, canonical_perm(rank))
        g = self.add(node.name, "GlobalAvgPool", [x], out=f"{node.output[0]}__gap")
        c = self.b.values[g].shape[-1]
        v = self.add(f"{node.name}__keepdims", "Reshape", [g], {"shape": (1,) * (rank - 1) + (c,)}, out=node.output[0])
        self.env[node.output[0]] = _Entry(v, canonical_perm(rank))

    # -------------------------------------------------------------- shape ops
    def _reshape_to(self, node, out_shape: tuple[int, ...]):
        e = self.entry(node, node.input[0])
        out = node.output[0]
        rank_in = len(e.perm)
        ident = tuple(range(rank_in))
        if e.perm != ident and len(out_shape) == 1 and out not in self.graph_outputs and self.consumers[out] and all(
                c.op_type in ("MatMul", "Gemm") and c.input[0] == out for c in self.consumers[out]):
            shp = self.onnx_shape(e)
            idx = np.arange(int(np.prod(shp))).reshape(shp).transpose(e.perm).ravel()
            v = self.add(node.name, "Reshape", [e.value], {"shape": out_shape}, out=out)
            rp = None if np.array_equal(idx, np.arange(idx.size)) else idx
            self.env[out] = _Entry(v, (0,), rp)
            return
        x = self.layout(node, e, ident)
        v = self.add(node.name, "Reshape", [x], {"shape": out_shape}, out=out)
        self.env[out] = _Entry(v, tuple(range(len(out_shape))))

    def op_Reshape(self, node):
        e = self.entry(node, node.input[0])
        target = [int(t) for t in np.asarray(self.const(node, node.input[1])).ravel()]
        full = (1, *self.onnx_shape(e))
        if int(self.attr(node, "allowzero", 0)) == 0:
            target = [full[i] if t == 0 and i < len(full) else t for i, t in enumerate(target)]
        try:
            new = np.empty(full, dtype=np.uint8).reshape(target).shape
        except ValueError as ex:
            raise UnsupportedError(f"Reshape to {target} is invalid for shape {full}: {ex}", node.name) from None
        if not new or new[0] != 1 or target[0] not in (1, -1):
            raise UnsupportedError(f"Reshape to {target} changes the batch dimension", node.name)
        self._reshape_to(node, tuple(new[1:]))

    def op_Flatten(self, node):
        e = self.entry(node, node.input[0])
        shp = self.onnx_shape(e)
        axis = int(self.attr(node, "axis", 1))
        if axis < 0:
            axis += len(shp) + 1
        if axis != 1:
            raise UnsupportedError(f"Flatten with axis={axis} is not supported (only 1: keep the batch)", node.name)
        self._reshape_to(node, (int(np.prod(shp)),))

    def op_Transpose(self, node):
        e = self.entry(node, node.input[0])
        rank = len(e.perm)
        P = [int(p) for p in self.attr(node, "perm", list(range(rank, -1, -1)))]
        if len(P) != rank + 1 or P[0] != 0:
            raise UnsupportedError(f"Transpose perm {P} moves the batch dimension", node.name)
        Pp = [p - 1 for p in P[1:]]  # onnx_out axis j = onnx_in axis Pp[j]
        if e.rowperm is not None:
            raise UnsupportedError("Transpose of a flattened tensor feeding a Dense", node.name)
        Pinv = _inv(Pp)
        q = tuple(Pinv[a] for a in e.perm)  # zero-cost: only the layout bookkeeping changes
        self.env[node.output[0]] = _Entry(e.value, q)

    def op_Concat(self, node):
        if any(self.is_const(t) for t in node.input):
            raise UnsupportedError("Concat with a constant input is not supported", node.name)
        es = [self.entry(node, t) for t in node.input]
        rank = len(es[0].perm)
        axis = int(self.attr(node, "axis"))
        if axis < 0:
            axis += rank + 1
        if axis == 0:
            raise UnsupportedError("Concat along the batch axis is not supported", node.name)
        p = es[0].perm if es[0].rowperm is None else tuple(range(rank))
        xs = [self.layout(node, ei, p) for ei in es]
        ir_axis = _inv(p)[axis - 1]
        v = self.add(node.name, "Concat", xs, {"axis": ir_axis}, out=node.output[0])
        self.env[node.output[0]] = _Entry(v, p)

    def op_Softmax(self, node):
        e = self.entry(node, node.input[0])
        rank = len(e.perm)
        default = 1 if self.opset < 13 else -1
        axis = int(self.attr(node, "axis", default))
        if axis < 0:
            axis += rank + 1
        if axis == 0:
            raise UnsupportedError("Softmax over the batch axis is not supported", node.name)
        ax = axis - 1
        if self.opset < 13 and ax != rank - 1:
            raise UnsupportedError(f"Softmax (opset {self.opset}) axis={axis} flattens the trailing axes: only the "
                                   f"last axis is supported", node.name)
        q = e.perm if e.perm[-1] == ax else tuple(a for a in range(rank) if a != ax) + (ax,)
        x = self.layout(node, e, q)
        v = self.add(node.name, "Softmax", [x], {"axis": -1}, out=node.output[0])
        self.env[node.output[0]] = _Entry(v, q)

    # -------------------------------------------------------------- final clean-up
    def finish(self, final_values: list[str]) -> Graph:
        values = self.b.values
        nodes = list(self.b.nodes)
        outputs = list(final_values)
        inputs = list(self.b.inputs)

        def consumers(v):
            return [n for n in nodes if v in n.inputs]

        def rename(old, new):
            nonlocal nodes, outputs
            nodes = [n.replace(inputs=tuple(new if i == old else i for i in n.inputs),
                               outputs=tuple(new if o == old else o for o in n.outputs)) for n in nodes]
            outputs = [new if o == old else o for o in outputs]

        changed = True
        while changed:
            changed = False
            prod = {n.output: n for n in nodes}
            for n in nodes:
                if n.op == "Reshape":
                    m = prod.get(n.inputs[0])
                    if m is not None and m.op == "Reshape" and m.output not in outputs and len(consumers(m.output)) == 1:
                        nodes = [x for x in nodes if x is not m]
                        nodes = [x.replace(inputs=m.inputs) if x is n else x for x in nodes]
                        changed = True
                        break
                noop = (n.op == "Reshape" and tuple(n.attrs["shape"]) == tuple(values[n.inputs[0]].shape)) or (
                    n.op == "Transpose" and tuple(n.attrs["perm"]) == tuple(range(len(n.attrs["perm"]))))
                if noop:
                    src, dst = n.inputs[0], n.output
                    if dst in outputs and (src in inputs or src in outputs):
                        continue
                    nodes = [x for x in nodes if x is not n]
                    if dst in outputs:
                        rename(src, dst)
                    else:
                        rename(dst, src)
                    changed = True
                    break
        # graph outputs carry the ONNX output names
        for want, _ in zip(self.graph_outputs, list(outputs)):
            i = self.graph_outputs.index(want)
            have = outputs[i]
            if have == want or have in inputs:
                continue
            if any(want in n.outputs for n in nodes):
                rename(want, f"{want}__onnx_layout")
            rename(have, want)
        b = GraphBuilder(self.b.name, dict(self.b.meta))
        for i in inputs:
            b.input(i, values[i].shape, values[i].dtype)
        for n in nodes:
            b.add_node(n)
        b.output(*outputs)
        return b.build()
