"""hls4ml translations of the data-movement ops added after :mod:`.ops` (``Resize``), declared with
the same :func:`~.ops.hls4ml_op` decorator into the same tables (the package ``__init__`` imports
this module, so the entries exist whenever :mod:`.ops` is importable).

C++ semantics relied on (hls4ml 1.3.0, ``templates/vivado/nnet_utils``):

* ``nnet_image.h`` ``resize_nearest`` (io_parallel): output ``(i, j)`` reads input
  ``((i * y_ratio) >> 16, (j * x_ratio) >> 16)`` with ``ratio = ((in << 16) / out) + 1`` (integer
  division).  For ``out = s * in`` that equals ``i // s`` only while ``i * ratio`` stays below the
  next multiple of ``2**16``; :func:`resize_index_ok` evaluates the formula for every output index
  and the translator refuses a layer where it is not a pure repetition.
* ``nnet_image_stream.h`` ``resize_nearest`` (io_stream): reads one input row, writes it
  ``new_height / height`` times with every pixel repeated ``new_width / width`` times -- a pure
  repetition for integer factors (it asserts the divisibility).
"""
from __future__ import annotations

from ...compiler.errors import UnsupportedError
from ...compiler.ir.graph import Node
from ...compiler.ir.ops.depth_space import permutation_plan
from .ops import ESTIMATE, TRANSLATE, chained, hls4ml_op
from .resources import Cost


def wires(ctx, node) -> dict:
    """Estimate row of pure data movement: no logic, no delay (A12)."""
    return chained(ctx, 0, 0, 0.0)


def resize_index_ok(length: int, s: int) -> bool:
    """True when hls4ml's io_parallel ``resize_nearest`` index ``(o * ratio) >> 16`` with
    ``ratio = ((length << 16) // (s * length)) + 1`` equals ``o // s`` for every output ``o``."""
    new = s * length
    ratio = ((length << 16) // new) + 1
    return all(((o * ratio) >> 16) == o // s for o in range(new))


@hls4ml_op("Resize", cost=Cost(wires))
def _resize(tr, n: Node):
    x = tr.graph.value(n.inputs[0])
    s = tuple(int(v) for v in n.attrs["scales"])
    if len(x.shape) == 2:
        (w, c), (sh, sw), h = x.shape, (1, s[0]), 1
    elif len(x.shape) == 3:
        (h, w, c), (sh, sw) = x.shape, s
    else:
        raise UnsupportedError(f"Resize of a rank-{len(x.shape)} input (hls4ml Resize: 1-D and 2-D)", n.name)
    if tr.io_type == "io_parallel":
        for length, k in ((h, sh), (w, sw)):
            if not resize_index_ok(length, k):
                raise UnsupportedError(f"hls4ml io_parallel resize_nearest's fixed-point index (ratio "
                                       f"(L << 16) / (s L) + 1) does not repeat each element {k} times on an axis "
                                       f"of {length}", n.name)
    d = {"class_name": "Resize", "data_format": "channels_last", "algorithm": "nearest", "align_corners": False,
         "in_height": h, "in_width": w, "out_height": h * sh, "out_width": w * sw, "n_chan": c}
    tr.bind(n.output, tr.layer(n, d, {"result": tr.vt(n.output).hls()}, [tr.src(n.inputs[0])]))


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
