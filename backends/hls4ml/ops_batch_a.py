"""hls4ml translations and FPGA estimate rows of the ops of batch A (``Pad``, ``Clip``, ``Sub``, ``Max``,
``Min``; the dilated ``Conv`` is handled by the Conv translator of :mod:`.ops`).

:data:`ENTRIES` maps each IR op to ``(translator, Cost)``; :mod:`.ops` registers them into its
``TRANSLATE``/``ESTIMATE`` tables (this module imports nothing from it, so the import graph keeps
no cycle).  A translator is ``fn(tr, node)`` with ``tr`` the
:class:`~qdeploy.backends.hls4ml.translate.Translator`; it raises :class:`UnsupportedError` naming
the node for attributes without an exact mapping.

C++ semantics relied on (hls4ml 1.3.0, ``templates/vivado/nnet_utils``):

* ``nnet_padding.h`` / ``nnet_padding_stream.h``: ``zeropad1d_cl`` / ``zeropad2d_cl`` write ``0``
  into the padded cells and copy the others (``res = (res_T) data``); the output keeps the input's
  precision (``ZeroPadding2D.initialize`` in ``hls4ml/model/layers.py``).
* ``nnet_batchnorm.h``: ``res = (res_T)(x * scale + bias)`` at full precision, exact when ``res_T``
  holds the result (our exact IR types).
* ``nnet_activation.h``: ``relu`` is ``x > 0 ? (res_T)x : 0``.
* ``nnet_merge.h`` / ``nnet_merge_stream.h``: ``subtract`` is ``res = data1 - data2``; ``maximum`` /
  ``minimum`` compare the operands and cast the chosen one to ``res_T``.
"""
from __future__ import annotations

import numpy as np

from ...compiler.errors import UnsupportedError
from ...compiler.ir.graph import Node
from ...compiler.ir.ops.clip import clip_bounds
from ...compiler.ir.types import FixedType, fixed_for_range
from .resources import T_LUT_NS, Cost, t_add, width

#: C++ type of the unit scale of a BatchNormalization used as a pure offset.
BIT = "ap_uint<1>"


def _chained(ctx, lut: float, dsp: int, delay_ns: float) -> dict:
    """Estimate row of a combinational op chained into the next registered layer (A10 of
    :mod:`.estimate`): ``lut`` modelled LUT bits scaled by the post-HLS factor (A6)."""
    return {"lut": int(round(ctx.lut_factor * lut)), "ff": 0, "dsp": int(dsp), "bram_18k": 0,
            "latency_cycles": 0, "ii_cycles": 1, "delay_ns": delay_ns}


def _affine_layer(tr, n: Node, value: str, src: str, scale: int, off: int, tout: FixedType, base: str,
                  out_value=None) -> str:
    """BatchNormalization ``(tout)(x * scale + off * 2**-F)`` (``scale`` in {1, -1}, ``off`` a code at
    ``tout``'s fraction bits F) over IR value ``value`` (layer ``src``); exact when ``tout`` holds the
    result."""
    v = tr.graph.value(value)
    c = v.shape[-1] if v.shape else 1
    return tr.bn_layer(n, v.size, c, np.full(c, float(scale)), np.full(c, off * tout.lsb),
                       "ap_int<2>" if scale < 0 else BIT, fixed_for_range(off, off, tout.frac_bits).hls(), tout,
                       src, out_value, base=base)


def _relu_layer(tr, n: Node, src: str, tout: FixedType, base: str) -> str:
    """``nnet_activation.h`` relu: ``x > 0 ? (res_T)x : 0`` (exact when ``res_T`` holds x)."""
    return tr.layer(n, {"class_name": "Activation", "activation": "relu", "base": base}, {"result": tout.hls()}, [src])


# ----------------------------------------------------------------------------- Pad
def _pad_cost(ctx, node):
    """Zero padding is wiring; a non-zero pad code adds two offset adders per element (A12)."""
    if int(node.attrs.get("code", 0)) == 0:
        return _chained(ctx, 0, 0, 0.0)
    out = ctx.graph.value(node.output)
    return _chained(ctx, 2 * out.size * width(out.dtype), 0, 2 * T_LUT_NS)


def _pad(tr, n: Node):
    """hls4ml ``ZeroPadding1D``/``2D`` on the spatial axes.  A non-zero pad code ``c`` is exact as
    ``x - c`` (BatchNormalization), zero padding, ``+ c`` (BatchNormalization).

    Raises:
        UnsupportedError: padding of the channel axis, or a rank other than 2 or 3.
    """
    x = tr.graph.value(n.inputs[0])
    rank = len(x.shape)
    p = [int(v) for v in n.attrs["pads"]]
    if rank not in (2, 3):
        raise UnsupportedError(f"Pad of a rank-{rank} tensor (hls4ml's ZeroPadding1D/2D take (W, C) or (H, W, C))",
                               n.name)
    if p[rank - 1] or p[2 * rank - 1]:
        raise UnsupportedError("Pad of the channel axis (hls4ml's ZeroPadding pads spatial axes only)", n.name)
    t: FixedType = x.dtype
    code = int(n.attrs.get("code", 0))
    src, tz = tr.src(n.inputs[0]), t
    if code:
        tz = fixed_for_range(t.min_code - code, t.max_code - code, t.frac_bits)
        src = _affine_layer(tr, n, n.inputs[0], src, 1, -code, tz, f"{n.name}_offset")
        tr.note(f"Pad '{n.name}' with code {code}: codes shifted by {-code} so that hls4ml's zero padding "
                "pads the code, shifted back afterwards")
    out = tr.graph.value(n.output).shape
    if rank == 2:
        d = {"class_name": "ZeroPadding1D", "data_format": "channels_last", "in_width": x.shape[0],
             "out_width": out[0], "n_chan": x.shape[1], "pad_left": p[0], "pad_right": p[2]}
    else:
        d = {"class_name": "ZeroPadding2D", "data_format": "channels_last", "in_height": x.shape[0],
             "in_width": x.shape[1], "out_height": out[0], "out_width": out[1], "n_chan": x.shape[2],
             "pad_top": p[0], "pad_bottom": p[3], "pad_left": p[1], "pad_right": p[4]}
    if code:
        d["base"] = f"{n.name}_zeropad"
    lay = tr.layer(n, d, {"result": tz.hls()}, [src])
    if code:
        _affine_layer(tr, n, n.output, lay, 1, code, t, f"{n.name}_unshift", n.output)
    else:
        tr.bind(n.output, lay)


# ----------------------------------------------------------------------------- Clip
def clip_plan(xlo: int, xhi: int, lo, hi):
    """Which bounds can change a value of an input with codes ``[xlo, xhi]`` (both at the output's
    fraction bits): ``(lo or None, hi or None)``."""
    return (lo if lo is not None and lo > xlo else None), (hi if hi is not None and hi < xhi else None)


def _clip_cost(ctx, node):
    """Up to three adders and two relus per element (A12: one LUT per bit each)."""
    out = ctx.graph.value(node.output)
    return _chained(ctx, 5 * out.size * width(out.dtype), 0, 3 * T_LUT_NS + 2 * T_LUT_NS)


def _clip(tr, n: Node):
    """``min(max(x, lo), hi)`` with relus and exact offsets (hls4ml has no clamp to arbitrary bounds):
    ``a = x - lo``, ``r = relu(a)`` (= max(x, lo) - lo), ``b = (hi - lo) - r``, ``s = relu(b)``,
    ``y = hi - s`` (= min(max(x, lo), hi)); with one bound only, its half.  Every intermediate type
    is the exact range of its values, at the output's fraction bits F (the BatchNormalization result
    is computed at full precision, ``nnet_batchnorm.h``)."""
    t: FixedType = tr.vt(n.inputs[0])
    tout = tr.vt(n.output)
    F = tout.frac_bits
    lo, hi = clip_bounds(n, F)
    xlo, xhi = t.min_code << (F - t.frac_bits), t.max_code << (F - t.frac_bits)
    lo, hi = clip_plan(xlo, xhi, lo, hi)
    src, cur = tr.src(n.inputs[0]), n.inputs[0]
    if lo is None and hi is None:
        if tout == t:  # nothing to do (hls4ml would drop an identical-type cast)
            tr.bind(n.output, src)
            tr.result.node_layers[n.name] = []
            return
        tr.bind(n.output, tr.layer(n, {"class_name": "Activation", "activation": "linear"},
                                   {"result": tout.hls()}, [src]))
        return
    if lo is not None:
        if lo:  # (a zero lower bound is a relu of x itself)
            src = _affine_layer(tr, n, cur, src, 1, -lo, fixed_for_range(xlo - lo, xhi - lo, F), f"{n.name}_sublo")
        rmax = max(xhi - lo, 0)
        if hi is None:
            if lo:
                src = _relu_layer(tr, n, src, fixed_for_range(0, rmax, F), f"{n.name}_relulo")
                _affine_layer(tr, n, n.output, src, 1, lo, tout, f"{n.name}_addlo", n.output)
            else:
                tr.bind(n.output, _relu_layer(tr, n, src, tout, n.name))
            tr.note(f"Clip '{n.name}' as a relu between exact offsets")
            return
        src = _relu_layer(tr, n, src, fixed_for_range(0, rmax, F), f"{n.name}_relulo")
        bmin, bmax = hi - lo - rmax, hi - lo
        src = _affine_layer(tr, n, n.output, src, -1, hi - lo, fixed_for_range(bmin, bmax, F), f"{n.name}_neg")
    else:
        bmin, bmax = hi - xhi, hi - xlo
        src = _affine_layer(tr, n, cur, src, -1, hi, fixed_for_range(bmin, bmax, F), f"{n.name}_neg")
    src = _relu_layer(tr, n, src, fixed_for_range(0, max(bmax, 0), F), f"{n.name}_reluhi")
    _affine_layer(tr, n, n.output, src, -1, hi, tout, f"{n.name}_subhi", n.output)
    tr.note(f"Clip '{n.name}' as relus between exact offsets (hls4ml has no clamp to arbitrary bounds)")


# ----------------------------------------------------------------------------- Sub / Max / Min
_MERGE_OPS = {"Sub": "subtract", "Max": "maximum", "Min": "minimum"}


def _merge_cost(ctx, node):
    """A12: an adder (Sub) or a comparator and a mux (Max/Min) per output bit and element."""
    out = ctx.graph.value(node.output)
    per_bit = 1 if node.op == "Sub" else 2
    return _chained(ctx, per_bit * out.size * width(out.dtype), 0, t_add(width(out.dtype)))


def _merge(tr, n: Node):
    """hls4ml ``Merge`` (``nnet_merge.h``): ``subtract`` is ``res = data1 - data2`` at full
    precision; ``maximum``/``minimum`` compare the two ap_fixed values exactly and assign the chosen
    one to ``res_T``.  ``res_T`` is the IR's exact output type, so nothing rounds.

    Raises:
        UnsupportedError: broadcasting operands (the Merge templates index ``ii % n_elem``, which is
            not NumPy broadcasting).
    """
    a, b = (tr.graph.value(i) for i in n.inputs)
    if a.shape != b.shape:
        raise UnsupportedError(f"{n.op} with broadcasting ({a.shape} vs {b.shape}); hls4ml Merge needs equal shapes",
                               n.name)
    tr.bind(n.output, tr.layer(n, {"class_name": "Merge", "op": _MERGE_OPS[n.op]}, {"result": tr.vt(n.output).hls()},
                               [tr.src(i) for i in n.inputs]))


#: IR op -> (translator, FPGA estimate Cost); registered by :mod:`.ops`.
ENTRIES = {"Pad": (_pad, Cost(_pad_cost)), "Clip": (_clip, Cost(_clip_cost)),
           **{op: (_merge, Cost(_merge_cost)) for op in _MERGE_OPS}}
