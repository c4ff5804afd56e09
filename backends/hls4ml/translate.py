"""IR (fixed-point device core) -> hls4ml layer dicts with explicit precisions.

Every hls4ml layer gets *every* precision variable from our IR types (hls4ml falls back silently
to ``ap_fixed<16,6>`` for anything missing; see ``/work/probe/hls4ml_notes.md`` section 0).
The C++ semantics relied on (hls4ml 1.3.0 templates, ``templates/vivado/nnet_utils``):

* ``nnet_dense_latency.h`` / ``nnet_conv*``: every product and the bias are cast to ``accum_t``,
  summed in ``accum_t``, then ``res = (res_T)acc``.  We set ``accum_t`` = result type = the IR's
  exact accumulator type (TRN, WRAP): products have at most its fraction bits, and WRAP makes
  intermediate overflow modular, so the final (in-range) sum is exact.
* ``nnet_activation.h``: ``relu`` is ``x > 0 ? (res_T)x : 0`` which equals
  ``quantize(relu(x))`` for any result type (``(res_T)0 == 0`` in every mode), so
  ``Relu -> Quantize`` fuses into one relu layer whose result type is the Quantize's type;
  ``linear`` is ``res = (res_T)x`` (a Quantize); ``binary_tanh`` is ``x >= 0 ? 1 : -1``
  (our ``Sign``) with an ``ap_int<2>`` result.
* ``nnet_batchnorm.h``: ``res = (res_T)(x * scale + bias)`` at full precision (our ``Affine``).
* ``nnet_merge.h``: ``res = (res_T)(a + b)`` / ``(res_T)(a * b)`` at full precision.
* ``nnet_pooling.h``: max pooling pads with the most negative code (top bit set);
  ``avg`` sums in ``accum_t`` and does ``y /= n`` -- an ``ap_fixed`` division keeping the
  dividend's fraction bits and truncating *towards zero* (``ap_fixed_base.h`` ``operator/``:
  ``sdiv``).  With ``accum_t`` having ``F_in + k`` fraction bits (``k = ceil(log2 n)``) that is
  our ``floor(sum * 2**k / n)`` whenever the sum is non-negative.  For a signed input we shift
  the input to non-negative codes with a BatchNormalization (``+c``), pool, and shift back
  (``-c * 2**k``): ``floor((s + n c) 2**k / n) = floor(s 2**k / n) + c 2**k`` exactly.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ...compiler.errors import UnsupportedError
from ...compiler.ir.graph import Graph, Node
from ...compiler.ir.ops import avg_shift
from ...compiler.ir.types import FixedType, fixed_for_range

#: Type string for the constant 0/1 tensors we add (missing bias / unit scale).
_BIT = "ap_uint<1>"
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


def _ftype(t, node: str) -> FixedType:
    if not isinstance(t, FixedType):
        raise UnsupportedError(f"float value inside the fixed-point device graph ({t})", node)
    return t


def _needs_widen(tin: FixedType, tout: FixedType) -> bool:
    """True when casting ``tin`` to ``tout`` rounds away at least ``tin.width`` fraction bits,
    which ap_fixed cannot do without reading past the input's MSB."""
    return tout.rounding != "TRN" and tin.frac_bits - tout.frac_bits >= tin.width


def _rank_pads(n: Node, nd: int):
    p = tuple(int(v) for v in n.attrs.get("pads", (0,) * (2 * nd)))
    s = tuple(int(v) for v in n.attrs.get("strides", (1,) * nd))
    return s, p


class _Translator:
    def __init__(self, g: Graph, io_type: str):
        self.g = g
        self.io_type = io_type
        self.t = Translation()
        self.used: set[str] = {"input", "output"}
        self.skip: set[str] = set()

    # ------------------------------------------------------------------ helpers
    def name(self, base: str) -> str:
        s = re.sub(r"[^0-9a-zA-Z_]", "_", base).lower().strip("_") or "layer"
        if s[0].isdigit():
            s = "l_" + s
        out, i = s, 1
        while out in self.used:
            out = f"{s}_{i}"
            i += 1
        self.used.add(out)
        return out

    def layer(self, node: Node, d: dict, prec: dict, inputs: list[str]) -> str:
        d = dict(d)
        d["name"] = self.name(d.pop("base", node.name))
        d["inputs"] = list(inputs)
        self.t.layers.append(d)
        self.t.precisions[d["name"]] = dict(prec)
        self.t.node_layers.setdefault(node.name, []).append(d["name"])
        return d["name"]

    def src(self, value: str) -> str:
        return self.t.value_layer[value]

    def vt(self, value: str) -> FixedType:
        return self.g.value(value).dtype

    # ------------------------------------------------------------------ driver
    def run(self) -> Translation:
        g = self.g
        for v in g.input_values():
            t = _ftype(v.dtype, v.name)
            if t.width > MAX_IO_WIDTH:
                raise UnsupportedError(f"device input of {t.width} bits exceeds the {MAX_IO_WIDTH}-bit exact "
                                       "range of the C-simulation's double interface", v.name)
            name = self.name("in_" + v.name)
            self.t.layers.append({"class_name": "InputLayer", "name": name, "input_shape": list(v.shape)})
            self.t.precisions[name] = {"result": t.hls()}
            self.t.inputs.append(name)
            self.t.value_layer[v.name] = name
        for n in g.nodes:
            if n.name in self.skip:
                continue
            for v in n.outputs:
                _ftype(g.value(v).dtype, n.name)
            getattr(self, "op_" + n.op, self.unsupported)(n)
        outs = []
        for o in g.outputs:
            t = self.vt(o)
            if t.width > MAX_IO_WIDTH:
                raise UnsupportedError(f"device output of {t.width} bits exceeds the {MAX_IO_WIDTH}-bit exact range "
                                       "of the C-simulation's double interface; add a Quantize", g.producer(o).name if g.producer(o) else o)
            lay = self.t.value_layer[o]
            if lay in self.t.inputs:
                raise UnsupportedError("a device input is also a device output (nothing to compute)", o)
            prod = g.producer(o)
            if prod is not None and prod.op == "Reshape" and self.t.value_layer.get(prod.inputs[0]) in self.t.inputs:
                # hls4ml drops a Reshape of an input layer (arrays are flat), which would make the
                # output alias the input and the generated C++ declare the input twice
                raise UnsupportedError("a device output that only reshapes a device input (nothing to compute on "
                                       "the device)", prod.name)
            if lay not in outs:
                outs.append(lay)
        self.t.outputs = outs
        return self.t

    def unsupported(self, n: Node):
        raise UnsupportedError(f"op {n.op} has no exact hls4ml mapping", n.name)

    # ------------------------------------------------------------------ ops
    def op_Quantize(self, n: Node):
        tin, tout = self.vt(n.inputs[0]), self.vt(n.output)
        if tin == tout:  # identical cast: hls4ml would drop the linear layer anyway
            self.t.value_layer[n.output] = self.src(n.inputs[0])
            self.t.node_layers[n.name] = []
            return
        src = self.src(n.inputs[0])
        if _needs_widen(tin, tout):
            # ap_fixed's rounding reads the bit just below the new LSB; when the cast drops at
            # least as many fraction bits as the input has, that bit lies beyond the input's MSB
            # and ap_private asserts ("Attempting to read bit beyond MSB").  Sign-extend first
            # (exact: only integer bits are added), then round.
            shift = tin.frac_bits - tout.frac_bits
            w = shift + 2
            tmid = FixedType(w, tin.int_bits + (w - tin.width), tin.signed)
            src = self.layer(n, {"class_name": "Activation", "activation": "linear", "base": f"{n.name}_widen"},
                             {"result": tmid.hls()}, [src])
            self.t.notes.append(f"Quantize '{n.name}': sign-extended to {tmid.hls()} before rounding")
        self.t.value_layer[n.output] = self.layer(n, {"class_name": "Activation", "activation": "linear"},
                                                  {"result": tout.hls()}, [src])

    def op_Relu(self, n: Node):
        cons = self.g.consumers(n.output)
        tout = self.vt(n.output)
        out_value = n.output
        if (len(cons) == 1 and cons[0].op == "Quantize" and n.output not in self.g.outputs
                and not _needs_widen(tout, self.vt(cons[0].output))):
            q = cons[0]
            tout, out_value = self.vt(q.output), q.output
            self.skip.add(q.name)
            self.t.node_layers[q.name] = []
            self.t.notes.append(f"fused Relu '{n.name}' + Quantize '{q.name}' into one relu layer with result {tout.hls()}")
        lay = self.layer(n, {"class_name": "Activation", "activation": "relu"}, {"result": tout.hls()},
                         [self.src(n.inputs[0])])
        self.t.value_layer[out_value] = lay

    def op_Sign(self, n: Node):
        self.t.value_layer[n.output] = self.layer(n, {"class_name": "Activation", "activation": "binary_tanh"},
                                                  {"result": "ap_int<2>"}, [self.src(n.inputs[0])])

    def _wb(self, n: Node, n_out: int):
        w = n.params["weight"]
        _ftype(w.dtype, n.name)
        b = n.params.get("bias")
        if b is None:
            return w, np.zeros(n_out), _BIT
        bt = _ftype(b.dtype, n.name)
        return w, np.broadcast_to(b.real(), (n_out,)).astype(np.float64), bt.hls()

    def _conv_like(self, n: Node, wdata: np.ndarray, bdata, btype, wtype, strides, pads, src):
        """Conv1D/Conv2D layer for channels-last input ``self.vt(n.inputs[0])``; wdata (*k, C_in, C_out)."""
        xin = self.g.value(n.inputs[0])
        tout = self.vt(n.output)
        nd = wdata.ndim - 2
        oshape = self.g.value(n.output).shape
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
        self.t.value_layer[n.output] = self.layer(n, d, prec, [src])

    def op_Dense(self, n: Node):
        x = self.g.value(n.inputs[0])
        w, b, bt = self._wb(n, n.params["weight"].shape[1])
        tout = self.vt(n.output)
        if len(x.shape) == 1:
            d = {"class_name": "Dense", "n_in": int(w.shape[0]), "n_out": int(w.shape[1]),
                 "weight_data": w.real(), "bias_data": b}
            prec = {"weight": w.dtype.hls(), "bias": bt, "accum": tout.hls(), "result": tout.hls()}
            self.t.value_layer[n.output] = self.layer(n, d, prec, [self.src(n.inputs[0])])
            return
        if len(x.shape) in (2, 3):  # Dense on the channel axis of a feature map = 1x1 convolution
            nd = len(x.shape) - 1
            wk = w.real().reshape((1,) * nd + w.shape)
            self.t.notes.append(f"Dense '{n.name}' on a rank-{len(x.shape)} tensor mapped to a pointwise Conv{nd}D")
            self._conv_like(n, wk, b, bt, w.dtype.hls(), (1,) * nd, (0,) * (2 * nd), self.src(n.inputs[0]))
            return
        raise UnsupportedError(f"Dense on a rank-{len(x.shape)} input", n.name)

    def op_Conv(self, n: Node):
        w = n.params["weight"]
        nd = w.data.ndim - 2
        strides, pads = _rank_pads(n, nd)
        groups = int(n.attrs.get("groups", 1))
        _, b, bt = self._wb(n, w.shape[-1])
        wr = w.real()
        if groups > 1:
            # hls4ml convolutions have no groups: use the equivalent dense kernel, block-diagonal
            # over (C_in, C_out) with exact zeros off the diagonal blocks.
            cin_g, cout = wr.shape[-2], wr.shape[-1]
            cout_g = cout // groups
            full = np.zeros(wr.shape[:-2] + (cin_g * groups, cout))
            for gi in range(groups):
                full[..., gi * cin_g:(gi + 1) * cin_g, gi * cout_g:(gi + 1) * cout_g] = \
                    wr[..., gi * cout_g:(gi + 1) * cout_g]
            wr = full
            self.t.notes.append(f"grouped Conv '{n.name}' (groups={groups}) mapped to one convolution with a "
                                "block-diagonal kernel (exact zeros between groups)")
        self._conv_like(n, wr, b, bt, w.dtype.hls(), strides, pads, self.src(n.inputs[0]))

    def op_Affine(self, n: Node):
        x = self.g.value(n.inputs[0])
        c = x.shape[-1] if x.shape else 1
        s, b = n.params.get("scale"), n.params.get("bias")
        sd = np.broadcast_to(s.real().reshape(-1), (c,)) if s is not None else np.ones(c)
        bd = np.broadcast_to(b.real().reshape(-1), (c,)) if b is not None else np.zeros(c)
        st = _ftype(s.dtype, n.name).hls() if s is not None else _BIT
        bt = _ftype(b.dtype, n.name).hls() if b is not None else _BIT
        self._bn(n, x.size, c, sd, bd, st, bt, self.vt(n.output), self.src(n.inputs[0]), n.output)

    def _bn(self, n, n_in, c, sd, bd, st, bt, tout, src, out_value, base=None):
        d = {"class_name": "BatchNormalization", "n_in": int(n_in), "n_filt": int(c),
             "scale_data": np.ascontiguousarray(sd, np.float64), "bias_data": np.ascontiguousarray(bd, np.float64)}
        if base:
            d["base"] = base
        lay = self.layer(n, d, {"scale": st, "bias": bt, "result": tout.hls()}, [src])
        if out_value is not None:
            self.t.value_layer[out_value] = lay
        return lay

    def _merge(self, n: Node, op: str):
        a, b = (self.g.value(i) for i in n.inputs)
        if a.shape != b.shape:
            raise UnsupportedError(f"{n.op} with broadcasting ({a.shape} vs {b.shape}); hls4ml Merge needs equal shapes",
                                   n.name)
        self.t.value_layer[n.output] = self.layer(n, {"class_name": "Merge", "op": op},
                                                  {"result": self.vt(n.output).hls()},
                                                  [self.src(i) for i in n.inputs])

    def op_Add(self, n: Node):
        self._merge(n, "add")

    def op_Mul(self, n: Node):
        self._merge(n, "multiply")

    def op_Concat(self, n: Node):
        rank = len(self.g.value(n.inputs[0]).shape)
        if not 1 <= rank <= 3:
            raise UnsupportedError(f"Concat of rank-{rank} tensors (hls4ml: 1..3)", n.name)
        ax = int(n.attrs.get("axis", -1)) % rank
        tout = self.vt(n.output)
        cur = self.src(n.inputs[0])
        for i, v in enumerate(n.inputs[1:]):  # hls4ml Concatenate takes two inputs: chain them
            d = {"class_name": "Concatenate", "op": f"concatenate{rank}d", "axis": ax - rank}
            if i < len(n.inputs) - 2:
                d["base"] = f"{n.name}_part{i}"
            cur = self.layer(n, d, {"result": tout.hls()}, [cur, self.src(v)])
        self.t.value_layer[n.output] = cur

    def op_Reshape(self, n: Node):
        self.t.value_layer[n.output] = self.layer(
            n, {"class_name": "Reshape", "target_shape": [int(s) for s in n.attrs["shape"]]},
            {"result": self.vt(n.output).hls()}, [self.src(n.inputs[0])])

    def op_Transpose(self, n: Node):
        self.t.value_layer[n.output] = self.layer(
            n, {"class_name": "Transpose", "perm": [int(p) for p in n.attrs["perm"]]},
            {"result": self.vt(n.output).hls()}, [self.src(n.inputs[0])])

    def _pool_dict(self, n: Node, kind: str, in_shape, kernel, strides, pads, out_shape):
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

    def op_MaxPool(self, n: Node):
        x = self.g.value(n.inputs[0])
        k = tuple(int(v) for v in n.attrs["kernel"])
        s, p = _rank_pads(n, len(k))
        t = x.dtype
        if any(p):
            # hls4ml pads max pooling with the code whose top bit is set: the most negative value of
            # a signed type but the LARGEST of an unsigned one.
            if not t.signed:
                raise UnsupportedError("padded MaxPool on an unsigned input: hls4ml pads with the top-bit-set code, "
                                       "the largest unsigned value", n.name)
            if any(pv >= kv for pv, kv in zip(p, k + k)):
                raise UnsupportedError("MaxPool padding as large as the kernel (all-padding windows)", n.name)
            if self.io_type == "io_stream":
                raise UnsupportedError("padded MaxPool in io_stream", n.name)
        d = self._pool_dict(n, "Max", x.shape, k, s, p, self.g.value(n.output).shape)
        self.t.value_layer[n.output] = self.layer(n, d, {"accum": t.hls(), "result": self.vt(n.output).hls()},
                                                  [self.src(n.inputs[0])])

    def _avg(self, n: Node, make_dict, count: int):
        """Average pooling of ``count`` elements per window, exact (see module docstring)."""
        x = self.g.value(n.inputs[0])
        t: FixedType = x.dtype
        tout = self.vt(n.output)
        k = avg_shift(count)
        src = self.src(n.inputs[0])
        shift = 0
        pow2 = count & (count - 1) == 0
        if t.signed and not pow2 and t.min_code < 0:
            # shift codes to >= 0 so that hls4ml's truncating division is a floor
            shift = -t.min_code
            tpos = fixed_for_range(0, t.max_code + shift, t.frac_bits)
            c = x.shape[-1]
            src = self._bn(n, x.size, c, np.ones(c), np.full(c, shift * t.lsb), _BIT,
                           fixed_for_range(shift, shift, t.frac_bits).hls(), tpos, src, None, base=f"{n.name}_offset")
            lo, hi = 0, t.max_code + shift
            self.t.notes.append(f"average pool '{n.name}': signed input shifted by +{shift} codes so that hls4ml's "
                                "truncating division equals the floor (shifted back afterwards)")
        else:
            lo, hi = t.min_code, t.max_code
        accum = fixed_for_range(min(lo, 0) * count << k, hi * count << k, t.frac_bits + k)
        if shift:
            mid = fixed_for_range(lo << k, hi << k, t.frac_bits + k)
            lay = self.layer(n, make_dict(), {"accum": accum.hls(), "result": mid.hls()}, [src])
            off = -(shift << k)
            c = x.shape[-1]
            self._bn(n, self.g.value(n.output).size, c, np.ones(c), np.full(c, off * mid.lsb), _BIT,
                     fixed_for_range(off, off, mid.frac_bits).hls(), tout, lay, n.output, base=f"{n.name}_unshift")
        else:
            self.t.value_layer[n.output] = self.layer(n, make_dict(), {"accum": accum.hls(), "result": tout.hls()},
                                                      [src])

    def op_AvgPool(self, n: Node):
        x = self.g.value(n.inputs[0])
        k = tuple(int(v) for v in n.attrs["kernel"])
        s, p = _rank_pads(n, len(k))
        if any(p):
            raise UnsupportedError("AvgPool with padding", n.name)
        self._avg(n, lambda: self._pool_dict(n, "Average", x.shape, k, s, p, self.g.value(n.output).shape),
                  int(np.prod(k)))

    def op_GlobalAvgPool(self, n: Node):
        x = self.g.value(n.inputs[0])
        if len(x.shape) == 2:
            mk = lambda: {"class_name": "GlobalAveragePooling1D", "data_format": "channels_last",  # noqa: E731
                          "n_in": x.shape[0], "n_filt": x.shape[1]}
        elif len(x.shape) == 3:
            mk = lambda: {"class_name": "GlobalAveragePooling2D", "data_format": "channels_last",  # noqa: E731
                          "in_height": x.shape[0], "in_width": x.shape[1], "n_filt": x.shape[2]}
        else:
            raise UnsupportedError(f"GlobalAvgPool over a rank-{len(x.shape)} input", n.name)
        self._avg(n, mk, int(np.prod(x.shape[:-1])))


def translate(device: Graph, io_type: str = "io_parallel") -> Translation:
    """Map the fixed-point device graph to hls4ml layer dicts.

    Raises:
        UnsupportedError: naming the node, for anything without an exact hls4ml mapping.
    """
    return _Translator(device, io_type).run()
