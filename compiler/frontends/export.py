"""IR -> QONNX export: a ``ModelProto`` that qonnx's ``execute_onnx`` runs to the IR's outputs.

The exported graph keeps the IR's channels-last layout internally and restores the user's ONNX
layout at the interface with ``meta["input_perms"]`` / ``meta["output_perms"]`` (a ``Transpose``
after each input and before each output).  Layout-sensitive ONNX ops (Conv, pools) are wrapped in a
Transpose pair.  Fixed-point constants become float initializers followed by a QONNX ``Quant``
(scale ``2**-F``, zero point 0, signed/unsigned, ``narrow=0``, ``ROUND``); ``Quantize`` nodes become
``Quant`` nodes, ``Sign`` becomes ``BipolarQuant``; fixed-point average pools get a ``Quant`` with
``FLOOR`` to reproduce the IR's truncated average.  Custom ops use the domain
``qonnx.custom_op.general``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import UnsupportedError
from ..ir.graph import Const, Graph
from ..ir.ops import REGISTRY, get as get_op
from ..ir.optable import OpTable
from ..ir.types import FixedType
from .onnx_finn import export_multithreshold

QONNX_DOMAIN = "qonnx.custom_op.general"
OPSET = 13

#: ap_fixed quantization mode -> QONNX rounding_mode (as qonnx executes it).
_ROUND_TO_QONNX = {"RND_CONV": "ROUND", "TRN": "FLOOR", "TRN_ZERO": "DOWN", "RND_INF": "HALF_UP",
                   "RND_ZERO": "HALF_DOWN"}


def export_qonnx(graph: Graph, path: str | Path | None = None, *, batch: int | None = 1) -> onnx.ModelProto:
    """Export ``graph`` as a QONNX model (opset 13 + ``qonnx.custom_op.general``).

    Args:
        graph: an IR graph (any layout; the meta permutations give the ONNX interface layout).
        path: when given, the model is also saved there.
        batch: the batch size written into the interface shapes (default 1, which qonnx's
            ``execute_onnx`` needs: it rejects inputs whose shape differs from the declared one);
            ``None`` writes a symbolic ``N`` (fine for onnxruntime).
    Returns:
        The ``onnx.ModelProto``; inputs and outputs keep the IR value names and are in the user's
        layout (NCHW for images).
    Raises:
        UnsupportedError: a ``Quantize`` whose rounding/overflow mode QONNX ``Quant`` cannot express
            (``RND``, ``RND_MIN_INF``, ``WRAP``, ``SAT_ZERO``), or an op without a mapping.
    """
    ex = QonnxExporter(graph, "N" if batch is None else int(batch))
    model = ex.run()
    if path is not None:
        onnx.save(model, str(path))
    return model


def _quant_attrs(t: FixedType, where: str, *, lenient: bool = False) -> dict:
    rnd = _ROUND_TO_QONNX.get(t.rounding)
    if rnd is None:
        raise UnsupportedError(f"rounding mode {t.rounding} of {t} has no QONNX Quant equivalent", where)
    if t.saturation not in ("SAT", "SAT_SYM") and not lenient:
        raise UnsupportedError(f"overflow mode {t.saturation} of {t} has no QONNX Quant equivalent (Quant saturates)",
                               where)
    return {"signed": int(t.signed), "narrow": int(t.saturation == "SAT_SYM"), "rounding_mode": rnd}


class QonnxExporter:
    """Builds the QONNX ``ModelProto`` of an IR graph (:func:`export_qonnx`); op entries
    (:data:`EXPORTERS`, ``OpSpec.onnx_export``) add nodes with :meth:`node`, initializers with
    :meth:`init`, quantizers with :meth:`quant` and constants with :meth:`const`.

    Args:
        graph: the IR graph.  batch: the batch size of the interface shapes (or ``"N"``).
    """

    def __init__(self, graph: Graph, batch):
        self.g = graph
        self.batch = batch
        self.nodes: list = []
        self.inits: list = []
        self.names: set[str] = set(graph.values)
        self.tname: dict[str, str] = {}  # IR value -> ONNX tensor

    def fresh(self, base: str) -> str:
        """A tensor/node name starting with ``base`` not used yet."""
        n, i = base, 1
        while n in self.names:
            n, i = f"{base}_{i}", i + 1
        self.names.add(n)
        return n

    def init(self, base: str, arr) -> str:
        """Add initializer ``arr``; returns its name."""
        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op, inputs, base, domain="", **attrs) -> str:
        """Add ONNX node ``op`` reading ``inputs``; returns the name of its (single) output."""
        out = self.fresh(base)
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=self.fresh(f"{base}__node"),
                                           domain=domain, **attrs))
        return out

    def quant(self, x: str, t: FixedType, base: str, where: str, rounding: str | None = None, lenient=False) -> str:
        """A QONNX ``Quant`` of tensor ``x`` into ``t`` (``where`` names the node in errors)."""
        attrs = _quant_attrs(t, where, lenient=lenient)
        if rounding:
            attrs["rounding_mode"] = rounding
        s = self.init(f"{base}_scale", np.float32(t.lsb))
        z = self.init(f"{base}_zeropt", np.float32(0))
        b = self.init(f"{base}_bitwidth", np.float32(t.width))
        return self.node("Quant", [x, s, z, b], base, domain=QONNX_DOMAIN, **attrs)

    def const(self, c: Const, base: str, where: str) -> str:
        """Constant ``c`` as an initializer (followed by a ``Quant`` when fixed-point)."""
        if isinstance(c.dtype, FixedType):
            raw = self.init(f"{base}_real", c.real().astype(np.float32))
            t = c.dtype.with_modes("RND_CONV", "SAT")
            return self.quant(raw, t, base, where)
        return self.init(base, c.data.astype(np.float32))

    def channels_first(self, x: str, rank: int, base: str) -> str:
        """``x`` (channels-last, per-sample ``rank``) transposed to NCHW."""
        perm = [0, rank] + list(range(1, rank))
        return self.node("Transpose", [x], f"{base}_nchw", perm=perm)

    def channels_last(self, x: str, rank: int, base: str, out=None) -> str:
        """``x`` (NCHW) transposed back to channels-last."""
        perm = [0] + list(range(2, rank + 1)) + [1]
        return self.node("Transpose", [x], out or f"{base}_nhwc", perm=perm)

    def run(self) -> onnx.ModelProto:
        """Export the whole graph (interface transposes, every node, shape inference)."""
        g = self.g
        in_perms = dict(g.meta.get("input_perms", {}) or {})
        out_perms = dict(g.meta.get("output_perms", {}) or {})
        inputs, outputs = [], []
        for name in g.inputs:
            v = g.values[name]
            full = (1, *v.shape)
            perm = list(in_perms.get(name, range(len(full))))
            user = [0] * len(full)
            for i, p in enumerate(perm):
                user[p] = full[i]
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [self.batch, *user[1:]]))
            t = name
            if perm != list(range(len(full))):
                t = self.node("Transpose", [name], f"{name}__ir", perm=perm)
            if isinstance(v.dtype, FixedType):
                t = self.quant(t, v.dtype, f"{name}__quant", name, lenient=True)
            self.tname[name] = t
        for n in g.nodes:
            self.emit(n)
        for name in g.outputs:
            v = g.values[name]
            full = (1, *v.shape)
            perm = list(out_perms.get(name, range(len(full))))
            user = [full[p] for p in perm]
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [self.batch, *user[1:]]))
            src = self.tname[name]
            if perm != list(range(len(full))):
                self.nodes.append(helper.make_node("Transpose", [src], [name], name=self.fresh(f"{name}__out"),
                                                   perm=perm))
            else:
                self.nodes.append(helper.make_node("Identity", [src], [name], name=self.fresh(f"{name}__out")))
        graph = helper.make_graph(self.nodes, g.name, inputs, outputs, self.inits)
        model = helper.make_model(graph, producer_name="qdeploy",
                                  opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(QONNX_DOMAIN, 1)])
        model.ir_version = min(model.ir_version, 8)
        try:  # value_info for every tensor (qonnx's execute_onnx insists on known shapes)
            from qonnx.core.modelwrapper import ModelWrapper
            from qonnx.transformation.infer_shapes import InferShapes
            model = ModelWrapper(model).transform(InferShapes()).model
        except Exception:  # pragma: no cover - shapes are an optional nicety
            pass
        return model

    def emit(self, n):
        """Write node ``n`` as ONNX nodes: its op's ``OpSpec.onnx_export`` when it declares one, else
        its :data:`EXPORTERS` entry.

        Raises:
            UnsupportedError: naming the node when neither maps the op.
        """
        spec = get_op(n.op)
        fn = spec.onnx_export if spec is not None and spec.onnx_export is not None else EXPORTERS.entry(n.op)
        if fn is None:
            raise UnsupportedError(f"QONNX export has no mapping for op {n.op!r}", n.name)
        self.tname[n.output] = fn(self, n, [self.tname[i] for i in n.inputs])


# ---------------------------------------------------------------------------------- op table
# Each entry: f(ex, n, x) -> name of the ONNX tensor holding the node's output, where ``ex`` is the
# QonnxExporter, ``n`` the IR node and ``x`` the ONNX tensor names of its inputs.
def _out_base(n) -> str:
    return n.output + "__ir"


def _quantize(ex, n, x):
    return ex.quant(x[0], n.attrs["to"], _out_base(n), n.name)


def _sign(ex, n, x):
    base = _out_base(n)
    s = ex.init(f"{base}_scale", np.float32(1.0))
    return ex.node("BipolarQuant", [x[0], s], base, domain=QONNX_DOMAIN)


def _dense(ex, n, x):
    base = _out_base(n)
    w = ex.const(n.params["weight"], f"{n.name}_weight", n.name)
    y = ex.node("MatMul", [x[0], w], base if "bias" not in n.params else f"{base}_mm")
    if "bias" in n.params:
        b = ex.const(n.params["bias"], f"{n.name}_bias", n.name)
        y = ex.node("Add", [y, b], base)
    return y


def _conv(ex, n, x):
    base = _out_base(n)
    wc = n.params["weight"]
    nd = wc.data.ndim - 2
    wt = Const(np.transpose(wc.data, (nd + 1, nd, *range(nd))), wc.dtype)  # [O, I/g, *k]
    w = ex.const(wt, f"{n.name}_weight", n.name)
    ins = [ex.channels_first(x[0], nd + 1, n.name), w]
    if "bias" in n.params:
        ins.append(ex.const(n.params["bias"], f"{n.name}_bias", n.name))
    attrs = dict(kernel_shape=list(n.attrs["kernel"]), strides=list(n.attrs.get("strides", [1] * nd)),
                 pads=list(n.attrs.get("pads", [0] * 2 * nd)), group=int(n.attrs.get("groups", 1)))
    d = n.attrs.get("dilations", 1)
    if d != 1 and any(int(v) != 1 for v in d):
        attrs["dilations"] = [int(v) for v in d]
    y = ex.node("Conv", ins, f"{base}_nchw_out", **attrs)
    return ex.channels_last(y, nd + 1, n.name, out=base)


def _same_name(ex, n, x):
    return ex.node(n.op, x, _out_base(n))


def _affine(ex, n, x):
    base = _out_base(n)
    y = x[0]
    if "scale" in n.params:
        y = ex.node("Mul", [y, ex.const(n.params["scale"], f"{n.name}_scale", n.name)],
                    base if "bias" not in n.params else f"{base}_mul")
    if "bias" in n.params:
        y = ex.node("Add", [y, ex.const(n.params["bias"], f"{n.name}_bias", n.name)], base)
    if y == x[0]:
        y = ex.node("Identity", [y], base)
    return y


def _concat(ex, n, x):
    ax = int(n.attrs.get("axis", -1))
    return ex.node("Concat", x, _out_base(n), axis=ax + 1 if ax >= 0 else ax)


def _reshape(ex, n, x):
    shp = ex.init(f"{n.name}_shape", np.array([-1, *n.attrs["shape"]], dtype=np.int64))
    return ex.node("Reshape", [x[0], shp], _out_base(n))


def _transpose(ex, n, x):
    return ex.node("Transpose", x, _out_base(n), perm=[0] + [int(p) + 1 for p in n.attrs["perm"]])


def _pool(ex, n, x):
    base = _out_base(n)
    out_v = ex.g.values[n.output]
    k = list(n.attrs["kernel"])
    nd = len(k)
    xt = ex.channels_first(x[0], nd + 1, n.name)
    attrs = dict(kernel_shape=k, strides=list(n.attrs.get("strides", [1] * nd)),
                 pads=list(n.attrs.get("pads", [0] * 2 * nd)))
    y = ex.node("MaxPool" if n.op == "MaxPool" else "AveragePool", [xt], f"{base}_nchw_out", **attrs)
    y = ex.channels_last(y, nd + 1, n.name, out=base if not isinstance(out_v.dtype, FixedType) else None)
    if n.op == "AvgPool" and isinstance(out_v.dtype, FixedType):
        y = ex.quant(y, out_v.dtype.with_modes("TRN", "SAT"), base, n.name)
    return y


def _global_avg_pool(ex, n, x):
    base = _out_base(n)
    out_v = ex.g.values[n.output]
    rank = len(ex.g.values[n.inputs[0]].shape)
    xt = ex.channels_first(x[0], rank, n.name)
    y = ex.node("GlobalAveragePool", [xt], f"{base}_gap")
    shp = ex.init(f"{n.name}_shape", np.array([-1, out_v.shape[-1]], dtype=np.int64))
    fixed = isinstance(out_v.dtype, FixedType)
    y = ex.node("Reshape", [y, shp], base if not fixed else f"{base}_flat")
    if fixed:
        y = ex.quant(y, out_v.dtype.with_modes("TRN", "SAT"), base, n.name)
    return y


def _softmax(ex, n, x):
    return ex.node("Softmax", x, _out_base(n), axis=-1)


#: IR op name -> QONNX export (built-in mappings; an op may instead declare ``OpSpec.onnx_export``).
EXPORTERS = OpTable("QONNX export")
for _op, _fn in (("Quantize", _quantize), ("Sign", _sign), ("Dense", _dense), ("Conv", _conv), ("Relu", _same_name),
                 ("Add", _same_name), ("Mul", _same_name), ("Affine", _affine), ("Concat", _concat),
                 ("Reshape", _reshape), ("Transpose", _transpose), ("MaxPool", _pool), ("AvgPool", _pool),
                 ("GlobalAvgPool", _global_avg_pool), ("Softmax", _softmax)):
    EXPORTERS.set(_op, _fn)
# ops that declare their own export (``OpSpec.onnx_export``) need no entry above
for _op, _spec in REGISTRY.items():
    if _spec.onnx_export is not None and _op not in EXPORTERS:
        EXPORTERS.set(_op, _spec.onnx_export)
if "MultiThreshold" not in EXPORTERS:
    EXPORTERS.set("MultiThreshold", export_multithreshold)
