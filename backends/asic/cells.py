"""Cell library of the ASIC estimator: gate-equivalent areas, switching energies and the
register model (assumptions B1, B5 and B8 of :mod:`qdeploy.backends.asic.estimate`)."""
from __future__ import annotations

#: Gate equivalents (1 GE = one NAND2_X1) of an AND2, a full adder and a D flip-flop (B1, Nangate
#: 45 nm Open Cell Library: AND2_X1 1.064, FA_X1 4.256, DFF_X1 4.522 um^2 over NAND2_X1 0.798).
GE_AND2, GE_FA, GE_DFF = 1.33, 5.33, 5.67
#: Majority voter (AOI222_X1 + INV_X1 of the Nangate 45 nm OCL, 2.394 + 0.532 um^2), B8.
GE_MAJ3 = 3.67
#: Register triplication modes (B8).
TMR_MODES = ("none", "registers")
#: Dynamic energy at 45 nm, fJ per full-adder or partial-product bit, and per clocked flip-flop (B5).
E_FA_FJ_45 = 3.1
E_DFF_FJ_45 = 2.0


def registers(clocked_bits: int, static_bits: int, opts: dict) -> tuple[float, float, int]:
    """(GE, dynamic energy per inference in 45 nm fJ, physical flip-flops) of ``clocked_bits``
    registers written every cycle and ``static_bits`` held ones (weights; clock-gated, B5).  With
    ``opts["tmr"] == "registers"`` (B8) each bit is three flip-flops with three majority voters,
    all clocked."""
    if opts.get("tmr") == "registers":
        bits = clocked_bits + static_bits
        return bits * 3 * (GE_DFF + GE_MAJ3), 3 * bits * E_DFF_FJ_45, 3 * bits
    return (clocked_bits + static_bits) * GE_DFF, clocked_bits * E_DFF_FJ_45, clocked_bits + static_bits
