"""``Pad``: constant padding of the per-sample axes of a channels-last tensor.

Source: ONNX ``Pad`` (opset 11+, ``mode="constant"``; https://onnx.ai/onnx/operators/onnx__Pad.html),
PyTorch ``nn.ConstantPad1d/2d`` / ``nn.ZeroPad2d`` (exported as ``Pad``).

Attributes:

* ``pads``: ``(begins..., ends...)``, one begin and one end per per-sample axis of the IR
  (channels-last) tensor, each >= 0 (ONNX's negative pads, i.e. cropping, are refused at import);
* ``code``: the pad element as a *code* of the input's fixed-point type (an integer in
  ``[t.min_code, t.max_code]``).  The pad value is a code, not a real, because the real value 0 is
  not code 0 under a zero-point quantizer: whoever builds the node decides which code pads.
* ``value``: the pad element of a float32 input (a real; ``code`` is then unused).

The output type is the input type: padding only places existing codes, so it is exact.
"""
from __future__ import annotations

import numpy as np

from ...errors import UnsupportedError, VerifyError
from ..types import FixedType
from .spec import OpSpec, register


def pad_widths(node, rank: int) -> list[tuple[int, int]]:
    """``[(begin, end)]`` per per-sample axis of ``node``'s ``pads`` attribute.

    Raises:
        VerifyError: naming the node when ``pads`` has not ``2 * rank`` entries or one is negative.
    """
    p = tuple(int(v) for v in node.attrs["pads"])
    if len(p) != 2 * rank:
        raise VerifyError(f"Pad pads {p} need 2 x {rank} entries (begins..., ends...) for a rank-{rank} input",
                          node.name)
    if any(v < 0 for v in p):
        raise VerifyError(f"Pad pads {p} must be >= 0 (cropping is not padding)", node.name)
    return [(p[i], p[i + rank]) for i in range(rank)]


def _rule(node, ins):
    x = ins[0]
    pw = pad_widths(node, len(x.shape))
    shape = tuple(d + a + b for d, (a, b) in zip(x.shape, pw))
    t = x.dtype
    if isinstance(t, FixedType):
        code = node.attrs.get("code", 0)
        if not isinstance(code, (int, np.integer)) or not t.min_code <= int(code) <= t.max_code:
            raise VerifyError(f"Pad code {code!r} is not a code of the input type {t} "
                              f"([{t.min_code}, {t.max_code}])", node.name)
    elif not np.isfinite(float(node.attrs.get("value", 0.0))):
        raise UnsupportedError("Pad value must be finite", node.name)
    return shape, t


def _reference(node, args, in_types, out_t):
    x = args[0]
    pw = [(0, 0)] + pad_widths(node, x.ndim - 1)
    if isinstance(out_t, FixedType):
        return np.pad(x, pw, constant_values=np.int64(node.attrs.get("code", 0)))
    return np.pad(x, pw, constant_values=np.float32(node.attrs.get("value", 0.0))).astype(np.float32)


def _macs(node, graph) -> int:
    """Data movement: no arithmetic (one per output element for generic costing)."""
    return max(1, graph.values[node.output].size)


def _import_onnx(cv, node):
    """ONNX ``Pad`` (mode ``constant``; ``pads``/``constant_value``/``axes`` as inputs from opset 11,
    as attributes before).  The constant must be a code of the (fixed-point) input type, exactly.

    Raises:
        UnsupportedError: naming the node for another mode, non-constant pads, padding of the
            batch axis, negative pads (cropping), or a constant that is not a code of the input type.
    """
    mode = str(cv.attr(node, "mode", "constant"))
    if mode != "constant":
        raise UnsupportedError(f"Pad mode {mode!r} is not supported (only 'constant')", node.name)
    e = cv.entry(node, node.input[0])
    if e.rowperm is not None:
        raise UnsupportedError("Pad between a Flatten and a Dense", node.name)
    rank = len(e.perm) + 1  # ONNX rank, batch included
    if cv.opset < 11:
        pads = [int(v) for v in cv.attr(node, "pads")]
        value = float(cv.attr(node, "value", 0.0))
        axes = list(range(rank))
    else:
        pads = [int(v) for v in np.asarray(cv.const(node, node.input[1])).ravel()]
        value = 0.0
        if len(node.input) > 2 and node.input[2]:
            cval = np.asarray(cv.const(node, node.input[2]))
            if cval.size != 1:
                raise UnsupportedError(f"Pad constant_value of shape {cval.shape} (must be a scalar)", node.name)
            value = float(cval.ravel()[0])
        axes = list(range(rank))
        if len(node.input) > 3 and node.input[3]:
            axes = [int(a) % rank for a in np.asarray(cv.const(node, node.input[3])).ravel()]
    if len(pads) != 2 * len(axes):
        raise UnsupportedError(f"Pad pads {pads} do not match {len(axes)} axes", node.name)
    full = [0] * (2 * rank)
    for i, a in enumerate(axes):
        full[a], full[a + rank] = pads[i], pads[i + len(axes)]
    if full[0] or full[rank]:
        raise UnsupportedError(f"Pad pads {pads} pad the batch axis", node.name)
    if any(v < 0 for v in full):
        raise UnsupportedError(f"Pad pads {pads} are negative (cropping is not supported)", node.name)
    n = rank - 1
    ir = [0] * (2 * n)
    for a in range(1, rank):  # ONNX per-sample axis a-1 is IR axis inv(perm)[a-1]
        j = e.perm.index(a - 1)
        ir[j], ir[j + n] = full[a], full[a + rank]
    t = cv.dtype(e)
    attrs = {"pads": tuple(ir)}
    if isinstance(t, FixedType):
        code = np.ldexp(value, t.frac_bits)
        if not t.represents(value):
            raise UnsupportedError(f"Pad constant {value:g} is not a value of the input type {t} "
                                   f"(code {code:g} is not an integer in [{t.min_code}, {t.max_code}])", node.name)
        attrs["code"] = int(code)
    else:
        attrs["value"] = float(np.float32(value))
    v = cv.add(node.name, "Pad", [e.value], attrs, out=node.output[0])
    cv.bind(node.output[0], v, e.perm)


def _export_onnx(ex, n, x):
    """ONNX ``Pad`` (opset 11+ form) on the channels-last tensor: pads ``[0, begins..., 0, ends...]``
    and the pad element's real value as ``constant_value``."""
    rank = len(ex.g.values[n.inputs[0]].shape)
    p = [int(v) for v in n.attrs["pads"]]
    pads = ex.init(f"{n.name}_pads", np.array([0, *p[:rank], 0, *p[rank:]], dtype=np.int64))
    t = ex.g.values[n.inputs[0]].dtype
    val = t.to_real(np.int64(n.attrs.get("code", 0))) if isinstance(t, FixedType) else n.attrs.get("value", 0.0)
    c = ex.init(f"{n.name}_value", np.array(val, dtype=np.float32))
    return ex.node("Pad", [x[0], pads, c], n.output + "__ir", mode="constant")


PAD = register(OpSpec(
    name="Pad", kind="layout", summary="constant padding of per-sample axes with a code of the input type",
    infer=_rule, reference=_reference, attrs={"pads": None, "code": 0, "value": 0.0}, macs=_macs,
    onnx_import={"Pad": _import_onnx}, onnx_export=_export_onnx))
