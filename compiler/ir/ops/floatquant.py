"""``FloatQuant``: QONNX's minifloat quantizer (FP8 e4m3 / e5m2 and other ``(E, M, bias)`` formats).

``y = scale * q(x / scale)`` where ``q`` rounds a real to the minifloat grid with ``E`` exponent
bits, ``M`` mantissa bits and exponent bias ``b``: every exponent code is a normal number
(qonnx reserves none for inf / NaN), so the largest magnitude is ``(2 - 2**-M) * 2**(2**E - 1 - b)``
(further capped by ``max_val``), the smallest normal exponent is ``e_min = 1 - b``, and below
``2**e_min`` the grid continues with the subnormal spacing ``2**(e_min - M)``.  Output and input
are float32; the output carries minifloat values times ``scale``.

Exact semantics, step by step in float32 (each step below is exact except the two marked, which
are single IEEE float32 operations, as in qonnx's executor):

1. ``X = x / scale``  (float32 division, rounded);
2. ``e = max(floor(log2 |X|), e_min)``, clamped above at ``e_max`` (counted by exact comparisons
   ``|X| >= 2**k``; a larger ``|X|`` saturates anyway);
3. ``t = X * 2**(M - e)``; ``r = round_half_even(t)`` (floor, then the tie rule); ``q = r * 2**(e - M)``
   with the sign of ``X`` (a negative input that rounds to zero gives ``-0.0``);
4. saturation: ``q`` clipped to ``[-max, max]``; without saturation values beyond ``max`` become
   ``+-inf`` (``has_inf``) or NaN (``has_nan``);
5. ``y = q * scale``  (float32 multiplication, rounded);
6. a NaN or infinite ``x`` gives NaN (qonnx: ``log2(inf)`` makes its internal scale infinite and
   ``inf / inf`` is NaN).

Attributes: ``exponent_bits``, ``mantissa_bits``, ``exponent_bias`` (ints), ``scale`` (a positive
float32), ``max_val`` (float, ``inf`` for none), ``saturation`` (bool), ``has_inf``, ``has_nan``
(bools; one of them is required without saturation), ``rounding`` (only ``"ROUND"``, half to even).

Sources: QONNX ``FloatQuant`` (``qonnx/custom_op/general/floatquant.py``, the NumPy port of
Brevitas' ``FloatQuant``; https://github.com/fastmachinelearning/qonnx/blob/main/docs/qonnx-custom-ops/
floatquant_op.md); Micikevicius et al., "FP8 Formats for Deep Learning", arXiv:2209.05433, section 3.
"""
from __future__ import annotations

import math

import numpy as np

from ...errors import VerifyError
from ..types import FLOAT32, FixedType
from .kernels import real_view
from .spec import OpSpec, register


def format_params(node) -> dict:
    """The checked attributes of a FloatQuant node as a dict (``e_min``, ``e_max``, ``max`` added).

    Raises:
        VerifyError: naming the node for a missing/invalid attribute, a format whose values leave
            float32's normal range, or a non-saturating format with neither ``has_inf`` nor ``has_nan``.
    """
    a = node.attrs
    try:
        E, M, bias = int(a["exponent_bits"]), int(a["mantissa_bits"]), int(a["exponent_bias"])
        scale = float(np.float32(a.get("scale", 1.0)))
        max_val = float(a.get("max_val", math.inf))
    except (KeyError, TypeError, ValueError) as e:
        raise VerifyError(f"FloatQuant attributes invalid ({type(e).__name__}: {e})", node.name) from None
    if not (1 <= E <= 8 and 0 <= M <= 22):
        raise VerifyError(f"FloatQuant format e{E}m{M}: exponent bits must be 1..8 and mantissa bits 0..22", node.name)
    e_min, e_max = 1 - bias, (1 << E) - 1 - bias
    if e_min - M < -126 or e_max > 126:
        raise VerifyError(f"FloatQuant e{E}m{M} with bias {bias}: exponents {e_min - M}..{e_max} leave float32's "
                          f"normal range", node.name)
    if not (scale > 0 and math.isfinite(scale)):
        raise VerifyError(f"FloatQuant scale {scale} must be positive and finite", node.name)
    if not max_val > 0:
        raise VerifyError(f"FloatQuant max_val {max_val} must be positive", node.name)
    mx = min((2.0 - 2.0 ** -M) * 2.0 ** e_max, max_val)
    sat = bool(a.get("saturation", True))
    if not sat and not (a.get("has_inf") or a.get("has_nan")):
        raise VerifyError("FloatQuant without saturation needs has_inf or has_nan (where do overflows go?)",
                          node.name)
    if str(a.get("rounding", "ROUND")).upper() not in ("ROUND", "HALF_EVEN"):
        raise VerifyError(f"FloatQuant rounding {a.get('rounding')!r}: only ROUND (half to even) is supported",
                          node.name)
    return {"E": E, "M": M, "bias": bias, "scale": scale, "e_min": e_min, "e_max": e_max,
            "max": float(np.float32(mx)), "saturation": sat, "has_inf": bool(a.get("has_inf")),
            "has_nan": bool(a.get("has_nan"))}


def grid_type(p: dict) -> FixedType | None:
    """The fixed-point type whose grid holds every saturated FloatQuant output exactly (the
    minifloat grid is a subset of ``2**(e_min - M) * scale`` steps up to ``max``), or ``None`` when
    ``scale`` is not a power of two or it would need more than 32 bits."""
    m, ex = math.frexp(p["scale"])
    if m != 0.5:
        return None
    f = -(p["e_min"] - p["M"] + ex - 1)  # lsb = 2**(e_min - M) * scale = 2**-f
    top = int(p["max"] * 2.0 ** f)  # max is on the grid unless max_val cuts between points
    if p["max"] * 2.0 ** f != top:
        return None
    w = top.bit_length() + 1
    if w > 32:
        return None
    return FixedType(w, w - f, True, "RND_CONV", "SAT")


def _rule(node, ins):
    format_params(node)
    return ins[0].shape, FLOAT32


def minifloat_round(x: np.ndarray, p: dict) -> np.ndarray:
    """Steps 1-6 of the module docstring on a float32 array (the exact reference kernel)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return _minifloat_round(np.asarray(x, dtype=np.float32), p)


def _minifloat_round(x: np.ndarray, p: dict) -> np.ndarray:
    one = np.float32(1.0)
    X = x / np.float32(p["scale"]) if p["scale"] != 1.0 else x
    a = np.abs(X)
    M = p["M"]
    up = np.full(X.shape, np.float32(2.0 ** (M - p["e_min"])))  # 2**(M - e)
    down = np.full(X.shape, np.float32(2.0 ** (p["e_min"] - M)))  # 2**(e - M)
    for k in range(p["e_min"] + 1, p["e_max"] + 1):
        ge = a >= np.float32(2.0 ** k)
        up = np.where(ge, np.float32(2.0 ** (M - k)), up)
        down = np.where(ge, np.float32(2.0 ** (k - M)), down)
    t = X * up
    r = np.floor(t)
    d = t - r
    odd = (r - np.float32(2.0) * np.floor(r * np.float32(0.5))) != 0
    r = np.where((d > np.float32(0.5)) | ((d == np.float32(0.5)) & odd), r + one, r)
    q = r * down
    q = np.where(X < 0, -np.abs(q), q)  # a negative input rounded to zero gives -0, as qonnx's np.round
    mx = np.float32(p["max"])
    if p["saturation"]:
        q = np.where(q > mx, mx, np.where(q < -mx, -mx, q))
    else:
        hi = np.float32(np.inf) if p["has_inf"] else np.float32(np.nan)
        q = np.where(q > mx, hi, np.where(q < -mx, -hi, q))
    y = q * np.float32(p["scale"]) if p["scale"] != 1.0 else q
    return np.where(np.isfinite(X), y, np.float32(np.nan)).astype(np.float32)


def _reference(node, args, in_types, out_t):
    return minifloat_round(real_view(args[0], in_types[0]), format_params(node))


def _export_onnx(ex, node, x):
    """Back to a QONNX ``FloatQuant`` node (inputs scale, exponent/mantissa widths, bias, max_val)."""
    p = format_params(node)
    base = node.output + "__ir"
    ins = [x[0]]
    for role, v in (("scale", p["scale"]), ("exponent_bitwidth", p["E"]), ("mantissa_bitwidth", p["M"]),
                    ("exponent_bias", p["bias"]), ("max_val", p["max"])):
        ins.append(ex.init(f"{node.name}_{role}", np.float32(v)))
    return ex.node("FloatQuant", ins, base, domain="qonnx.custom_op.general", rounding_mode="ROUND",
                   has_inf=int(p["has_inf"]), has_nan=int(p["has_nan"]), has_subnormal=1,
                   saturation=int(p["saturation"]))


FLOAT_QUANT = register(OpSpec(
    name="FloatQuant",
    summary="minifloat quantizer: scale * round_to_minifloat(x / scale) (float32 in and out)",
    infer=_rule, reference=_reference,
    attrs={"exponent_bits": None, "mantissa_bits": None, "exponent_bias": None, "scale": 1.0,
           "max_val": math.inf, "saturation": True, "has_inf": False, "has_nan": False, "rounding": "ROUND"},
    onnx_export=_export_onnx))
