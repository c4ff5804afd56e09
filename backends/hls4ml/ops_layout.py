"""hls4ml translations of the data-movement ops added after :mod:`.ops` (``Resize``), declared with
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

from ...compiler.ir.graph import Node
from ...compiler.ir.ops.depth_space import permutation_plan
from .ops import ESTIMATE, TRANSLATE, chained, hls4ml_op
from .resources import T_LUT_NS, Cost


def wires(ctx, node) -> dict:
    """Estimate row of pure data movement: no logic, no delay (A12)."""
    return chained(ctx, 0, 0, 0.0)


@hls4ml_op("Resize", cost=Cost(wires))
def _resize(tr, n: Node):
    x = tr.graph.value(n.inputs[0])
    tr.bind(n.output, tr.resize_layer(n, x.shape, n.attrs["scales"], tr.src(n.inputs[0]), tr.vt(n.output).hls()))


@hls4ml_op("DepthToSpace", cost=Cost(wires))
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
ESTIMATE.set("SpaceToDepth", Cost(wires))


TRANSLATE.reject("Lookup", "hls4ml has no exact table layer: its sigmoid/tanh activations index fixed-range "
                           "tables of their own (table_size over [-8, 8)), not one entry per input code")


def _lookup_cost(ctx, node) -> dict:
    """A fixed-point table as a ROM of 2**W entries per element: ceil(2**W / 64) LUT6 per output bit,
    one LUT level of delay per 6 address bits (A12 style; a float-valued table is a host row, A14,
    and never reaches this row)."""
    out = ctx.graph.value(node.output)
    w = ctx.graph.value(node.inputs[0]).dtype.width
    lut = out.size * out.dtype.width * -(-(1 << w) // 64)
    return chained(ctx, lut, 0, T_LUT_NS * max(1, -(-w // 6)))


ESTIMATE.set("Lookup", Cost(_lookup_cost))
