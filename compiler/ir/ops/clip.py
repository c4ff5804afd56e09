"""``Clip``: saturation to constant bounds, ``y = min(max(x, lo), hi)`` (either bound optional).

Sources: ONNX ``Clip`` (https://onnx.ai/onnx/operators/onnx__Clip.html: ``min``/``max`` inputs from
opset 11, attributes before), PyTorch ``nn.Hardtanh`` / ``torch.clamp`` / ``nn.ReLU6`` (exported as
``Clip``), ONNX ``Max``/``Min`` of an activation and a scalar constant.

Attributes: ``lo`` and ``hi``, the bounds as integer codes with ``frac_bits`` fraction bits (real
bound = ``code * 2**-frac_bits``; ``None`` = no bound), ``lo <= hi``.

Exactness.  Every float32 bound is a dyadic rational, so it has an exact code at some number of
fraction bits.  The output gets ``F = max(F_in, frac_bits)`` fraction bits: where a bound lies off the
input's grid, the source outputs the bound itself for inputs beyond it, and this type holds that
value exactly.  (Rounding such a bound inward to the input grid would give the same result on every
input *inside* the bounds but a different one -- the rounded bound instead of the bound -- on inputs
beyond it, so the IR does not do it.)  The output range is the input's range clipped to the bounds,
so the type is usually narrower than the input's.
"""
from __future__ import annotations

import numpy as np

from ...errors import VerifyError
from ..types import FLOAT32, FixedType, fixed_for_range
from .kernels import align
from .spec import OpSpec, register


def clip_bounds(node, f_to: int) -> tuple[int | None, int | None]:
    """``(lo, hi)`` codes of ``node``'s bounds at ``f_to >= frac_bits`` fraction bits (None: absent)."""
    fb = int(node.attrs.get("frac_bits", 0))
    lo, hi = node.attrs.get("lo"), node.attrs.get("hi")
    return (None if lo is None else int(lo) << (f_to - fb)), (None if hi is None else int(hi) << (f_to - fb))


def _clamp(v: int, lo, hi) -> int:
    if lo is not None:
        v = max(v, lo)
    if hi is not None:
        v = min(v, hi)
    return v


def _rule(node, ins):
    t = ins[0].dtype
    lo, hi = node.attrs.get("lo"), node.attrs.get("hi")
    fb = node.attrs.get("frac_bits", 0)
    if not isinstance(fb, (int, np.integer)) or any(b is not None and not isinstance(b, (int, np.integer))
                                                     for b in (lo, hi)):
        raise VerifyError(f"Clip bounds lo={lo!r} hi={hi!r} / frac_bits={fb!r} must be integer codes", node.name)
    if lo is not None and hi is not None and lo > hi:
        raise VerifyError(f"Clip lower bound code {lo} is above the upper bound code {hi}", node.name)
    if not isinstance(t, FixedType):
        return ins[0].shape, FLOAT32
    F = max(t.frac_bits, int(fb))
    blo, bhi = clip_bounds(node, F)
    xlo, xhi = t.min_code << (F - t.frac_bits), t.max_code << (F - t.frac_bits)
    return ins[0].shape, fixed_for_range(_clamp(xlo, blo, bhi), _clamp(xhi, blo, bhi), F)


def _reference(node, args, in_types, out_t):
    x = args[0]
    if isinstance(out_t, FixedType):
        F = out_t.frac_bits
        lo, hi = clip_bounds(node, F)
        y = align(x, in_types[0].frac_bits, F)
        if lo is not None:
            y = np.maximum(y, lo)
        if hi is not None:
            y = np.minimum(y, hi)
        return y
    fb = int(node.attrs.get("frac_bits", 0))
    y = x.astype(np.float32)
    if node.attrs.get("lo") is not None:
        y = np.maximum(y, np.float32(np.ldexp(float(node.attrs["lo"]), -fb)))
    if node.attrs.get("hi") is not None:
        y = np.minimum(y, np.float32(np.ldexp(float(node.attrs["hi"]), -fb)))
    return y.astype(np.float32)


def bound_code(value: float, node: str, max_extra_bits: int = 32, f_in: int = 0) -> tuple[int, int]:
    """``(code, frac_bits)`` of the float32 ``value`` exactly, with ``frac_bits >= f_in`` as small as
    possible.

    Raises:
        VerifyError: naming ``node`` when ``value`` is not finite or needs more than ``f_in +
            max_extra_bits`` fraction bits (the output type would be impractically wide).
    """
    v = float(np.float32(value))
    if not np.isfinite(v):
        raise VerifyError(f"bound {value!r} is not finite", node)
    for f in range(f_in, f_in + max_extra_bits + 1):
        q = np.ldexp(v, f)
        if q == np.floor(q):
            return int(q), f
    raise VerifyError(f"bound {v!r} is not on a grid of 2**-{f_in + max_extra_bits} (it would need a wider "
                      f"output type than exactness allows)", node)


def add_clip(cv, onnx_node, value: str, lo, hi, out, name: str | None = None):
    """Add a ``Clip`` (named ``name``, default the ONNX node's name) of IR value ``value`` with float bounds ``lo``/``hi`` (None = absent) for ONNX node
    ``onnx_node``; returns the IR value.  Bounds are kept exactly (see the module docstring); a bound
    beyond the input type's range is dropped, and with no bound left no node is added (``value``
    is returned).

    Raises:
        VerifyError: naming the node for a bound that is NaN, one that needs more than 32 fraction
            bits beyond a fixed-point input's, or ``lo > hi``.
    """
    t = cv.b.values[value].dtype
    f_in = t.frac_bits if isinstance(t, FixedType) else 0
    codes = {}
    for k, b in (("lo", lo), ("hi", hi)):
        if b is not None and (np.isinf(b) or (isinstance(t, FixedType) and (
                b <= t.min_value if k == "lo" else b >= t.max_value))):
            b = None  # no effect on any input code: dropped (exactly equivalent)
        # a float input keeps any float32 bound (<= 149 fraction bits); a fixed one at most 32 more bits
        codes[k] = None if b is None else bound_code(b, onnx_node.name, 32 if isinstance(t, FixedType) else 160, f_in)
    if all(c is None for c in codes.values()):
        return value  # no bound can change a value: no node
    F = max([f_in] + [c[1] for c in codes.values() if c is not None])
    attrs = {"frac_bits": F}
    for k, c in codes.items():
        attrs[k] = None if c is None else c[0] << (F - c[1])
    if attrs["lo"] is not None and attrs["hi"] is not None and attrs["lo"] > attrs["hi"]:
        raise VerifyError(f"Clip min {lo!r} is above max {hi!r}", onnx_node.name)
    return cv.add(name or onnx_node.name, "Clip", [value], attrs, out=out)


def _import_onnx(cv, node):
    """ONNX ``Clip``: bounds from the ``min``/``max`` inputs (opset 11+; empty name = absent) or
    attributes (before opset 11).  Bounds must be constants."""
    e = cv.entry(node, node.input[0])
    if e.rowperm is not None:
        raise VerifyError("Clip between a Flatten and a Dense", node.name)
    if cv.opset < 11:
        lo, hi = cv.attr(node, "min", None), cv.attr(node, "max", None)
    else:
        lo = hi = None
        if len(node.input) > 1 and node.input[1]:
            lo = float(np.asarray(cv.const(node, node.input[1])).ravel()[0])
        if len(node.input) > 2 and node.input[2]:
            hi = float(np.asarray(cv.const(node, node.input[2])).ravel()[0])
    if lo is None and hi is None:
        cv.env[node.output[0]] = e
        return
    v = add_clip(cv, node, e.value, None if lo is None else float(lo), None if hi is None else float(hi), node.output[0])
    cv.bind(node.output[0], v, e.perm)


def _export_onnx(ex, n, x):
    """ONNX ``Clip`` (opset 11+ form) with the bounds as float32 scalars (exact: the export refuses
    nothing, a bound that is not a float32 would have failed at import)."""
    fb = int(n.attrs.get("frac_bits", 0))
    ins = [x[0]]
    for k in ("lo", "hi"):
        b = n.attrs.get(k)
        ins.append("" if b is None else ex.init(f"{n.name}_{k}", np.float32(np.ldexp(float(b), -fb))))
    return ex.node("Clip", ins, n.output + "__ir")


CLIP = register(OpSpec(
    name="Clip", summary="saturate to constant bounds: min(max(x, lo), hi), bounds as exact codes",
    infer=_rule, reference=_reference, attrs={"lo": None, "hi": None, "frac_bits": 0},
    onnx_import={"Clip": _import_onnx}, onnx_export=_export_onnx))
