"""Gate-equivalent ASIC estimate (area, power, energy per inference, latency) of an IR graph.

``estimate(graph, config) -> dict`` with ``total`` and per-node ``layers``, each holding
``area_mm2``, ``power_mw``, ``energy_nj``, ``latency_cycles``, ``latency_ns``, ``ii_cycles``,
``ff`` (physical flip-flops, three per bit with TMR) and ``ge`` (gate equivalents); the
FPGA-only keys ``lut``, ``dsp`` and ``bram_18k`` are present and ``None`` (JSON ``null``; tables
leave them out or print ``-``).  An estimate, not synthesis: its measured error on the ECON-T
encoder is printed by ``benchmarks/asic_econt.py`` (``../shared/refs/asic_econt.csv``) and
carried in every result's ``note`` (:data:`MEASURED_ERROR`).

Architecture assumed (what HLS-for-ASIC flows such as Catapult produce for small on-detector
networks, e.g. ECON-T, arXiv 2105.01683): fully spatial -- every multiply of every output
position has its own multiplier, the whole network is combinational between an input and an
output register, one inference per clock (II = 1) unless the critical path needs more cycles.

Assumptions and constants (with sources):
  B1. Cell areas in gate equivalents (1 GE = one NAND2_X1), from the Nangate 45 nm Open Cell
      Library (NAND2_X1 0.798 um^2, AND2_X1 1.064, FA_X1 4.256, DFF_X1 4.522 um^2):
      AND2 = 1.33 GE, full adder = 5.33 GE, D flip-flop = 5.67 GE.
  B2. A W-bit adder is W full adders (ripple carry; synthesis at a relaxed clock keeps it).
      An a x b multiplier with a run-time operand is an array multiplier: a*b AND2 + (a-1)*b
      full adders (Baugh-Wooley for signed).  With ``weights="constant"`` a product by a known
      weight code ``c`` costs (CSD digits(c) - 1) adders of ``a + bitlen(c)`` bits (zero and
      +-2**k are free), the same rule as the hls4ml estimator (A2/A4 there).
      ``weights="programmable"`` (default; ECON-T's weights are loaded through I2C) stores every
      weight in flip-flops and uses general multipliers.
  B3. Accumulation: a balanced adder tree per output; level l adds (product bits + l) bits,
      capped at the IR's exact accumulator width.  Registers: the graph inputs and outputs, and
      (programmable) every weight bit; the network between them is one combinational path.
      Per-layer ``latency_ns`` is that layer's combinational delay; the total latency is
      ``ceil(path / period)`` cycles (>= 1), carried by the last layer's ``latency_cycles``.
  B4. Area of one GE per node: 45 nm 0.798 um^2 (Nangate OCL, B1); 65 nm 1.44 um^2 and 28 nm
      0.31 um^2 -- 65 nm: a typical NAND2X1 of 65 nm commercial libraries (assumption);
      28 nm: 0.798 * (28/45)^2 (ideal scaling, assumption).  Core area = cell area / 0.7
      (placement utilisation 70%, a common target; assumption).
  B5. Dynamic energy: Horowitz, "Computing's energy problem", ISSCC 2014 (45 nm, 0.9 V):
      32-bit add 0.1 pJ, 8-bit add 0.03 pJ, 8x8 multiply 0.2 pJ, 32x32 multiply 3.1 pJ -- all
      about 3.1 fJ per full-adder bit or per partial-product bit.  We use 3.1 fJ per FA bit and
      per partial-product bit, and 2 fJ per clocked flip-flop per cycle; weight registers are
      clock-gated (0).  Other nodes scale by C*V^2 with C ~ node: 65 nm LP at 1.2 V -> x2.57,
      28 nm at 0.9 V -> x0.62 (assumption).  ``activity`` (default 1.0) scales all switching.
  B6. Power = energy per inference x clock / II.  Leakage is ignored (small in LP processes at
      these sizes; an under-estimate).
  B7. Delay: a full-adder stage 2 FO4, FO4 = 0.5 ps per nm of node (rule of thumb); a
      multiplier is a + b FA stages, a W-bit ripple adder W stages; cycles = ceil(path / period).
  B8. Triple modular redundancy (``tmr="registers"``; default ``"none"``).  Radiation-tolerant
      detector ASICs triplicate their registers: the ECON-T reference "features triple modular
      redundancy to maintain its radiation tolerance up to 200 MRad" (arXiv 2103.05579 Sec.
      4.3.2).  Modelled as self-correcting register TMR (Hindman et al., IEEE Trans. Nucl. Sci. 58
      (2011) 3046): every flip-flop becomes three, each with a majority voter in its feedback
      (MAJ3 = AOI222 + INV, about 3.67 GE in the Nangate 45 nm OCL, B1), and all copies are
      clocked every cycle so that the vote rewrites an upset copy (so weight registers are no
      longer clock-gated).  The combinational datapath is *not* triplicated (our assumption:
      triplicating it would put the ECON-T area at ~3x ours, far above the published figure).

Config keys: ``node_nm`` (65 | 45 | 28, default 65), ``clock_mhz`` (default 40) or
``clock_period`` (ns), ``weights`` (``programmable`` | ``constant``), ``activity`` (1.0),
``tmr`` (``none`` | ``registers``, B8).
"""
from __future__ import annotations

import math

import numpy as np

from ...compiler.errors import QDeployError, UnsupportedError
from ...compiler.ir.graph import Graph
from ...compiler.ir.types import FixedType

GE_AND2, GE_FA, GE_DFF = 1.33, 5.33, 5.67
#: Majority voter (AOI222_X1 + INV_X1 of the Nangate 45 nm OCL, 2.394 + 0.532 um^2), B8.
GE_MAJ3 = 3.67
TMR_MODES = ("none", "registers")
UM2_PER_GE = {65: 1.44, 45: 0.798, 28: 0.31}
E_FA_FJ_45 = 3.1
E_DFF_FJ_45 = 2.0
ENERGY_SCALE = {65: 2.57, 45: 1.0, 28: 0.62}
UTILIZATION = 0.70
#: What ``benchmarks/asic_econt.py`` printed (ours / published, no calibration).
#: What ``benchmarks/asic_econt.py`` printed (ours / published, no calibration).
MEASURED_ERROR = ("gate-equivalent estimate, not synthesis; measured on the ECON-T encoder (65 nm, 40 MHz, "
                  "arXiv 2105.01683; no calibration): ours/published area 0.73x, power 0.70x, energy 0.69x with "
                  "tmr=none (default); area 0.91x, power 0.78x, energy 0.77x with tmr=registers (the reference "
                  "chip is triple-redundant); latency 1.00x (benchmarks/asic_econt.py)")
SUPPORTED_OPS = ("Dense", "Conv", "Relu", "Quantize", "Sign", "Add", "Mul", "Affine", "Concat", "Reshape",
                 "Transpose", "MaxPool", "AvgPool", "GlobalAvgPool")


def _csd(codes):
    x = np.abs(np.asarray(codes, dtype=np.int64))
    xh = x >> 1
    return np.bitwise_count(xh ^ (x + xh)).astype(np.int64)


def _bitlen(codes):
    a = np.abs(np.asarray(codes, dtype=np.int64))
    out = np.zeros(a.shape, dtype=np.int64)
    nz = a > 0
    out[nz] = np.floor(np.log2(a[nz])).astype(np.int64) + 1
    return out


def _options(config):
    cfg = dict(config or {})
    node = int(cfg.get("node_nm") or 65)
    if node not in UM2_PER_GE:
        raise QDeployError(f"unknown technology node {node} nm; supported: {', '.join(map(str, UM2_PER_GE))} nm")
    if cfg.get("clock_period") is not None:  # 0 is a (bad) value, not "use the default"
        period = float(cfg["clock_period"])
    else:
        period = 1000.0 / float(cfg.get("clock_mhz") or 40.0)
    if not math.isfinite(period) or period <= 0:
        raise QDeployError(f"clock period must be a positive number of ns, got {period}")
    w = str(cfg.get("weights") or "programmable")
    if w not in ("programmable", "constant"):
        raise QDeployError(f"weights must be 'programmable' or 'constant', got {w!r}")
    tmr = str(cfg.get("tmr") or "none")
    if tmr not in TMR_MODES:
        raise QDeployError(f"tmr must be one of {', '.join(TMR_MODES)}, got {tmr!r}")
    return {"node_nm": node, "clock_period": period, "weights": w, "activity": float(cfg.get("activity", 1.0)),
            "tmr": tmr}


def _tree(terms: np.ndarray, pw: np.ndarray, cap: int) -> tuple[int, int]:
    """(adder bits, depth) of balanced trees summing ``terms[j]`` values of ``pw[j]`` bits."""
    left = terms.astype(np.int64).copy()
    bits, lvl = 0, 0
    while (left > 1).any():
        lvl += 1
        bits += int(np.sum((left // 2) * np.minimum(cap, pw + lvl)))
        left = (left + 1) // 2
    return bits, lvl


def _mac(graph, node, opts):
    x = graph.value(node.inputs[0])
    w = node.params["weight"]
    b = node.params.get("bias")
    out = graph.value(node.output)
    if not all(isinstance(t, FixedType) for t in (x.dtype, w.dtype, out.dtype)):
        raise UnsupportedError(f"{node.op} on float data has no ASIC estimate (quantize it first)", node.name)
    xb, wb, ab = x.dtype.width, w.dtype.width, out.dtype.width
    codes = w.data.reshape(-1, w.shape[-1])
    n_in, n_out = codes.shape
    pos = int(np.prod(out.shape[:-1], dtype=np.int64)) if len(out.shape) > 1 else 1
    zero = codes == 0
    terms = np.count_nonzero(~zero, axis=0) + ((np.broadcast_to(b.data, (n_out,)) != 0).astype(np.int64)
                                                if b is not None else 0)
    if opts["weights"] == "programmable":
        # every weight is a register: all products are general multipliers (zeros are not known)
        n_mult = n_in * n_out
        pp = xb * wb
        mult_ge = n_mult * (pp * GE_AND2 + (xb - 1) * wb * GE_FA)
        mult_e_bits = n_mult * pp
        terms = np.full(n_out, n_in + (1 if b is not None else 0))
        pw = np.full(n_out, min(ab, xb + wb))
        w_ff = n_in * n_out * wb + (n_out * b.dtype.width if b is not None else 0)
        t_mult = xb + wb
    else:
        d, bl = _csd(codes), _bitlen(codes)
        adds = np.maximum(d - 1, 0) * (xb + bl + 1)
        mult_ge = float(np.sum(adds)) * GE_FA
        mult_e_bits = float(np.sum(adds))
        pw = np.where(zero, 0, np.minimum(ab, xb + bl + 1)).max(axis=0)
        w_ff = 0
        dmax = int(d.max(initial=1))
        t_mult = (math.ceil(math.log2(dmax)) if dmax > 1 else 0) * (xb + wb)
    tree_bits, depth = _tree(terms, pw, ab)
    ff = n_out * ab if node.output in graph.outputs else 0  # output register (B3)
    ge_per_pos = mult_ge + tree_bits * GE_FA
    reg_ge, reg_fj, n_ff = _registers(ff * pos, w_ff, opts)
    ge = pos * ge_per_pos + reg_ge
    e_fj = pos * (mult_e_bits + tree_bits) * E_FA_FJ_45 + reg_fj
    stages = t_mult + depth * 2 + ab  # FA stages on the critical path (B7, ripple of the last add)
    return ge, n_ff, e_fj, stages


def _registers(clocked_bits: int, static_bits: int, opts: dict) -> tuple[float, float, int]:
    """(GE, dynamic energy per inference in 45 nm fJ, physical flip-flops) of ``clocked_bits``
    registers written every cycle and ``static_bits`` held ones (weights; clock-gated, B5).  With
    ``tmr="registers"`` (B8) each bit is three flip-flops with three majority voters, all clocked."""
    if opts.get("tmr") == "registers":
        bits = clocked_bits + static_bits
        return bits * 3 * (GE_DFF + GE_MAJ3), 3 * bits * E_DFF_FJ_45, 3 * bits
    return (clocked_bits + static_bits) * GE_DFF, clocked_bits * E_DFF_FJ_45, clocked_bits + static_bits


def _other(graph, node):
    out = graph.value(node.output)
    ob = out.dtype.width if isinstance(out.dtype, FixedType) else 32
    size = out.size
    if node.op in ("Reshape", "Transpose", "Concat", "Sign"):
        return 0.0, 0.0, 0
    if node.op == "Relu":
        return size * ob * GE_AND2, size * ob * 0.3, 1
    if node.op == "Quantize":
        to = node.attrs["to"]
        bits = (size * ob if to.rounding != "TRN" else 0) + (size * ob if to.saturation != "WRAP" else 0)
        return bits * GE_FA, bits, ob if to.rounding != "TRN" else 1
    if node.op in ("Add", "Affine"):
        return size * ob * GE_FA, size * ob, ob
    if node.op == "Mul":
        return size * ob * ob * GE_AND2 * 5, size * ob * ob, 2 * ob
    if node.op == "MaxPool":
        n = int(np.prod(node.attrs["kernel"]))
        return size * (n - 1) * ob * 2 * GE_FA, size * (n - 1) * ob, ob * math.ceil(math.log2(max(n, 2)))
    n = int(np.prod(node.attrs["kernel"])) if node.op == "AvgPool" else int(np.prod(graph.value(node.inputs[0]).shape[:-1]))
    return size * (n - 1) * ob * GE_FA, size * (n - 1) * ob, ob + math.ceil(math.log2(max(n, 2)))


def estimate(graph: Graph, config: dict | None = None) -> dict:
    """ASIC estimate of ``graph``; see the module docstring for every assumption (B1-B8).

    Returns ``{"target": "asic", "estimate": True, "config", "total", "layers", "note"}``; ``total``
    and each layer hold ``area_mm2`` (core area, mm^2), ``power_mw`` (mW at the clock, II = 1),
    ``energy_nj`` (nJ per inference), ``latency_cycles``, ``latency_ns`` (per layer: its
    combinational delay; total: cycles x period), ``ii_cycles``, ``ff``, ``ge``, and ``None`` for the
    FPGA-only ``lut``/``dsp``/``bram_18k``; ``note`` states the measured error on the reference.

    Raises:
        QDeployError: unknown technology node (lists 65/45/28), bad clock, unknown ``weights`` or
            ``tmr`` mode; UnsupportedError naming a node whose op has no model (the message lists
            the supported ops).
    """
    opts = _options(config)
    node_nm, period = opts["node_nm"], opts["clock_period"]
    fo4_ns = 0.5e-3 * node_nm
    layers = []
    for node in graph.nodes:
        out_t = graph.value(node.output).dtype
        in_ts = [graph.value(i).dtype for i in node.inputs]
        row = {"name": node.name, "op": node.op, "lut": None, "dsp": None, "bram_18k": None, "ff": 0, "ge": 0.0,
               "area_mm2": 0.0, "power_mw": 0.0, "energy_nj": 0.0, "latency_cycles": 0, "latency_ns": 0.0,
               "ii_cycles": 1, "host": False}
        if not isinstance(out_t, FixedType) or (in_ts and all(not isinstance(t, FixedType) for t in in_ts)):
            row["host"] = True
            layers.append(row)
            continue
        if node.op not in SUPPORTED_OPS:
            raise UnsupportedError(f"op {node.op!r} has no ASIC estimate; supported ops: {', '.join(SUPPORTED_OPS)}",
                                   node.name)
        if node.op in ("Dense", "Conv"):
            ge, ff, e_fj, stages = _mac(graph, node, opts)
        else:
            ge, e_bits, stages = _other(graph, node)
            ff, e_fj = 0, e_bits * E_FA_FJ_45
        delay = stages * 2 * fo4_ns
        row.update(ff=int(ff), ge=float(ge), latency_ns=round(delay, 3))
        row["area_mm2"] = ge * UM2_PER_GE[node_nm] / UTILIZATION * 1e-6
        row["energy_nj"] = e_fj * opts["activity"] * ENERGY_SCALE[node_nm] * 1e-6
        layers.append(row)
    # registers only at the input and the outputs (B3): the network is one combinational path
    in_bits = sum(v.size * v.dtype.width for v in graph.input_values() if isinstance(v.dtype, FixedType))
    path_ns = sum(r["latency_ns"] for r in layers)
    cycles = max(1, math.ceil(path_ns / period - 1e-9))
    for r in layers:
        r["power_mw"] = r["energy_nj"] / period * 1e3
        r["latency_cycles"] = 0
    dev = [r for r in layers if not r["host"]]
    if dev:
        dev[-1]["latency_cycles"] = cycles
    total = {"lut": None, "dsp": None, "bram_18k": None}
    in_ge, in_fj, in_ff = _registers(in_bits, 0, opts)
    total["ff"] = int(sum(r["ff"] for r in layers) + in_ff)
    total["ge"] = float(sum(r["ge"] for r in layers) + in_ge)
    total["area_mm2"] = total["ge"] * UM2_PER_GE[node_nm] / UTILIZATION * 1e-6
    total["energy_nj"] = float(sum(r["energy_nj"] for r in layers)
                               + in_fj * opts["activity"] * ENERGY_SCALE[node_nm] * 1e-6)
    total["latency_cycles"] = int(cycles)
    total["path_ns"] = round(path_ns, 3)
    total["latency_ns"] = round(total["latency_cycles"] * period, 3)
    total["ii_cycles"] = 1
    total["power_mw"] = total["energy_nj"] / total["ii_cycles"] / period * 1e3  # nJ / ns = W
    return {"target": "asic", "estimate": True, "config": opts, "total": total, "layers": layers,
            "note": MEASURED_ERROR}
