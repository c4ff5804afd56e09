"""hls4ml translations of the ops added or reworked after :mod:`.ops` (``Resize``, ``DepthToSpace`` /
``SpaceToDepth``, ``Lookup``, ``MaxPool``), declared with
the same :func:`~.ops.hls4ml_op` decorator into the same tables (the package ``__init__`` imports
this module, so the entries exist whenever :mod:`.ops` is importable).

C++ semantics relied on (hls4ml 1.3.0, ``templates/vivado/nnet_utils``):

* ``nnet_image.h`` ``resize_nearest`` (io_parallel): output ``(i, j)`` reads input
  ``((i * y_ratio) >> 16, (j * x_ratio) >> 16)`` with ``ratio = ((in << 16) / out) + 1`` (integer
  division).  For ``out = s * in`` that equals ``i // s`` only while ``i * ratio`` stays below the
  next multiple of ``2**16``; :func:`.translate.resize_index_ok` evaluates the formula for every output index
  and the translator refuses a layer where it is not a pure repetition.
* ``nnet_image_stream.h`` ``resize_nearest`` (io_stream): reads one input row, writes it
  ``new_height / height`` times with every pixel repeated ``new_width / width`` times -- a pure
  repetition for integer factors (it asserts the divisibility).
"""
from __future__ import annotations

import math

import numpy as np

from ...compiler.errors import UnsupportedError
from ...compiler.ir.graph import Node
from ...compiler.ir.types import FixedType
from ...compiler.ir.ops.depth_space import permutation_plan
from .ops import ESTIMATE, TRANSLATE, chained, hls4ml_op
from .resources import T_LUT_NS, Cost, t_add


def wires(ctx, node) -> dict:
    """Estimate row of pure data movement: no logic, no delay (A12)."""
    return chained(ctx, 0, 0, 0.0)


@hls4ml_op("Resize", cost=Cost(wires))
def _resize(tr, n: Node):
    x = tr.graph.value(n.inputs[0])
    tr.bind(n.output, tr.resize_layer(n, x.shape, n.attrs["scales"], tr.src(n.inputs[0]), tr.vt(n.output).hls()))


def _permute_cost(ctx, node) -> dict:
    """Wires in io_parallel; in io_stream hls4ml's ``transpose`` buffers the whole tensor in a
    completely partitioned array (``nnet_transpose_stream.h``): one register per output bit."""
    r = wires(ctx, node)
    if ctx.opts["io_type"] == "io_stream":
        out = ctx.graph.value(node.output)
        r["ff"] = out.size * out.dtype.width
        r["stream_priced"] = True  # already the io_stream process (not one pixel of logic, A15)
    return r


@hls4ml_op("DepthToSpace", cost=Cost(_permute_cost))
def _depth_to_space(tr, n: Node):
    """``Reshape(mid) -> Transpose(perm) -> Reshape(out)`` of :func:`permutation_plan`: hls4ml's
    ``nnet_transpose.h`` ``transpose`` is ``res[i] = data[transfer_idx(i)]`` for any rank (io_parallel)
    and buffers the whole tensor before writing it in the new order (io_stream)."""
    mid, perm, out = permutation_plan(n, tr.graph.value(n.inputs[0]).shape)
    t = tr.vt(n.output).hls()
    src = tr.layer(n, {"class_name": "Reshape", "target_shape": list(mid), "base": f"{n.name}_split"},
                   {"result": t}, [tr.src(n.inputs[0])])
    src = tr.layer(n, {"class_name": "Transpose", "perm": list(perm), "base": f"{n.name}_perm"}, {"result": t}, [src])
    tr.bind(n.output, tr.layer(n, {"class_name": "Reshape", "target_shape": list(out)}, {"result": t}, [src]))


TRANSLATE.set("SpaceToDepth", _depth_to_space)
ESTIMATE.set("SpaceToDepth", Cost(_permute_cost))


#: hls4ml 1.3 table activations: IR Lookup ``fn`` -> (hls4ml activation, half-range R of the
#: table: ``nnet_activation.h`` indexes ``data * table_size / (2R) + table_size / 2``).
TABLE_ACTIVATIONS = {"Sigmoid": ("sigmoid", 8), "Tanh": ("tanh", 4)}
#: Largest table_size used (2**16 entries).
MAX_TABLE = 1 << 16


def hls4ml_table_codes(fn: str, t_in: FixedType, to: FixedType) -> tuple[int, np.ndarray, np.ndarray]:
    """What hls4ml 1.3's ``sigmoid`` / ``tanh`` (``nnet_activation.h``, io_parallel and io_stream alike)
    computes for every code of ``t_in`` with ``table_t = res_T = to`` and ``table_size = 2R * 2**F``
    (F = ``t_in.frac_bits``, R = 8 for sigmoid, 4 for tanh): index ``code + table_size / 2`` (exact:
    ``data * table_size / (2R)`` is the code), clamped to the table; entry ``i`` is the C++ function at
    ``2R (i - table_size / 2) / table_size`` -- ``1.0 / (1 + expf(-x))`` (sigmoid) or ``tanh(x)`` --
    cast to ``to``.  Returns ``(table_size, codes, ok)`` where ``ok[i]`` is False when the C++ value is
    within ``2**-21`` (relative: 16 float32 ulps, far above a float32 libm's error) of a rounding
    boundary of ``to``, so that no emulation here can vouch for the rounding.

    Raises:
        UnsupportedError: (node-less; the caller names the node) an input type whose table would need
            a fractional or more than :data:`MAX_TABLE`-entry table.
    """
    name, r = TABLE_ACTIVATIONS[fn]
    f = t_in.frac_bits
    if f < 0 or (2 * r << f) > MAX_TABLE:
        raise UnsupportedError(f"hls4ml {name} table for a {t_in} input needs table_size 2*{r}*2**{f}: outside "
                               f"1..{MAX_TABLE}")
    ts = 2 * r << f
    codes = np.arange(t_in.min_code, t_in.max_code + 1, dtype=np.int64)
    idx = np.clip(codes + ts // 2, 0, ts - 1)
    x = ((idx - ts // 2) * (2.0 * r) / ts).astype(np.float32)  # exact: a code's real value
    if fn == "Sigmoid":
        v = 1.0 / (np.float32(1.0) + np.exp(-x)).astype(np.float64)
    else:
        v = np.tanh(x.astype(np.float64))
    out = to.quantize_real(v)
    d = np.maximum(np.abs(v) * 2.0 ** -21, 2.0 ** -40)
    ok = (to.quantize_real(v - d) == out) & (to.quantize_real(v + d) == out)
    return ts, out, ok


@hls4ml_op("Lookup", cost=Cost(lambda ctx, node: _lookup_cost(ctx, node)))
def _lookup(tr, n: Node):
    """A fixed-point Lookup of Sigmoid/Tanh values (a folded ``Lookup -> Quantize``, see
    :mod:`qdeploy.passes.lookup`) as hls4ml's table activation, when :func:`hls4ml_table_codes`
    reproduces every table code with a safe margin; refused naming the node otherwise."""
    fn = n.attrs.get("fn")
    tab = n.params["table"]
    t_in = tr.vt(n.inputs[0])
    if fn not in TABLE_ACTIVATIONS:
        raise UnsupportedError(f"Lookup table of {fn!r}: hls4ml has no layer holding an arbitrary table (only its "
                               f"own {'/'.join(TABLE_ACTIVATIONS)} tables)", n.name)
    to = tab.dtype
    try:
        ts, codes, ok = hls4ml_table_codes(fn, t_in, to)
    except UnsupportedError as e:
        raise UnsupportedError(str(e), n.name) from None
    bad = np.flatnonzero((codes != tab.data) | ~ok)
    if bad.size:
        i = int(bad[0])
        why = "" if codes[i] != tab.data[i] else " (too close to a rounding boundary to vouch for)"
        raise UnsupportedError(f"hls4ml's {fn} table (table_size {ts}) gives code {int(codes[i])} for input code "
                               f"{t_in.min_code + i}, the source {int(tab.data[i])}{why}: not exact", n.name)
    name = TABLE_ACTIVATIONS[fn][0]
    tr.note(f"Lookup '{n.name}' ({fn}) as hls4ml's {name} table (table_size {ts}, table_t {to.hls()}): every input "
            "code checked against the source's table")
    from hls4ml.model.types import FixedPrecisionType

    # table_t is a layer attribute of hls4ml's table activations (default fixed<18,8>), not a
    # "Precision" variable: hand it over as a precision object in the layer dict
    table_t = FixedPrecisionType(to.width, to.int_bits, to.signed, to.rounding, to.saturation)
    d = {"class_name": "Activation", "activation": name, "table_size": ts, "table_t": table_t}
    tr.bind(n.output, tr.layer(n, d, {"table": to.hls(), "result": to.hls()}, [tr.src(n.inputs[0])]))


def _lookup_cost(ctx, node) -> dict:
    """A fixed-point table as a ROM of 2**W entries per element: ceil(2**W / 64) LUT6 per output bit,
    one LUT level of delay per 6 address bits (A12 style; a float-valued table is a host row, A14,
    and never reaches this row)."""
    out = ctx.graph.value(node.output)
    w = ctx.graph.value(node.inputs[0]).dtype.width
    lut = out.size * out.dtype.width * -(-(1 << w) // 64)
    return chained(ctx, lut, 0, T_LUT_NS * max(1, -(-w // 6)))


# ----------------------------------------------------------------------------- MaxPool
def _pads(n: Node, nd: int):
    s = tuple(int(v) for v in n.attrs.get("strides", (1,) * nd))
    p = tuple(int(v) for v in n.attrs.get("pads", (0,) * (2 * nd)))
    return s, p


def _maxpool_cost(ctx, node):
    """A12: k-1 comparators+muxes per output (2 LUT per bit); the explicit zero-padding path adds
    the two offset adders (+c before, -c after) per element of a signed input."""
    out = ctx.graph.value(node.output)
    size, ob = out.size, out.dtype.width
    n = int(np.prod(node.attrs["kernel"]))
    lut, delay = size * (n - 1) * 2 * ob, math.ceil(math.log2(max(n, 2))) * t_add(ob)
    x = ctx.graph.value(node.inputs[0])
    if _zero_padded(node, x.dtype, ctx.opts["io_type"]) and x.dtype.min_code < 0:
        lut += (x.size + size) * ob
        delay += 2 * t_add(ob)
    return chained(ctx, lut, 0, delay)


def _zero_padded(n: Node, t: FixedType, io_type: str) -> bool:
    k = tuple(int(v) for v in n.attrs["kernel"])
    _, p = _pads(n, len(k))
    return any(p) and (not t.signed or io_type == "io_stream" or any(pv >= kv for pv, kv in zip(p, k + k)))


@hls4ml_op("MaxPool", cost=Cost(_maxpool_cost))
def _maxpool(tr, n: Node):
    """hls4ml max pooling; kernel-1 pools in io_stream (stride != kernel, which hls4ml's streaming
    pooling asserts against) as :meth:`~.translate.Translator.subsample_layer`; padding hls4ml does
    not do exactly (unsigned input, io_stream, all-padding windows) as
    :meth:`~.translate.Translator.maxpool_zero_padded`."""
    x = tr.graph.value(n.inputs[0])
    k = tuple(int(v) for v in n.attrs["kernel"])
    s, p = _pads(n, len(k))
    t = x.dtype
    if all(kv == 1 for kv in k) and tr.io_type == "io_stream" and s != k:
        tr.subsample_layer(n, s, tr.src(n.inputs[0]))
        return
    if _zero_padded(n, t, tr.io_type):
        tr.maxpool_zero_padded(n, k, s, p, tr.src(n.inputs[0]))
        return
    d = tr.pool_dict(n, "Max", x.shape, k, s, p, tr.graph.value(n.output).shape)
    tr.bind(n.output, tr.layer(n, d, {"accum": t.hls(), "result": tr.vt(n.output).hls()}, [tr.src(n.inputs[0])]))
