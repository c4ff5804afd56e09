"""ONNX QDQ normalization: ``QuantizeLinear`` / ``DequantizeLinear`` -> QONNX ``Quant``.

An ONNX-level rewrite run by :func:`.onnx_load.prepare` before the QONNX cleanup, so that the
importer's ``Quant`` path handles QDQ models (``onnxruntime.quantization.quantize_static`` with
``QuantFormat.QDQ``, ``torch.onnx`` fake-quant exports):

* ``QuantizeLinear(x, s, z) -> DequantizeLinear(., s, z)`` (the same ``s`` and ``z``): one QONNX
  ``Quant(x, s, z, bits)`` (signed per the zero point's type, ``narrow=0``, ``rounding_mode=ROUND``,
  i.e. half to even, which is QuantizeLinear's rounding).  ONNX's QuantizeLinear computes
  ``sat(round(x / s) + z)``; QONNX's Quant computes ``clamp(round(x / s + z)) - z``.  In real
  arithmetic the two agree for an even ``z`` (round half to even commutes with adding an even
  integer) and differ at ties for an odd one; in the float32 arithmetic both sources use, the sum
  ``x / s + z`` is itself rounded, so they can differ for any ``z != 0``.  So with ``z != 0`` the
  rewrite is two quantizers: ``Quant(x, s, 0, bits + 1)`` (the rounding of the float32 quotient,
  with the zero point 0) then ``Quant(., s, z, bits)`` (an exact integer shift and the saturation),
  which is QuantizeLinear for every float32 ``x``.
* ``DequantizeLinear(w, s, z)`` of an integer initializer ``w`` (int8 per-channel weights, int32
  biases): the float32 initializer ``float32((w - z) * s)``, exactly what onnxruntime computes, and,
  when a QONNX ``Quant(., s, 0, bits)`` reproduces every element of it bit for bit, wrapped in that
  ``Quant`` (so the importer treats it as quantized weights); otherwise it stays a plain float32
  initializer.
* QOperator ops (``QLinearConv``, ``QLinearMatMul``, ``QGemm``, ``ConvInteger``, ``MatMulInteger``,
  ...) are refused with one line naming the node and saying to export QDQ instead.

Sources: the ONNX operator specification of QuantizeLinear / DequantizeLinear (opsets 10, 13, 19,
21: ``axis``, ``saturate``, ``block_size``, ``output_dtype``; https://onnx.ai/onnx/operators/);
QONNX ``Quant`` (Pappalardo et al., "QONNX: Representing Arbitrary-Precision Quantized Neural
Networks", 2022, section 3; ``qonnx/custom_op/general/intquant.py``).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelImportError, UnsupportedError

QONNX_DOMAIN = "qonnx.custom_op.general"
#: domains of QuantizeLinear / DequantizeLinear: ONNX, and onnxruntime's contrib ops (same semantics;
#: ``quantize_static(..., extra_options={"UseQDQContribOps": True})``, 16-bit QDQ before opset 21)
QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")

#: ONNX integer element type -> (bit width, signed) of QuantizeLinear / DequantizeLinear codes.
INT_TYPES = {
    TensorProto.UINT8: (8, False), TensorProto.INT8: (8, True),
    TensorProto.UINT16: (16, False), TensorProto.INT16: (16, True),
    TensorProto.UINT4: (4, False), TensorProto.INT4: (4, True),
    TensorProto.INT32: (32, True),
}
#: Quantized-operator ops (QOperator format) and their domains' message.
QOPERATOR_OPS = ("QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "QLinearAdd",
                 "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearAveragePool",
                 "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSoftmax", "QAttention",
                 "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")
_QOP_HINT = ("quantized-operator (QOperator) format is not supported: export QDQ instead "
             "(onnxruntime.quantization.quantize_static(..., quant_format=QuantFormat.QDQ))")


def _type_name(elem: int) -> str:
    return TensorProto.DataType.Name(elem)


class _Qdq:
    """The rewrite of one model (see the module docstring); :meth:`run` edits ``proto`` in place."""

    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto
        self.g = proto.graph
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.inits = {t.name: t for t in self.g.initializer}
        self.const_nodes = {n.output[0]: n for n in self.g.node if n.op_type == "Constant" and n.output}
        self.consumers: dict[str, list] = {}
        for n in self.g.node:
            for t in n.input:
                if t:
                    self.consumers.setdefault(t, []).append(n)
        self.outputs = {o.name for o in self.g.output}
        self.new_inits: list = []
        self.drop: set[int] = set()
        self.names = {n.name for n in self.g.node} | set(self.inits)

    # ------------------------------------------------------------ helpers
    def fresh(self, base: str) -> str:
        nm, k = base, 1
        while nm in self.names:
            nm, k = f"{base}_{k}", k + 1
        self.names.add(nm)
        return nm

    def attr(self, node, key, default=None):
        for a in node.attribute:
            if a.name == key:
                return helper.get_attribute_value(a)
        return default

    def tensor(self, node, t: str, what: str):
        """The TensorProto of constant input ``t`` (initializer or Constant node)."""
        if t in self.inits:
            return self.inits[t]
        c = self.const_nodes.get(t)
        if c is not None:
            for a in c.attribute:
                if a.name == "value":
                    return a.t
        raise UnsupportedError(f"{node.op_type} {what} {t!r} must be a constant (initializer)", node.name)

    def init(self, base: str, arr) -> str:
        nm = self.fresh(base)
        self.new_inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), nm))
        return nm

    def params(self, node):
        """(scale float32 array, zero point int64 array, bits, signed, axis, zp elem type) of a Q/DQ node.

        Raises:
            UnsupportedError: block quantization, float8 / non-integer zero points, non-float32
                scales, a non-positive or non-finite scale, a zero point out of its type's range.
        """
        op = node.op_type
        bs = int(self.attr(node, "block_size", 0) or 0)
        if bs:
            raise UnsupportedError(f"{op} with block_size={bs} (blocked quantization) is not supported: "
                                   f"use per-tensor or per-axis scales", node.name)
        st = self.tensor(node, node.input[1], "scale")
        if st.data_type not in (TensorProto.FLOAT, TensorProto.DOUBLE):
            raise UnsupportedError(f"{op} scale of type {_type_name(st.data_type)}: only float32 scales are "
                                   f"supported", node.name)
        s = numpy_helper.to_array(st).astype(np.float32)
        if s.size == 0 or not np.all(np.isfinite(s)) or np.any(s <= 0):
            raise ModelImportError(f"{op} scale must be positive and finite, got {s.ravel()[:4].tolist()}", node.name)
        if len(node.input) > 2 and node.input[2]:
            zt = self.tensor(node, node.input[2], "zero point")
            elem = zt.data_type
            if elem not in INT_TYPES or elem == TensorProto.INT32 and op == "QuantizeLinear":
                raise UnsupportedError(f"{op} zero point of type {_type_name(elem)} is not supported (uint8, int8, "
                                       f"uint16, int16, uint4, int4; float8 formats are not)", node.name)
            z = numpy_helper.to_array(zt).astype(np.int64)
        else:
            elem = int(self.attr(node, "output_dtype", 0) or 0) if op == "QuantizeLinear" else 0
            if op == "DequantizeLinear":
                elem = self.input_elem(node)
            elem = elem or TensorProto.UINT8
            if elem not in INT_TYPES:
                raise UnsupportedError(f"{op} of type {_type_name(elem)} is not supported (integer types only)",
                                       node.name)
            z = np.zeros(1, dtype=np.int64)
        bits, signed = INT_TYPES[elem]
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        if np.any(z < lo) or np.any(z > hi):
            raise ModelImportError(f"{op} zero point {z.ravel()[:4].tolist()} is outside {_type_name(elem)}", node.name)
        if s.size > 1 and z.size > 1 and s.shape != z.shape:
            raise ModelImportError(f"{op} scale shape {s.shape} and zero point shape {z.shape} differ", node.name)
        axis = int(self.attr(node, "axis", 1))
        if s.size > 1 and (s.ndim != 1 or (self.opset < 13 and node.domain != "com.microsoft")):
            raise UnsupportedError(f"{op} scale of shape {s.shape}: only scalars or 1-D per-axis scales "
                                   f"(opset >= 13)", node.name)
        return s, z, bits, signed, axis, elem

    def input_elem(self, node) -> int:
        t = node.input[0]
        if t in self.inits:
            return self.inits[t].data_type
        if t in self.const_nodes:
            return self.tensor(node, t, "input").data_type
        return 0

    # ------------------------------------------------------------ rewrites
    def quant(self, name, x, out, s, z, bits, signed, axis_shape=None) -> onnx.NodeProto:
        """A QONNX Quant node ``name``: ``x`` -> ``out`` with scale ``s``, zero point ``z``."""
        if axis_shape is not None:
            s = s.reshape(axis_shape)
            z = z.reshape(axis_shape) if z.size > 1 else z.reshape(())
        else:
            s, z = s.reshape(()), z.reshape(())
        ins = [x, self.init(f"{name}_scale", s), self.init(f"{name}_zeropt", z.astype(np.float32)),
               self.init(f"{name}_bitwidth", np.float32(bits))]
        return helper.make_node("Quant", ins, [out], name=name, domain=QONNX_DOMAIN, signed=int(signed), narrow=0,
                                rounding_mode="ROUND")

    def pair(self, q) -> list:
        """Rewrite QuantizeLinear ``q`` and every DequantizeLinear reading it into Quant nodes."""
        s, z, bits, signed, axis, elem = self.params(q)
        if s.size > 1 or z.size > 1:
            raise UnsupportedError(f"QuantizeLinear with a per-axis scale (axis={axis}, {s.size} channels) on an "
                                   f"activation is not supported: only per-tensor activation scales", q.name)
        y = q.output[0]
        users = self.consumers.get(y, [])
        if y in self.outputs or not users or any(u.op_type != "DequantizeLinear" or u.input[0] != y for u in users):
            other = next((u for u in users if u.op_type != "DequantizeLinear"), None)
            why = "is a graph output" if y in self.outputs else (
                f"feeds {other.op_type} node {other.name!r}" if other else "is not read by a DequantizeLinear")
            raise UnsupportedError(f"QuantizeLinear output {y!r} {why}: only QuantizeLinear -> DequantizeLinear pairs "
                                   f"(QDQ format) are supported", q.name)
        new = []
        for k, d in enumerate(users):
            s2, z2, bits2, signed2, _, elem2 = self.params(d)
            if elem2 != elem or not (np.array_equal(s2.ravel(), s.ravel()) and np.array_equal(z2.ravel(), z.ravel())):
                raise UnsupportedError(f"DequantizeLinear {d.name!r} reads QuantizeLinear {q.name!r} with a different "
                                       f"scale, zero point or type: the pair is not a plain fake quantizer", q.name)
            self.drop.add(id(d))
            zi = int(z.ravel()[0])
            base = q.name if len(users) == 1 else f"{q.name}__{k}"
            if zi == 0:
                new.append(self.quant(base, q.input[0], d.output[0], s, z, bits, signed))
            else:  # round with zero point 0 (one more bit holds round(x/s) in [lo - z, hi - z]), then shift
                mid = self.fresh(f"{base}__round")
                new.append(self.quant(f"{base}__round", q.input[0], mid, s, np.zeros(1, np.int64), bits + 1, True))
                new.append(self.quant(base, mid, d.output[0], s, z, bits, signed))
        return new

    def dequant_init(self, d) -> list:
        """Rewrite DequantizeLinear ``d`` of an integer initializer into a float32 initializer (+ Quant)."""
        wt = self.tensor(d, d.input[0], "input")
        s, z, bits, signed, axis, elem = self.params(d)
        if wt.data_type != elem:
            raise ModelImportError(f"DequantizeLinear input {d.input[0]!r} is {_type_name(wt.data_type)} but its "
                                   f"zero point is {_type_name(elem)}", d.name)
        w = numpy_helper.to_array(wt).astype(np.int64)
        shape = None
        if s.size > 1:
            ax = axis % max(w.ndim, 1)
            if w.ndim == 0 or w.shape[ax] != s.size:
                raise ModelImportError(f"DequantizeLinear per-axis scale of {s.size} values does not match axis {axis} "
                                       f"of the input shape {list(w.shape)}", d.name)
            shape = [1] * w.ndim
            shape[ax] = s.size
        sb = s.reshape(shape) if shape else s.reshape(())
        zb = z.reshape(shape) if (shape and z.size > 1) else z.reshape(())
        codes = w - zb
        real = codes.astype(np.float32) * sb  # onnxruntime: float32((w - z) * s)
        self.drop.add(id(d))
        out = d.output[0]
        need = max(int(np.abs(codes).max(initial=0)).bit_length() + 1, 2)
        if need <= 32 and self.reproduces(real, sb, need):
            src = self.init(f"{d.name}__float", real)
            return [self.quant(d.name, src, out, s, np.zeros_like(z), need, True, shape)]
        self.new_inits.append(numpy_helper.from_array(real.astype(np.float32), out))
        return []

    @staticmethod
    def reproduces(real: np.ndarray, s: np.ndarray, bits: int) -> bool:
        """True when QONNX's ``Quant(real, s, 0, bits, signed)`` (qonnx ``int_quant``) returns ``real``
        bit for bit (so wrapping the initializer in that Quant changes no value)."""
        from qonnx.custom_op.general.intquant import int_quant

        y = int_quant(real, s, np.float32(0), np.float32(bits), 1, 0, "ROUND")
        return np.asarray(y).dtype == np.float32 and np.array_equal(np.asarray(y), real)

    def run(self) -> None:
        nodes = list(self.g.node)
        for n in nodes:
            if n.op_type in QOPERATOR_OPS:
                raise UnsupportedError(f"{n.op_type}: {_QOP_HINT}", n.name)
        if not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.domain in QDQ_DOMAINS for n in nodes):
            return
        out_nodes = []
        for n in nodes:
            if id(n) in self.drop:
                continue
            if n.op_type == "QuantizeLinear" and n.domain in QDQ_DOMAINS:
                out_nodes.extend(self.pair(n))
            elif n.op_type == "DequantizeLinear" and n.domain in QDQ_DOMAINS:
                t = n.input[0]
                if t in self.inits or t in self.const_nodes:
                    out_nodes.extend(self.dequant_init(n))
                else:
                    raise UnsupportedError(f"DequantizeLinear input {t!r} is neither an integer initializer nor the "
                                           f"output of a QuantizeLinear", n.name)
            else:
                out_nodes.append(n)
        # DequantizeLinear nodes read by a QuantizeLinear before it (never in a topological order) are
        # caught above; every DQ of a Q was dropped while rewriting its Q.
        del self.g.node[:]
        self.g.node.extend(out_nodes)
        self.g.initializer.extend(self.new_inits)
        if not any(o.domain == QONNX_DOMAIN for o in self.proto.opset_import):
            self.proto.opset_import.append(helper.make_opsetid(QONNX_DOMAIN, 1))


def normalize_qdq(proto: onnx.ModelProto) -> None:
    """Rewrite the QDQ nodes of ``proto`` (in place) into QONNX ``Quant`` nodes (module docstring).

    Nodes must be named (``prepare`` names them first); the new ``Quant`` nodes take the name of the
    QuantizeLinear (pairs) or DequantizeLinear (initializers) they replace, so later errors name a
    node of the user's file.

    Raises:
        UnsupportedError: QOperator ops, block quantization, per-axis activation scales, float8 or
            int32 activation types, a QuantizeLinear not followed (only) by matching DequantizeLinear
            nodes, a DequantizeLinear of an activation that no QuantizeLinear produced (each message
            names the node).
        ModelImportError: invalid scales / zero points (non-positive scale, zero point out of range,
            mismatched shapes).
    """
    _Qdq(proto).run()
