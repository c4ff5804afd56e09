"""QONNX ``FloatQuant`` (minifloat quantizer) -> IR ``FloatQuant`` (+ the lossless cast onto its grid).

``FloatQuant(X, scale, exponent_bitwidth, mantissa_bitwidth, exponent_bias, max_val)`` with the
attributes ``rounding_mode``, ``has_inf``, ``has_nan``, ``has_subnormal``, ``saturation``
(``qonnx/custom_op/general/floatquant.py``).  Its semantics are those of qonnx's executor, which
the IR op reproduces exactly (:mod:`qdeploy.compiler.ir.ops.floatquant`); note that the executor
always produces subnormals, whatever ``has_subnormal`` says, and so does the IR.

* A constant input (weights) is folded with qonnx's own ``float_quant`` (per-channel scales and
  every rounding mode qonnx has allowed) and marked quantized, so the weights become an exact
  fixed-point constant when their values allow it.
* An activation becomes the IR ``FloatQuant`` (float32 out).  When the scale is a power of two and
  the quantizer saturates, every output lies on a fixed-point grid of at most 32 bits
  (:func:`~qdeploy.compiler.ir.ops.floatquant.grid_type`): a ``Quantize`` onto that grid follows,
  which changes no value (it is exact) and lets the following layers compute in exact integers.

Sources: QONNX ``FloatQuant`` spec (https://github.com/fastmachinelearning/qonnx/blob/main/docs/
qonnx-custom-ops/floatquant_op.md) and its NumPy executor.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from ..errors import UnsupportedError, VerifyError
from ..ir.ops.floatquant import format_params, grid_type
from .onnx_convert import Entry

_ROLES = ("scale", "exponent_bitwidth", "mantissa_bitwidth", "exponent_bias", "max_val")


def _scalar(cv, node, t: str, role: str, integer: bool) -> float:
    v = np.asarray(cv.const(node, t), dtype=np.float64)
    if v.size == 0 or not np.all(v == v.ravel()[0]):
        raise UnsupportedError(f"FloatQuant {role} must be one value (per-tensor), got shape {list(v.shape)}",
                               node.name)
    x = float(v.ravel()[0])
    if integer and not x.is_integer():
        raise UnsupportedError(f"FloatQuant {role} {x:g} is not an integer", node.name)
    return x


def _fold(cv, node, out: str) -> None:
    """A FloatQuant of a constant: qonnx's ``float_quant`` itself (the source's semantics, any
    rounding mode it has, per-channel scale / max_val); marked quantized when every value is finite."""
    from qonnx.custom_op.general.floatquant import float_quant

    x = np.asarray(cv.consts[node.input[0]], dtype=np.float32)
    scale, e, m, bias, mx = (np.asarray(cv.const(node, t), dtype=np.float32) for t in node.input[1:6])
    for role, v in (("exponent_bitwidth", e), ("mantissa_bitwidth", m), ("exponent_bias", bias)):
        if v.size != 1 or not float(v.ravel()[0]).is_integer():
            raise UnsupportedError(f"FloatQuant {role} must be one integer, got {v.ravel()[:4].tolist()}", node.name)
    try:
        with np.errstate(invalid="ignore", over="ignore"):
            y = float_quant(x.copy(), scale, np.float32(e.item()), np.float32(m.item()), np.float32(bias.item()),
                            True, mx, int(cv.attr(node, "has_inf")), int(cv.attr(node, "has_nan")), True,
                            str(cv.attr(node, "rounding_mode", "ROUND")), int(cv.attr(node, "saturation")))
    except Exception as ex:  # qonnx's own refusal (unknown rounding mode, no inf/nan without saturation)
        raise UnsupportedError(f"FloatQuant of constant {node.input[0]!r}: qonnx's float_quant failed "
                               f"({type(ex).__name__}: {ex})", node.name) from None
    y = np.asarray(y, dtype=np.float32)
    cv.consts[out] = y
    if np.all(np.isfinite(y)):
        cv.quantized.add(out)


def import_floatquant(cv, node) -> None:
    """Import one QONNX ``FloatQuant`` node (see the module docstring).

    Raises:
        UnsupportedError: fewer than 6 inputs; a missing has_inf / has_nan / saturation attribute;
            on an activation: non-constant or per-channel format inputs, a rounding mode other than
            ROUND, a format outside float32's range, or a non-saturating quantizer with neither
            has_inf nor has_nan (qonnx's executor raises there); each naming the node.
    """
    if len(node.input) < 6 or not all(node.input[:6]):
        raise UnsupportedError("FloatQuant needs 6 inputs (X, scale, exponent_bitwidth, mantissa_bitwidth, "
                               "exponent_bias, max_val)", node.name)
    missing = [a for a in ("has_inf", "has_nan", "saturation") if cv.attr(node, a) is None]
    if missing:
        raise UnsupportedError(f"FloatQuant attribute(s) {', '.join(missing)} missing (required by QONNX; not guessed)",
                               node.name)
    out = node.output[0]
    if cv.is_const(node.input[0]):  # weights: qonnx's own float_quant (any broadcast scale / max_val)
        _fold(cv, node, out)
        return
    vals = {r: _scalar(cv, node, t, r, r not in ("scale", "max_val")) for r, t in zip(_ROLES, node.input[1:6])}
    mode = str(cv.attr(node, "rounding_mode", "ROUND")).upper()
    attrs = {"exponent_bits": int(vals["exponent_bitwidth"]), "mantissa_bits": int(vals["mantissa_bitwidth"]),
             "exponent_bias": int(vals["exponent_bias"]), "scale": vals["scale"], "max_val": vals["max_val"],
             "saturation": bool(int(cv.attr(node, "saturation", 1))), "has_inf": bool(int(cv.attr(node, "has_inf", 0))),
             "has_nan": bool(int(cv.attr(node, "has_nan", 0))), "rounding": mode}
    try:
        p = format_params(SimpleNamespace(attrs=attrs, name=node.name))
    except VerifyError as e:
        raise UnsupportedError(e.reason, node.name) from None
    e = cv.entry(node, node.input[0])
    gt = grid_type(p) if p["saturation"] else None
    v = cv.add(node.name, "FloatQuant", [e.value], attrs, out=out if gt is None else f"{out}__minifloat")
    if gt is not None:
        v = cv.add(f"{node.name}__grid", "Quantize", [v], {"to": gt}, out=out)
    cv.env[out] = Entry(v, e.perm, e.rowperm)
