"""The ``io_stream`` architecture of the hls4ml estimator: per-pixel layers, line buffers, FIFOs
between layers, BRAM_18K packing, and the dataflow latency (assumptions A15-A19 of
:mod:`qdeploy.backends.hls4ml.estimate`).

Sources (hls4ml 1.3 templates, ``templates/vivado/nnet_utils``, and the Vivado HLS 2020.1
reports of the hls4ml tutorial's SVHN CNN, ``fastmachinelearning/hls4ml-tutorial``
``archived/*/myproject_prj/solution1/syn/report/myproject_csynth.rpt``):

A15. Every io_stream layer is a dataflow process that reads one *pixel* (all channels of one
     position, ``nnet::array<T, C>``) per iteration of a ``#pragma HLS PIPELINE`` loop
     (``nnet_activation_stream.h``, ``nnet_batchnorm_stream.h``, ``nnet_merge_stream.h``,
     ``nnet_pooling_stream.h``), so its arithmetic is that of *one* pixel, reused for every
     position: the io_parallel row of an elementwise op divided by the number of pixels.  II =
     pixels; the loop adds a pipeline stage.  Its registers: the loop counter (the reports show
     3-18 FF per activation layer), not a copy of the tensor.
A16. ``conv_2d_buffer_cl`` / ``pooling2d_buffer_cl`` (``nnet_conv_stream.h``,
     ``nnet_pooling_stream.h``) keep ``K_h - 1`` rows in ``ap_shift_reg<T, in_width>
     line_buffer[K_h - 1][n_chan]`` and the window in ``kernel_data[K_h * K_w * n_chan]``:
     a line buffer at most :data:`SRL_MAX_DEPTH` words wide is counted as registers (FF, one per
     bit) and a wider one as SRL storage (UG902: an ``ap_shift_reg`` "is implemented as an SRL";
     one LUT per bit per 32 words, UG574); the window is registers.  Evidence, not a fitted
     constant: the hls4ml tutorial's Vivado HLS 2020.1 SVHN report has 3,799 FF in a 3x3 conv over
     32x32x3 16-bit data, of which 2 x 32 x 3 x 16 = 3,072 would be line buffer (counted as SRL
     LUTs its six conv rows' FF came out at 0.35-0.64 of the report, as FF at 0.72-1.65), and a
     public Vivado HLS 2019.1 report of an io_stream CNN (rows 18, 10 and 6 words wide) agrees
     (its 2x2 pool over 16-wide 8-channel 6-bit rows: 1,171 FF for 768 line-buffer and 192 window
     bits).  No reference row is wider than 32 words, so the SRL side is UG902's word, untested.
     1-D layers keep only the window.
     The layer's output pixel is registered too (``C_out x bits``), and a streaming Dense
     (``nnet_dense_stream.h``) copies its whole input and output vector into completely
     partitioned arrays (``n_in x bits + n_out x bits`` FF).  A padded Conv reads a zero-padding
     layer (hls4ml inserts ``zeropad2d_cl`` before a padded io_stream Conv,
     ``nnet_padding_stream.h``): a select per input bit and one more FIFO of the padded size; its
     line buffer spans the padded width.
A17. Every layer whose output feeds another device layer writes it to a FIFO (a flatten is no
     layer; whether a Quantize is a layer of its own is the estimator's ``casts`` option,
     :data:`qdeploy.backends.hls4ml.estimate.CASTS`).  Layers are connected by ``hls::stream``
     FIFOs of depth = pixels of the tensor (``StreamVariableConverter.convert``: ``depth =
     prod(shape) // shape[-1]``, ``backends/fpga/fpga_types.py``), hls4ml's default "most
     conservative possible depth" (hls4ml docs, I/O Types; its optional FIFO depth optimization,
     which needs co-simulation, is not modelled).  Vivado HLS builds one FIFO per channel (the reports list
     ``layerN_out_V_data_<c>_V``).  A FIFO deeper than :data:`SRL_MAX_DEPTH` goes to BRAM_18K (in
     the reports depth 16 is an SRL FIFO, depth >= 36 a BRAM one; we put the boundary at the
     SRLC32E depth), packed by :func:`bram18_count`; else its data is SRL storage (one LUT per bit
     per 32 words).  Registers: a BRAM FIFO holds its output word and three pointers/counters
     (``bits + 3 * addr`` FF, addr = ceil(log2(depth + 1)); the reports: 49 FF at 900 x 16 b, 38 at
     169 x 16 b, 33 at 36 x 16 b), an SRL FIFO ``addr + 2`` FF (7 at depth 16, 5 at depth 1-4).
     Control logic: ``3 * addr`` LUT per FIFO (two pointer incrementers and the full/empty
     compare).  Not fitted to the reports (which give FIFO LUTs only as one total).
A18. BRAM_18K aspect ratios (UG573): 512 x 36, 1K x 18, 2K x 9, 4K x 4, 8K x 2, 16K x 1; a memory
     of ``width x depth`` bits takes the cheapest tiling (:func:`bram18_count`).  Used for FIFOs
     and for the Resource strategy's weight ROMs (A8).
A19. Dataflow latency: the layers overlap, so the design's latency is the longest layer interval
     (``max II``: the layer that reads the most pixels) plus every layer's pipeline depth
     (latency - II) plus one cycle per FIFO; its II is the largest layer II (the reports: latency
     1044, interval 1028 for a 32 x 32 input).
"""
from __future__ import annotations

import math

import numpy as np

#: Deepest FIFO kept in shift registers (an SRLC32E holds 32 words per LUT, UG574); deeper -> BRAM_18K (A17).
SRL_MAX_DEPTH = 32
#: (width, depth) configurations of one BRAM_18K: the RAMB18E2 port aspect ratios (UG573, UltraScale
#: Architecture Memory Resources; the 7-series RAMB18E1 has the same ones, UG473).
BRAM18_SHAPES = ((36, 512), (18, 1024), (9, 2048), (4, 4096), (2, 8192), (1, 16384))
#: Ops hls4ml's io_stream implements without a layer of their own (no FIFO after them): a flatten
#: keeps its input stream (``ReshapeStream`` skips 1-D outputs, ``fpga/passes/repack_stream.py``).
NO_LAYER_OPS = ("Reshape",)


def bram18_count(width_bits: int, depth: int) -> int:
    """BRAM_18K blocks for a ``width_bits x depth`` memory: the cheapest tiling by the RAMB18
    aspect ratios of :data:`BRAM18_SHAPES` (A18); 0 for an empty memory.

    >>> bram18_count(16, 900), bram18_count(6, 900), bram18_count(256, 64)
    (1, 1, 8)
    """
    if width_bits <= 0 or depth <= 0:
        return 0
    return min(math.ceil(width_bits / w) * math.ceil(depth / d) for w, d in BRAM18_SHAPES)


def addr_bits(depth: int) -> int:
    """Bits of a pointer/counter over ``depth`` entries (``ceil(log2(depth + 1))``, at least 1)."""
    return max(1, math.ceil(math.log2(depth + 1)))


def fifo_cost(channels: int, bits: int, depth: int) -> dict:
    """LUT / FF / BRAM_18K of the FIFOs of one io_stream tensor: ``channels`` FIFOs of ``bits``-bit
    words, ``depth`` deep (A17).  Returns ``{"lut", "ff", "bram_18k", "depth", "kind"}`` (kind
    ``"bram"`` or ``"srl"``)."""
    a = addr_bits(depth)
    if depth > SRL_MAX_DEPTH:
        return {"lut": channels * 3 * a, "ff": channels * (bits + 3 * a),
                "bram_18k": channels * bram18_count(bits, depth), "depth": depth, "kind": "bram"}
    return {"lut": channels * (bits * math.ceil(depth / 32) + 3 * a), "ff": channels * (a + 2), "bram_18k": 0,
            "depth": depth, "kind": "srl"}


def pixels(shape) -> int:
    """Positions of a channels-last tensor (all but the last axis; 1 for a flat vector)."""
    return int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1


def window_buffers(kernel, in_shape, bits: int) -> dict:
    """Line buffer and window of a streaming Conv / pool over ``in_shape`` (A16, the padded input
    of a padded Conv): ``{"lut", "ff", "line_bits", "window_bits"}`` -- ``K_h - 1`` shift
    registers of ``in_width`` words per channel (2-D only; registers when ``in_width <=``
    :data:`SRL_MAX_DEPTH`, else SRL storage, one LUT per bit per 32 words) and ``prod(kernel) * C``
    window registers."""
    c = in_shape[-1]
    k = tuple(int(v) for v in kernel)
    win = int(np.prod(k)) * c * bits
    lines = max(k[0] - 1, 0) if len(k) == 2 and len(in_shape) == 3 else 0
    width = int(in_shape[1]) if lines else 0
    line = lines * c * bits * width
    if width <= SRL_MAX_DEPTH:
        return {"lut": 0, "ff": win + line, "line_bits": line, "window_bits": win}
    return {"lut": lines * c * bits * math.ceil(width / 32), "ff": win, "line_bits": line, "window_bits": win}


def padded_shape(shape, pads) -> tuple:
    """Shape of a channels-last 2-D tensor after ``pads = (top, left, bottom, right)`` (ONNX order
    ``(x1_begin, x2_begin, x1_end, x2_end)``), or ``shape`` for another rank."""
    if isinstance(pads, int):
        pads = (pads,) * 4
    if len(shape) != 3 or not pads or not any(pads):
        return tuple(shape)
    t, l, b, r = (int(p) for p in pads)
    return (shape[0] + t + b, shape[1] + l + r, shape[2])


def stream_elementwise(row: dict, out_shape, in_shape) -> dict:
    """An io_parallel row of a per-element op turned into its io_stream process (A15): LUT and DSP
    of one pixel, II = pixels read, one pipeline stage, the loop counter's registers."""
    n_pix = max(pixels(out_shape), 1)
    n_in = max(pixels(in_shape), 1) if in_shape is not None else n_pix
    r = dict(row)
    r["lut"] = math.ceil(row["lut"] / n_pix)
    r["dsp"] = math.ceil(row["dsp"] / n_pix)
    r["ff"] = 2 * addr_bits(n_in)
    r["ii_cycles"] = n_in
    r["latency_cycles"] = n_in + max(row.get("latency_cycles", 0), 1)
    return r


def dataflow_latency(rows: list[dict], n_fifos: int) -> tuple[int, int]:
    """(latency, II) in cycles of an io_stream design from its device layer rows (A19)."""
    if not rows:
        return 0, 1
    ii = max(int(r["ii_cycles"]) for r in rows)
    depth = sum(max(int(r["latency_cycles"]) - int(r["ii_cycles"]), 0) for r in rows)
    return ii + depth + n_fifos, ii
