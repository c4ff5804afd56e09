"""``Lookup``: an elementwise function of a fixed-point input given as a table over its codes.

``y = table[x_code - x_type.min_code]``.  A fixed-point input of width ``W`` has ``2**W`` codes, so
any elementwise function of it is exactly a table of ``2**W`` entries.  Used for ONNX ``Sigmoid``
and ``Tanh`` on a quantized input: the table holds the *source's own* float32 results for every
input code -- computed at import by running the ONNX node in onnxruntime (the runtime qonnx's
``execute_onnx`` uses for standard ops) on all codes at once -- so the op equals the source bit for
bit, and the ``Quant`` that normally follows (an IR ``Quantize`` float -> fixed) rounds them exactly
as the source does.

Operands: input ``x`` of a :class:`FixedType` of at most :data:`MAX_WIDTH` bits; ``params["table"]``
a 1-D :class:`Const` of ``x.max_code - x.min_code + 1`` entries, float32 (the output is float32) or
fixed-point (the output has the table's type).  Attribute ``fn``: the source function's name
(documentation and QONNX export).

Sources: ONNX ``Sigmoid`` / ``Tanh`` (https://onnx.ai/onnx/operators/onnx__Sigmoid.html); the table
method for low-precision activations: hls4ml's lookup-table activations (Duarte et al., "Fast
inference of deep neural networks in FPGAs for particle physics", JINST 13 P07027, 2018, sec. 3),
made exact here by tabulating every input code.
"""
from __future__ import annotations

import numpy as np

from ...errors import UnsupportedError, VerifyError
from ..graph import Const
from ..types import FLOAT32, FixedType
from .spec import OpSpec, register

#: Widest input type a table is built for (2**16 entries).
MAX_WIDTH = 16
#: ONNX ops imported as a table of the source's own results.
FUNCTIONS = ("Sigmoid", "Tanh")


def _rule(node, ins):
    x = ins[0]
    if not isinstance(x.dtype, FixedType):
        raise VerifyError(f"Lookup needs a fixed-point input, got {x.dtype}", node.name)
    tab = node.params.get("table")
    if tab is None:
        raise VerifyError("Lookup needs parameter 'table'", node.name)
    n = x.dtype.max_code - x.dtype.min_code + 1
    if tab.data.ndim != 1 or tab.shape[0] != n:
        raise VerifyError(f"Lookup table of shape {tab.shape} does not hold the {n} codes of {x.dtype}", node.name)
    if isinstance(tab.dtype, FixedType):
        return x.shape, tab.dtype
    if not np.all(np.isfinite(tab.data)):
        raise VerifyError("Lookup table holds non-finite values", node.name)
    return x.shape, FLOAT32


def _reference(node, args, in_types, out_t):
    idx = np.asarray(args[0], dtype=np.int64) - in_types[0].min_code
    return node.params["table"].data[idx]


def source_values(fn: str, reals: np.ndarray) -> np.ndarray:
    """float32 results of ONNX op ``fn`` (``Sigmoid`` / ``Tanh``) on the float32 ``reals``, computed by
    onnxruntime (the runtime qonnx's ``execute_onnx`` uses for standard ONNX ops)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [len(reals)])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [len(reals)])
    m = helper.make_model(helper.make_graph([helper.make_node(fn, ["x"], ["y"])], "table", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = min(m.ir_version, 8)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": np.asarray(reals, dtype=np.float32)})[0]


def _import_onnx(cv, node):
    """ONNX ``Sigmoid`` / ``Tanh`` on a fixed-point (quantized) activation -> ``Lookup`` with the
    source's float32 results; refused on a float input or one wider than :data:`MAX_WIDTH` bits."""
    e = cv.entry(node, node.input[0])
    t = cv.dtype(e)
    if not isinstance(t, FixedType):
        raise UnsupportedError(f"{node.op_type} on a float input: only a quantized (fixed-point) input is exact, "
                               "as a table over its codes (put a Quant before it)", node.name)
    if t.width > MAX_WIDTH:
        raise UnsupportedError(f"{node.op_type} on a {t.width}-bit input: tables are built for at most {MAX_WIDTH} "
                               "bits", node.name)
    codes = np.arange(t.min_code, t.max_code + 1, dtype=np.int64)
    vals = source_values(node.op_type, t.to_real(codes).astype(np.float32))
    v = cv.add(node.name, "Lookup", [e.value], {"fn": node.op_type}, {"table": Const(vals, FLOAT32)},
               out=node.output[0])
    cv.bind(node.output[0], v, e.perm)


def _export_onnx(ex, n, x):
    """Back to the source op ``fn``: a float32 table as ``fn`` itself, a fixed-point table (a folded
    ``Lookup -> Quantize``) as ``fn`` followed by a ``Quant`` into the table's type -- after checking
    that this is the table (the source's values, rounded by that Quant, for every input code);
    anything else is refused naming the node."""
    fn = n.attrs.get("fn")
    tab = n.params["table"]
    if fn not in FUNCTIONS:
        raise UnsupportedError(f"QONNX export of a Lookup table of {fn!r}: only {'/'.join(FUNCTIONS)} tables map "
                               "back to an ONNX op", n.name)
    base = n.output + "__ir"
    if not isinstance(tab.dtype, FixedType):
        return ex.node(fn, x, base)
    t_in = ex.g.values[n.inputs[0]].dtype
    real = t_in.to_real(np.arange(t_in.min_code, t_in.max_code + 1, dtype=np.int64)).astype(np.float32)
    if not np.array_equal(tab.dtype.quantize_real(source_values(fn, real)), tab.data):
        raise UnsupportedError(f"QONNX export: this Lookup table is not {fn} rounded to {tab.dtype}", n.name)
    y = ex.node(fn, x, f"{base}_{fn.lower()}")
    return ex.quant(y, tab.dtype, base, n.name)


LOOKUP = register(OpSpec(
    name="Lookup", summary="elementwise table over the input's codes: table[x - min_code]",
    infer=_rule, reference=_reference, attrs={"fn": None}, params=("table",),
    onnx_import={fn: _import_onnx for fn in FUNCTIONS}, onnx_export=_export_onnx))
