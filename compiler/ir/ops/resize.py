"""``Resize``: nearest-neighbour upsampling by integer factors, i.e. pure repetition.

``y[..., i_0, ..., i_{d-1}, c] = x[..., i_0 // s_0, ..., i_{d-1} // s_{d-1}, c]`` on a channels-last
``(*spatial, C)`` input, attribute ``scales = (s_0, ..., s_{d-1})`` (positive integers, one per
spatial axis).  The op moves codes only, so the output type is the input type and every target is
exact by construction.

Sources: ONNX ``Resize`` (opset 11-19, ``mode="nearest"``; the coordinate transformations and
``nearest_mode`` roundings of https://onnx.ai/onnx/operators/onnx__Resize.html) and ``Upsample``
(opset 7-9, ``mode="nearest"``); PyTorch ``nn.Upsample(scale_factor=k, mode="nearest")`` exports
``Resize`` with ``coordinate_transformation_mode="asymmetric"``, ``nearest_mode="floor"``.

Import only accepts a (coordinate transformation, nearest mode, factor, length) combination when
the exact rational evaluation of the ONNX formula (:func:`onnx_nearest_index`, in
:class:`fractions.Fraction`) reads input ``o // s`` for every output index ``o``; everything else
(``align_corners`` in general, ``asymmetric`` with ``round_prefer_*`` for factors > 2, ``floor``
/ ``ceil`` with ``half_pixel``, ``tf_crop_and_resize``, non-integer or downscaling factors, other
interpolation modes) is refused naming the node.  onnxruntime (which qonnx's ``execute_onnx`` runs)
agreed with this rational evaluation on every combination of six coordinate transformations x
four nearest modes, factors 2..13 and lengths 1..300 tried while writing this module.
"""
from __future__ import annotations

from fractions import Fraction
import math

import numpy as np

from ...errors import UnsupportedError, VerifyError
from .spec import OpSpec, register

#: ONNX ``coordinate_transformation_mode`` values this module evaluates.
CTMS = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
        "tf_half_pixel_for_nn")
#: ONNX ``nearest_mode`` values.
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def onnx_nearest_index(o: int, s: int, length: int, ctm: str, nearest_mode: str) -> int:
    """Input index ONNX ``Resize`` (nearest) reads for output index ``o``, computed exactly.

    Args:
        o: output index, ``0 <= o < s * length``.  s: the integer scale.  length: input length.
        ctm: ``coordinate_transformation_mode`` (one of :data:`CTMS`).
        nearest_mode: one of :data:`NEAREST_MODES`.
    Returns:
        The clamped source index (ONNX spec: ``x_original`` by the transformation, rounded by
        ``nearest_mode``, clamped to ``[0, length - 1]``).
    Raises:
        ValueError: an unknown mode.
    """
    out_len = s * length
    half = Fraction(1, 2)
    if ctm in ("half_pixel", "half_pixel_symmetric"):
        # half_pixel_symmetric: adjustment = out_len / (s * length) = 1, so its offset is 0
        x = (o + half) / s - half
    elif ctm == "pytorch_half_pixel":
        x = (o + half) / s - half if out_len > 1 else Fraction(0)
    elif ctm == "align_corners":
        x = Fraction(o * (length - 1), out_len - 1) if out_len > 1 else Fraction(0)
    elif ctm == "asymmetric":
        x = Fraction(o, s)
    elif ctm == "tf_half_pixel_for_nn":
        x = (o + half) / s
    else:
        raise ValueError(f"coordinate_transformation_mode {ctm!r}")
    fl = math.floor(x)
    frac = x - fl
    if nearest_mode == "floor":
        i = fl
    elif nearest_mode == "ceil":
        i = math.ceil(x)
    elif nearest_mode == "round_prefer_floor":
        i = fl + 1 if frac > half else fl
    elif nearest_mode == "round_prefer_ceil":
        i = fl + 1 if frac >= half else fl
    else:
        raise ValueError(f"nearest_mode {nearest_mode!r}")
    return min(max(i, 0), length - 1)


def check_repetition(s: int, length: int, ctm: str, nearest_mode: str, node: str) -> None:
    """Refuse unless ONNX nearest resizing by ``s`` is ``o -> o // s`` on an axis of ``length``.

    Raises:
        UnsupportedError: naming ``node``, with the first output index that reads elsewhere.
    """
    if ctm not in CTMS:
        raise UnsupportedError(f"Resize coordinate_transformation_mode {ctm!r} is not supported "
                               f"(only {', '.join(CTMS)})", node)
    if nearest_mode not in NEAREST_MODES:
        raise UnsupportedError(f"Resize nearest_mode {nearest_mode!r} is not supported", node)
    for o in range(s * length):
        src = onnx_nearest_index(o, s, length, ctm, nearest_mode)
        if src != o // s:
            raise UnsupportedError(
                f"Resize with coordinate_transformation_mode={ctm!r}, nearest_mode={nearest_mode!r}, scale {s} on "
                f"an axis of length {length} is not a repetition of each element (output {o} reads input {src}, "
                f"not {o // s}): refused, only exact integer repetition is supported", node)


def _scales(node, nd: int) -> tuple[int, ...]:
    s = tuple(node.attrs["scales"])
    if len(s) != nd:
        raise VerifyError(f"Resize scales {s} do not match the {nd} spatial axes", node.name)
    for v in s:
        if int(v) != v or int(v) < 1:
            raise VerifyError(f"Resize scales {s} must be positive integers", node.name)
    return tuple(int(v) for v in s)


def _rule(node, ins):
    x = ins[0]
    if len(x.shape) < 2:
        raise VerifyError(f"Resize needs a channels-last (*spatial, C) input, got shape {x.shape}", node.name)
    s = _scales(node, len(x.shape) - 1)
    return tuple(d * k for d, k in zip(x.shape[:-1], s)) + (x.shape[-1],), x.dtype


def _reference(node, args, in_types, out_t):
    y = args[0]
    for i, k in enumerate(_scales(node, y.ndim - 2)):
        if k > 1:
            y = np.repeat(y, k, axis=1 + i)
    return y


# ------------------------------------------------------------------------------------ ONNX
def _const_or_empty(cv, node, idx):
    """The constant input ``idx`` of ``node`` as float64, or None when absent or empty."""
    if len(node.input) <= idx or not node.input[idx]:
        return None
    c = np.asarray(cv.const(node, node.input[idx]), dtype=np.float64).ravel()
    return c if c.size else None


def _import_onnx(cv, node):
    """ONNX ``Resize`` (opset >= 11: X, roi, scales, sizes; empty ``roi``/``scales`` allowed) or
    ``Upsample`` (opset 9: X, scales; opset 7: attribute ``scales``) -> IR ``Resize``."""
    e = cv.entry(node, node.input[0])
    rank = len(e.perm)
    mode = str(cv.attr(node, "mode", "nearest"))
    if mode != "nearest":
        raise UnsupportedError(f"{node.op_type} mode {mode!r}: only 'nearest' (exact repetition) is supported",
                               node.name)
    if rank < 2:
        raise UnsupportedError(f"{node.op_type} of a rank-{rank + 1} tensor: expected (N, C, *spatial)", node.name)
    onnx_shape = cv.onnx_shape(e)  # (C, *spatial)
    if node.op_type == "Upsample":
        ctm, nm = "asymmetric", "floor"  # Upsample-7/9 nearest: x_original = floor(x_resized / scale)
        sc = _const_or_empty(cv, node, 1)
        if sc is None:
            sc = cv.attr(node, "scales")
            sc = None if sc is None else np.asarray(sc, dtype=np.float64)
        sizes = None
    else:
        if len(node.input) < 3:
            raise UnsupportedError("Resize with fewer than 3 inputs (opset 10) is not supported: export with "
                                   "opset >= 11", node.name)
        if cv.attr(node, "axes") is not None:
            raise UnsupportedError("Resize with an 'axes' attribute is not supported", node.name)
        ctm = str(cv.attr(node, "coordinate_transformation_mode", "half_pixel"))
        nm = str(cv.attr(node, "nearest_mode", "round_prefer_floor"))
        sc = _const_or_empty(cv, node, 2)
        sizes = _const_or_empty(cv, node, 3)
        if sizes is not None and str(cv.attr(node, "keep_aspect_ratio_policy", "stretch")) != "stretch":
            raise UnsupportedError("Resize keep_aspect_ratio_policy other than 'stretch' is not supported", node.name)
    full = (1, *onnx_shape)
    if sc is None and sizes is None:
        raise UnsupportedError(f"{node.op_type} has neither scales nor sizes", node.name)
    if sc is None:
        if sizes.size != len(full):
            raise UnsupportedError(f"Resize sizes {sizes.tolist()} do not match input rank {len(full)}", node.name)
        if int(sizes[0]) != 1:
            raise UnsupportedError(f"Resize sizes {[int(z) for z in sizes]} fix the batch to {int(sizes[0])}: only "
                                   "batch 1 in sizes (the imported model runs any batch) is supported", node.name)
        if any(int(z) % d for z, d in zip(sizes, full)) or any(z < d for z, d in zip(sizes, full)):
            raise UnsupportedError(f"Resize sizes {[int(z) for z in sizes]} are not integer multiples of the input "
                                   f"shape {list(full)}: only integer upsampling is exact", node.name)
        sc = np.array([int(z) // d for z, d in zip(sizes, full)], dtype=np.float64)
    if sc.size != len(full):
        raise UnsupportedError(f"{node.op_type} scales {sc.tolist()} do not match input rank {len(full)}", node.name)
    if any(float(v) != int(v) or v < 1 for v in sc):
        raise UnsupportedError(f"{node.op_type} scales {sc.tolist()} are not positive integers: only integer "
                               "upsampling factors are exact repetitions", node.name)
    if sc[0] != 1 or sc[1] != 1:
        raise UnsupportedError(f"{node.op_type} scales {sc.tolist()} resize the batch or channel axis", node.name)
    spatial = [int(v) for v in sc[2:]]
    for k, length in zip(spatial, onnx_shape[1:]):
        check_repetition(k, length, ctm, nm, node.name)
    canon = tuple(range(1, rank)) + (0,)  # channels-last (the ONNX importer's canonical layout)
    x = cv.layout(node, e, canon)
    v = cv.add(node.name, "Resize", [x], {"scales": tuple(spatial)}, out=node.output[0])
    cv.bind(node.output[0], v, canon)


def _export_onnx(ex, n, x):
    """ONNX ``Resize`` (nearest, ``asymmetric`` + ``floor``: exact repetition) between the
    exporter's channels-first/channels-last transposes."""
    nd = len(n.attrs["scales"])
    base = n.output + "__ir"
    xt = ex.channels_first(x[0], nd + 1, n.name)
    sc = ex.init(f"{n.name}_scales", np.array([1, 1, *n.attrs["scales"]], dtype=np.float32))
    y = ex.node("Resize", [xt, "", sc], f"{base}_nchw_out", mode="nearest",
                coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    return ex.channels_last(y, nd + 1, n.name, out=base)


def _macs(node, graph) -> int:
    """Data movement only: one copy per output element."""
    return max(1, graph.values[node.output].size)


RESIZE = register(OpSpec(
    name="Resize", kind="layout", summary="nearest upsampling by integer factors: repeat each spatial element",
    infer=_rule, reference=_reference, attrs={"scales": None}, macs=_macs,
    onnx_import={"Resize": _import_onnx, "Upsample": _import_onnx}, onnx_export=_export_onnx))
