"""IR (fixed-point device core) -> hls4ml layer dicts with explicit precisions: the driver.

Every hls4ml layer gets *every* precision variable from our IR types: hls4ml falls back silently
to its ``Model`` precision (``ap_fixed<16,6>`` by default) for any variable a layer's config
does not name (``HLSConfig.get_precision`` in hls4ml 1.3.0 ``hls4ml/model/graph.py``).

:func:`translate` walks the device graph in topological order and calls each node's translator
from the op table :data:`qdeploy.backends.hls4ml.ops.TRANSLATE`, handing it a :class:`Translator`
(the context: the graph, the ``io_type``, and the helpers that add hls4ml layers).  The per-op
C++ semantics relied on are written beside each translator in :mod:`.ops`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ...compiler.errors import UnsupportedError
from ...compiler.ir.graph import Graph, Node
from ...compiler.ir.optable import Rejected
from ...compiler.ir.types import FixedType, fixed_for_range
from .ops import TRANSLATE

def resize_index_ok(length: int, s: int) -> bool:
    """True when hls4ml's io_parallel ``resize_nearest`` index ``(o * ratio) >> 16`` with
    ``ratio = ((length << 16) // (s * length)) + 1`` (``nnet_image.h``) equals ``o // s`` for every
    output index ``o < s * length``."""
    new = s * length
    ratio = ((length << 16) // new) + 1
    return all(((o * ratio) >> 16) == o // s for o in range(new))


#: Widest value the float64 C-simulation bridge carries exactly.
MAX_IO_WIDTH = 53


@dataclass
class Translation:
    """hls4ml model description of one device graph.

    Attributes:
        layers: hls4ml layer dicts (first the InputLayers), in topological order.
        precisions: layer name -> {precision var: C++ type string}.
        inputs / outputs: hls4ml layer names of the model inputs / outputs, in device order.
        value_layer: IR value name -> hls4ml layer producing it.
        node_layers: IR node name -> hls4ml layer names it became ([] when it became a no-op).
        notes: human-readable facts (fusions, rewrites).
    """

    layers: list = field(default_factory=list)
    precisions: dict = field(default_factory=dict)
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    value_layer: dict = field(default_factory=dict)
    node_layers: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


class Translator:
    """The context every translator of :data:`~qdeploy.backends.hls4ml.ops.TRANSLATE` receives.

    Attributes:
        graph: the fixed-point device graph being translated.
        io_type: hls4ml ``io_type`` (``"io_parallel"`` or ``"io_stream"``).
        strategy: hls4ml ``Strategy`` of every layer (``"Latency"`` or ``"Resource"``).
        result: the :class:`Translation` being built.
        skip: names of nodes a translator already handled (e.g. a Quantize fused into a Relu);
            the driver does not call their translator.
    """

    def __init__(self, graph: Graph, io_type: str, strategy: str = "Latency"):
        self.graph = graph
        self.io_type = io_type
        self.strategy = strategy
        self.result = Translation()
        self.skip: set[str] = set()
        self._used: set[str] = {"input", "output"}

    # ------------------------------------------------------------------ helpers
    def name(self, base: str) -> str:
        """A fresh hls4ml layer name (a C++ identifier) derived from ``base``."""
        s = re.sub(r"[^0-9a-zA-Z_]", "_", base).lower().strip("_") or "layer"
        if s[0].isdigit():
            s = "l_" + s
        out, i = s, 1
        while out in self._used:
            out = f"{s}_{i}"
            i += 1
        self._used.add(out)
        return out

    def layer(self, node: Node, d: dict, prec: dict, inputs: list[str]) -> str:
        """Append hls4ml layer dict ``d`` (named from ``d["base"]`` if given, else the node) made
        for ``node``, reading layers ``inputs``, with precisions ``prec`` ({var: C++ type});
        returns its name."""
        d = dict(d)
        d["name"] = self.name(d.pop("base", node.name))
        d["inputs"] = list(inputs)
        self.result.layers.append(d)
        self.result.precisions[d["name"]] = dict(prec)
        self.result.node_layers.setdefault(node.name, []).append(d["name"])
        return d["name"]

    def bind(self, value: str, layer: str) -> None:
        """Record that hls4ml layer ``layer`` produces IR value ``value``."""
        self.result.value_layer[value] = layer

    def note(self, text: str) -> None:
        """Add a human-readable fact (a fusion, a rewrite) to the translation's notes."""
        self.result.notes.append(text)

    def src(self, value: str) -> str:
        """The hls4ml layer producing IR value ``value``."""
        return self.result.value_layer[value]

    def vt(self, value: str) -> FixedType:
        """The IR type of ``value``."""
        return self.graph.value(value).dtype

    @staticmethod
    def fixed(t, node: str) -> FixedType:
        """``t`` itself when it is a fixed-point type.

        Raises:
            UnsupportedError: naming ``node`` when ``t`` is a float type.
        """
        if not isinstance(t, FixedType):
            raise UnsupportedError(f"float value inside the fixed-point device graph ({t})", node)
        return t

    def bn_layer(self, n: Node, n_in: int, c: int, sd, bd, st: str, bt: str, tout: FixedType, src: str,
                 out_value: str | None, base: str | None = None) -> str:
        """A BatchNormalization layer ``res = (tout)(x * scale + bias)`` (``nnet_batchnorm.h``, at
        full precision) over ``n_in`` values of ``c`` channels; ``sd``/``bd`` the per-channel
        scale/bias reals of C++ types ``st``/``bt``; binds ``out_value`` when given.  Returns its
        name."""
        d = {"class_name": "BatchNormalization", "n_in": int(n_in), "n_filt": int(c),
             "scale_data": np.ascontiguousarray(sd, np.float64), "bias_data": np.ascontiguousarray(bd, np.float64)}
        if base:
            d["base"] = base
        lay = self.layer(n, d, {"scale": st, "bias": bt, "result": tout.hls()}, [src])
        if out_value is not None:
            self.bind(out_value, lay)
        return lay

    def conv_layer(self, n: Node, wdata: np.ndarray, bdata, btype, wtype, strides, pads, src):
        """Add a Conv1D/Conv2D layer (channels-last input ``n.inputs[0]``, kernel ``wdata`` of shape
        (*k, C_in, C_out), bias reals ``bdata``; C++ types ``wtype``/``btype``; accumulator and result
        the output's type) reading layer ``src``, and bind ``n.output`` to it.

        Raises:
            UnsupportedError: a kernel of rank other than 1 or 2.
        """
        xin = self.graph.value(n.inputs[0])
        tout = self.vt(n.output)
        nd = wdata.ndim - 2
        oshape = self.graph.value(n.output).shape
        if nd == 1:
            d = {"class_name": "Conv1D", "data_format": "channels_last", "in_width": xin.shape[0],
                 "n_chan": xin.shape[1], "n_filt": wdata.shape[-1], "filt_width": wdata.shape[0],
                 "stride_width": strides[0], "dilation": 1, "out_width": oshape[0], "pad_left": pads[0],
                 "pad_right": pads[1]}
        elif nd == 2:
            d = {"class_name": "Conv2D", "data_format": "channels_last", "in_height": xin.shape[0],
                 "in_width": xin.shape[1], "n_chan": xin.shape[2], "n_filt": wdata.shape[-1],
                 "filt_height": wdata.shape[0], "filt_width": wdata.shape[1], "stride_height": strides[0],
                 "stride_width": strides[1], "dilation_height": 1, "dilation_width": 1,
                 "out_height": oshape[0], "out_width": oshape[1], "pad_top": pads[0], "pad_bottom": pads[2],
                 "pad_left": pads[1], "pad_right": pads[3]}
        else:
            raise UnsupportedError(f"{nd}-D convolution (hls4ml has Conv1D and Conv2D)", n.name)
        d["weight_data"] = np.ascontiguousarray(wdata, dtype=np.float64)
        d["bias_data"] = np.ascontiguousarray(bdata, dtype=np.float64)
        prec = {"weight": wtype, "bias": btype, "accum": tout.hls(), "result": tout.hls()}
        self.bind(n.output, self.layer(n, d, prec, [src]))

    def depthwise_layer(self, n: Node, wdata: np.ndarray, bdata, btype, wtype, strides, pads, src):
        """Add a DepthwiseConv1D/2D layer (depth multiplier 1) for the depthwise convolution ``n``:
        ``wdata`` (*k, 1, C) is the IR kernel (one filter per channel), ``bdata`` the bias reals;
        binds ``n.output``.

        hls4ml 1.3 ``nnet_sepconv{1,2}d_latency.h`` ``depthwise_conv_*_latency_cl``: each product
        ``data * weight`` is cast to ``accum_t``, the bias and the k products of a channel are summed in
        ``accum_t`` and cast to ``res_T`` -- the same contract as ``Conv`` (``accum_t`` = result = the
        IR's exact accumulator type), with ``weights[(kh * fw + kw) * C + c]`` (the kernel flattened
        channels-last, as hls4ml's Keras converter passes ``depthwise_kernel`` (*k, C, 1)).

        Raises:
            UnsupportedError: a kernel of rank other than 1 or 2.
        """
        xin = self.graph.value(n.inputs[0])
        tout = self.vt(n.output)
        nd = wdata.ndim - 2
        oshape = self.graph.value(n.output).shape
        c = int(wdata.shape[-1])
        if nd == 1:
            d = {"class_name": "DepthwiseConv1D", "data_format": "channels_last", "in_width": xin.shape[0],
                 "n_chan": c, "n_filt": c, "depth_multiplier": 1, "filt_width": wdata.shape[0],
                 "stride_width": strides[0], "dilation": 1, "out_width": oshape[0], "pad_left": pads[0],
                 "pad_right": pads[1]}
        elif nd == 2:
            d = {"class_name": "DepthwiseConv2D", "data_format": "channels_last", "in_height": xin.shape[0],
                 "in_width": xin.shape[1], "n_chan": c, "n_filt": c, "depth_multiplier": 1,
                 "filt_height": wdata.shape[0], "filt_width": wdata.shape[1], "stride_height": strides[0],
                 "stride_width": strides[1], "dilation_height": 1, "dilation_width": 1,
                 "out_height": oshape[0], "out_width": oshape[1], "pad_top": pads[0], "pad_bottom": pads[2],
                 "pad_left": pads[1], "pad_right": pads[3]}
        else:
            raise UnsupportedError(f"{nd}-D depthwise convolution (hls4ml has DepthwiseConv1D and 2D)", n.name)
        # (*k, 1, C) -> (*k, C, 1): hls4ml's depthwise kernel layout (depth multiplier last)
        d["depthwise_data"] = np.ascontiguousarray(np.swapaxes(wdata, -1, -2), dtype=np.float64)
        d["bias_data"] = np.ascontiguousarray(bdata, dtype=np.float64)
        prec = {"weight": wtype, "bias": btype, "accum": tout.hls(), "result": tout.hls()}
        self.bind(n.output, self.layer(n, d, prec, [src]))

    def subsample_layer(self, n: Node, strides, src: str) -> None:
        """A pooling ``n`` whose window is one element (kernel 1, any stride) is a subsampling
        ``y[i] = x[i * s]``: emitted as a Conv1D/2D with a 1-wide identity kernel (weight 1 of type
        ``ap_uint<1>`` from channel c to c, zero bias), stride ``strides``, accumulator and result
        the output's type -- exact (one product ``x * 1`` per output) in io_parallel and io_stream,
        where hls4ml's streaming pooling needs stride == kernel.  Binds ``n.output``."""
        x = self.graph.value(n.inputs[0])
        nd, c = len(x.shape) - 1, x.shape[-1]
        eye = np.zeros((1,) * nd + (c, c))
        eye[..., np.arange(c), np.arange(c)] = 1.0
        self.note(f"{n.op} '{n.name}' (kernel 1, strides {tuple(strides)}) emitted as a subsampling 1x1 convolution "
                  "with an identity kernel")
        self.conv_layer(n, eye, np.zeros(c), "ap_uint<1>", "ap_uint<1>", tuple(strides), (0,) * (2 * nd), src)

    def maxpool_zero_padded(self, n: Node, kernel, strides, pads, src: str) -> None:
        """MaxPool ``n`` with explicit padding by the input type's smallest code (the IR's rule):
        shift the codes to ``>= 0`` with a BatchNormalization (``+c``, exact) when the type is signed,
        pad with an hls4ml ZeroPadding1D/2D layer (0 is then the smallest code), pool without
        padding, and shift back (``-c``).  Exact in both io types, for unsigned inputs too (hls4ml's
        own pooling pads with the top-bit-set code, the *largest* unsigned value).  Binds ``n.output``.

        Raises:
            UnsupportedError: from :meth:`pool_dict` (overlapping windows in io_stream).
        """
        x = self.graph.value(n.inputs[0])
        t: FixedType = x.dtype
        tout = self.vt(n.output)
        nd, c = len(kernel), x.shape[-1]
        shift = -t.min_code if t.min_code < 0 else 0
        tpos = fixed_for_range(t.min_code + shift, t.max_code + shift, t.frac_bits)
        if shift:
            src = self.bn_layer(n, x.size, c, np.ones(c), np.full(c, shift * t.lsb), "ap_uint<1>",
                                fixed_for_range(shift, shift, t.frac_bits).hls(), tpos, src, None,
                                base=f"{n.name}_offset")
        padded = tuple(x.shape[i] + pads[i] + pads[i + nd] for i in range(nd)) + (c,)
        if nd == 1:
            d = {"class_name": "ZeroPadding1D", "data_format": "channels_last", "in_width": x.shape[0],
                 "out_width": padded[0], "n_chan": c, "pad_left": pads[0], "pad_right": pads[1]}
        else:
            d = {"class_name": "ZeroPadding2D", "data_format": "channels_last", "in_height": x.shape[0],
                 "in_width": x.shape[1], "out_height": padded[0], "out_width": padded[1], "n_chan": c,
                 "pad_top": pads[0], "pad_bottom": pads[2], "pad_left": pads[1], "pad_right": pads[3]}
        src = self.layer(n, {**d, "base": f"{n.name}_pad"}, {"result": tpos.hls()}, [src])
        oshape = self.graph.value(n.output).shape
        d = self.pool_dict(n, "Max", padded, kernel, strides, (0,) * (2 * nd), oshape)
        mid = tpos if shift else tout
        lay = self.layer(n, d, {"accum": tpos.hls(), "result": mid.hls()}, [src])
        self.note(f"padded MaxPool '{n.name}': explicit ZeroPadding of codes shifted by +{shift} (0 is the smallest), "
                  "then an unpadded pool")
        if not shift:
            self.bind(n.output, lay)
            return
        self.bn_layer(n, self.graph.value(n.output).size, c, np.ones(c), np.full(c, -shift * t.lsb), "ap_uint<1>",
                      fixed_for_range(-shift, -shift, t.frac_bits).hls(), tout, lay, n.output,
                      base=f"{n.name}_unshift")

    def pool_dict(self, n: Node, kind: str, in_shape, kernel, strides, pads, out_shape):
        """hls4ml ``{kind}Pooling1D``/``2D`` layer dict (``kind``: ``"Max"`` or ``"Average"``) for
        channels-last ``in_shape`` -> ``out_shape`` with ``kernel``, ``strides`` and ``pads`` (ONNX
        order: begins then ends).

        Raises:
            UnsupportedError: rank other than 1 or 2, or overlapping windows in io_stream.
        """
        nd = len(kernel)
        if self.io_type == "io_stream" and tuple(strides) != tuple(kernel):
            # nnet_pooling_stream.h asserts pool size == stride (aborts the C simulation otherwise)
            raise UnsupportedError(f"pooling with strides {tuple(strides)} != kernel {tuple(kernel)} in io_stream "
                                   "(hls4ml's streaming pooling needs non-overlapping windows)", n.name)
        if nd == 1:
            return {"class_name": f"{kind}Pooling1D", "data_format": "channels_last", "n_in": in_shape[0],
                    "n_out": out_shape[0], "n_filt": in_shape[-1], "pool_width": kernel[0],
                    "stride_width": strides[0], "pad_left": pads[0], "pad_right": pads[1]}
        if nd == 2:
            return {"class_name": f"{kind}Pooling2D", "data_format": "channels_last", "in_height": in_shape[0],
                    "in_width": in_shape[1], "n_filt": in_shape[-1], "pool_height": kernel[0],
                    "pool_width": kernel[1], "stride_height": strides[0], "stride_width": strides[1],
                    "out_height": out_shape[0], "out_width": out_shape[1], "pad_top": pads[0],
                    "pad_bottom": pads[2], "pad_left": pads[1], "pad_right": pads[3]}
        raise UnsupportedError(f"{nd}-D pooling (hls4ml has 1-D and 2-D)", n.name)

    def resize_layer(self, n: Node, in_shape, scales, src: str, t: str, base: str | None = None) -> str:
        """An hls4ml ``Resize`` (nearest) layer repeating each element of the channels-last
        ``in_shape`` (rank 2 or 3) ``scales[i]`` times along spatial axis ``i``, reading layer
        ``src`` of C++ type ``t``; returns its name.

        ``nnet_image.h`` (io_parallel) reads input ``(o * ratio) >> 16`` with ``ratio = ((L << 16) /
        (s L)) + 1``; :func:`resize_index_ok` checks that this is ``o // s`` for every output.
        ``nnet_image_stream.h`` (io_stream) writes each row ``s_h`` times, each pixel ``s_w`` times.

        Raises:
            UnsupportedError: naming ``n`` for another rank, or where the io_parallel index is not a
                pure repetition.
        """
        if len(in_shape) == 2:
            (w, c), (sh, sw), h = in_shape, (1, int(scales[0])), 1
        elif len(in_shape) == 3:
            (h, w, c), (sh, sw) = in_shape, (int(scales[0]), int(scales[1]))
        else:
            raise UnsupportedError(f"repeating a rank-{len(in_shape)} tensor (hls4ml Resize: 1-D and 2-D)", n.name)
        if self.io_type == "io_parallel":
            for length, k in ((h, sh), (w, sw)):
                if not resize_index_ok(length, k):
                    raise UnsupportedError(f"hls4ml io_parallel resize_nearest's fixed-point index (ratio "
                                           f"(L << 16) / (s L) + 1) does not repeat each element {k} times on an "
                                           f"axis of {length}", n.name)
        d = {"class_name": "Resize", "data_format": "channels_last", "algorithm": "nearest", "align_corners": False,
             "in_height": int(h), "in_width": int(w), "out_height": int(h * sh), "out_width": int(w * sw),
             "n_chan": int(c)}
        if base:
            d["base"] = base
        return self.layer(n, d, {"result": t}, [src])

    def broadcast_to(self, n: Node, value: str, shape) -> str:
        """The layer holding IR value ``value`` broadcast (NumPy rules, leading unit axes added) to
        the channels-last ``shape`` of rank 2 or 3: the value itself when the shapes agree, else a
        ``Reshape`` to the padded rank and a ``Resize`` repeating it along its unit spatial axes
        (exact: codes are only copied).

        Raises:
            UnsupportedError: naming ``n`` for a broadcast along the channel axis, another rank, or a
                repetition hls4ml's Resize cannot do exactly (:meth:`resize_layer`).
        """
        v = self.graph.value(value)
        shape = tuple(int(d) for d in shape)
        src = self.src(value)
        if tuple(v.shape) == shape:
            return src
        padded = (1,) * (len(shape) - len(v.shape)) + tuple(v.shape)
        if padded[-1] != shape[-1]:
            raise UnsupportedError(f"{n.op} broadcasting {tuple(v.shape)} to {shape} along the channel axis: hls4ml "
                                   "can only repeat along spatial axes (Resize)", n.name)
        if len(shape) not in (2, 3):
            raise UnsupportedError(f"{n.op} broadcasting to a rank-{len(shape)} tensor (hls4ml: spatial repetition "
                                   "of rank-2/3 tensors only)", n.name)
        t = v.dtype.hls()
        stem = re.sub(r"[^0-9a-zA-Z_]", "_", value)
        if padded != tuple(v.shape):
            d = {"class_name": "Reshape", "target_shape": list(padded), "base": f"{n.name}_{stem}_rank"}
            src = self.layer(n, d, {"result": t}, [src])
        self.note(f"{n.op} '{n.name}': operand {value!r} {tuple(v.shape)} repeated to {shape} with an hls4ml Resize "
                  "(hls4ml merge layers need equal shapes)")
        return self.resize_layer(n, padded, [b // a for a, b in zip(padded[:-1], shape[:-1])], src, t,
                                 base=f"{n.name}_{stem}_repeat")

    # ------------------------------------------------------------------ driver
    def run(self) -> Translation:
        """Translate the whole graph (see :func:`translate`)."""
        g = self.graph
        for v in g.input_values():
            t = self.fixed(v.dtype, v.name)
            if t.width > MAX_IO_WIDTH:
                raise UnsupportedError(f"device input of {t.width} bits exceeds the {MAX_IO_WIDTH}-bit exact "
                                       "range of the C-simulation's double interface", v.name)
            name = self.name("in_" + v.name)
            self.result.layers.append({"class_name": "InputLayer", "name": name, "input_shape": list(v.shape)})
            self.result.precisions[name] = {"result": t.hls()}
            self.result.inputs.append(name)
            self.bind(v.name, name)
        for n in g.nodes:
            if n.name in self.skip:
                continue
            for v in n.outputs:
                self.fixed(g.value(v).dtype, n.name)
            impl = TRANSLATE.entry(n.op)
            if impl is None:
                raise UnsupportedError(f"op {n.op} has no exact hls4ml mapping", n.name)
            if isinstance(impl, Rejected):
                raise UnsupportedError(f"op {n.op} has no exact hls4ml mapping: {impl.reason}", n.name)
            impl(self, n)
        outs = []
        for o in g.outputs:
            t = self.vt(o)
            if t.width > MAX_IO_WIDTH:
                raise UnsupportedError(f"device output of {t.width} bits exceeds the {MAX_IO_WIDTH}-bit exact range "
                                       "of the C-simulation's double interface; add a Quantize", g.producer(o).name if g.producer(o) else o)
            lay = self.result.value_layer[o]
            if lay in self.result.inputs:
                raise UnsupportedError("a device input is also a device output (nothing to compute)", o)
            prod = g.producer(o)
            if prod is not None and prod.op == "Reshape" and self.result.value_layer.get(prod.inputs[0]) in self.result.inputs:
                # hls4ml drops a Reshape of an input layer (arrays are flat), which would make the
                # output alias the input and the generated C++ declare the input twice
                raise UnsupportedError("a device output that only reshapes a device input (nothing to compute on "
                                       "the device)", prod.name)
            if lay not in outs:
                outs.append(lay)
        self.result.outputs = outs
        return self.result


def translate(device: Graph, io_type: str = "io_parallel", strategy: str = "Latency") -> Translation:
    """Map the fixed-point device graph to hls4ml layer dicts (``strategy``: the hls4ml ``Strategy``
    the model is built with; it decides, e.g., whether a depthwise convolution can use hls4ml's
    DepthwiseConv layers).

    Raises:
        UnsupportedError: naming the node, for anything without an exact hls4ml mapping.
    """
    return Translator(device, io_type, strategy).run()
