"""FINN ``finn_datatype`` annotations -> QONNX quantizers (an ONNX-level rewrite before import).

:func:`normalize_finn`, run by :func:`.onnx_load.prepare`: a graph input or a weight initializer
(the constant operand of MatMul / Gemm / Conv) carrying an integer ``finn_datatype`` annotation
(``INTk``, ``UINTk``, ``BIPOLAR``, ``BINARY``, ``TERNARY``) gets a QONNX quantizer with scale 1 that
states the annotation (``Quant`` with the type's bit width, signedness and narrow range;
``BipolarQuant`` for ``BIPOLAR``), so the importer carries those tensors as exact integers.  An
annotated initializer must already hold such integers (checked, else :class:`ModelImportError`); a
graph input annotated as an integer type is rounded (half to even) and saturated into it, which is
the identity on the integer inputs the annotation promises.

Sources: qonnx ``DataType`` and ``ModelWrapper.get_tensor_datatype`` (annotations are stored in
``graph.quantization_annotation`` under the key ``finn_datatype``;
https://github.com/fastmachinelearning/qonnx).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ModelImportError, UnsupportedError

QONNX_DOMAIN = "qonnx.custom_op.general"
#: ops whose constant operand is a weight that a ``finn_datatype`` annotation makes an exact integer
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")


def annotations(g) -> dict[str, str]:
    """Tensor name -> ``finn_datatype`` string of every annotated tensor of ONNX graph ``g``."""
    out = {}
    for qa in g.quantization_annotation:
        for kv in qa.quant_parameter_tensor_names:
            if kv.key == "finn_datatype":
                out[qa.tensor_name] = kv.value
    return out


def integer_quant_spec(dt_name: str):
    """``(bits, signed, narrow)`` of an integer FINN datatype, ``"bipolar"`` for BIPOLAR, or ``None``
    for a non-integer one (FLOAT32, FIXED<..>, SCALEDINT<..>, FLOAT<..>)."""
    from qonnx.core.datatype import DataType

    try:
        dt = DataType[dt_name]
    except Exception:
        return None
    if not dt.is_integer():
        return None
    if dt.name == "BIPOLAR":
        return "bipolar"
    if dt.name == "TERNARY":
        return (2, True, True)
    lo, hi = int(dt.min()), int(dt.max())
    if lo < 0:
        bits = max(2, int(hi).bit_length() + 1)
        return (bits, True, lo == -hi)
    return (max(1, int(hi).bit_length()), False, False)


def normalize_finn(proto: onnx.ModelProto) -> None:
    """Add the scale-1 quantizers that state integer ``finn_datatype`` annotations (module docstring).

    Raises:
        ModelImportError: an annotated weight initializer holding a value outside its datatype
            (naming the node that reads it).
    """
    g = proto.graph
    ann = annotations(g)
    if not ann:
        return
    inits = {t.name: t for t in g.initializer}
    names = {n.name for n in g.node} | set(inits) | {o for n in g.node for o in n.output}
    new_nodes, new_inits = [], []

    def fresh(base):
        nm, k = base, 1
        while nm in names:
            nm, k = f"{base}_{k}", k + 1
        names.add(nm)
        return nm

    def quantizer(t: str, spec) -> str:
        out = fresh(f"{t}__finn_dt")
        if spec == "bipolar":
            s = fresh(f"{out}_scale")
            new_inits.append(numpy_helper.from_array(np.float32(1.0), s))
            new_nodes.append(helper.make_node("BipolarQuant", [t, s], [out], name=out, domain=QONNX_DOMAIN))
            return out
        bits, signed, narrow = spec
        ins = [t]
        for role, v in (("scale", 1.0), ("zeropt", 0.0), ("bitwidth", bits)):
            nm = fresh(f"{out}_{role}")
            new_inits.append(numpy_helper.from_array(np.float32(v), nm))
            ins.append(nm)
        new_nodes.append(helper.make_node("Quant", ins, [out], name=out, domain=QONNX_DOMAIN, signed=int(signed),
                                          narrow=int(narrow), rounding_mode="ROUND"))
        return out

    rename: dict[str, str] = {}
    for inp in g.input:
        spec = integer_quant_spec(ann.get(inp.name, "FLOAT32"))
        if spec is not None and inp.name not in inits:
            rename[inp.name] = quantizer(inp.name, spec)
    for n in g.node:
        if n.op_type not in WEIGHT_OPS or len(n.input) < 2:
            continue
        w = n.input[1]
        spec = integer_quant_spec(ann.get(w, "FLOAT32"))
        if spec is None or w not in inits or w in rename:
            continue
        vals = numpy_helper.to_array(inits[w]).astype(np.float64)
        if spec == "bipolar":
            ok = np.all(np.isin(vals, (-1.0, 1.0)))
        else:
            bits, signed, narrow = spec
            lo = (-(1 << (bits - 1)) + int(narrow)) if signed else 0
            hi = ((1 << (bits - 1)) - 1) if signed else (1 << bits) - 1
            ok = np.all(vals == np.round(vals)) and vals.min(initial=0) >= lo and vals.max(initial=0) <= hi
        if not ok:
            raise ModelImportError(f"{n.op_type} weight {w!r} is annotated {ann[w]} but holds other values "
                                   f"(e.g. {vals.ravel()[:3].tolist()})", n.name)
        rename[w] = quantizer(w, spec)
    if not rename:
        return
    for n in g.node:
        for i, t in enumerate(n.input):
            if t in rename:
                n.input[i] = rename[t]
    for o in g.output:
        if o.name in rename:
            raise UnsupportedError(f"graph input {o.name!r} is also a graph output", o.name)
    nodes = new_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_inits)
    if not any(o.domain == QONNX_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(QONNX_DOMAIN, 1))


