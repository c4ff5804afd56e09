"""hls4ml translations and FPGA estimate rows of the ops of batch A (``Pad``, ...).

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
"""
from __future__ import annotations

import numpy as np

from ...compiler.errors import UnsupportedError
from ...compiler.ir.graph import Node
from ...compiler.ir.types import FixedType, fixed_for_range
from .resources import T_LUT_NS, Cost, width

#: C++ type of the unit scale of a BatchNormalization used as a pure offset.
BIT = "ap_uint<1>"


def _chained(ctx, lut: float, dsp: int, delay_ns: float) -> dict:
    """Estimate row of a combinational op chained into the next registered layer (A10 of
    :mod:`.estimate`): ``lut`` modelled LUT bits scaled by the post-HLS factor (A6)."""
    return {"lut": int(round(ctx.lut_factor * lut)), "ff": 0, "dsp": int(dsp), "bram_18k": 0,
            "latency_cycles": 0, "ii_cycles": 1, "delay_ns": delay_ns}


def _offset(tr, n: Node, value: str, src: str, t: FixedType, off: int, tout: FixedType, base: str,
            out_value=None) -> str:
    """A BatchNormalization adding ``off`` codes of ``t`` to each element of IR value ``value`` (layer
    ``src``), with result type ``tout`` (exact when it holds every shifted code); binds
    ``out_value`` when given.  Returns the layer."""
    v = tr.graph.value(value)
    c = v.shape[-1] if v.shape else 1
    return tr.bn_layer(n, v.size, c, np.ones(c), np.full(c, off * t.lsb), BIT,
                       fixed_for_range(off, off, t.frac_bits).hls(), tout, src, out_value, base=base)


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
        src = _offset(tr, n, n.inputs[0], src, t, -code, tz, f"{n.name}_offset")
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
        _offset(tr, n, n.output, lay, t, code, t, f"{n.name}_unshift", n.output)
    else:
        tr.bind(n.output, lay)


#: IR op -> (translator, FPGA estimate Cost); registered by :mod:`.ops`.
ENTRIES = {"Pad": (_pad, Cost(_pad_cost))}
