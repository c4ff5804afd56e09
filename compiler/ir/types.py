"""Exact tensor types of the qdeploy IR.

Two kinds of element type exist:

* :class:`FixedType` -- a two's-complement (or unsigned) fixed-point number with
  ``ap_fixed<W, I, Q, O>`` semantics (Xilinx UG1399, "Arbitrary Precision Fixed-Point Data
  Types"): ``width`` W total bits, ``int_bits`` I bits left of the binary point (may be
  negative or larger than W), so the value of a code ``c`` is ``c * 2**-(W - I)``.  The
  quantization mode Q (``rounding``) and overflow mode O (``saturation``) say what happens
  when a wider value is cast *into* this type.  An integer is a ``FixedType`` with
  ``int_bits == width``.  A QONNX ``Quant`` node with scale ``2**-F`` and zero point 0 is the
  fixed type ``<bit_width, bit_width - F>``.
* :class:`FloatType` -- IEEE float32 for unquantized parts of a graph.

Tensors of fixed type are carried as ``int64`` *codes* everywhere (reference interpreter,
TVM lowering); :func:`requantize` and :meth:`FixedType.quantize_real` are the exact casts.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

#: ap_fixed quantization modes (rounding applied when dropping fraction bits).
ROUNDING_MODES = ("TRN", "TRN_ZERO", "RND", "RND_ZERO", "RND_INF", "RND_MIN_INF", "RND_CONV")
#: ap_fixed overflow modes (applied when the value does not fit the integer bits).
SATURATION_MODES = ("WRAP", "SAT", "SAT_ZERO", "SAT_SYM")

#: Widest fixed type the IR accepts (codes must fit in int64 with headroom for products).
MAX_WIDTH = 62


class FixedTypeError(ValueError):
    """Raised for an invalid type description (bad width, unknown mode, unparsable string)."""


@dataclass(frozen=True)
class FixedType:
    """Fixed-point element type with ``ap_fixed<W,I,Q,O>`` semantics.

    Attributes:
        width: total bits W, 1..62.
        int_bits: integer bits I (including the sign bit when signed); value = code * 2**(I-W).
        signed: two's complement when True (``ap_fixed``), else ``ap_ufixed``.
        rounding: quantization mode Q, one of :data:`ROUNDING_MODES` (``RND_CONV`` is round
            half to even, the QONNX ``ROUND`` mode; ``TRN`` is floor).
        saturation: overflow mode O, one of :data:`SATURATION_MODES` (``SAT_SYM`` is the
            symmetric range of QONNX ``narrow=1`` signed quantizers).

    Raises:
        FixedTypeError: on a width outside 1..62, an unknown mode, or ``SAT_SYM`` on an unsigned type.
    """

    width: int
    int_bits: int
    signed: bool = True
    rounding: str = "TRN"
    saturation: str = "WRAP"

    def __post_init__(self):
        if not isinstance(self.width, (int, np.integer)) or not 1 <= int(self.width) <= MAX_WIDTH:
            raise FixedTypeError(f"bit width {self.width} outside 1..{MAX_WIDTH}")
        if self.signed and self.width < 1:
            raise FixedTypeError("signed type needs at least 1 bit")
        if self.rounding not in ROUNDING_MODES:
            raise FixedTypeError(f"unknown rounding mode {self.rounding!r} (one of {ROUNDING_MODES})")
        if self.saturation not in SATURATION_MODES:
            raise FixedTypeError(f"unknown saturation mode {self.saturation!r} (one of {SATURATION_MODES})")
        if self.saturation == "SAT_SYM" and not self.signed:
            raise FixedTypeError("SAT_SYM needs a signed type")
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "int_bits", int(self.int_bits))
        object.__setattr__(self, "signed", bool(self.signed))

    # ------------------------------------------------------------------ properties
    @property
    def frac_bits(self) -> int:
        """Fraction bits F = W - I (a code c means c * 2**-F)."""
        return self.width - self.int_bits

    @property
    def is_integer(self) -> bool:
        return self.frac_bits == 0

    @property
    def min_code(self) -> int:
        """Smallest representable code (``SAT_SYM`` excludes -2**(W-1))."""
        if not self.signed:
            return 0
        lo = -(1 << (self.width - 1))
        return lo + 1 if self.saturation == "SAT_SYM" else lo

    @property
    def max_code(self) -> int:
        return (1 << (self.width - 1)) - 1 if self.signed else (1 << self.width) - 1

    @property
    def min_value(self) -> float:
        return math.ldexp(self.min_code, -self.frac_bits)

    @property
    def max_value(self) -> float:
        return math.ldexp(self.max_code, -self.frac_bits)

    @property
    def lsb(self) -> float:
        """Value of one least-significant bit, 2**-F."""
        return math.ldexp(1.0, -self.frac_bits)

    def with_modes(self, rounding: str | None = None, saturation: str | None = None) -> "FixedType":
        return FixedType(self.width, self.int_bits, self.signed, rounding or self.rounding,
                         saturation or self.saturation)

    # ------------------------------------------------------------------ conversions
    def quantize_real(self, x) -> np.ndarray:
        """Cast real numbers into this type: returns int64 codes, exactly.

        ``x`` (any shape, float32/float64) is scaled by 2**F (exact in float64), rounded with
        ``rounding`` and overflowed with ``saturation``.  NaN raises ``ValueError``.
        """
        q = np.ldexp(np.asarray(x, dtype=np.float64), self.frac_bits)
        if np.isnan(q).any():
            raise ValueError("NaN cannot be quantized to a fixed-point type")
        with np.errstate(invalid="ignore"):  # +-inf: handled by the overflow step
            fl = np.floor(q)
            rem = np.where(np.isfinite(q), q - fl, 0.0)  # exact for float64
            up = _round_up(fl, rem == 0.5, rem > 0.5, rem != 0.0, self.rounding, odd=np.mod(fl, 2) == 1)
            q = fl + up
        return _overflow_float(q, self)

    def to_real(self, codes) -> np.ndarray:
        """Real value (float64) of int64 codes: codes * 2**-F (exact while |code| < 2**53)."""
        return np.ldexp(np.asarray(codes, dtype=np.float64), -self.frac_bits)

    def represents(self, x) -> bool:
        """True when every real in ``x`` is exactly a code of this type (no rounding or overflow)."""
        q = np.ldexp(np.asarray(x, dtype=np.float64), self.frac_bits)
        return bool(np.all(q == np.round(q)) and np.all(q >= self.min_code) and np.all(q <= self.max_code))

    # ------------------------------------------------------------------ text forms
    def __str__(self) -> str:
        base = "fixed" if self.signed else "ufixed"
        tail = ""
        if self.rounding != "TRN" or self.saturation != "WRAP":
            tail = f",{self.rounding},{self.saturation}"
        return f"{base}<{self.width},{self.int_bits}{tail}>"

    def hls(self) -> str:
        """The C++ type string for Vivado/Vitis HLS, e.g. ``ap_fixed<8,3,AP_RND_CONV,AP_SAT>``."""
        base = "ap_fixed" if self.signed else "ap_ufixed"
        if self.rounding == "TRN" and self.saturation == "WRAP":
            return f"{base}<{self.width},{self.int_bits}>"
        return f"{base}<{self.width},{self.int_bits},AP_{self.rounding},AP_{self.saturation}>"

    def to_dict(self) -> dict:
        return {"kind": "fixed", "width": self.width, "int_bits": self.int_bits, "signed": self.signed,
                "rounding": self.rounding, "saturation": self.saturation}


@dataclass(frozen=True)
class FloatType:
    """IEEE-754 floating point element type (only float32 is used)."""

    bits: int = 32

    def __str__(self) -> str:
        return f"float{self.bits}"

    def to_dict(self) -> dict:
        return {"kind": "float", "bits": self.bits}

    @property
    def width(self) -> int:
        return self.bits


DType = FixedType | FloatType
FLOAT32 = FloatType(32)


def int_type(width: int, signed: bool = True) -> FixedType:
    """An integer type: ``FixedType(width, width, signed)``."""
    return FixedType(width, width, signed)


def type_from_dict(d: dict) -> DType:
    if d["kind"] == "float":
        return FloatType(d.get("bits", 32))
    return FixedType(d["width"], d["int_bits"], d["signed"], d["rounding"], d["saturation"])


_TYPE_RE = re.compile(r"^\s*(ap_)?(u?)(fixed|int)<\s*(-?\d+)\s*(?:,\s*(-?\d+)\s*)?(?:,\s*(?:AP_)?(\w+)\s*)?(?:,\s*(?:AP_)?(\w+)\s*)?>\s*$")


def parse_type(text: str) -> DType:
    """Parse ``fixed<8,3>``, ``ufixed<6,0,RND_CONV,SAT>``, ``ap_fixed<16,6>``, ``int<8>``,
    ``uint<4>`` or ``float32``.

    Raises:
        FixedTypeError: when the text is not one of these forms.
    """
    text = text.strip()
    if text in ("float", "float32"):
        return FLOAT32
    m = _TYPE_RE.match(text)
    if not m:
        raise FixedTypeError(f"cannot parse type {text!r}: expected e.g. fixed<8,3>, ufixed<6,0,RND_CONV,SAT>, int<8>, float32")
    _, u, kind, w, i, q, o = m.groups()
    w = int(w)
    if kind == "int":
        if i is not None:
            raise FixedTypeError(f"int type takes one parameter: {text!r}")
        i = w
    elif i is None:
        raise FixedTypeError(f"fixed type needs <width,int_bits>: {text!r}")
    return FixedType(w, int(i), signed=(u == ""), rounding=q or "TRN", saturation=o or "WRAP")


# ---------------------------------------------------------------------- exact casts
def _round_up(floor, is_half, above_half, inexact, mode: str, odd):
    """0/1 increment to add to ``floor`` for rounding ``floor + rem`` (rem in [0, 1))."""
    neg = floor < 0  # value = floor + rem is negative iff floor < 0 (rem >= 0)
    if mode == "TRN":
        return np.zeros_like(floor)
    if mode == "TRN_ZERO":
        return (inexact & neg).astype(floor.dtype)
    if mode == "RND":  # half towards +inf
        return (above_half | is_half).astype(floor.dtype)
    if mode == "RND_MIN_INF":  # half towards -inf
        return above_half.astype(floor.dtype)
    if mode == "RND_ZERO":  # half towards zero
        return (above_half | (is_half & neg)).astype(floor.dtype)
    if mode == "RND_INF":  # half away from zero
        return (above_half | (is_half & ~neg)).astype(floor.dtype)
    if mode == "RND_CONV":  # half to even
        return (above_half | (is_half & odd)).astype(floor.dtype)
    raise FixedTypeError(f"unknown rounding mode {mode}")


def _overflow_int(q: np.ndarray, t: FixedType) -> np.ndarray:
    lo, hi = t.min_code, t.max_code
    if t.saturation in ("SAT", "SAT_SYM"):
        return np.clip(q, lo, hi)
    if t.saturation == "SAT_ZERO":
        return np.where((q < lo) | (q > hi), 0, q)
    # WRAP: keep the low W bits, two's complement when signed
    mod = 1 << t.width
    q = np.bitwise_and(q, mod - 1)
    if t.signed:
        q = np.where(q >= (mod >> 1), q - mod, q)
    return q


def _overflow_float(q: np.ndarray, t: FixedType) -> np.ndarray:
    if np.isinf(q).any():
        if t.saturation == "WRAP":
            raise ValueError("infinite value cannot be wrapped into a fixed-point type")
        q = np.clip(q, float(t.min_code) - 1, float(t.max_code) + 1)
    if np.abs(q).max(initial=0) >= 2.0 ** 62:
        if t.saturation == "WRAP":
            raise ValueError("value too large to wrap into a fixed-point type")
        q = np.clip(q, -(2.0 ** 61), 2.0 ** 61)
    return _overflow_int(q.astype(np.int64), t)


def requantize(codes, frac_in: int, t: FixedType) -> np.ndarray:
    """Exact cast of int64 ``codes`` with ``frac_in`` fraction bits into type ``t``.

    Implements the ap_fixed assignment ``t y = x`` bit for bit: drop (or add) fraction bits
    with ``t.rounding``, then apply ``t.saturation`` to the integer part.

    Args:
        codes: int64 array of any shape (value = code * 2**-frac_in).
        frac_in: fraction bits of the source.
        t: destination type.
    Returns:
        int64 array, same shape, codes of ``t``.
    """
    codes = np.asarray(codes, dtype=np.int64)
    shift = frac_in - t.frac_bits
    if shift <= 0:
        q = np.left_shift(codes, -shift)
    else:
        fl = np.right_shift(codes, shift)  # arithmetic shift = floor
        rem = codes - np.left_shift(fl, shift)
        half = np.int64(1) << np.int64(shift - 1)
        q = fl + _round_up(fl, rem == half, rem > half, rem != 0, t.rounding, odd=(fl & 1) == 1)
    return _overflow_int(q, t)


def bits_for_range(lo: int, hi: int) -> tuple[int, bool]:
    """Fewest bits (and signedness) whose integer codes cover ``[lo, hi]``."""
    lo, hi = int(lo), int(hi)
    if lo >= 0:
        return max(1, int(hi).bit_length()), False
    w = max((-lo - 1).bit_length(), hi.bit_length()) + 1
    return w, True


def fixed_for_range(lo: int, hi: int, frac_bits: int) -> FixedType:
    """Exact (TRN, WRAP) fixed type holding every code in ``[lo, hi]`` at ``frac_bits``.

    Raises:
        FixedTypeError: when more than 62 bits would be needed.
    """
    w, signed = bits_for_range(lo, hi)
    if w > MAX_WIDTH:
        raise FixedTypeError(f"range [{lo}, {hi}] needs {w} bits, more than {MAX_WIDTH}")
    return FixedType(w, w - frac_bits, signed)


def exact_type_for_values(values, max_width: int = 32) -> FixedType | None:
    """The narrowest fixed type representing every real in ``values`` exactly, or None.

    Used for constants (weights, biases) that come from QONNX ``Quant`` nodes: their reals are
    integer multiples of a power of two.  Returns None when no type of at most ``max_width``
    bits does (e.g. float weights, or a non-power-of-two scale).
    """
    v = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        return None
    if v.size == 0 or np.all(v == 0):
        return FixedType(1, 1, False)
    for f in range(-16, 48):
        q = np.ldexp(v, f)
        if np.all(q == np.round(q)):
            lo, hi = int(q.min()), int(q.max())
            w, signed = bits_for_range(lo, hi)
            if w > max_width:
                return None
            return FixedType(w, w - f, signed)
    return None
