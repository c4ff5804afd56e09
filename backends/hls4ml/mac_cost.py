"""FPGA estimate row of the multiply-accumulate layers (Dense, Conv) for the hls4ml estimator.

Implements assumptions A1-A11 of :mod:`qdeploy.backends.hls4ml.estimate` (multipliers by
constant weights, adder trees, reuse factor, Latency/Resource strategies, io_parallel/io_stream,
timing and registers); the constants and DSP/CSD rules are in :mod:`.resources`.
"""
from __future__ import annotations

import math

import numpy as np

from ...compiler.errors import UnsupportedError
from ...compiler.ir.ops.kernels import dilate_kernel
from ...compiler.ir.ops.linear import conv_dilations
from ...compiler.ir.types import FixedType
from .resources import (DSP_MIN_BITS, HLS_FF_FACTOR, LUT_PER_PP_BIT, T_DSP_NS, EstimateContext, bitlen,
                        csd_digits, dsp_mask, dsps_per_mult, dsps_per_mult_arr, t_add)
from ...compiler.ir.modules import node_keyed
from .settings import check_reuse_factor_keys, closest_reuse_factor, requested_reuse_factor
from .stream import bram18_count, padded_shape, pixels




def is_depthwise(node) -> bool:
    """A Conv with groups == C_in == C_out (weight (*k, 1, C))."""
    if node.op != "Conv":
        return False
    w = node.params["weight"]
    g = int(node.attrs.get("groups", 1))
    return g > 1 and w.shape[-2] == 1 and w.shape[-1] == g


def emits_depthwise(graph, node, strategy: str) -> bool:
    """True when the hls4ml translation of depthwise Conv ``node`` is a DepthwiseConv1D/2D layer
    (one k-tap filter per channel) rather than a dense convolution with a block-diagonal kernel:
    hls4ml 1.3's depthwise kernels assert on the Resource strategy (``nnet_sepconv{1,2}d.h``), and
    ``nnet_sepconv1d_latency.h`` / ``nnet_sepconv2d_latency.h`` share the include guard
    ``NNET_SEPARABLE_CONV2D_LATENCY_H_``, so a 1-D one is dense when the graph has a 2-D one."""
    if not is_depthwise(node) or strategy != "Latency":
        return False
    nd = node.params["weight"].data.ndim - 2
    return nd == 2 or not any(is_depthwise(m) and m.params["weight"].data.ndim == 4 for m in graph.nodes)


def kernel_codes(graph, node, strategy: str) -> np.ndarray:
    """The ``[n_in, n_out]`` weight codes of the hls4ml layer emitted for Dense/Conv ``node``: the
    IR kernel, except that a grouped Conv hls4ml cannot take as a DepthwiseConv
    (:func:`emits_depthwise`) is a dense kernel with exact zeros between the groups, and a dilated
    kernel is zero-inserted (that is what the translation writes, and what the Resource strategy
    stores and multiplies)."""
    w = node.params["weight"].data
    if node.op == "Conv":  # a dilated kernel is emitted zero-inserted (ops._conv): count its zeros
        w = dilate_kernel(w, conv_dilations(node, w.ndim - 2))
    g = int(node.attrs.get("groups", 1)) if node.op == "Conv" else 1
    if g == 1 or emits_depthwise(graph, node, strategy):
        return w.reshape(-1, w.shape[-1])
    cin_g, cout = w.shape[-2], w.shape[-1]
    cout_g = cout // g
    full = np.zeros(w.shape[:-2] + (cin_g * g, cout), dtype=w.dtype)
    for gi in range(g):
        full[..., gi * cin_g:(gi + 1) * cin_g, gi * cout_g:(gi + 1) * cout_g] = w[..., gi * cout_g:(gi + 1) * cout_g]
    return full.reshape(-1, cout)


def layer_reuse_factors(graph, strategy: str, reuse_factor) -> dict:
    """``{node: {"requested", "used", "n_in", "n_out"}}`` for every Dense/Conv node of ``graph``
    (the hls4ml layer's kernel size from :func:`kernel_codes`; legalized by :func:`.settings.closest_reuse_factor`)."""
    names = [n.name for n in graph.nodes if n.op in ("Dense", "Conv")]
    reuse_factor = node_keyed(reuse_factor, graph, names)  # PyTorch module names -> IR node names
    check_reuse_factor_keys(reuse_factor, names, graph)
    out = {}
    for n in graph.nodes:
        if n.op not in ("Dense", "Conv"):
            continue
        n_in, n_out = kernel_codes(graph, n, strategy).shape
        req = requested_reuse_factor(reuse_factor, n.name)
        out[n.name] = {"requested": req, "used": closest_reuse_factor(n_in, n_out, req, strategy),
                       "n_in": int(n_in), "n_out": int(n_out)}
    return out


def mac_row(ctx: EstimateContext, node) -> dict:
    """Estimate row of a Dense or Conv ``node`` (A1-A11): ``lut``, ``ff``, ``dsp``, ``bram_18k``,
    ``latency_cycles``, ``ii_cycles`` and a ``detail`` dict (operand widths, products that are
    zero / a shift / on LUTs / on DSPs, adders).

    Raises:
        UnsupportedError: float input, weight or output (quantize it first).
        QDeployError: a reuse factor that is not an integer >= 1 (one hls4ml cannot implement is
            replaced by the one it builds, :func:`.settings.closest_reuse_factor`; the detail keeps
            both).
    """
    graph, opts, part, period_eff = ctx.graph, ctx.opts, ctx.part, ctx.period_eff
    x = graph.value(node.inputs[0])
    w = node.params["weight"]
    bias = node.params.get("bias")
    out = graph.value(node.output)
    if not (isinstance(x.dtype, FixedType) and isinstance(w.dtype, FixedType) and isinstance(out.dtype, FixedType)):
        raise UnsupportedError(f"{node.op} on float data cannot be estimated for hls4ml (quantize it first)", node.name)
    xb, wb = x.dtype.width, w.dtype.width
    acc_t = opts["accum_type"] or out.dtype
    ab = acc_t.width
    rb = acc_t.width if opts["accum_type"] else out.dtype.width  # registered layer result
    codes = kernel_codes(graph, node, opts["strategy"])  # [n_in, n_out] of the emitted hls4ml layer
    n_in, n_out = codes.shape
    positions = int(np.prod(out.shape[:-1], dtype=np.int64)) if len(out.shape) > 1 else 1
    names = [n.name for n in graph.nodes if n.op in ("Dense", "Conv")]
    rf_map = node_keyed(opts["reuse_factor"], graph, names)  # PyTorch module names -> IR node names
    check_reuse_factor_keys(rf_map, names, graph)  # a misspelt layer is an error, never ignored
    rf_req = requested_reuse_factor(rf_map, node.name)
    resource = opts["strategy"] == "Resource"
    rf = closest_reuse_factor(n_in, n_out, rf_req, opts["strategy"])  # what hls4ml builds (settings.py)

    digits = csd_digits(codes)
    blen = bitlen(codes)
    zero = codes == 0
    shift = digits == 1  # A2: +-2**k (and, with A1, binary/ternary weights) -> free
    mult = digits >= 2   # a real ``mul`` survives in the HLS IR (A3)
    on_dsp_mask, cw = dsp_mask(codes, digits, xb, wb, opts["dsp_rule"])
    on_lut = mult & ~on_dsp_mask
    n_zero, n_free = int(zero.sum()), int(shift.sum())
    n_dsp, n_lut = int(on_dsp_mask.sum()), int(on_lut.sum())
    on_dsp = n_dsp > 0
    # product bits that survive the cast to accum_t (A5: low fraction bits below accum_t's LSB drop)
    drop = max(0, x.dtype.frac_bits + w.dtype.frac_bits - acc_t.frac_bits)
    pbits = np.clip(xb + blen + 1 - drop, 1, ab)
    # A4: a LUT multiplier by a constant is (CSD digits - 1) shift-and-add adders
    lutmul = int(np.sum((digits[on_lut] - 1) * np.maximum(xb + blen[on_lut] + 1 - drop, 1)))
    xs = xb + (0 if x.dtype.signed else 1)  # the DSP ports are signed: an unsigned operand needs a bit more
    dsp_units = int(np.sum(dsps_per_mult_arr(xs, cw[on_dsp_mask], part["dsp_width"]))) if on_dsp else 0
    add1_luts, sel_luts = 0, 0
    terms = np.count_nonzero(~zero, axis=0) + (
        (np.broadcast_to(bias.data, (n_out,)) != 0).astype(np.int64) if bias is not None else 0)
    adders = int(np.sum(np.maximum(terms - 1, 0)))
    # adder tree bits (A5): level l adds values of at most (widest product + l) bits, capped at accum_t
    pw = np.where(zero, 0, pbits).max(axis=0) if n_in else np.zeros(n_out, dtype=np.int64)
    left = terms.astype(np.int64).copy()
    adder_bits = 0
    lvl = 0
    while (left > 1).any():
        lvl += 1
        adder_bits += int(np.sum((left // 2) * np.minimum(ab, pw + lvl)))
        left = (left + 1) // 2
    depth = int(max(math.ceil(math.log2(t)) if t > 1 else 0 for t in terms)) if n_out else 0

    # ---- sharing (A7/A8/A9): units are divided by the reuse factor
    share = rf
    if resource:
        block = math.ceil(n_in * n_out / rf)
        if rf == 1:  # weights fully partitioned constants (no ROM pragma at RF 1): A2/A3 hold
            dsp = dsp_units
            mult_luts = add1_luts + lutmul + sel_luts
        else:  # A8: weights come from a ROM -> block_factor general x * w multipliers, declared widths
            lane_dsp = (max(xb, wb) if opts["dsp_rule"] == "csd_wider" else min(xb, wb)) >= DSP_MIN_BITS
            ws = wb + (0 if w.dtype.signed else 1)
            dsp = block * dsps_per_mult(xs, ws, part["dsp_width"]) if lane_dsp else 0
            mult_luts = 0 if lane_dsp else math.ceil(block * LUT_PER_PP_BIT * xb * wb)
        acc_luts = min(block, adders) * ab  # one accumulator adder per MAC lane
        mux_luts = (block * xb) * math.ceil((rf - 1) / 3) if rf > 1 else 0
        rom_bits = n_in * n_out * wb
        depth_rom = rf
        if rf > 1 and rom_bits >= 1024:  # ROM_nP_BRAM: block RAM whatever its depth (A8)
            bram = bram18_count(block * wb, depth_rom)  # A18: cheapest RAMB18 aspect ratio
            rom_luts = 0
        else:
            bram = 0
            rom_luts = math.ceil(block * wb * math.ceil(depth_rom / 64)) if rf > 1 else 0
        luts = ctx.lut_factor * (mult_luts + acc_luts) + mux_luts + rom_luts
        mstages = 1 if (dsp or mult_luts) else 0
        layer_cycles = rf + mstages + 2
        ff = n_out * ab + n_out * out.dtype.width
        if rf > 1:  # A11: the II=1 MAC loop registers each lane's selected input, weight word and partial sum
            ff += block * (xb + wb + ab + (0 if dsp > 0 else xb + wb))
        ii = rf
    else:
        dsp = math.ceil(dsp_units / share)
        mult_luts = math.ceil((add1_luts + lutmul + sel_luts) / share)
        acc_luts = math.ceil(adder_bits / share)
        n_units = math.ceil((n_dsp + n_lut) / share) + math.ceil(adders / share)
        mux_luts = n_units * max(xb, ab) * math.ceil((share - 1) / 3) if share > 1 else 0
        luts = ctx.lut_factor * (mult_luts + acc_luts) + mux_luts
        bram = 0
        rom_luts = 0
        # ---- timing (A10)
        if on_dsp:
            t_mult = T_DSP_NS
        elif n_lut:  # a balanced shift-and-add tree of (digits - 1) adders
            t_mult = math.ceil(math.log2(int(digits[on_lut].max()))) * t_add(xb + wb)
        else:
            t_mult = 0.0
        t_lvl = t_add(ab)
        path = t_mult + depth * t_lvl
        base = max(1, math.ceil(path / period_eff - 1e-9))
        # ---- registers (A11)
        ff = n_out * rb
        for j in range(1, base):
            tcut = j * period_eff
            if tcut < t_mult:  # cut inside the multipliers
                live_bits = 0 if on_dsp else int(np.sum(~zero)) * (xb + wb)
                if on_dsp:  # DSP products stay in M/P registers; LUT-side products are registered
                    live_bits = (n_free + n_lut) * (xb + wb)
            else:
                lvl = int((tcut - t_mult) // t_lvl)
                live_bits = int(np.sum(np.ceil(terms / 2.0 ** lvl))) * ab
            ff += live_bits
        ff = math.ceil(HLS_FF_FACTOR * ff)
        layer_cycles = base + (rf - 1)
        ii = rf
    if node.op == "Conv" or positions > 1:
        # A9: one position per RF cycles (io_parallel) -- the kernel's multipliers serve all positions
        ii = ii * positions
        layer_cycles = layer_cycles + ii - rf
        if opts["io_type"] == "io_stream" and len(x.shape) > 1:
            # pixels arrive one per cycle: the layer cannot start a new sample faster
            in_pix = pixels(padded_shape(x.shape, node.attrs.get("pads")) if node.op == "Conv" else x.shape)
            if resource and node.op == "Conv":
                # nnet_conv_stream.h pipelines the pixel loop only for the Latency strategy: with
                # Resource each (padded) input pixel waits for the whole RF-cycle MAC loop
                ii = in_pix * (rf + mstages + 2)
                layer_cycles = ii
            elif in_pix > ii:
                layer_cycles += in_pix - ii
                ii = in_pix
        elif opts["io_type"] == "io_parallel" and positions > 1:
            # A11: the io_parallel result is one completely partitioned array; the positions
            # computed in earlier cycles are held in registers until the last one is done
            extra = (positions - 1) * n_out * rb
            ff += extra if resource else math.ceil(HLS_FF_FACTOR * extra)
    return {"lut": int(round(luts)), "ff": int(ff), "dsp": int(dsp), "bram_18k": int(bram),
            "latency_cycles": int(layer_cycles), "ii_cycles": int(ii),
            "detail": {"n_in": n_in, "n_out": n_out, "positions": positions, "reuse_factor": rf,
                       "reuse_factor_requested": rf_req,
                       "x_bits": xb, "w_bits": wb, "accum_bits": ab, "mults_zero": n_zero, "mults_shift": n_free,
                       "mults_lut": n_lut, "mults_dsp": n_dsp, "dsp_rule": opts["dsp_rule"],
                       "adders": adders, "adder_bits": adder_bits, "adder_tree_depth": depth}}

