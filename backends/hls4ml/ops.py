"""The hls4ml backend's op tables: for each IR op, its translation to hls4ml layers and its FPGA
estimate row, declared together by :func:`hls4ml_op`.

* :data:`TRANSLATE` (``OpTable("hls4ml")``): ``fn(tr, node)`` adds the node's hls4ml layers
  through the :class:`~qdeploy.backends.hls4ml.translate.Translator` context ``tr`` and binds
  its output value; it raises :class:`UnsupportedError` naming the node for attributes without
  an exact mapping.
* :data:`ESTIMATE` (``OpTable("hls4ml estimate")``): a :class:`~.resources.Cost` whose row
  prices the node (assumptions A1-A14 of :mod:`qdeploy.backends.hls4ml.estimate`).

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

A new elementwise op is one ``@hls4ml_op("Op", cost=Cost(row))`` translator here, its ``row``
returning :func:`chained` of its LUTs, DSPs and delay.
"""
from __future__ import annotations

import math

import numpy as np

from ...compiler.errors import UnsupportedError
from ...compiler.ir.graph import Node
from ...compiler.ir.ops import avg_shift
from ...compiler.ir.ops.kernels import dilate_kernel
from ...compiler.ir.ops.linear import conv_dilations
from ...compiler.ir.ops.pool import window_counts
from ...compiler.ir.optable import OpTable
from ...compiler.ir.types import FixedType, fixed_for_range
from .mac_cost import emits_depthwise, is_depthwise, mac_row
from .ops_batch_a import ENTRIES as _BATCH_A
from .resources import (DSP_MIN_BITS, LUT_PER_PP_BIT, T_DSP_NS, T_LUT_NS, Cost, EstimateContext, bitlen,
                        csd_digits, dsp_mask, dsps_per_mult, dsps_per_mult_arr, t_add, width)

#: IR op -> translator ``fn(tr: Translator, node)``, or :class:`Rejected`.
TRANSLATE = OpTable("hls4ml")
#: IR op -> :class:`~.resources.Cost` (FPGA estimate row), or :class:`Rejected`.
ESTIMATE = OpTable("hls4ml estimate")

#: Type string for the constant 0/1 tensors we add (missing bias / unit scale).
BIT = "ap_uint<1>"


def hls4ml_op(op: str, *, cost: Cost):
    """Decorator: the decorated ``fn(tr, node)`` translates IR op ``op``; ``cost`` is its FPGA
    estimate entry.

    Raises:
        ValueError: ``op`` already has an entry in either table.
    """
    def deco(fn):
        TRANSLATE.set(op, fn)
        ESTIMATE.set(op, cost)
        return fn
    return deco


def chained(ctx: EstimateContext, lut: float, dsp: int, delay_ns: float) -> dict:
    """Estimate row of a combinational (``chained``) op: ``lut`` modelled LUT bits (scaled by the
    rule's post-HLS factor, A6), ``dsp`` slices, and its delay in ns, chained into the next
    registered layer (A10)."""
    return {"lut": int(round(ctx.lut_factor * lut)), "ff": 0, "dsp": int(dsp), "bram_18k": 0,
            "latency_cycles": 0, "ii_cycles": 1, "delay_ns": delay_ns}


def _out_bits(ctx: EstimateContext, node) -> tuple[int, int]:
    """(element count, bit width) of ``node``'s output."""
    out = ctx.graph.value(node.output)
    return out.size, width(out.dtype)


def _needs_widen(tin: FixedType, tout: FixedType) -> bool:
    """True when casting ``tin`` to ``tout`` rounds away at least ``tin.width`` fraction bits,
    which ap_fixed cannot do without reading past the input's MSB."""
    return tout.rounding != "TRN" and tin.frac_bits - tout.frac_bits >= tin.width


def _rank_pads(n: Node, nd: int):
    p = tuple(int(v) for v in n.attrs.get("pads", (0,) * (2 * nd)))
    s = tuple(int(v) for v in n.attrs.get("strides", (1,) * nd))
    return s, p


# ----------------------------------------------------------------------------- Dense / Conv
def _wb(tr, n: Node, n_out: int):
    w = n.params["weight"]
    tr.fixed(w.dtype, n.name)
    b = n.params.get("bias")
    if b is None:
        return w, np.zeros(n_out), BIT
    bt = tr.fixed(b.dtype, n.name)
    return w, np.broadcast_to(b.real(), (n_out,)).astype(np.float64), bt.hls()


@hls4ml_op("Dense", cost=Cost(mac_row, "registered"))
def _dense(tr, n: Node):
    x = tr.graph.value(n.inputs[0])
    w, b, bt = _wb(tr, n, n.params["weight"].shape[1])
    tout = tr.vt(n.output)
    if len(x.shape) == 1:
        d = {"class_name": "Dense", "n_in": int(w.shape[0]), "n_out": int(w.shape[1]),
             "weight_data": w.real(), "bias_data": b}
        prec = {"weight": w.dtype.hls(), "bias": bt, "accum": tout.hls(), "result": tout.hls()}
        tr.bind(n.output, tr.layer(n, d, prec, [tr.src(n.inputs[0])]))
        return
    if len(x.shape) in (2, 3):  # Dense on the channel axis of a feature map = 1x1 convolution
        nd = len(x.shape) - 1
        wk = w.real().reshape((1,) * nd + w.shape)
        tr.note(f"Dense '{n.name}' on a rank-{len(x.shape)} tensor mapped to a pointwise Conv{nd}D")
        tr.conv_layer(n, wk, b, bt, w.dtype.hls(), (1,) * nd, (0,) * (2 * nd), tr.src(n.inputs[0]))
        return
    raise UnsupportedError(f"Dense on a rank-{len(x.shape)} input", n.name)


@hls4ml_op("Conv", cost=Cost(mac_row, "registered"))
def _conv(tr, n: Node):
    w = n.params["weight"]
    nd = w.data.ndim - 2
    strides, pads = _rank_pads(n, nd)
    groups = int(n.attrs.get("groups", 1))
    _, b, bt = _wb(tr, n, w.shape[-1])
    wr = w.real()
    dil = conv_dilations(n, nd)
    if any(d != 1 for d in dil):
        # hls4ml convolutions have no dilation: the equivalent zero-inserted kernel, exact
        wr = dilate_kernel(wr, dil)
        tr.note(f"dilated Conv '{n.name}' (dilations={dil}) mapped to a convolution with the zero-inserted "
                f"{'x'.join(map(str, wr.shape[:nd]))} kernel (exact; the zeros are counted by the estimate)")
    if is_depthwise(n):
        # depthwise (groups == C_in == C_out): hls4ml's DepthwiseConv layers, one k-tap filter per
        # channel, where hls4ml 1.3 allows it (emits_depthwise); else the block-diagonal dense
        # kernel below, with a note.
        if emits_depthwise(tr.graph, n, tr.strategy):
            tr.depthwise_layer(n, wr, b, bt, w.dtype.hls(), strides, pads, tr.src(n.inputs[0]))
            return
        why = (f"hls4ml's DepthwiseConv does not support the {tr.strategy} strategy" if tr.strategy != "Latency" else
               "hls4ml 1.3's DepthwiseConv1D and DepthwiseConv2D headers share an include guard and the model also "
               "has a 2-D depthwise convolution")
        tr.note(f"depthwise Conv '{n.name}': {why}; emitted as a dense convolution with a block-diagonal kernel")
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
        tr.note(f"grouped Conv '{n.name}' (groups={groups}) mapped to one convolution with a "
                "block-diagonal kernel (exact zeros between groups)")
    tr.conv_layer(n, wr, b, bt, w.dtype.hls(), strides, pads, tr.src(n.inputs[0]))


# ----------------------------------------------------------------------------- activations, casts
def _relu_cost(ctx, node):
    """A12: ``x > 0 ? x : 0`` is a comparison of the input (one LUT per input bit) and a select
    of the output (one LUT per output bit)."""
    size, ob = _out_bits(ctx, node)
    ib = width(ctx.graph.value(node.inputs[0]).dtype)
    return chained(ctx, size * (ib + ob), 0, 2 * T_LUT_NS)


@hls4ml_op("Relu", cost=Cost(_relu_cost))
def _relu(tr, n: Node):
    cons = tr.graph.consumers(n.output)
    tout = tr.vt(n.output)
    out_value = n.output
    if (len(cons) == 1 and cons[0].op == "Quantize" and n.output not in tr.graph.outputs
            and not _needs_widen(tout, tr.vt(cons[0].output))):
        q = cons[0]
        tout, out_value = tr.vt(q.output), q.output
        tr.skip.add(q.name)
        tr.result.node_layers[q.name] = []
        tr.note(f"fused Relu '{n.name}' + Quantize '{q.name}' into one relu layer with result {tout.hls()}")
    lay = tr.layer(n, {"class_name": "Activation", "activation": "relu"}, {"result": tout.hls()},
                   [tr.src(n.inputs[0])])
    tr.bind(out_value, lay)


@hls4ml_op("LeakyRelu", cost=Cost(_relu_cost))
def _leaky_relu(tr, n: Node):
    """``nnet_activation.h`` ``leaky_relu``: ``x > 0 ? (res_T)x : (res_T)(alpha * x)`` with ``alpha``
    of type ``param_T``.  ``alpha = 2**-shift`` is exact in ``ap_ufixed<shift+1,1>``, the product is
    exact (ap_fixed multiplies at full precision) and ``res_T`` is the IR's exact output type, so
    no step rounds."""
    s = int(n.attrs["shift"])
    d = {"class_name": "LeakyReLU", "activation": "LeakyReLU", "activ_param": 2.0 ** -s}
    prec = {"param": f"ap_ufixed<{s + 1},1>", "result": tr.vt(n.output).hls()}
    tr.bind(n.output, tr.layer(n, d, prec, [tr.src(n.inputs[0])]))


def _quantize_cost(ctx, node):
    """A12: rounding other than TRN adds an adder, saturation other than WRAP a comparator+mux."""
    size, ob = _out_bits(ctx, node)
    src = ctx.graph.value(node.inputs[0]).dtype
    to = node.attrs["to"]
    lut, t = 0.0, 0.0
    if isinstance(src, FixedType) and src.frac_bits > to.frac_bits and to.rounding != "TRN":
        lut += size * ob
        t += t_add(ob)
    if to.saturation != "WRAP":  # compare the input against the range, select the output
        lut += size * (width(src) + ob)
        t += T_LUT_NS
    return chained(ctx, lut, 0, t)


@hls4ml_op("Quantize", cost=Cost(_quantize_cost))
def _quantize(tr, n: Node):
    tin, tout = tr.vt(n.inputs[0]), tr.vt(n.output)
    if tin == tout:  # identical cast: hls4ml would drop the linear layer anyway
        tr.bind(n.output, tr.src(n.inputs[0]))
        tr.result.node_layers[n.name] = []
        return
    src = tr.src(n.inputs[0])
    if _needs_widen(tin, tout):
        # ap_fixed's rounding reads the bit just below the new LSB; when the cast drops at
        # least as many fraction bits as the input has, that bit lies beyond the input's MSB
        # and ap_private asserts ("Attempting to read bit beyond MSB").  Sign-extend first
        # (exact: only integer bits are added), then round.
        shift = tin.frac_bits - tout.frac_bits
        w = shift + 2
        tmid = FixedType(w, tin.int_bits + (w - tin.width), tin.signed)
        src = tr.layer(n, {"class_name": "Activation", "activation": "linear", "base": f"{n.name}_widen"},
                       {"result": tmid.hls()}, [src])
        tr.note(f"Quantize '{n.name}': sign-extended to {tmid.hls()} before rounding")
    tr.bind(n.output, tr.layer(n, {"class_name": "Activation", "activation": "linear"},
                               {"result": tout.hls()}, [src]))


def _free(ctx, node):
    """Wires: no logic, no delay (A12: Reshape, Transpose, Concat; Sign is the sign bit)."""
    return chained(ctx, 0, 0, 0.0)


@hls4ml_op("Sign", cost=Cost(_free))
def _sign(tr, n: Node):
    tr.bind(n.output, tr.layer(n, {"class_name": "Activation", "activation": "binary_tanh"},
                               {"result": "ap_int<2>"}, [tr.src(n.inputs[0])]))


# ----------------------------------------------------------------------------- arithmetic
def _merge(tr, n: Node, op: str):
    """hls4ml Merge layers need equal shapes: a broadcast operand is first repeated to the output
    shape (:meth:`~.translate.Translator.broadcast_to`, exact)."""
    shape = tr.graph.value(n.output).shape
    srcs = [tr.broadcast_to(n, i, shape) for i in n.inputs]
    tr.bind(n.output, tr.layer(n, {"class_name": "Merge", "op": op}, {"result": tr.vt(n.output).hls()}, srcs))


def _add_cost(ctx, node):
    size, ob = _out_bits(ctx, node)
    return chained(ctx, size * ob, 0, t_add(ob))  # A12: an adder per element


@hls4ml_op("Add", cost=Cost(_add_cost))
def _add(tr, n: Node):
    _merge(tr, n, "add")


def _mul_cost(ctx, node):
    """A3/A4 for run-time x run-time products: DSPs when the deciding operand is >= 9 bits."""
    size, _ = _out_bits(ctx, node)
    a, b = (ctx.graph.value(i).dtype for i in node.inputs)
    wa, wb = width(a), width(b)
    wide = max(wa, wb) if ctx.opts["dsp_rule"] == "csd_wider" else min(wa, wb)  # A3: run-time operands
    if wide >= DSP_MIN_BITS:
        return chained(ctx, 0.0, size * dsps_per_mult(wa, wb, ctx.part["dsp_width"]), T_DSP_NS)
    return chained(ctx, size * LUT_PER_PP_BIT * wa * wb, 0, t_add(wa + wb) * 2)


@hls4ml_op("Mul", cost=Cost(_mul_cost))
def _mul(tr, n: Node):
    _merge(tr, n, "multiply")


def _affine_cost(ctx, node):
    """A12: scale multipliers by constants follow A2-A4, the bias an adder per element."""
    graph = ctx.graph
    size, ob = _out_bits(ctx, node)
    xin = graph.value(node.inputs[0])
    xb = width(xin.dtype)
    sc = node.params.get("scale")
    c = xin.shape[-1] if xin.shape else 1
    per = size // max(c, 1)
    lut, dsp, t = 0.0, 0, 0.0
    if sc is not None:
        codes = np.broadcast_to(sc.data.reshape(-1), (c,))
        d = csd_digits(codes)
        bl = bitlen(codes)
        on_dsp, cw = dsp_mask(codes, d, xb, sc.dtype.width, ctx.opts["dsp_rule"])
        if on_dsp.any():
            xt = xin.dtype
            xs = xb + (0 if isinstance(xt, FixedType) and xt.signed else 1 if isinstance(xt, FixedType) else 0)
            dsp = per * int(np.sum(dsps_per_mult_arr(xs, cw[on_dsp], ctx.part["dsp_width"])))
            t = T_DSP_NS
        lut += per * float(np.sum(np.where(on_dsp, 0, np.maximum(d - 1, 0) * (xb + bl))))
        if (~on_dsp & (d >= 2)).any():
            t = max(t, t_add(xb + sc.dtype.width) * 2)
    if node.params.get("bias") is not None:
        lut += size * ob
        t += t_add(ob)
    return chained(ctx, lut, dsp, t)


@hls4ml_op("Affine", cost=Cost(_affine_cost))
def _affine(tr, n: Node):
    x = tr.graph.value(n.inputs[0])
    c = x.shape[-1] if x.shape else 1
    s, b = n.params.get("scale"), n.params.get("bias")
    sd = np.broadcast_to(s.real().reshape(-1), (c,)) if s is not None else np.ones(c)
    bd = np.broadcast_to(b.real().reshape(-1), (c,)) if b is not None else np.zeros(c)
    st = tr.fixed(s.dtype, n.name).hls() if s is not None else BIT
    bt = tr.fixed(b.dtype, n.name).hls() if b is not None else BIT
    tr.bn_layer(n, x.size, c, sd, bd, st, bt, tr.vt(n.output), tr.src(n.inputs[0]), n.output)


# ----------------------------------------------------------------------------- layout
@hls4ml_op("Concat", cost=Cost(_free))
def _concat(tr, n: Node):
    rank = len(tr.graph.value(n.inputs[0]).shape)
    if not 1 <= rank <= 3:
        raise UnsupportedError(f"Concat of rank-{rank} tensors (hls4ml: 1..3)", n.name)
    ax = int(n.attrs.get("axis", -1)) % rank
    tout = tr.vt(n.output)
    cur = tr.src(n.inputs[0])
    for i, v in enumerate(n.inputs[1:]):  # hls4ml Concatenate takes two inputs: chain them
        d = {"class_name": "Concatenate", "op": f"concatenate{rank}d", "axis": ax - rank}
        if i < len(n.inputs) - 2:
            d["base"] = f"{n.name}_part{i}"
        cur = tr.layer(n, d, {"result": tout.hls()}, [cur, tr.src(v)])
    tr.bind(n.output, cur)


@hls4ml_op("Reshape", cost=Cost(_free))
def _reshape(tr, n: Node):
    shape = [int(s) for s in n.attrs["shape"]]
    cls = "Reshape"
    xin = tr.graph.value(n.inputs[0]).shape
    if tr.io_type == "io_stream" and len(shape) == 1 and len(xin) > 1 and xin[-1] != shape[0] and \
            any(c.op != "Dense" for c in tr.graph.consumers(n.output)):
        # hls4ml 1.3 keeps a flatten in io_stream as an alias of its input stream (its ReshapeStream
        # pass skips 1-D outputs, fpga/passes/repack_stream.py): only a Dense reads such a stream
        # right.  An elementwise consumer reads words of the flat width from words of the input's
        # last-axis width (nnet_activation_stream.h ``linear``: ``out_data[j] = in_data[j]`` for
        # j < res_T::size), which gave wrong outputs and "Hls::stream contains leftover data".
        # hls4ml's own Repack layer (``nnet::repack_stream``) re-packs the words exactly.
        cls = "Repack"
        tr.note(f"flatten '{n.name}' in io_stream feeds a non-Dense layer: emitted as an hls4ml Repack")
    tr.bind(n.output, tr.layer(n, {"class_name": cls, "target_shape": shape},
                               {"result": tr.vt(n.output).hls()}, [tr.src(n.inputs[0])]))


@hls4ml_op("Transpose", cost=Cost(_free))
def _transpose(tr, n: Node):
    tr.bind(n.output, tr.layer(n, {"class_name": "Transpose", "perm": [int(p) for p in n.attrs["perm"]]},
                               {"result": tr.vt(n.output).hls()}, [tr.src(n.inputs[0])]))


# ----------------------------------------------------------------------------- pooling
def _avg(tr, n: Node, make_dict, count: int, divisors=None):
    """Average pooling of ``count`` elements per window (``divisors``: every window's own count when
    padding is excluded from it), exact (see the module docstring)."""
    x = tr.graph.value(n.inputs[0])
    t: FixedType = x.dtype
    tout = tr.vt(n.output)
    k = avg_shift(count)
    src = tr.src(n.inputs[0])
    shift = 0
    pow2 = all(int(d) & (int(d) - 1) == 0 for d in np.unique(divisors if divisors is not None else count))
    if t.signed and not pow2 and t.min_code < 0:
        # shift codes to >= 0 so that hls4ml's truncating division is a floor
        shift = -t.min_code
        tpos = fixed_for_range(0, t.max_code + shift, t.frac_bits)
        c = x.shape[-1]
        src = tr.bn_layer(n, x.size, c, np.ones(c), np.full(c, shift * t.lsb), BIT,
                          fixed_for_range(shift, shift, t.frac_bits).hls(), tpos, src, None, base=f"{n.name}_offset")
        lo, hi = 0, t.max_code + shift
        tr.note(f"average pool '{n.name}': signed input shifted by +{shift} codes so that hls4ml's "
                "truncating division equals the floor (shifted back afterwards)")
    else:
        lo, hi = t.min_code, t.max_code
    accum = fixed_for_range(min(lo, 0) * count << k, hi * count << k, t.frac_bits + k)
    if shift:
        mid = fixed_for_range(lo << k, hi << k, t.frac_bits + k)
        lay = tr.layer(n, make_dict(), {"accum": accum.hls(), "result": mid.hls()}, [src])
        off = -(shift << k)
        c = x.shape[-1]
        tr.bn_layer(n, tr.graph.value(n.output).size, c, np.ones(c), np.full(c, off * mid.lsb), BIT,
                    fixed_for_range(off, off, mid.frac_bits).hls(), tout, lay, n.output, base=f"{n.name}_unshift")
    else:
        tr.bind(n.output, tr.layer(n, make_dict(), {"accum": accum.hls(), "result": tout.hls()}, [src]))


def _avg_cost(ctx, node, n: int):
    size, ob = _out_bits(ctx, node)  # A12: an adder tree of n inputs per output
    return chained(ctx, size * (n - 1) * ob, 0, math.ceil(math.log2(max(n, 2))) * t_add(ob))


@hls4ml_op("AvgPool", cost=Cost(lambda ctx, node: _avg_cost(ctx, node, int(np.prod(node.attrs["kernel"])))))
def _avgpool(tr, n: Node):
    x = tr.graph.value(n.inputs[0])
    k = tuple(int(v) for v in n.attrs["kernel"])
    s, p = _rank_pads(n, len(k))
    if any(p) and tr.io_type == "io_stream":
        raise UnsupportedError("padded AvgPool in io_stream (hls4ml's streaming pooling has no padding)", n.name)
    if not any(p) and all(kv == 1 for kv in k) and tr.io_type == "io_stream" and tuple(s) != k:
        tr.subsample_layer(n, s, tr.src(n.inputs[0]))  # the average of one element is the element
        return
    # count_pad=False: nnet_pooling.h divides each window by its number of non-padding pixels
    _avg(tr, n, lambda: {**tr.pool_dict(n, "Average", x.shape, k, s, p, tr.graph.value(n.output).shape),
                         "count_pad": False}, int(np.prod(k)), window_counts(n, x.shape) if any(p) else None)


@hls4ml_op("GlobalAvgPool", cost=Cost(lambda ctx, node: _avg_cost(
    ctx, node, int(np.prod(ctx.graph.value(node.inputs[0]).shape[:-1])))))
def _global_avgpool(tr, n: Node):
    x = tr.graph.value(n.inputs[0])
    if len(x.shape) == 2:
        mk = lambda: {"class_name": "GlobalAveragePooling1D", "data_format": "channels_last",  # noqa: E731
                      "n_in": x.shape[0], "n_filt": x.shape[1]}
    elif len(x.shape) == 3:
        mk = lambda: {"class_name": "GlobalAveragePooling2D", "data_format": "channels_last",  # noqa: E731
                      "in_height": x.shape[0], "in_width": x.shape[1], "n_filt": x.shape[2]}
    else:
        raise UnsupportedError(f"GlobalAvgPool over a rank-{len(x.shape)} input", n.name)
    _avg(tr, n, mk, int(np.prod(x.shape[:-1])))


# ----------------------------------------------------------------------------- float ops
def _softmax_cost(ctx, node):
    """A13: hls4ml's ``softmax_latency`` (only with ``softmax_on_device``; else a host row)."""
    if not ctx.opts["softmax_on_device"]:
        return {"host": True}
    n = ctx.graph.value(node.output).shape[-1]
    rows = ctx.graph.value(node.output).size // max(n, 1)
    tb = 18  # hls4ml default exp/inv table type ap_fixed<18,8> (A13)
    return {"lut": int(round(ctx.lut_factor * rows * (n - 1) * tb)), "ff": rows * 3 * n * tb,
            "dsp": rows * n * dsps_per_mult(tb, tb, ctx.part["dsp_width"]), "bram_18k": rows * (math.ceil(n / 2) + 1),
            "latency_cycles": 3, "ii_cycles": 1}


TRANSLATE.reject("Softmax", "float32 op: it runs on the host after the fixed-point core (hls4ml's softmax is "
                            "a lookup-table approximation, not bit-exact)")
ESTIMATE.set("Softmax", Cost(_softmax_cost, "standalone"))
TRANSLATE.reject("FloatQuant", "float32 minifloat quantizer: hls4ml has no minifloat rounding layer, so it runs on the "
                               "host in the float prologue/epilogue (a FloatQuant between fixed-point layers is refused)")
ESTIMATE.set("FloatQuant", Cost(lambda ctx, node: {"host": True}, "standalone"))
TRANSLATE.reject("TopK", "label select with float32 indices: it runs on the host in the float epilogue (hls4ml has "
                         "no top-k layer)")
ESTIMATE.set("TopK", Cost(lambda ctx, node: {"host": True}, "standalone"))

for _op, (_fn, _cost) in _BATCH_A.items():
    hls4ml_op(_op, cost=_cost)(_fn)
