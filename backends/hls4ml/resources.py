"""FPGA resource helpers of the hls4ml estimator: device parts, calibrated constants, the DSP /
CSD / reuse-factor rules, and the per-op table entry type.

The assumptions these implement (A1-A14) and their sources are written out in
:mod:`qdeploy.backends.hls4ml.estimate`; the per-op rows that use them are the ``estimate``
entries of :mod:`qdeploy.backends.hls4ml.ops` (Dense/Conv in :mod:`.mac_cost`).
"""
from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ...compiler.errors import QDeployError
from ...compiler.ir.graph import Graph
from ...compiler.ir.types import FixedType

#: Device capacities (LUT, FF, DSP, BRAM_18K = 2 x BRAM36) from the Xilinx/AMD product tables:
#: DS890 (UltraScale / UltraScale+ families), DS891 (Zynq UltraScale+), DS190 (Zynq-7000),
#: DS962 (Alveo U250).  ``dsp`` gives the DSP slice multiplier width (a, b).
PARTS: dict[str, dict] = {
    "xcvu9p": {"name": "Virtex UltraScale+ VU9P", "aliases": ("vu9p",), "lut": 1182240, "ff": 2364480,
               "dsp": 6840, "bram_18k": 4320, "dsp_width": (27, 18)},
    "xcvu13p": {"name": "Virtex UltraScale+ VU13P", "aliases": ("vu13p",), "lut": 1728000, "ff": 3456000,
                "dsp": 12288, "bram_18k": 5376, "dsp_width": (27, 18)},
    "xcku115": {"name": "Kintex UltraScale KU115", "aliases": ("ku115",), "lut": 663360, "ff": 1326720,
                "dsp": 5520, "bram_18k": 4320, "dsp_width": (27, 18)},
    "xcu250": {"name": "Alveo U250 (XCU250)", "aliases": ("u250", "alveo-u250", "alveo_u250"), "lut": 1728000,
               "ff": 3456000, "dsp": 12288, "bram_18k": 5376, "dsp_width": (27, 18)},
    "xczu9eg": {"name": "ZCU102 (Zynq UltraScale+ ZU9EG)", "aliases": ("zcu102", "zu9eg"), "lut": 274080,
                "ff": 548160, "dsp": 2520, "bram_18k": 1824, "dsp_width": (27, 18)},
    "xc7z020": {"name": "PYNQ-Z2 (Zynq-7000 Z-7020)", "aliases": ("pynq-z2", "pynqz2", "pynq_z2", "z7020"),
                "lut": 53200, "ff": 106400, "dsp": 220, "bram_18k": 280, "dsp_width": (25, 18)},
}

#: Calibrated on one row only (A6): post-HLS LUTs per adder bit, per DSP rule (each fitted on the
#: 16-bit PTQ row with that rule in place: the rule moves products between DSPs and LUTs).
HLS_LUT_FACTORS = {"csd_wider": 1.248, "vivado": 0.913, "hls4ml_weight": 1.421}
#: Calibrated on one io_stream row (A20): post-HLS LUTs per modelled bit of an io_stream design relative
#: to :data:`HLS_LUT_FACTORS` (fitted on the SVHN CNN ``svhn16`` total of ``benchmarks/refs/hls4ml_published.csv``).
STREAM_LUT_SCALE = 1.369
#: Calibrated on the same row (A11): fraction of the modelled pipeline-cut bits that post-HLS reports count.
HLS_FF_FACTOR = 0.603
#: hls4ml default clock uncertainty (A10).
CLOCK_UNCERTAINTY = 0.125
T_DSP_NS = 3.0
T_LUT_NS = 0.4
T_CARRY_NS_PER_BIT = 0.015
#: hls4ml's Vivado DSP threshold (A3): "Vivado doesn't use DSP when precision < 9".
DSP_MIN_BITS = 9
#: DSP-vs-LUT rules (A3); the first is the default.
DSP_RULES = ("csd_wider", "vivado", "hls4ml_weight")
HLS_LUT_FACTOR = HLS_LUT_FACTORS[DSP_RULES[0]]  # the default rule's factor
LUT_PER_PP_BIT = 1.2


#: How an estimate row is timed by the driver (A10): ``chained`` ops are combinational and add
#: their delay to the next registered layer's path; ``registered`` layers (Dense/Conv) end in a
#: register and absorb the chained delay before them; ``standalone`` ops (Softmax) are priced by
#: their row alone, whatever their types (the row itself may say ``host``).
TIMINGS = ("chained", "registered", "standalone")


@dataclass(frozen=True)
class EstimateContext:
    """What every FPGA estimate row reads besides its node.

    Attributes:
        graph: the IR graph being estimated.
        opts: validated estimator options (``estimate._options``: part, clock_period, reuse_factor,
            strategy, io_type, accum_type, softmax_on_device, dsp_rule).
        part: the device's entry of :data:`PARTS`.
        period_eff: usable clock period in ns (``clock_period * (1 - CLOCK_UNCERTAINTY)``, A10).
    """

    graph: Graph
    opts: dict
    part: dict
    period_eff: float

    @property
    def lut_factor(self) -> float:
        """Post-HLS LUTs per modelled adder bit for the configured DSP rule (A6), times
        :data:`STREAM_LUT_SCALE` for an io_stream design (A20)."""
        f = HLS_LUT_FACTORS[self.opts["dsp_rule"]]
        return f * STREAM_LUT_SCALE if self.opts.get("io_type") == "io_stream" else f


@dataclass(frozen=True)
class Cost:
    """One entry of the FPGA estimate table (``ops.ESTIMATE``).

    Attributes:
        row: ``row(ctx: EstimateContext, node) -> dict`` with ``lut``, ``ff``, ``dsp``,
            ``bram_18k`` (counts), ``latency_cycles``, ``ii_cycles`` (cycles), optionally
            ``detail``; a ``chained`` row also holds ``delay_ns`` (its combinational delay, ns), a
            ``standalone`` row may be just ``{"host": True}``.
        timing: one of :data:`TIMINGS`.
    """

    row: Callable
    timing: str = "chained"

    def __post_init__(self):
        if self.timing not in TIMINGS:
            raise ValueError(f"estimate timing must be one of {TIMINGS}, got {self.timing!r}")


# ----------------------------------------------------------------------------- parts
def resolve_part(part: str | None) -> tuple[str, dict]:
    """Canonical part key and its capacities for a part name like ``xcvu9p-flga2104-2L-e``,
    ``vu9p``, ``Alveo U250``, ``ZCU102`` or ``pynq-z2``.

    Raises:
        QDeployError: unknown part (the message lists the known ones).
    """
    name = (part or "xcvu9p").strip().lower().replace(" ", "-")
    for key, p in PARTS.items():
        if name.startswith(key) or any(name == a or name.startswith(a + "-") for a in p["aliases"]):
            return key, p
        if name.startswith("alveo-") and name[6:] in p["aliases"]:
            return key, p
    known = ", ".join(f"{k} ({p['name']})" for k, p in PARTS.items())
    raise QDeployError(f"unknown FPGA part {part!r}; known parts: {known}")


def valid_reuse_factors(n_in: int, n_out: int) -> list[int]:
    """Reuse factors hls4ml's Resource strategy implements for an n_in x n_out multiply
    (``FPGABackend.get_valid_reuse_factors`` / ``_validate_reuse_factor``, hls4ml 1.3)."""
    out = []
    for rf in range(1, n_in * n_out + 1):
        multfactor = min(n_in, rf)
        multiplier_limit = int(math.ceil((n_in * n_out) / float(multfactor)))
        ok = ((multiplier_limit % n_out) == 0) or (rf >= n_in)
        ok = ok and (((rf % n_in) == 0) or (rf < n_in))
        ok = ok and (((n_in * n_out) % rf) == 0)
        if ok:
            out.append(rf)
    return out


def nearest_reuse_factors(valid: list[int], rf: int) -> list[int]:
    """The legal reuse factors either side of ``rf`` (one or two values)."""
    pos = bisect_left(valid, rf)
    return sorted({valid[i] for i in (pos - 1, pos) if 0 <= i < len(valid)})



# ----------------------------------------------------------------------------- helpers
def csd_digits(codes: np.ndarray) -> np.ndarray:
    """Non-zero digits of each integer in canonical signed-digit (non-adjacent) form.

    popcount((x >> 1) ^ (x + (x >> 1))) for x = |c| (the NAF identity)."""
    x = np.abs(np.asarray(codes, dtype=np.int64))
    xh = x >> 1
    return np.bitwise_count(xh ^ (x + xh)).astype(np.int64)


def bitlen(codes: np.ndarray) -> np.ndarray:
    """Bits of ``|c|`` for each integer code (``0 -> 0``, ``1 -> 1``, ``-8 -> 4``), int64."""
    a = np.abs(np.asarray(codes, dtype=np.int64))
    out = np.zeros(a.shape, dtype=np.int64)
    nz = a > 0
    out[nz] = np.floor(np.log2(a[nz])).astype(np.int64) + 1
    return out


def width(t) -> int:
    """Bit width of an IR type; 32 for a float type."""
    return t.width if isinstance(t, FixedType) else 32


def t_add(w: int) -> float:
    """Delay in ns of a ``w``-bit adder: one LUT level plus the carry chain (A10)."""
    return T_LUT_NS + T_CARRY_NS_PER_BIT * w


def dsps_per_mult(a: int, b: int, dsp_width) -> int:
    """DSP slices for one ``a x b``-bit product on a part whose DSP multiplies ``dsp_width`` =
    (A, B) bits: ``ceil(max/A) * ceil(min/B)`` (A3)."""
    A, B = dsp_width
    hi, lo = max(a, b), min(a, b)
    return math.ceil(hi / A) * math.ceil(lo / B)


def dsps_per_mult_arr(x_bits: int, c_bits: np.ndarray, dsp_width) -> np.ndarray:
    """DSP slices per ``x_bits x c_bits`` product, elementwise over ``c_bits`` (A3)."""
    A, B = dsp_width
    c = np.asarray(c_bits, dtype=np.int64)
    hi, lo = np.maximum(x_bits, c), np.minimum(x_bits, c)
    return ((hi + A - 1) // A) * ((lo + B - 1) // B)


def const_width(codes: np.ndarray) -> np.ndarray:
    """Fewest two's-complement bits that hold each integer constant: ``bitlen(c) + 1`` for
    ``c > 0``, ``bitlen(-c - 1) + 1`` for ``c < 0`` (``-1 -> 1``, ``0 -> 1``, ``5 -> 4``,
    ``-8 -> 4``).  This is the multiplier operand width Vivado HLS gives a constant (A3)."""
    c = np.asarray(codes, dtype=np.int64)
    mag = np.where(c < 0, -c - 1, c)
    return bitlen(mag) + 1


def dsp_mask(codes: np.ndarray, digits: np.ndarray, x_bits: int, w_bits: int, rule: str):
    """(bool mask of the constant products bound to DSP slices, operand width of each constant).

    ``csd_wider`` (default, A3): products of >= 3 CSD digits when the wider operand is >= 9 bits.
    ``vivado``: a product that is not free (A2) goes to DSPs when both operands are at least
    ``DSP_MIN_BITS`` wide, the constant counted at its narrowed width (:func:`const_width`).
    ``hls4ml_weight``: hls4ml's own estimator literally -- the *declared* weight type width >= 9
    decides, every non-free product.  See A3 for how the default was chosen."""
    mult = digits >= 2
    if rule == "vivado":
        cw = const_width(codes)
        return mult & (np.minimum(cw, x_bits) >= DSP_MIN_BITS), cw
    cw = np.full(np.shape(codes), w_bits, dtype=np.int64)
    if rule == "hls4ml_weight":
        return mult & (w_bits >= DSP_MIN_BITS), cw
    return (digits >= 3) & (max(x_bits, w_bits) >= DSP_MIN_BITS), cw



def layer_row(node, host=False, **kw) -> dict:
    """An estimate row for ``node``: zeros for every key (``host`` as given), updated by ``kw``."""
    r = {"name": node.name, "op": node.op, "lut": 0, "ff": 0, "dsp": 0, "bram_18k": 0, "latency_cycles": 0,
         "latency_ns": 0.0, "ii_cycles": 1, "host": host}
    r.update(kw)
    return r
