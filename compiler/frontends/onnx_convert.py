"""The ONNX -> IR converter: layout bookkeeping, constants, the node loop and the final clean-up.

ONNX is NCHW, the IR channels-last: each ONNX tensor is carried as an IR value plus a per-sample
axis permutation ``perm`` with ``ir = onnx_sample.transpose(perm)`` (an :class:`Entry`).
Layout-sensitive ops (Conv, pools) ask for the channels-last layout, Flatten/Reshape for the ONNX
order (a ``Transpose`` is inserted only where the element order really changes, and a flatten that
feeds a ``Dense`` folds the permutation into the weight rows instead).  The per-op handlers live in
:mod:`.onnx_ops`.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ModelImportError, UnsupportedError, VerifyError
from ..ir.graph import Const, Graph, GraphBuilder
from ..ir.types import FLOAT32, FixedType, FloatType
from . import onnx_scaled, onnx_scaled_ops
from .onnx_load import STD_DOMAINS

# ops evaluated here when all their inputs are constants (Quant folding and the like)
CONST_OPS = ("Quant", "BipolarQuant", "Transpose", "Identity", "Reshape", "Flatten", "Mul", "Add", "Sub",
             "Div", "Neg", "Cast")


def check_quant_params(node, scale, zp, bw) -> None:
    """Values no QONNX ``Quant`` may have (activation or weight quantizer), naming the node."""
    if scale.size == 0 or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        bad = scale.ravel()[~(np.isfinite(scale.ravel()) & (scale.ravel() > 0))]
        raise ModelImportError(f"Quant scale must be positive and finite, got {bad[0] if bad.size else scale.ravel()}",
                           node.name)
    if not np.all(np.isfinite(zp)):
        raise ModelImportError("Quant zero point is not finite", node.name)
    if bw.size == 0 or not np.all(np.isfinite(bw)) or np.any(bw < 1):
        raise ModelImportError(f"Quant bit width {bw.ravel().tolist()[:4]} must be >= 1", node.name)


def canonical_perm(rank: int) -> tuple[int, ...]:
    """Per-sample axis permutation ONNX -> IR: channels-last for rank >= 2 ((C,H,W) -> (H,W,C))."""
    if rank >= 2:
        return tuple(range(1, rank)) + (0,)
    return tuple(range(rank))


def inv_perm(p) -> tuple[int, ...]:
    inv = [0] * len(p)
    for i, a in enumerate(p):
        inv[a] = i
    return tuple(inv)


def is_pow2(s: float) -> bool:
    if not (s > 0 and math.isfinite(s)):
        return False
    m, _ = math.frexp(s)
    return m == 0.5


class Entry:
    """An ONNX activation tensor in the IR: IR value name + layout (+ pending row permutation, +
    for a scaled-integer value its pending exact affine map, an :class:`.onnx_scaled.Scaled`)."""

    __slots__ = ("value", "perm", "rowperm", "scaled")

    def __init__(self, value: str, perm: tuple[int, ...], rowperm=None, scaled=None):
        self.value, self.perm, self.rowperm, self.scaled = value, tuple(perm), rowperm, scaled


class OnnxConverter:
    """Converts a cleaned-up ONNX graph node by node into a :class:`GraphBuilder`.

    Args:
        m: the qonnx ``ModelWrapper`` from :func:`.onnx_load.prepare`.
        name: the IR graph name.  source: where the model came from (for ``meta``).
        importer_for: ONNX op type -> handler ``(converter, onnx_node) -> None`` or ``None``
            (:func:`.onnx_ops.importer_for`).  A handler reads its inputs with :meth:`entry` /
            :meth:`const`, adds IR nodes with :meth:`add`, and records its ONNX outputs in
            :attr:`env` as :class:`Entry` s.
    """


    def __init__(self, m, name: str, source: str, importer_for):
        self.m = m
        self.g = m.graph
        self.opset = next((o.version for o in m.model.opset_import if o.domain in STD_DOMAINS), 13)
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in self.g.initializer}
        self.quantized: set[str] = set()  # constants produced by Quant/BipolarQuant (exact fixed reals)
        self.qcodes: dict[str, tuple] = {}  # such constants as (integer codes y - z, scale broadcast to them)
        self.env: dict[str, Entry] = {}
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
        self.importer_for = importer_for

    # -------------------------------------------------------------- small helpers
    def attr(self, node, key, default=None):
        """ONNX attribute ``key`` of ``node`` as a Python value (bytes decoded), else ``default``."""
        for a in node.attribute:
            if a.name == key:
                v = onnx.helper.get_attribute_value(a)
                return v.decode() if isinstance(v, bytes) else v
        return default

    def bind(self, t: str, value: str, perm, rowperm=None, scaled=None) -> None:
        """Record that ONNX tensor ``t`` is IR value ``value`` in layout ``perm`` (an :class:`Entry`),
        with the pending affine map ``scaled`` of a scaled-integer value."""
        self.env[t] = Entry(value, perm, rowperm, scaled)

    def is_const(self, t: str) -> bool:
        """True when ONNX tensor ``t`` is a (folded) constant."""
        return t in self.consts

    def const(self, node, t: str) -> np.ndarray:
        """The value of constant ``t``; :class:`UnsupportedError` naming ``node`` when it is not one."""
        if t not in self.consts:
            raise UnsupportedError(f"{node.op_type} input {t!r} must be a constant", node.name)
        return self.consts[t]

    def entry(self, node, t: str, scaled: bool = False) -> Entry:
        """The :class:`Entry` of activation ``t`` read by ``node``.

        A handler that understands scaled-integer values (:mod:`.onnx_scaled`) passes ``scaled=True``;
        for any other, a scaled value is turned into a plain fixed-point one where that is exact
        (:func:`.onnx_scaled.materialize`), else refused.

        Raises:
            UnsupportedError: ``t`` is a constant, or a scaled value ``node`` cannot read.
            ModelImportError: nothing produces ``t``.
        """
        if t not in self.env:
            if t in self.consts:
                raise UnsupportedError(f"{node.op_type}: constant input {t!r} where an activation is expected",
                                       node.name)
            raise ModelImportError(f"{node.op_type}: input {t!r} is not produced by any node", node.name)
        e = self.env[t]
        if e.scaled is not None and not scaled:
            return onnx_scaled.materialize(self, node, e)
        return e

    def onnx_shape(self, e: Entry) -> tuple[int, ...]:
        """Per-sample ONNX shape of an entry."""
        ir = self.b.values[e.value].shape
        inv = inv_perm(e.perm)
        return tuple(ir[inv[a]] for a in range(len(ir)))

    def dtype(self, e: Entry):
        """IR dtype of entry ``e``."""
        return self.b.values[e.value].dtype

    def layout(self, node, e: Entry, q) -> str:
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
        pinv = inv_perm(e.perm)
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

    def channel_vector(self, c: np.ndarray, e: Entry):
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
        """Add an IR node (type-inferred, see :meth:`GraphBuilder.add`); returns its output value."""
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
        """Convert every node and return the verified IR graph (with ``input_perms``/``output_perms``)."""
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
            self.env[inp.name] = Entry(inp.name, p)
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
                raise ModelImportError(f"graph output {o!r} is not produced by any node", o)
            rank = len(self.b.values[e.value].shape)
            q = canonical_perm(rank)
            fake = onnx.helper.make_node("Identity", [o], [o], name=o)
            v = onnx_scaled_ops.output(self, o, e, q) if e.scaled is not None else self.layout(fake, e, q)
            final.append(v)
            output_perms[o] = [0] + [a + 1 for a in inv_perm(q)]
        self.b.meta["input_perms"] = input_perms
        self.b.meta["output_perms"] = output_perms
        return self.finish(final)

    def convert(self, node):
        """Convert one ONNX node: fold it when all its inputs are constants, else call its handler.

        Raises:
            UnsupportedError: naming the node when no handler maps its op type.
        """
        op = node.op_type
        ins = [i for i in node.input]
        if all((not i) or self.is_const(i) for i in ins) and op in CONST_OPS:
            self.fold_const(node)
            return
        handler = self.importer_for(op)
        if handler is None:
            raise UnsupportedError(f"unsupported op type {op!r} (domain {node.domain or 'ai.onnx'!r})", node.name)
        handler(self, node)

    # -------------------------------------------------------------- constants
    def fold_const(self, node):
        """Evaluate ``node`` (one of :data:`CONST_OPS`) on constant inputs into :attr:`consts`."""
        op = node.op_type
        x = [self.consts[i] if i else None for i in node.input]
        quant = False
        if op == "Quant":
            from qonnx.custom_op.general.intquant import int_quant
            check_quant_params(node, *(np.asarray(v, dtype=np.float64) for v in x[1:4]))
            y = int_quant(x[0], x[1], x[2], x[3], int(self.attr(node, "signed", 1)), int(self.attr(node, "narrow", 0)),
                          self.attr(node, "rounding_mode", "ROUND"))
            qc = onnx_scaled.quant_codes(x[0], x[1], x[2], x[3], bool(int(self.attr(node, "signed", 1))),
                                         bool(int(self.attr(node, "narrow", 0))), self.attr(node, "rounding_mode", "ROUND"))
            if qc is not None:
                self.qcodes[node.output[0]] = qc
            quant = True
        elif op == "BipolarQuant":
            y = np.where(x[0] >= 0, 1.0, -1.0).astype(x[0].dtype) * x[1]
            codes = np.where(x[0] >= 0, 1, -1).astype(np.int64)
            self.qcodes[node.output[0]] = (codes, np.broadcast_to(np.asarray(x[1], np.float64), codes.shape).copy())
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
        src = self.qcodes.get(node.input[0]) if op in ("Transpose", "Identity", "Cast", "Reshape", "Flatten") else None
        if src is not None:  # the same layout op on the codes and on the broadcast scale
            if op == "Transpose":
                self.qcodes[node.output[0]] = tuple(np.transpose(a, self.attr(node, "perm")) for a in src)
            else:
                self.qcodes[node.output[0]] = tuple(a.reshape(np.asarray(y).shape) for a in src)

    # -------------------------------------------------------------- quantizers

    def finish(self, final_values: list[str]) -> Graph:
        """Merge Reshape chains, drop no-op Reshape/Transpose, give graph outputs their ONNX
        names, and build (type inference + verification)."""
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
