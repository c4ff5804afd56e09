"""FINN-ONNX: ``finn_datatype`` annotations, the ``MultiThreshold`` op (import and QONNX export).

Import
------
* ``finn_datatype`` annotations of graph inputs and weights become scale-1 quantizers before the
  conversion (:mod:`.finn_annotations`), so annotated integers are exact fixed-point values.
* :func:`import_multithreshold`: qonnx's ``MultiThreshold`` (``qonnx/custom_op/general/
  multithreshold.py``): ``y = out_scale * #{k : x >= thresholds[c, k]} + out_bias`` per channel
  ``c`` of the axis ``data_layout`` names -> the IR ``MultiThreshold`` (see
  :mod:`qdeploy.compiler.ir.ops.threshold`).  The input must be fixed-point (integer-valued on its
  grid ``2**-F``): for a code ``x``, ``x >= t  <=>  x >= ceil(t * 2**F)``, so the thresholds are
  rounded up to the grid exactly.  ``out_scale = +-2**-F_o`` with ``out_bias`` on the ``2**-F_o`` grid
  is exact in the op's output type; any other ``out_scale`` / ``out_bias`` becomes the count followed
  by a float32 ``Affine`` (qonnx computes ``out_scale * count + out_bias`` in float32, and so does the
  Affine).
* :func:`import_topk`: FINN's label select (``TopK`` indices) -> the IR ``TopK`` (float32 indices, on
  the host for hls4ml).

Export: :func:`export_multithreshold` writes the IR op back as a qonnx ``MultiThreshold`` (channels
last, ``data_layout`` ``N...C``) so an imported FINN graph round-trips through qonnx's executor.

Sources: Umuroglu et al., "FINN: A Framework for Fast, Scalable Binarized Neural Network
Inference", FPGA 2017, section 4.2; qonnx ``MultiThreshold`` / ``DataType`` / ``ModelWrapper
.get_tensor_datatype`` (https://github.com/fastmachinelearning/qonnx).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import UnsupportedError
from ..ir.graph import Const
from ..ir.types import FLOAT32, FixedType, fixed_for_range
from .onnx_convert import Entry

QONNX_DOMAIN = "qonnx.custom_op.general"
#: qonnx data_layout strings (channels last) by tensor rank, for the export
_LAYOUTS = {2: "NC", 3: "NWC", 4: "NHWC", 5: "NDHWC"}


# ---------------------------------------------------------------- MultiThreshold import
def _channel_axis(cv, node, rank: int) -> int:
    """Per-sample channel axis of the MultiThreshold input (qonnx's rule, with data_layout)."""
    layout = str(cv.attr(node, "data_layout", "") or "")
    if layout:
        if len(layout) != rank + 1 or layout.count("C") != 1 or layout.index("C") == 0:
            raise UnsupportedError(f"MultiThreshold data_layout {layout!r} does not describe a rank-{rank + 1} "
                                   f"tensor with one channel axis C after the batch", node.name)
        return layout.index("C") - 1
    if rank + 1 == 3:  # qonnx assumes NWC here, unlike ONNX's NCW: ambiguous, so refuse
        raise UnsupportedError("MultiThreshold on a rank-3 tensor without data_layout: qonnx assumes NWC, ONNX "
                               "tensors are NCW; set data_layout ('NWC' or 'NCW')", node.name)
    if rank == 0:
        raise UnsupportedError("MultiThreshold on a tensor without a channel axis", node.name)
    return 0  # NC, NCHW and qonnx's default channel axis 1 for higher ranks


def import_multithreshold(cv, node) -> None:
    """ONNX ``MultiThreshold`` -> IR ``MultiThreshold`` (+ a float32 ``Affine`` for a non-dyadic
    ``out_scale`` / ``out_bias``).  See the module docstring.

    Raises:
        UnsupportedError: a float input (no integer FINN datatype annotation and no preceding
            quantizer), thresholds that are not a constant ``[C, T]`` / ``[1, T]``, an unclear layout,
            ``out_scale`` 0; each naming the node.
    """
    e = cv.entry(node, node.input[0])
    xt = cv.dtype(e)
    if not isinstance(xt, FixedType):
        raise UnsupportedError(f"MultiThreshold input {node.input[0]!r} is float32: it must be integer-valued (an "
                               f"integer finn_datatype annotation on a graph input, or a preceding Quant)", node.name)
    if e.rowperm is not None:
        raise UnsupportedError("MultiThreshold between a Flatten and a Dense", node.name)
    t = np.asarray(cv.const(node, node.input[1]), dtype=np.float64)
    rank = len(e.perm)
    ch = _channel_axis(cv, node, rank)
    C = cv.onnx_shape(e)[ch]
    if t.ndim != 2 or t.shape[0] not in (1, C) or t.shape[1] < 1:
        raise UnsupportedError(f"MultiThreshold thresholds of shape {list(t.shape)}: expected [C={C}, T] or [1, T]",
                               node.name)
    F = xt.frac_bits
    lo, hi = xt.min_code, xt.max_code
    codes = np.ceil(t * 2.0 ** F)  # x >= t  <=>  x >= ceil(t * 2**F) for a code x (t float32: exact scaling)
    codes = np.sort(np.clip(codes, lo, hi + 1), axis=1).astype(np.int64)  # the count ignores the order
    tt = fixed_for_range(int(codes.min()), int(codes.max()), F)
    n = t.shape[1]
    s = float(np.float32(cv.attr(node, "out_scale", 1.0)))
    b = float(np.float32(cv.attr(node, "out_bias", 0.0)))
    if s == 0.0:
        raise UnsupportedError("MultiThreshold out_scale 0 (a constant output) is not supported", node.name)
    m, ex = math.frexp(abs(s))
    fo = 1 - ex  # |s| = 2**-fo when m == 0.5
    dyadic = m == 0.5 and fo >= 0 and float(b * 2.0 ** fo).is_integer()
    base = int(b * 2.0 ** fo) if dyadic else 0
    sign = (1 if s > 0 else -1) if dyadic else 1
    if dyadic and max(abs(base), abs(base + sign * n)) >= 1 << 24:  # qonnx's float32 arithmetic would round
        dyadic, base, sign = False, 0, 1
    to = fixed_for_range(min(base, base + sign * n), max(base, base + sign * n), fo if dyadic else 0)
    q = e.perm if e.perm[-1] == ch else tuple(a for a in range(rank) if a != ch) + (ch,)
    x = cv.layout(node, e, q)
    out = node.output[0]
    params = {"thresholds": Const(codes, tt), "base": Const(np.array([base]), fixed_for_range(base, base, 0)),
              "sign": Const(np.array([sign]), FixedType(2, 2, True))}
    v = cv.add(node.name, "MultiThreshold", [x], {"to": to}, params, out=out if dyadic else f"{out}__count")
    if not dyadic:
        pr = {"scale": Const(np.array(s, dtype=np.float32), FLOAT32), "bias": Const(np.array(b, dtype=np.float32),
                                                                                    FLOAT32)}
        v = cv.add(f"{node.name}__out_scale", "Affine", [v], {}, pr, out=out)
        cv.b.meta.setdefault("notes", []).append(
            f"MultiThreshold {node.name!r}: out_scale {s:g} / out_bias {b:g} are not a power of two and a multiple "
            f"of it: its output is float32 (count * out_scale + out_bias, as qonnx computes it)")
    cv.env[out] = Entry(v, q)


def import_topk(cv, node) -> None:
    """ONNX ``TopK`` (FINN's label select) -> IR ``TopK`` (float32 indices, host epilogue on hls4ml).

    Only the indices output may be used, ``sorted=1``, a constant ``K``; ties go to the lower index
    (the ONNX rule).

    Raises:
        UnsupportedError: the values output used, ``sorted=0``, a non-constant or out-of-range ``K``,
            the batch axis; each naming the node.
    """
    vals = node.output[0]
    if vals and (vals in cv.graph_outputs or cv.consumers.get(vals)):
        raise UnsupportedError("TopK values output is used: only the indices (label select) are supported",
                               node.name)
    if not int(cv.attr(node, "sorted", 1)):
        raise UnsupportedError("TopK with sorted=0 (unspecified order) is not supported", node.name)
    k = np.asarray(cv.const(node, node.input[1])).ravel()
    if k.size != 1:
        raise UnsupportedError(f"TopK K must be one value, got {k.tolist()}", node.name)
    e = cv.entry(node, node.input[0])
    if e.rowperm is not None:
        raise UnsupportedError("TopK between a Flatten and a Dense", node.name)
    rank = len(e.perm)
    axis = int(cv.attr(node, "axis", -1))
    axis = axis + rank + 1 if axis < 0 else axis
    if axis == 0 or axis > rank:
        raise UnsupportedError(f"TopK over axis {cv.attr(node, 'axis', -1)} (the batch or no axis)", node.name)
    ax = axis - 1
    q = e.perm if e.perm[-1] == ax else tuple(a for a in range(rank) if a != ax) + (ax,)
    x = cv.layout(node, e, q)
    v = cv.add(node.name, "TopK", [x], {"k": int(k[0]), "largest": bool(int(cv.attr(node, "largest", 1)))},
               out=node.output[1])
    cv.env[node.output[1]] = Entry(v, q)


# ---------------------------------------------------------------- MultiThreshold export
def export_multithreshold(ex, n, x) -> str:
    """IR ``MultiThreshold`` -> qonnx ``MultiThreshold`` (channels last, thresholds as reals) followed,
    when ``base`` / ``sign`` differ between channels, by a per-channel ``Mul`` and ``Add``.

    Raises:
        UnsupportedError: threshold or output codes of more than 24 bits (not exact in float32).
    """
    xv = ex.g.values[n.inputs[0]]
    F = xv.dtype.frac_bits
    to = n.attrs["to"]
    codes = n.params["thresholds"].data
    base, sign = n.params["base"].data, n.params["sign"].data
    if np.abs(codes).max(initial=0) >= 1 << 24 or max(abs(to.min_code), abs(to.max_code)) >= 1 << 24:
        raise UnsupportedError("MultiThreshold with codes of more than 24 bits: not exact in qonnx's float32", n.name)
    rank = len(xv.shape) + 1
    if rank not in _LAYOUTS:
        raise UnsupportedError(f"MultiThreshold export of a rank-{rank} tensor (2..5 supported)", n.name)
    layout = _LAYOUTS[rank]
    thr = ex.init(f"{n.name}_thresholds", (codes * 2.0 ** -F).astype(np.float32))
    lsb = 2.0 ** -to.frac_bits
    out = n.output + "__ir"
    uniform = np.all(base == base.ravel()[0]) and np.all(sign == sign.ravel()[0])
    steps = int(codes.shape[1])
    odt = f"UINT{max(1, steps.bit_length())}"
    if uniform:
        return ex.node("MultiThreshold", [x[0], thr], out, domain=QONNX_DOMAIN, out_dtype=odt, data_layout=layout,
                       out_scale=float(sign.ravel()[0] * lsb), out_bias=float(base.ravel()[0] * lsb))
    y = ex.node("MultiThreshold", [x[0], thr], f"{out}_count", domain=QONNX_DOMAIN, out_dtype=odt,
                data_layout=layout)
    y = ex.node("Mul", [y, ex.init(f"{n.name}_sign", (sign * lsb).astype(np.float32))], f"{out}_mul")
    return ex.node("Add", [y, ex.init(f"{n.name}_base", (base * lsb).astype(np.float32))], out)
