"""Gate-equivalent ASIC estimate (area, power, energy per inference, latency) of an IR graph.

``estimate(graph, config) -> dict`` with ``total`` and per-node ``layers``, each holding
``area_mm2``, ``power_mw``, ``energy_nj``, ``latency_cycles``, ``latency_ns``, ``ii_cycles``,
``ff`` (physical flip-flops, three per bit with TMR) and ``ge`` (gate equivalents); the
FPGA-only keys ``lut``, ``dsp`` and ``bram_18k`` are present and ``None`` (JSON ``null``; tables
leave them out or print ``-``).  An estimate, not synthesis: its measured error on the ECON-T
encoder is printed by ``benchmarks/asic_econt.py`` (``../shared/refs/asic_econt.csv``) and
carried in every result's ``note`` (:data:`MEASURED_ERROR`).

Layout: this module is the driver (options, the walk over the graph, totals); each op's cost is
its entry in the table :data:`qdeploy.backends.asic.ops.ESTIMATE`; the cell library and the
register model are in :mod:`.cells`.

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

from ...compiler.errors import QDeployError, UnsupportedError
from ...compiler.ir.graph import Graph
from ...compiler.ir.optable import Rejected
from ...compiler.ir.types import FixedType
from .cells import TMR_MODES, registers
from .ops import ESTIMATE

UM2_PER_GE = {65: 1.44, 45: 0.798, 28: 0.31}
ENERGY_SCALE = {65: 2.57, 45: 1.0, 28: 0.62}
UTILIZATION = 0.70
#: What ``benchmarks/asic_econt.py`` printed (ours / published, no calibration).
MEASURED_ERROR = ("gate-equivalent estimate, not synthesis; measured on the ECON-T encoder (65 nm, 40 MHz, "
                  "arXiv 2105.01683; no calibration): ours/published area 0.73x, power 0.70x, energy 0.69x with "
                  "tmr=none (default); area 0.91x, power 0.78x, energy 0.77x with tmr=registers (the reference "
                  "chip is triple-redundant); latency 1.00x (benchmarks/asic_econt.py)")


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


def _cost(node):
    """``fn(graph, node, opts) -> (ge, ff, e_fj, stages)`` of ``node``'s op (:data:`.ops.ESTIMATE`).

    Raises:
        UnsupportedError: the op has no model (naming the node and the supported ops).
    """
    e = ESTIMATE.entry(node.op)
    if e is None or isinstance(e, Rejected):
        why = f" ({e.reason})" if e is not None else ""
        supported = [op for op in ESTIMATE if not isinstance(ESTIMATE.entry(op), Rejected)]
        raise UnsupportedError(f"op {node.op!r} has no ASIC estimate{why}; supported ops: {', '.join(supported)}",
                               node.name)
    return e


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
        ge, ff, e_fj, stages = _cost(node)(graph, node, opts)
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
    in_ge, in_fj, in_ff = registers(in_bits, 0, opts)
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
